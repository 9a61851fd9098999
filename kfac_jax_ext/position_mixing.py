r"""Whether a layer's positions reach other loss examples (TENGraD's guard).

TENGraD's blocks are built from per-example gradients. For a layer applied
at several positions of each input (a sequence's tokens, an image's pixels)
under a loss with one example per position (a language model's mean over
tokens: ``softmax_cross_entropy(logits.reshape(-1, V), ...)``), the
statistics give, per position t, ``ā_t`` and ``g_t = Σ_k ∂ℓ_k/∂s_t`` (the
output gradient of the summed loss), and ``ā_t g_tᵀ`` is example t's
gradient only if position t's output reaches no loss but ``ℓ_t``: true of
a transformer's output head, false of every layer before an attention, a
convolution over the positions or a recurrence, whose output at t also
moves the losses at later positions. There ``ā_t g_tᵀ`` mixes several
examples' gradients, and its Gram is that of the per-position
("same location") approximation, not of the exact block
``(1/n) Σ_k ∇ℓ_k ∇ℓ_kᵀ``; nor can the per-example gradients be recovered
from the summed loss's statistics.

``mixes_positions(traced, layer)`` decides it once per trace, numerically:
a forward-mode pass of the per-example losses with a tangent on the
layer's output at its first position only, and one at its last, with fixed
pseudo-random parameters and inputs of the traced shapes (integer inputs
zero, so ids stay in range). The layer mixes if either moves more than one
loss example. A layer that does not mix gives exact zeros there (zero tangents
propagate exactly), so the test has no tolerance to tune. It errs towards
"mixes": a kernel concatenated with others before one product (a fused
query-key-value kernel) is tested on the whole product's output, and a
position that feeds two registered losses counts twice.

Example:
  >>> traced = tracing.trace_loss(loss_fn, params, batch)
  >>> [l.name for l in traced.layers if mixes_positions(traced, l)]
"""

from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp

from kfac_jax_ext import losses as losses_lib
from kfac_jax_ext import statistics
from kfac_jax_ext import weight_sharing as sharing_lib


def needs_check(layer, num_examples: int) -> bool:
  """A layer outside any scan with one token per loss example whose output
  has more than one position axis (so position t of one input can reach
  the loss at another position)."""
  if layer.steps or layer.kind not in ("dense", "conv2d", "embedding"):
    return False
  if sharing_lib.tokens(layer) != num_examples or num_examples < 2:
    return False
  feature = set(_feature_axes(layer, len(layer.outputs_shape)))
  positions = [n for d, n in enumerate(layer.outputs_shape)
               if d not in feature and n > 1]
  return len(positions) > 1


def _dummy(aval, key):
  if jnp.issubdtype(aval.dtype, jnp.floating):
    return (0.5 * jax.random.normal(key, aval.shape)).astype(aval.dtype)
  return jnp.zeros(aval.shape, aval.dtype)


def mixes_positions(traced, layer) -> bool:
  """Whether the layer's output at one position moves more than one loss
  example (see the module docstring); tried at its first and at its last
  position (a causal model mixes forward, an anti-causal one backward).
  Layers ``needs_check`` rejects return False.

  Args:
    traced: the ``tracing.TracedLoss`` the layer was found in.
    layer: one of ``traced.layers``.

  Returns:
    True when the output at the first or the last position reaches more
    than one loss example.
  """
  if not needs_check(layer, traced.num_examples):
    return False
  site = layer.probes[0]
  closed = traced.closed_jaxpr
  with jax.ensure_compile_time_eval():
    keys = jax.random.split(jax.random.PRNGKey(0), len(closed.in_avals))
    inputs = [_dummy(aval, k) for aval, k in zip(closed.in_avals, keys)]
    probes = statistics.probe_zeros(traced)
    shape = probes[site].shape
    feature = _feature_axes(layer, len(shape))
    for end in (0, -1):
      where = tuple(slice(None) if d in feature else end for d in range(len(shape)))
      tangent = {s: jnp.zeros_like(v) for s, v in probes.items()}
      tangent[site] = tangent[site].at[where].set(1.0)
      _, moved = jax.jvp(lambda pr: per_example_losses(traced, inputs, pr),
                         (probes,), (tangent,))
      if np.count_nonzero(np.asarray(moved)) > 1:
        return True
  return False


def per_example_losses(traced, inputs, probes):
  """The unweighted per-example losses of every registered loss,
  concatenated, from ``loss_fn``'s jaxpr at ``inputs`` (parameter leaves,
  then batch leaves) with ``probes`` added at the layer outputs."""
  actions, active = statistics.instrumentation(traced)
  closed = traced.closed_jaxpr
  _, captured = statistics.evaluate_jaxpr(closed.jaxpr, closed.consts,
                                         list(inputs), (), probes, actions,
                                         active)
  kinds = [traced.jaxprs[p].eqns[i].params["kind"] for p, i in traced.loss_sites]
  out = []
  for k, kind in enumerate(kinds):
    loss = losses_lib.RegisteredLoss(kind, *captured[("loss", k)])
    out.append(losses_lib.per_example_loss(kind, loss.predictions,
                                           loss.targets).reshape(-1))
  return jnp.concatenate(out)


def _feature_axes(layer, ndim: int) -> tuple:
  """The output's feature axes (all of their entries get the tangent)."""
  if layer.kind == "conv2d":
    return (layer.conv[4].out_spec[1],)
  if layer.kind == "embedding":
    return (ndim - 1,)
  return tuple(layer.out_axes)
