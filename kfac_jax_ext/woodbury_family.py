"""The Woodbury (TENGraD) shell: exact damped per-layer blocks, refreshed on
schedule and applied every step.

``tengrad_stepper(loss_fn, ...)`` returns ``(init_fn, update_fn)``: on a
refresh step the statistics batch's per-layer factors (``Ā``, ``G``, or the
per-example gradients of conv layers) are stored and the ``n×n`` Gram
``K/n + λI`` inverted; every step then applies the stored block,
``Δ = (1/λ)[∇ − U (K/n + λI)⁻¹ Uᵀ∇ / n]``, to the fresh gradient (§2.3
"reuse"). ``scale_by_tengrad`` wraps it as optax;
``scale_by_natural_gradient`` uses it for the layers it gives Woodbury
blocks. See ``blocks/woodbury.py`` for the layouts and products.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp

from kfac_jax_ext import checks
from kfac_jax_ext import distributed
from kfac_jax_ext import initial_arrays
from kfac_jax_ext import linalg
from kfac_jax_ext import plan as plan_lib
from kfac_jax_ext import schedule
from kfac_jax_ext import statistics
from kfac_jax_ext import tengrad_plan
from kfac_jax_ext import tracing
from kfac_jax_ext.blocks import diagonal
from kfac_jax_ext.blocks import woodbury
from kfac_jax_ext.state import Health, TengradState


def _check_options(gram_batch, conv_gram, damping_mode, stats_every,
                   inverse_every, ema_decay):
  if not isinstance(gram_batch, int) or isinstance(gram_batch, bool) or (
      gram_batch < 1):
    raise ValueError("gram_batch must be a positive Python int (it fixes the "
                     "state's shapes; under optax.inject_hyperparams list it in "
                     f"static_args), got {gram_batch!r}.")
  if conv_gram not in woodbury.CONV_GRAMS:
    raise ValueError(f"conv_gram must be one of {woodbury.CONV_GRAMS}, got "
                     f"{conv_gram!r}.")
  if damping_mode != "tikhonov":
    raise ValueError("TENGraD inverts the exact damped block (F + λI): "
                     f"damping_mode must be 'tikhonov', got {damping_mode!r}.")
  if isinstance(ema_decay, (int, float)) and ema_decay != 0.0:
    raise ValueError("TENGraD uses the exact block of one statistics batch (no "
                     f"running average): ema_decay must be 0.0, got {ema_decay!r}.")
  if isinstance(stats_every, int) and isinstance(inverse_every, int) and (
      stats_every not in (1, inverse_every)):
    raise ValueError("TENGraD stores a statistics batch and its Gram inverse "
                     "together every inverse_every updates: stats_every must be 1 "
                     f"or equal to inverse_every, got {stats_every} and "
                     f"{inverse_every}.")


def _gram_memory_check(plan, traced, blocks, n, capacity, conv_gram, dtype):
  """Raises before the refresh's transient arrays exceed free memory."""
  size = jnp.dtype(dtype).itemsize
  total = 0
  for kl in plan.kronecker:
    t = math.prod(kl.layer.outputs_shape) // kl.layer.d_out // traced.num_examples
    total += capacity * capacity * 2
    if blocks[kl.layer.kernel].per_example is not None:
      total += n * kl.d_a * kl.d_g + n * t * (kl.d_a + kl.d_g)
      if conv_gram == "exact" and woodbury.factored_conv_gram_is_cheaper(
          t, kl.d_a, kl.d_g):
        total += 2 * n * n * t * t
  woodbury.check_fits(total * size, "the TENGraD refresh",
                      "lower gram_batch.")


