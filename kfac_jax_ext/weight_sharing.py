"""Weight sharing along token axes: K-FAC-expand and K-FAC-reduce.

A dense or conv layer applied at R positions of each example (tokens,
patches) has per-example gradient ``Σ_r ā_{n,r} ⊗ g_{n,r}``. Eschenhagen et
al. (NeurIPS 2023) give two Kronecker approximations of its Fisher block:

* **expand** (the positions act as extra examples; KFC for convs):
  ``A = Σ_{n,r} ā āᵀ / K``, ``G = Σ_{n,r} g gᵀ / M`` (K tokens, M loss
  examples) — right when every position reaches the loss on its own
  (a per-token language-model loss);
* **reduce** (the positions are summed or pooled before the loss):
  ``â_n = mean_r ā_{n,r}``, ``ĝ_n = Σ_r g_{n,r}``, ``A = Σ_n â âᵀ / M``,
  ``G = Σ_n ĝ ĝᵀ / M`` — exact for one example of a linear network whose
  shared axis is summed before the loss, and N rows instead of N·R.

``weight_sharing="auto"`` decides per layer from the traced shapes: a layer
with ``K = R·M`` tokens, ``R > 1``, whose leading output axis is the M loss
examples, has its shared axis reduced before the loss (the loss sees only M
terms), so it gets *reduce*; a layer with one token per loss example (a
per-token loss) gets *expand* (the two coincide there). Embeddings and tied
kernels always use *expand* (a mean of one-hot rows is not one-hot).

Example:
  >>> tx = kfe.kfac(loss_fn, 0.1, weight_sharing="auto", example_batch=batch)
"""

from __future__ import annotations

import math

import jax.numpy as jnp

MODES = ("expand", "reduce", "auto")


def check_mode(mode) -> None:
  if mode not in MODES:
    raise ValueError(f"weight_sharing must be one of {MODES}, got {mode!r}.")


def tokens(layer) -> int:
  """K: the number of positions (all examples) at which the layer applies."""
  # the output shape is one slice's (stacked) or the whole layer's
  per_block = layer.slice_groups if layer.stacked else layer.groups
  # the scan steps that share one block: all of them, or for a kernel
  # stacked over the outer scan, those of the scans nested in it
  slices = layer.groups // layer.slice_groups if layer.stacked else 1
  steps = max(layer.steps // slices, 1)
  return steps * math.prod(layer.outputs_shape) // (layer.d_out * per_block)


def examples_lead(layer, num_examples: int) -> bool:
  """Whether the examples are the leading token axis of the layer's output
  (so each example's tokens are contiguous in the canonical token order):
  its first output axis that is not a feature axis (a conv's batch axis; a
  grouped dense layer's first axis after its batch axes)."""
  token_axes = [d for d in range(len(layer.outputs_shape))
                if d not in layer.out_axes]
  return bool(token_axes) and layer.outputs_shape[token_axes[0]] == num_examples


def positions(layer, num_examples: int, mode: str) -> int:
  """R, the positions per example to reduce over; 1 means *expand*.

  Raises:
    ValueError: ``mode="reduce"`` on a layer whose tokens are not R
      contiguous positions per loss example.
  """
  if mode == "expand" or layer.kind not in ("dense", "conv2d"):
    return 1
  k = tokens(layer)
  if k == num_examples:
    return 1
  ok = k % num_examples == 0 and examples_lead(layer, num_examples)
  if not ok and mode == "reduce":
    raise ValueError(
        f"weight_sharing='reduce': layer {layer.name} has {k} tokens that are "
        f"not R contiguous positions of each of the {num_examples} loss "
        f"examples (output shape {layer.outputs_shape}); use 'auto' or "
        "'expand'.")
  return k // num_examples if ok else 1


def reduce_tokens(a, g, r: int):
  """``(â, ĝ)``: ``a`` averaged and ``g`` summed over each example's ``r``
  contiguous tokens (``[..., K, d] -> [..., K/r, d]``; a grouped conv's
  leading group axis is kept)."""
  if r == 1:
    return a, g
  split = lambda x: x.reshape(x.shape[:-2] + (x.shape[-2] // r, r, x.shape[-1]))
  return jnp.mean(split(a), axis=-2), jnp.sum(split(g), axis=-2)
