"""TENGraD's layout and plan: which layers get a Woodbury block, stored how.

A layer with one position per loss example stores ``Ā [N, d_a]`` and
``G [N, d_g]`` (factored); one with several positions per example (a conv,
a dense layer over the tokens of a per-sequence loss) stores its exact
per-example gradients ``[N, d_a, d_g]`` (explicit). Grouped convs and
kernels stacked over a scan get one block per group or slice
(``blocks/woodbury_batched.py``); kernels closed over by a scan body one
block over the steps; an embedding table stores its lookups' ids and
output gradients (``blocks/woodbury_embedding.py``), a tied kernel its
explicit per-example gradients summed over its uses
(``blocks/woodbury_tied.py``). A layer whose tokens are not grouped by
example (its output's leading axis is not the loss examples) has no
Woodbury block.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kfac_jax_ext import plan as plan_lib
from kfac_jax_ext import position_mixing
from kfac_jax_ext import weight_sharing as sharing_lib
from kfac_jax_ext.blocks import woodbury
from kfac_jax_ext.blocks import woodbury_batched
from kfac_jax_ext.blocks import woodbury_embedding
from kfac_jax_ext.blocks import woodbury_tied


def make_plan(traced, blocks) -> plan_lib.Plan:
  """K-FAC's plan, with 2-D (factored) leaves restricted to one location per
  example: their stored ``Ā``, ``G`` cannot hold sums over locations."""
  m = traced.num_examples
  fits = lambda layer, *args: block_fits(
      layer, *args, num_examples=layer_examples(layer, traced))
  plan = plan_lib.make_plan(traced, blocks, fits=fits,
                            unsupported=lambda layer: unsupported(layer, m, traced))
  keep, unfactored = [], list(plan.unfactored_layers)
  for kl in plan.kronecker:
    tokens = sharing_lib.tokens(kl.layer)
    m = layer_examples(kl.layer, traced)
    factored = getattr(blocks[kl.layer.kernel], "per_example", 0) is None
    if factored and tokens != m:
      unfactored.append((kl.index, kl.layer,
                         f"{tokens // m} locations per example on a 2-D kernel "
                         "laid out for one (pass example_batch= to lay it out "
                         "for per-example gradients)"))
    else:
      keep.append(kl)
  return dataclasses.replace(plan, kronecker=tuple(keep),
                             unfactored_layers=tuple(unfactored))


def layout_blocks(traced, capacity, dtype, damping, share=None):
  """Per leaf, a ``WoodburyBlock`` sized for the traced layer of which it is
  the kernel (None elsewhere): factored for one position per loss example,
  explicit per-example gradients otherwise. With ``share`` (a
  ``plan.Share``) only for the layers it owns."""
  blocks = [None] * len(traced.param_shapes)
  total = 0
  for layer in traced.layers:
    if unsupported(layer, traced.num_examples, traced) is not None or (
        layer.kind == "scale_and_shift") or (
        share is not None and not share.owns(layer)):
      continue
    positions = sharing_lib.tokens(layer) // layer_examples(layer, traced)
    side = plan_lib.natural_a_side(layer, len(traced.param_shapes[layer.kernel]))
    block = woodbury_block(layer, traced, capacity, positions == 1,
                           initial_damping=damping)
    blocks[layer.kernel] = block.init(side, dtype)
    total += sum(x.size for x in jax.tree_util.tree_leaves(blocks[layer.kernel]))
  woodbury.check_fits(total * jnp.dtype(dtype).itemsize,
                      f"scale_by_tengrad's state (gram_batch={capacity})",
                      "lower gram_batch.")
  return tuple(blocks)


def unsupported(layer, num_examples: int | None = None,
                traced=None) -> str | None:
  """Why the layer has no Woodbury block (None: it has one). With
  ``num_examples`` (M), a layer with several tokens per example must have
  them grouped by example: the examples lead its output. With ``traced``
  (the ``TracedLoss``), a layer with one token per example at several
  positions of an input must not reach other positions' losses
  (``position_mixing``), unless its sequences can be its examples
  (``position_mixing.sequence_examples``)."""
  reason = woodbury.Woodbury.unsupported(layer)
  if reason is not None or num_examples is None or (
      layer.kind == "scale_and_shift"):
    return reason
  if layer.kind == "tied":   # every use's tokens, by loss example
    reason = next((r for r in (_per_example_reason(use, num_examples, traced)
                               for use in layer.uses) if r), None)
  else:
    reason = _per_example_reason(layer, num_examples, traced)
  if reason is not None and traced is not None and (
      position_mixing.sequence_examples(traced, layer) is not None):
    return None
  return reason


def _per_example_reason(layer, num_examples: int, traced) -> str | None:
  """Why the loss examples cannot be the layer's examples (None: they can)."""
  k = sharing_lib.tokens(layer)
  if k % num_examples:
    return (f"its {k} tokens do not split evenly over the {num_examples} loss "
            "examples, and no loss example stays within one entry of its "
            "leading axis")
  if k != num_examples and not sharing_lib.examples_lead(layer, num_examples):
    return ("its tokens are not grouped by example (the loss examples are not "
            f"the leading axis of its output {layer.outputs_shape}), so its "
            "per-example gradients are unknown")
  if traced is not None and position_mixing.mixes_positions(traced, layer):
    return ("its output at one position reaches the losses at other positions "
            "(attention, a convolution or a recurrence after it, or positions "
            "not in the loss examples' order, e.g. a mixture of experts' "
            "capacity slots) while the loss has one example per position, so "
            "its per-example gradients are unknown (only the per-position "
            "approximation, not the exact block), nor can its sequences be "
            "the examples (a loss reaches several entries of its leading "
            "axis, or the layer is grouped)")
  return None


