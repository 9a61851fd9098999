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
the gradients of the first and of the last per-example loss with respect
to every checked layer's output (two reverse-mode passes for all layers),
with fixed pseudo-random parameters and inputs of the traced shapes
(integer inputs zero, so ids stay in range). A layer mixes if either loss
depends on its output at more than one position (a causal model's last
position depends on all earlier ones, an anti-causal model's first on all
later ones), or depends on a position other than its own (the k-th in
the layer's token order: a loss whose examples are in another order than
the layer's positions, a mixture of experts' capacity slots). Where nothing
depends, the gradient is an exact zero (zero cotangents propagate exactly),
so the test has no tolerance to tune. It errs towards
"mixes": a kernel concatenated with others before one product (a fused
query-key-value kernel) is tested on the whole product's output.

Example:
  >>> traced = tracing.trace_loss(loss_fn, params, batch)
  >>> [l.name for l in traced.layers if mixes_positions(traced, l)]
"""

from __future__ import annotations

import hashlib

import numpy as np

import jax
import jax.numpy as jnp

from kfac_jax_ext import batch_free
from kfac_jax_ext import losses as losses_lib
from kfac_jax_ext import statistics
from kfac_jax_ext import weight_sharing as sharing_lib


def needs_check(layer, num_examples: int) -> bool:
  """A layer outside any scan with one token per loss example whose output
  has more than one position axis (so position t of one input can reach
  the loss at another position), or a grouped dense layer with one token
  per loss example (a mixture of experts' ``[E, C, F]``: its capacity slots
  need not hold the examples in order)."""
  if layer.steps or layer.kind not in ("dense", "conv2d", "embedding"):
    return False
  if sharing_lib.tokens(layer) != num_examples or num_examples < 2:
    return False
  if layer.kind == "dense" and layer.groups > 1 and not layer.stacked:
    return True
  feature = set(_feature_axes(layer, len(layer.outputs_shape)))
  positions = [n for d, n in enumerate(layer.outputs_shape)
               if d not in feature and n > 1]
  return len(positions) > 1


_CACHE: list = []   # (closed jaxpr, its text and input shapes, mixing sites)


def mixes_positions(traced, layer) -> bool:
  """Whether the layer's output at some position reaches the losses of more
  than one position (see the module docstring). Layers ``needs_check``
  rejects return False.

  Args:
    traced: the ``tracing.TracedLoss`` the layer was found in.
    layer: one of ``traced.layers`` (or a use of a tied one).

  Returns:
    True when the first or the last loss example depends on the layer's
    output at more than one position.
  """
  if not needs_check(layer, traced.num_examples):
    return False
  return (layer.probes[0], layer.kernel) in _mixing_sites(traced)


def _mixing_sites(traced) -> frozenset:
  """``(probe site, kernel)`` of the layers ``needs_check`` accepts whose
  output gradient (per example: ``batch_free``) of the first or of the last
  per-example loss is nonzero at more than one position: two reverse-mode
  passes for all layers of a trace, cached by the jaxpr's text (``init``,
  ``update`` and ``describe_layers`` trace the same program)."""
  closed = traced.closed_jaxpr
  for program, _, sites in _CACHE:     # the same trace: no text to build
    if program is closed:
      return sites
  key = (str(closed.jaxpr), tuple(closed.in_avals), _consts_key(closed.consts))
  for _, cached, sites in _CACHE:
    if cached == key:
      _CACHE.insert(0, (closed, key, sites))
      del _CACHE[8:]
      return sites
  checked = {}
  for layer in traced.layers:
    for one in (layer,) + tuple(layer.uses):
      if needs_check(one, traced.num_examples):
        checked[(one.probes[0], one.kernel)] = one   # two batch-free layers
                                                     # may meet the batch at one add
  mixing = set()
  if checked:
    with jax.ensure_compile_time_eval():
      inputs = batch_free.random_inputs(closed)
      losses, pullback = jax.vjp(
          lambda pr: per_example_losses(traced, inputs, pr),
          statistics.probe_zeros(traced))
      for k in (0, losses.shape[0] - 1):
        (grads,) = pullback(jnp.zeros_like(losses).at[k].set(1.0))
        for checked_key, one in checked.items():   # per example (batch_free)
          g = np.asarray(batch_free.example_gradients(
              one, [grads[s] for s in one.probes]))
          reached = np.any(g != 0, axis=_feature_axes(one, len(one.outputs_shape)))
          if np.any(np.flatnonzero(reached) != k):   # not (only) its own
            mixing.add(checked_key)
  sites = frozenset(mixing)
  _CACHE[:] = ([(closed, key, sites)] + _CACHE)[:8]
  return sites


def _consts_key(consts) -> tuple:
  """The values of a jaxpr's constants (its text does not show them: two
  losses that differ only in a closed-over routing or mask print alike)."""
  out = []
  for c in consts:
    try:
      x = np.asarray(c)
    except Exception:   # pylint: disable=broad-except  (an abstract value)
      out.append(id(c))
      continue
    out.append((x.shape, str(x.dtype), hashlib.sha1(x.tobytes()).hexdigest()))
  return tuple(out)


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
  if layer.kind == "embedding":
    return (ndim - 1,)
  return tuple(layer.out_axes)
