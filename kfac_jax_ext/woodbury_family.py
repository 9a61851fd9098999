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

import dataclasses
import warnings

import jax
import jax.numpy as jnp

from kfac_jax_ext import checks
from kfac_jax_ext import distributed
from kfac_jax_ext import initial_arrays
from kfac_jax_ext import linalg
from kfac_jax_ext import plan as plan_lib
from kfac_jax_ext import relative_damping
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


def _gram_memory_check(plan, entries, blocks, capacity, conv_gram, dtype):
  """Raises before the refresh's transient arrays exceed free memory
  (``blocks``: ``_blocks``, with each layer's Gram size and positions)."""
  size = jnp.dtype(dtype).itemsize
  total = 0
  for kl, block in zip(plan.kronecker, blocks):   # a grouped or stacked
    n, t = block.gram_size, block.positions       # layer has G blocks
    one = capacity * capacity * 2
    if kl.layer.kind == "embedding":   # the lookups' Gram terms
      one += 2 * n * n * t * t + n * t * kl.d_g
    elif entries[kl.layer.kernel].per_example is not None:
      one += n * kl.d_a * kl.d_g + n * t * (kl.d_a + kl.d_g)
      if conv_gram == "exact" and woodbury.factored_conv_gram_is_cheaper(
          t, kl.d_a, kl.d_g):
        one += 2 * n * n * t * t
    total += kl.layer.groups * one
  woodbury.check_fits(total * size, "the TENGraD refresh",
                      "lower gram_batch.")