def layer_examples(layer, traced) -> int:
  """The examples TENGraD groups the layer's tokens by: the M loss examples,
  or the S sequences of a layer whose per-example gradients are unknown
  (``position_mixing.sequence_examples``; its block's Gram then holds
  ``u_s/√R``, R = M/S loss examples per sequence). A tied kernel: its
  uses' (all by loss example, or all by sequence)."""
  m = traced.num_examples
  uses = layer.uses if layer.kind == "tied" else (layer,)
  if layer.kind == "scale_and_shift" or all(
      _per_example_reason(use, m, traced) is None for use in uses):
    return m
  return position_mixing.sequence_examples(traced, layer) or m


def woodbury_kind(layer) -> type:
  """The Woodbury block class of a layer: per group or slice, for a table,
  or the plain one."""
  if layer.kind == "embedding":
    return woodbury_embedding.EmbeddingWoodbury
  if layer.kind == "tied":
    return woodbury_tied.TiedWoodbury
  if layer.groups > 1:
    return woodbury_batched.BatchedWoodbury
  return woodbury.Woodbury


def woodbury_block(layer, traced, capacity: int, factored: bool,
                   conv_gram: str = "exact", *, examples: int | None = None,
                   gram_size: int | None = None,
                   initial_damping=1.0) -> woodbury.Woodbury:
  """The layer's ``woodbury.Woodbury`` block: ``capacity`` = ``gram_batch``;
  ``examples`` (per device) and ``gram_size`` (all devices) default to
  ``min(capacity, E)``, E its examples (``layer_examples``)."""
  e = layer_examples(layer, traced)
  n = min(capacity, e)
  return woodbury_kind(layer)(
      layer, capacity=capacity, gram_size=n if gram_size is None else gram_size,
      examples=n if examples is None else examples,
      positions=sharing_lib.tokens(layer) // e,
      factored=factored, conv_gram=conv_gram, initial_damping=initial_damping,
      loss_examples=traced.num_examples // e)


def block_fits(layer, block, a_side, num_examples=None) -> bool:
  """Whether a leaf's ``WoodburyBlock`` can store the layer's tokens (A in
  ``a_side``); ``num_examples``: the loss examples M (default: the leading
  axis of the layer's output)."""
  if block is None:
    return False
  d_a, d_g = layer.d_a, layer.d_out
  if isinstance(block, woodbury_embedding.EmbeddingWoodburyBlock) or (
      layer.kind == "embedding"):   # laid out for the table exactly
    m = num_examples or max(layer.outputs_shape[0], 1)
    lookups = sharing_lib.tokens(layer) // m   # per example, as at init
    return (isinstance(block, woodbury_embedding.EmbeddingWoodburyBlock)
            and layer.kind == "embedding" and block.g.shape[-1] == d_g
            and block.ids.shape[-1] == lookups)
  lead = (layer.groups,) if layer.groups > 1 else ()
  if block.gram_inverse.shape[:-2] != lead:
    return False   # one block per group or slice, or a single one
  k = len(lead)
  if block.per_example is not None:
    return (a_side == "rows" and block.per_example.shape[k + 1] >= d_a
            and block.per_example.shape[k + 2] >= d_g)
  g_side = "cols" if a_side == "rows" else "rows"
  return (getattr(block, a_side).shape[k + 1] >= d_a
          and getattr(block, g_side).shape[k + 1] >= d_g)
