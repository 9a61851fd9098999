r"""Whether a layer's positions reach other loss examples, or other sequences'
(TENGraD's guard).

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
(integer and boolean inputs one, so ids stay in range and a padding mask
keeps every position) and pseudo-random perturbations of every layer's
output (equal ids would give equal keys and values, and an attention over
them has exactly zero derivatives in its queries and keys, hiding the
dependence). A layer mixes if either loss
depends on its output at more than one position (a causal model's last
position depends on all earlier ones, an anti-causal model's first on all
later ones), or depends on a position other than its own (the k-th in
the layer's token order: a loss whose examples are in another order than
the layer's positions, a mixture of experts' capacity slots). Where nothing
depends, the gradient is an exact zero (zero cotangents propagate exactly),
so the test has no tolerance to tune. It errs towards
"mixes": a kernel concatenated with others before one product (a fused
query-key-value kernel) is tested on the whole product's output.

``sequence_examples(traced, layer)``: where the loss examples cannot be a
layer's examples, each checked loss may still reach the layer's output in
one entry of its leading axis only (one sequence, one image); then the S
sequences are its examples (their gradients are exact in the statistics;
see the function). The check runs outside the caller's transformations,
with collectives as over one device (``_jax_internals.outside_traces``,
``one_device``); where it cannot run, every checked layer counts as mixing
(a warning says so).

Example:
  >>> traced = tracing.trace_loss(loss_fn, params, batch)
  >>> [l.name for l in traced.layers if mixes_positions(traced, l)]
  >>> [sequence_examples(traced, l) for l in traced.layers]   # S or None
"""

from __future__ import annotations

import warnings

import numpy as np

import jax
import jax.numpy as jnp

from kfac_jax_ext import _jax_internals as jint
from kfac_jax_ext import batch_free
from kfac_jax_ext import losses as losses_lib
from kfac_jax_ext import statistics
from kfac_jax_ext import weight_sharing as sharing_lib