def _examples(num_examples: int, gram_batch: int, axis_name) -> tuple[int, int]:
  """``(n_d, n)``: examples each device contributes and the Gram's size.

  Every device contributes the first ``n_d = min(M_d, gram_batch // D)`` of
  its ``M_d`` examples (``num_examples``: a layer's, ``tengrad_plan.
  layer_examples``); ``n = D·n_d``. With ``gram_batch ≥ M`` that is the
  whole global batch (the single-device result); otherwise the Gram batch
  is the first ``n_d`` examples of each shard (on one device: the first
  ``gram_batch``). The scale is always ``F = UUᵀ/n``.
  """
  devices = distributed.num_devices(axis_name)
  n_local = min(num_examples, gram_batch // devices)
  if n_local < 1:
    raise ValueError(f"gram_batch={gram_batch} is smaller than the {devices} "
                     f"devices of axis {axis_name!r}: every device must "
                     "contribute at least one example.")
  return n_local, devices * n_local


def _blocks(plan, traced, state_blocks, gram_batch, axis_name, conv_gram,
            damping_scale="absolute"):
  """The ``woodbury.Woodbury`` block of every layer in the plan, each with
  the Gram examples of its own examples (``_examples``)."""
  out = []
  for kl in plan.kronecker:
    entry = state_blocks[kl.layer.kernel]
    n_local, n = _examples(tengrad_plan.layer_examples(kl.layer, traced),
                           gram_batch, axis_name)
    out.append(dataclasses.replace(tengrad_plan.woodbury_block(
        kl.layer, traced, entry.gram_inverse.shape[-1],
        getattr(entry, "per_example", 0) is None, conv_gram,
        examples=n_local, gram_size=n), damping_scale=damping_scale))
  return out


def _refresh(plan, blocks, traced, state, cb, lam, fallback, dtype,
             axis_name=None):
  """Replaces the stored blocks by the statistics batch's.

  With ``axis_name`` the tokens are gathered over the devices and each
  device builds and inverts the Grams of the layers it owns
  (``distributed.on_owners``; every device stores the gathered batch). A
  batch with non-finite statistics is skipped whole (counted in
  ``nonfinite_statistics``); a layer whose refreshed block is non-finite
  keeps its previous block (counted in ``failed_inverses``).
  """
  stats_ok = jnp.array(True)
  tokens = []
  for kl, block in zip(plan.kronecker, blocks):
    batch = jax.tree_util.tree_map(
        lambda x: distributed.gather_examples(x, axis_name),
        block.batch_statistics(cb.layers[kl.index],
                               tengrad_plan.layer_examples(kl.layer, traced),
                               dtype))
    stats_ok = stats_ok & linalg.all_finite(*jax.tree_util.tree_leaves(batch))
    tokens.append(batch)
  refresh = [lambda b=b, t=t: b.refresh(t, lam) for b, t in zip(blocks, tokens)]
  if axis_name is None:
    refreshed = [fn() for fn in refresh]
  else:   # the Gram inverses on their owners; the stored batch everywhere
    inverted = distributed.on_owners(
        [lambda fn=fn: (lambda d, ok: (d.gram_inverse, ok))(*fn())
         for fn in refresh], [b.refresh_cost() for b in blocks], axis_name)
    refreshed = [(fn()[0]._replace(gram_inverse=inverse), ok)
                 for fn, (inverse, ok) in zip(refresh, inverted)]
  batch_diags = diagonal.batch_diagonals(plan, traced, cb, fallback, dtype,
                                         axis_name)
  stats_ok = stats_ok & linalg.all_finite(*batch_diags.values())
  entries, diags = list(state.blocks), list(state.diagonals)
  failures = jnp.zeros([], jnp.int32)
  for kl, block, (data, ok) in zip(plan.kronecker, blocks, refreshed):
    old = entries[kl.layer.kernel]
    new = block.store(old, data, kl.a_side)
    take = stats_ok & ok
    entries[kl.layer.kernel] = jax.tree_util.tree_map(
        lambda x, y, take=take: jnp.where(take, x, y), new, old)
    failures = failures + (stats_ok & ~ok).astype(jnp.int32)
  for leaf, d in batch_diags.items():
    diags[leaf] = jnp.where(stats_ok, d, diags[leaf])
  health = state.health._replace(
      nonfinite_statistics=state.health.nonfinite_statistics + (
          ~stats_ok).astype(jnp.int32),
      failed_inverses=state.health.failed_inverses + failures)
  return tuple(entries), tuple(diags), health


def _precondition(plan, blocks, grads, entries, diags, lam, fallback,
                  damping_scale="absolute"):
  block_of = {kl.index: block for kl, block in zip(plan.kronecker, blocks)}

  def apply(kl, v):
    block = block_of[kl.index]
    return block.apply(block.load(entries[kl.layer.kernel], kl.a_side), v, lam)

  out = plan_lib.precondition_layers(plan, grads, lam.dtype, apply)
  return diagonal.precondition_leaves(plan, grads, diags, lam, fallback, out,
                                      damping_scale)


def tengrad_stepper(loss_fn, *, damping, gram_batch, conv_gram, damping_mode,
                    fisher, stats_every, inverse_every, ema_decay, fallback,
                    axis_name, has_aux, example_batch, damping_scale="absolute",
                    name="scale_by_tengrad"):
  """``(init_fn, update_fn)`` of ``scale_by_tengrad`` (same options, checked
  here); both take an optional ``share`` (a ``plan.Share``) that limits them
  to part of the model."""
  checks.check_options("tikhonov", fisher, fallback, stats_every,
                       inverse_every, 0.0, damping)
  _check_options(gram_batch, conv_gram, damping_mode, stats_every, inverse_every,
                 ema_decay)
  distributed.check_axis_name(axis_name, name)
  relative_damping.check(damping_scale, name)
  period = inverse_every

  def init_fn(params, share=None):
    dtype = linalg.factor_dtype()
    leaves = jax.tree_util.tree_leaves(params)
    shapes = [tuple(jnp.shape(x)) for x in leaves]
    lam0 = damping(0) if callable(damping) else damping
    if example_batch is not None:
      traced = tracing.trace_loss(loss_fn, params, example_batch, has_aux,
                                  axis_name)
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
    blocks = _blocks(plan, traced, state.blocks, gram_batch, axis_name,
                     conv_gram, damping_scale)
    _gram_memory_check(plan, state.blocks, blocks, gram_batch, conv_gram, dtype)

    def refresh(st):
      if curvature is not None:
        checks.check_curvature(traced, curvature)
        cb = curvature
      else:
        cb = statistics.statistics_pass(traced, params, batch, key, fisher,
                                        axis_name=axis_name)[2]
      return _refresh(plan, blocks, traced, st, cb, lam, fallback, dtype,
                      axis_name)

    entries, diags, health = schedule.maybe(
        period, state.count % period == 0, refresh,
        lambda st: (st.blocks, st.diagonals, st.health), state,
        None if due is None else due.statistics)
    out = _precondition(plan, blocks, grads, entries, diags, lam, fallback,
                        damping_scale)
    count = state.count + 1
    new_state = TengradState(count, count % period == 0, entries, diags, health)
    return jax.tree_util.tree_unflatten(treedef, out), new_state

  return init_fn, update_fn