def _examples(traced, gram_batch: int, axis_name) -> tuple[int, int]:
  """``(n_d, n)``: examples each device contributes and the Gram's size.

  Every device contributes the first ``n_d = min(M_d, gram_batch // D)`` of
  its ``M_d`` examples; ``n = D·n_d``. With ``gram_batch ≥ M`` that is the
  whole global batch (the single-device result); otherwise the Gram batch
  is the first ``n_d`` examples of each shard (on one device: the first
  ``gram_batch``). The scale is always ``F = UUᵀ/n``.
  """
  devices = distributed.num_devices(axis_name)
  n_local = min(traced.num_examples, gram_batch // devices)
  if n_local < 1:
    raise ValueError(f"gram_batch={gram_batch} is smaller than the {devices} "
                     f"devices of axis {axis_name!r}: every device must "
                     "contribute at least one example.")
  return n_local, devices * n_local


def _layer_tokens(kl, traced, cb, n_local, dtype, axis_name):
  """The Gram batch's tokens ``ā [n, T, d_a]``, ``g [n, T, d_g]`` of a layer,
  gathered over the devices."""
  a, g = cb.layers[kl.index]
  a, g = woodbury.per_example_tokens(a.astype(dtype), g.astype(dtype),
                                     kl.has_bias, traced.num_examples, n_local)
  return (distributed.gather_examples(a, axis_name),
          distributed.gather_examples(g, axis_name))


def _gram(kl, a, g, block, conv_gram):
  """The layer's Gram ``K`` and the arrays it stores (``rows``/``cols`` or
  ``per_example``)."""
  if block.per_example is None:                      # factored layout
    a, g = a[:, 0], g[:, 0]
    slot_a = getattr(block, kl.a_side)
    slot_g = getattr(block, kl.g_side)
    stored = {kl.a_side: linalg.set_leading(jnp.zeros_like(slot_a), a),
              kl.g_side: linalg.set_leading(jnp.zeros_like(slot_g), g)}
    return (lambda: woodbury.dense_gram(a, g)), stored
  t = a.shape[1]
  if conv_gram == "spatial_sum":
    a, g = jnp.sum(a, axis=1, keepdims=True), jnp.sum(g, axis=1, keepdims=True)
  u = woodbury.per_example_gradients(a, g)
  stored = {"per_example": linalg.set_leading(jnp.zeros_like(block.per_example), u)}
  if conv_gram == "same_location":
    return (lambda: woodbury.conv_gram(a, g, "same_location")), stored
  if conv_gram == "exact" and woodbury.factored_conv_gram_is_cheaper(
      t, kl.d_a, kl.d_g):
    return (lambda: woodbury.conv_gram(a, g, "exact")), stored
  return (lambda: woodbury.explicit_gram(u)), stored


def _gram_cost(kl, traced, n, block) -> float:
  t = math.prod(kl.layer.outputs_shape) // kl.layer.d_out // traced.num_examples
  body = n * n * (kl.d_a + kl.d_g) if block.per_example is None else n * n * min(
      t * t * (kl.d_a + kl.d_g), kl.d_a * kl.d_g)
  return body + n ** 3


def _refresh(plan, traced, state, cb, n_local, lam, conv_gram, fallback, dtype,
             axis_name=None):
  """Replaces the stored blocks by the statistics batch's.

  With ``axis_name`` the tokens are gathered over the devices and each
  device builds and inverts the Grams of the layers it owns
  (``distributed.on_owners``). A batch with non-finite statistics is skipped
  whole (counted in ``nonfinite_statistics``); a layer whose refreshed block
  is non-finite keeps its previous block (counted in ``failed_inverses``).
  """
  stats_ok = jnp.array(True)
  prepared, jobs, costs = [], [], []
  for kl in plan.kronecker:
    block = state.blocks[kl.layer.kernel]
    a, g = _layer_tokens(kl, traced, cb, n_local, dtype, axis_name)
    stats_ok = stats_ok & linalg.all_finite(a, g)
    gram_fn, stored = _gram(kl, a, g, block, conv_gram)
    n, cap = a.shape[0], block.gram_inverse.shape[0]

    def job(gram_fn=gram_fn, n=n, cap=cap):
      full = linalg.set_leading(jnp.zeros((cap, cap), dtype), gram_fn())
      return woodbury.invert_gram(full, jnp.asarray(n, dtype), lam)

    jobs.append(job)
    costs.append(_gram_cost(kl, traced, n, block))
    prepared.append((kl, block, n, stored))
  inverted = distributed.on_owners(jobs, costs, axis_name)
  refreshed = []
  for (kl, block, n, stored), (inverse, inverse_ok) in zip(prepared, inverted):
    new = block._replace(gram_inverse=inverse, examples=jnp.asarray(n, dtype),
                         damping=lam, **stored)
    ok = inverse_ok & linalg.all_finite(*jax.tree_util.tree_leaves(new))
    refreshed.append((kl.layer.kernel, new, ok))
  batch_diags = diagonal.batch_diagonals(plan, traced, cb, fallback, dtype,
                                         axis_name)
  stats_ok = stats_ok & linalg.all_finite(*batch_diags.values())
  blocks, diags = list(state.blocks), list(state.diagonals)
  failures = jnp.zeros([], jnp.int32)
  for leaf, new, ok in refreshed:
    take = stats_ok & ok
    blocks[leaf] = jax.tree_util.tree_map(
        lambda x, y, take=take: jnp.where(take, x, y), new, blocks[leaf])
    failures = failures + (stats_ok & ~ok).astype(jnp.int32)
  for leaf, d in batch_diags.items():
    diags[leaf] = jnp.where(stats_ok, d, diags[leaf])
  health = state.health._replace(
      nonfinite_statistics=state.health.nonfinite_statistics + (
          ~stats_ok).astype(jnp.int32),
      failed_inverses=state.health.failed_inverses + failures)
  return tuple(blocks), tuple(diags), health


def _precondition(plan, grads, blocks, diags, lam, fallback):
  out = list(grads)
  for kl in plan.kronecker:
    layer = kl.layer
    kernel_grad = grads[layer.kernel]
    bias_grad = grads[layer.bias] if kl.has_bias else None
    b = blocks[layer.kernel]
    v = plan_lib.to_matrix(layer, kernel_grad, bias_grad).astype(lam.dtype)
    if b.per_example is None:
      a = getattr(b, kl.a_side)[:, :kl.d_a]
      g = getattr(b, kl.g_side)[:, :kl.d_g]
      delta = woodbury.apply_factored(v, a, g, b.gram_inverse, b.examples,
                                      b.damping)
    else:
      delta = woodbury.apply_explicit(v, b.per_example[:, :kl.d_a, :kl.d_g],
                                      b.gram_inverse, b.examples, b.damping)
    dk, db = plan_lib.from_matrix(layer, delta, kernel_grad.shape, kl.has_bias)
    out[layer.kernel] = dk.astype(kernel_grad.dtype)
    if kl.has_bias:
      out[layer.bias] = db.astype(bias_grad.dtype)
  return diagonal.precondition_leaves(plan, grads, diags, lam, fallback, out)


def tengrad_stepper(loss_fn, *, damping, gram_batch, conv_gram, damping_mode,
                    fisher, stats_every, inverse_every, ema_decay, fallback,
                    axis_name, has_aux, example_batch, name="scale_by_tengrad"):
  """``(init_fn, update_fn)`` of ``scale_by_tengrad`` (same options, checked
  here); both take an optional ``share`` (a ``plan.Share``) that limits them
  to part of the model."""
  checks.check_options("tikhonov", fisher, fallback, stats_every,
                       inverse_every, 0.0, damping)
  _check_options(gram_batch, conv_gram, damping_mode, stats_every, inverse_every,
                 ema_decay)
  distributed.check_axis_name(axis_name, name)
  period = inverse_every

  def init_fn(params, share=None):
    dtype = linalg.factor_dtype()
    leaves = jax.tree_util.tree_leaves(params)
    shapes = [tuple(jnp.shape(x)) for x in leaves]
    lam0 = damping(0) if callable(damping) else damping
    if example_batch is not None:
      traced = tracing.trace_loss(loss_fn, params, example_batch, has_aux)
      blocks = tengrad_plan.layout_blocks(traced, gram_batch, dtype, lam0, share)
    else:
      total = sum(woodbury.storage_elements(s, gram_batch) for s in shapes)
      woodbury.check_fits(total * jnp.dtype(dtype).itemsize,
                          f"{name}'s state (gram_batch={gram_batch})",
                          "lower gram_batch.")
      blocks = tuple(woodbury.init_block(s, gram_batch, dtype, lam0)
                     for s in shapes)
    diags = tuple(initial_arrays.zeros(s, dtype) for s in shapes)
    zero = lambda: jnp.zeros([], jnp.int32)
    return TengradState(zero(), jnp.array(True), blocks, diags,
                        Health(zero(), zero()))

  def update_fn(updates, state, params=None, *, batch=None, key=None,
                curvature=None, due=None, share=None, **extra_args):
    schedule.check_due(due, name)
    if due is not None and due.statistics != due.inverses:
      raise ValueError(f"{name} refreshes its statistics batch and its Woodbury "
                       f"inverses together: due must have statistics == "
                       f"inverses, got {due}.")
    checks.check_update_args(name, params, batch, curvature, fisher,
                                       key, due)
    traced = tracing.trace_loss(loss_fn, params, batch, has_aux)
    grads, treedef = jax.tree_util.tree_flatten(updates)
    checks.check_structure(traced, grads, treedef, state)
    plan = plan_lib.restrict(tengrad_plan.make_plan(traced, state.blocks), share)
    for _, layer, reason in plan.unfactored_layers:
      warnings.warn(f"{name}: layer {layer.name} ({layer.kind}) gets no "
                    f"Woodbury block ({reason}); it falls back to "
                    f"fallback={fallback!r}.", stacklevel=2)
    dtype = state.diagonals[0].dtype if state.diagonals else jnp.float32
    lam = jnp.asarray(schedule.value_at(damping, state.count,
                                        extra_args.get("damping")), dtype)
    n_local, n = _examples(traced, gram_batch, axis_name)
    _gram_memory_check(plan, traced, state.blocks, n, gram_batch, conv_gram,
                       dtype)

    def refresh(st):
      if curvature is not None:
        checks.check_curvature(traced, curvature)
        cb = curvature
      else:
        cb = statistics.statistics_pass(traced, params, batch, key, fisher,
                                        axis_name=axis_name)[2]
      return _refresh(plan, traced, st, cb, n_local, lam, conv_gram, fallback,
                      dtype, axis_name)

    blocks, diags, health = schedule.maybe(
        period, state.count % period == 0, refresh,
        lambda st: (st.blocks, st.diagonals, st.health), state,
        None if due is None else due.statistics)
    out = _precondition(plan, grads, blocks, diags, lam, fallback)
    count = state.count + 1
    new_state = TengradState(count, count % period == 0, blocks, diags, health)
    return jax.tree_util.tree_unflatten(treedef, out), new_state

  return init_fn, update_fn