def needs_check(layer, num_examples: int) -> bool:
  """A layer with one token per loss example whose output has more than one
  position axis, the scan steps sharing its kernel counted as one (so
  position t of one input can reach the loss at another position: an RNN
  cell's kernel under a per-step loss, a scanned stack's under a per-token
  one), or a grouped dense layer with one token per loss example (a
  mixture of experts' ``[E, C, F]``: its capacity slots need not hold the
  examples in order)."""
  if layer.kind not in ("dense", "conv2d", "embedding"):
    return False
  if sharing_lib.tokens(layer) != num_examples or num_examples < 2:
    return False
  if layer.kind == "dense" and layer.groups > 1 and not layer.stacked:
    return True
  feature = set(_feature_axes(layer, len(layer.outputs_shape)))
  positions = [n for d, n in enumerate(layer.outputs_shape)
               if d not in feature and n > 1]
  slices = layer.groups // layer.slice_groups if layer.stacked else 1
  if layer.steps // slices > 1:   # the steps that share one block
    positions.append(layer.steps // slices)
  return len(positions) > 1


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
  return _verdicts(traced).get((layer.probes[0], layer.kernel), (False,))[0]


def sequence_examples(traced, layer) -> int | None:
  r"""S when TENGraD may take the layer's S sequences as its examples: the
  layer's per-example gradients are unknown (its positions reach other
  positions' losses, or its tokens are not grouped by loss example), but
  each checked loss (the first and the last) reaches the layer's output in
  one entry of its leading token axis only (one sequence, one image), and
  that axis's extent S divides the M loss examples and the layer's tokens.
  A tied kernel: every use so, with one S, each loss in the same entry of
  all of them.

  Then the sequence's gradient ``u_s = Σ_t ā_st g_stᵀ`` (``g`` of the summed
  loss) is exact in the statistics, and with targets drawn independently
  per loss example ``E[u_s u_sᵀ] = Σ_{k∈s} E[∇ℓ_k ∇ℓ_kᵀ]`` (the cross terms
  vanish), so ``(1/(nR)) Σ_s u_s u_sᵀ`` (R = M/S loss examples per
  sequence) estimates the same Fisher as the per-example block, at rank n
  sequences; with ``fisher="empirical"`` it is the empirical Fisher of the
  sequences, not of the loss examples. None otherwise (a grouped layer
  other than a scanned stack's slices, a loss reaching several sequences).
  """
  m = traced.num_examples
  if layer.kind == "tied":
    uses = tuple(layer.uses)
  elif sequence_candidate(layer, m) is not None:
    uses = (layer,)
  else:
    return None
  sizes = {leading_extent(use, m) for use in uses}
  if len(sizes) != 1 or None in sizes:
    return None
  verdicts = _verdicts(traced)
  reached = [set(), set()]   # per checked loss, over the uses
  for use in uses:
    verdict = verdicts.get((use.probes[0], use.kernel))
    if verdict is None:
      return None
    for entries, new in zip(reached, verdict[1]):
      entries |= new
  return sizes.pop() if all(len(r) <= 1 for r in reached) else None


def sequence_candidate(layer, num_examples: int) -> int | None:
  """``leading_extent`` of a layer whose per-example grouping does not
  apply (``needs_check``, or tokens not split by loss example)."""
  s = leading_extent(layer, num_examples)
  if s is None:
    return None
  k, m = sharing_lib.tokens(layer), num_examples
  per_example = k == m or (k % m == 0 and sharing_lib.examples_lead(layer, m))
  return None if per_example and not needs_check(layer, m) else s


def leading_extent(layer, num_examples: int) -> int | None:
  """S, the extent of the layer's leading token axis (of one scan step's
  output), when S could be its examples: a dense, conv or embedding layer
  with one group (or one per scanned slice), ``S < M`` dividing the M loss
  examples and the layer's tokens."""
  if layer.kind not in ("dense", "conv2d", "embedding") or (
      layer.groups > 1 and not layer.stacked) or (
      layer.stacked and layer.slice_groups > 1):
    return None
  k, m = sharing_lib.tokens(layer), num_examples
  feature = set(_feature_axes(layer, len(layer.outputs_shape)))
  axes = [d for d in range(len(layer.outputs_shape)) if d not in feature]
  s = layer.outputs_shape[axes[0]] if axes else 0
  if not 1 <= s < m or m % s or k % s:
    return None
  return s


_CACHE: list = []   # (closed jaxpr, its text and input shapes, verdicts)


def _verdicts(traced) -> dict:
  """``{(probe site, kernel): (mixes, sequences)}`` for the layers
  ``needs_check`` or ``sequence_candidate`` accepts (or a use of a tied
  kernel one of whose uses it accepts), from the output gradient (per
  example: ``batch_free``) of the first and of the last per-example loss:
  ``mixes`` when one is nonzero at a position other than the loss's own;
  ``sequences``, per loss, the entries of the output's leading token axis
  where it is nonzero. Two reverse-mode passes for all layers of a trace,
  cached by the jaxpr's text (``init``, ``update`` and ``describe_layers``
  trace the same program)."""
  closed = traced.closed_jaxpr
  for program, _, verdicts in _CACHE:     # the same trace: no text to build
    if program is closed:
      return verdicts
  key = (str(closed.jaxpr), tuple(closed.in_avals),
         tuple(batch_free.const_key(c) for c in closed.consts))
  for _, cached, verdicts in _CACHE:
    if cached == key:
      _CACHE.insert(0, (closed, key, verdicts))
      del _CACHE[8:]
      return verdicts
  m = traced.num_examples
  checked = {}
  for layer in traced.layers:
    uses = (layer,) + tuple(layer.uses)
    wanted = [needs_check(one, m) or sequence_candidate(one, m) is not None
              for one in uses]
    for one, want in zip(uses, wanted):
      if want or (layer.uses and any(wanted)):   # a tied kernel: every use
        checked[(one.probes[0], one.kernel)] = one   # two batch-free layers
                                                     # may meet the batch at one add
  try:
    verdicts = jint.outside_traces(lambda: _check(traced, checked))
  except Exception as e:   # pylint: disable=broad-except  (cannot evaluate)
    warnings.warn(f"kfac_jax_ext: the check of which losses the layers' "
                  f"positions reach could not run ({type(e).__name__}: {e}); "
                  "TENGraD treats every checked layer as mixing examples and "
                  "sequences (no Woodbury block).", stacklevel=2)
    verdicts = {k: (True, (frozenset({0, 1}),)) for k in checked}
  _CACHE[:] = ([(closed, key, verdicts)] + _CACHE)[:8]
  return verdicts


def _check(traced, checked) -> dict:
  """``_verdicts`` of the ``checked`` layers (``{key: layer}``)."""
  mixing, sequences = set(), {key: [] for key in checked}
  if checked:
    with jax.ensure_compile_time_eval(), jint.one_device():
      losses, pullback = jax.vjp(
          # integers and booleans one: ids stay in range of any table of
          # two rows or more, a padding mask (ids != 0) keeps every position
          lambda pr: per_example_losses(traced, batch_free.random_inputs(
              traced.closed_jaxpr, integers=1), pr), _random_probes(traced))
      for k in (0, losses.shape[0] - 1):
        (grads,) = pullback(jnp.zeros_like(losses).at[k].set(1.0))
        for checked_key, one in checked.items():   # per example (batch_free)
          g = np.asarray(batch_free.example_gradients(
              one, [grads[s] for s in one.probes]))
          steps = g.ndim - len(one.outputs_shape)   # scan steps lead
          reached = np.any(g != 0, axis=tuple(
              steps + a for a in _feature_axes(one, len(one.outputs_shape))))
          if reached.ndim > steps:   # the leading token axis first, then
            reached = np.moveaxis(reached, steps, 0)   # the steps
          reached = np.atleast_1d(reached)
          if np.any(np.flatnonzero(reached) != k):   # not (only) its own
            mixing.add(checked_key)
          lead = reached.reshape(reached.shape[:1] + (-1,)).any(axis=1)
          sequences[checked_key].append(frozenset(np.flatnonzero(lead).tolist()))
  return {k: (k in mixing, tuple(sequences[k])) for k in checked}


def _random_probes(traced) -> dict:
  """Probes ``0.1·N(0, 1)`` rather than zeros: every layer's output then
  differs between positions, so that identical inputs (equal ids) cannot
  hide a dependence (an attention over equal keys and values has exactly
  zero derivatives with respect to its queries and keys)."""
  rng = np.random.default_rng(2)
  return {site: jnp.asarray(0.1 * rng.standard_normal(z.shape), z.dtype)
          for site, z in statistics.probe_zeros(traced).items()}


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
