"""The optax shell shared by the Kronecker-factored methods (K-FAC, TKFAC).

``scale_by_kronecker(loss_fn, variant, ...)`` is a
``GradientTransformationExtraArgs``: it gets per-layer statistics from the one
statistics pass, keeps running averages in per-leaf slots, refreshes damped
inverses on schedule and applies them. A ``KroneckerVariant`` says what the
batch statistics are, which Kronecker factors they define and how each layer
is damped; everything else (periods, EMA, failure handling, dtypes, optax
contract) is shared.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kfac_jax_ext import checks
from kfac_jax_ext import distributed
from kfac_jax_ext import eager
from kfac_jax_ext import initial_arrays
from kfac_jax_ext import linalg
from kfac_jax_ext import plan as plan_lib
from kfac_jax_ext import relative_damping
from kfac_jax_ext import schedule
from kfac_jax_ext import statistics
from kfac_jax_ext import stats_subsample
from kfac_jax_ext.state import Health, KfacState
from kfac_jax_ext import tracing
from kfac_jax_ext import weight_sharing as sharing_lib
from kfac_jax_ext.blocks import diagonal
from kfac_jax_ext.blocks import kronecker
from kfac_jax_ext.blocks import table


class KroneckerVariant(NamedTuple):
  """What distinguishes a Kronecker-factored method.

  Attributes:
    batch_statistics: ``(block, stats, num_examples, dtype) ->
      (side_a, side_g, trace)``: from the layer's statistics (``(a, g)``; a
      tied kernel: its uses' ``(a, g)``) and its ``CurvatureBlock``, the
      matrices kept (EMA) in the A- and G-slots and a scalar kept per layer
      (K-FAC: unused zero); ``num_examples`` is M, a static int.
    effective_factors: ``(side_a, side_g, trace) -> (A, G)``; the block is
      ``A ⊗ G``.
    layer_damping: ``(damping, layer, side_a, side_g, trace) -> λ_l``.
    unsupported: ``layer -> reason or None`` for layer kinds the method
      has no block for (they take the fallback).
  """
  batch_statistics: Callable
  effective_factors: Callable
  layer_damping: Callable
  unsupported: Callable = lambda layer: None
  damping_scale: str = "absolute"   # units of λ: relative_damping.apply sets it
  product_dtype: Any = None         # GEMM inputs (blocks/kronecker.matmul)


class StepContext(NamedTuple):
  """What a Kronecker step leaves for a method built on top (two-level):
  the trace, the plan, ``precondition(leaves) -> leaves`` (``M⁻¹`` with the
  step's refreshed state) and the damping λ of the step."""
  traced: Any
  plan: Any
  precondition: Callable
  damping: jax.Array


def kronecker_stepper(
    loss_fn: Callable[..., Any],
    variant: KroneckerVariant,
    *,
    damping: float | Callable[[jax.Array], jax.Array] = 1e-3,
    damping_mode: str = "factored",
    fisher: str = "sampled",
    stats_every: int = 1,
    inverse_every: int = 5,
    ema_decay: float = 0.95,
    fallback: str = "identity",
    max_factor_dim: int = 4096,
    axis_name: str | None = None,
    has_aux: bool = False,
    example_batch: Any = None,
    weight_sharing: str = "expand",
    stats_batch: int | None = None,
    damping_scale: str = "absolute",
    product_dtype: Any = None,
    name: str = "scale_by_kronecker",
) -> optax.GradientTransformationExtraArgs:
  """``(init_fn, step_fn)`` of the Kronecker family (options: ``scale_by_kfac``).

  ``step_fn(updates, state, params, *, batch, key, curvature, due,
  damping_override, share)`` returns
  ``(preconditioned updates, new state, StepContext)``; ``scale_by_kronecker``
  wraps it as an optax transformation, ``scale_by_two_level_kfac`` builds its
  coarse correction on the context. ``share`` (a ``plan.Share``, also an
  argument of ``init_fn``) limits the stepper to part of the model.
  """
  checks.check_options(damping_mode, fisher, fallback, stats_every,
                       inverse_every, ema_decay, damping, weight_sharing)
  distributed.check_axis_name(axis_name, name)
  stats_subsample.check_examples(stats_batch, "stats_batch", name)
  variant = relative_damping.apply(variant, damping_scale, name)._replace(
      product_dtype=checks.check_product_dtype(product_dtype, name))

  def init_fn(params, share=None):
    dtype = linalg.factor_dtype()
    leaves = jax.tree_util.tree_leaves(params)
    if example_batch is not None:
      traced = tracing.trace_loss(loss_fn, params, example_batch, has_aux,
                                  axis_name)
      unsupported = variant.unsupported if share is None else (
          lambda layer: variant.unsupported(layer) if share.owns(layer)
          else "another transform's layer")
      factors, inverses, traces = layout_entries(traced, dtype, damping_mode,
                                                 max_factor_dim, unsupported)
    else:
      factors, inverses, traces = guessed_entries(leaves, dtype, damping_mode,
                                                  max_factor_dim)
    diags = tuple(initial_arrays.zeros(jnp.shape(leaf), dtype) for leaf in leaves)
    zero = lambda: jnp.zeros([], jnp.int32)  # distinct buffers: state is donatable
    return KfacState(zero(), zero(), jnp.array(True), factors, traces, inverses,
                     diags, Health(zero(), zero()))

  def step_fn(updates, state, params=None, *, batch=None, key=None,
              curvature=None, due=None, damping_override=None, share=None):
    schedule.check_due(due, name)
    checks.check_update_args(name, params, batch, curvature, fisher, key, due)
    traced = tracing.trace_loss(loss_fn, params, batch, has_aux)
    grads, treedef = jax.tree_util.tree_flatten(updates)
    checks.check_structure(traced, grads, treedef, state)
    plan = plan_lib.restrict(plan_lib.make_plan(
        traced, state.factors, unsupported=variant.unsupported), share)
    checks.warn_unfactored(name, plan, fallback, traced)
    lam = schedule.value_at(damping, state.count, damping_override)
    dtype = state.diagonals[0].dtype if state.diagonals else jnp.float32
    lam = jnp.asarray(lam, dtype)

    def new_statistics(st):
      s_batch, s_traced = stats_subsample.statistics_inputs(
          loss_fn, params, batch, traced, stats_batch, has_aux)
      if curvature is not None:
        batch_stats = curvature
        checks.check_curvature(s_traced, batch_stats)
        if s_traced is not traced:
          stats_subsample.check_curvature_size(
              curvature, s_traced, params, s_batch, statistics.statistics_pass,
              name)
      else:
        batch_stats = statistics.statistics_pass(s_traced, params, s_batch, key,
                                                 fisher, axis_name=axis_name)[2]
      return _accumulate(plan, s_traced, st, batch_stats, variant, ema_decay,
                         fallback, dtype, axis_name, weight_sharing)

    def old_statistics(st):
      return (st.factors, st.traces, st.diagonals, st.statistics_count,
              st.health)

    factors, traces, diags, stats_count, health = schedule.maybe(
        stats_every, state.curvature_due, new_statistics, old_statistics, state,
        None if due is None else due.statistics)

    def refresh(inverses):
      return _refresh(plan, factors, traces, inverses, lam, variant, damping_mode,
                      axis_name)

    inverses, failures = schedule.maybe(
        inverse_every, state.count % inverse_every == 0, refresh,
        lambda inv: (inv, jnp.zeros([], jnp.int32)), state.inverses,
        None if due is None else due.inverses)
    health = health._replace(failed_inverses=health.failed_inverses + failures)
    precondition = lambda leaves: _precondition(
        plan, traced, leaves, factors, traces, inverses, diags, lam, variant,
        damping_mode, fallback)
    count = state.count + 1
    new_state = KfacState(count, stats_count, count % stats_every == 0, factors,
                          traces, inverses, diags, health)
    out = jax.tree_util.tree_unflatten(treedef, precondition(grads))
    return out, new_state, StepContext(traced, plan, precondition, lam)

  return init_fn, step_fn


def layout_entries(traced, dtype, mode: str, max_factor_dim: int,
                   unsupported=lambda layer: None):
  """Per leaf ``(factors, inverses, traces)`` laid out exactly from the traced
  layers: each kernel of a layer the variant supports gets its layer's
  factor shapes (``plan.factor_shapes``); every other leaf None."""
  n = len(traced.param_shapes)
  factors, inverses, traces = [None] * n, [None] * n, [None] * n
  for layer in traced.layers:
    if layer.kind == "scale_and_shift" or unsupported(layer) is not None:
      continue
    if plan_lib.largest_dense_dim(layer) > int(max_factor_dim):
      continue
    block = table.kronecker_block(layer, mode)
    side = plan_lib.natural_a_side(layer, len(traced.param_shapes[layer.kernel]))
    factors[layer.kernel], inverses[layer.kernel] = block.init(side, dtype)
    a_shape = block.factor_shapes()[0]
    traces[layer.kernel] = initial_arrays.zeros(a_shape[:-2], dtype)  # per group
  return tuple(factors), tuple(inverses), tuple(traces)


def guessed_entries(leaves, dtype, mode: str, max_factor_dim: int):
  """Per leaf ``(factors, inverses, traces)`` from the leaf shapes alone:
  padded slots for every ≥2-D leaf (``kronecker.slot_sizes``)."""
  factors, inverses, traces = [], [], []
  for leaf in leaves:
    shape = tuple(jnp.shape(leaf))
    fits = len(shape) >= 2 and max(kronecker.slot_sizes(shape)) <= int(
        max_factor_dim)
    factors.append(kronecker.init_factors(shape, dtype) if fits else None)
    inverses.append(kronecker.init_inverse(shape, dtype, mode) if fits else None)
    traces.append(initial_arrays.zeros([], dtype) if fits else None)
  return tuple(factors), tuple(inverses), tuple(traces)


def scale_by_kronecker(loss_fn: Callable[..., Any], variant: KroneckerVariant,
                       **options) -> optax.GradientTransformationExtraArgs:
  """The shared Kronecker-family transform (see ``scale_by_kfac`` for options).

  Without ``curvature=`` a statistics step runs its own pass inside
  ``lax.cond``; pass the statistics of ``kfe.value_and_grad`` (the fused
  path) to share the forward and keep convolutions out of the conditional.
  With ``due=kfe.Due(...)`` (static) no conditional is compiled at all
  (``kfac_jax_ext.schedule``).

  Args:
    loss_fn: the user's loss (calls a ``kfe`` loss helper).
    variant: the method's ``KroneckerVariant``.
    **options: as documented by ``scale_by_kfac`` (and ``name``, the public
      name used in error messages).

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  init_fn, step_fn = kronecker_stepper(loss_fn, variant, **options)

  def update_fn(updates, state, params=None, *, batch=None, key=None,
                curvature=None, due=None, **extra_args):
    out, new_state, _ = step_fn(updates, state, params, batch=batch, key=key,
                                curvature=curvature, due=due,
                                damping_override=extra_args.get("damping"))
    return out, new_state

  return optax.GradientTransformationExtraArgs(
      init_fn, eager.compile_when_eager(update_fn))


def layer_statistics(cb, kl, num_examples: int, weight_sharing: str = "expand"):
  """A layer's statistics in the ``CurvatureBatch``: ``(a, g)``, reduced over
  each example's positions where ``weight_sharing`` says *reduce* (a tied
  kernel: its uses' ``(a, g)``, as they are)."""
  if kl.layer.kind == "tied":
    return cb.layers[kl.index]
  a, g = cb.layers[kl.index]
  r = sharing_lib.positions(kl.layer, num_examples, weight_sharing)
  return sharing_lib.reduce_tokens(a, g, r)


def _ema(old, new, eps):
  return eps * old + (1.0 - eps) * new


def _accumulate(plan, traced, st, cb, variant, ema_decay, fallback, dtype,
                axis_name=None, weight_sharing="expand"):
  """EMA of the batch statistics into the slots; skipped if non-finite.
  With ``axis_name`` the batch statistics are averaged over the devices
  first (all of them are means over examples)."""
  k = (st.statistics_count + 1).astype(dtype)
  eps = jnp.minimum(1.0 - 1.0 / k, ema_decay)
  factors, traces, diags = list(st.factors), list(st.traces), list(st.diagonals)
  layer_stats = distributed.mean(
      [variant.batch_statistics(
          table.kronecker_block(kl.layer, product_dtype=variant.product_dtype),
          layer_statistics(cb, kl, traced.num_examples, weight_sharing),
          traced.num_examples, dtype)
       for kl in plan.kronecker], axis_name)
  batch_values = []
  for kl, (fa, fg, tr) in zip(plan.kronecker, layer_stats):
    batch_values += [fa, fg, tr]
    traces[kl.layer.kernel] = _ema(traces[kl.layer.kernel], tr, eps)
    slots = factors[kl.layer.kernel]
    sa, sg = getattr(slots, kl.a_side), getattr(slots, kl.g_side)
    sa = linalg.set_leading(sa, _ema(linalg.leading(sa, fa.shape), fa, eps))
    sg = linalg.set_leading(sg, _ema(linalg.leading(sg, fg.shape), fg, eps))
    factors[kl.layer.kernel] = slots._replace(**{kl.a_side: sa, kl.g_side: sg})
  for leaf, d in diagonal.batch_diagonals(plan, traced, cb, fallback,
                                          dtype, axis_name).items():
    batch_values.append(d)
    diags[leaf] = _ema(diags[leaf], d, eps)
  ok = linalg.all_finite(*batch_values)
  keep = lambda new, old: jax.tree_util.tree_map(
      lambda n, o: jnp.where(ok, n, o), new, old)
  health = st.health._replace(
      nonfinite_statistics=st.health.nonfinite_statistics + (~ok).astype(jnp.int32))
  return (keep(tuple(factors), st.factors), keep(tuple(traces), st.traces),
          keep(tuple(diags), st.diagonals),
          st.statistics_count + ok.astype(jnp.int32), health)


def layer_factors(kl, slots, trace, variant, lam):
  """The layer's effective ``(A, G)`` and its damping λ_l (grouped convs:
  per group, λ_l of shape ``[groups]``)."""
  a_shape, g_shape = plan_lib.factor_shapes(kl.layer)
  side_a = linalg.leading(getattr(slots, kl.a_side), a_shape)
  side_g = linalg.leading(getattr(slots, kl.g_side), g_shape)

  def one(side_a, side_g, trace):
    a, g = variant.effective_factors(side_a, side_g, trace)
    return a, g, jnp.asarray(variant.layer_damping(lam, kl.layer, side_a,
                                                   side_g, trace), a.dtype)

  return jax.vmap(one)(side_a, side_g, trace) if kl.layer.groups > 1 else one(
      side_a, side_g, trace)


def refresh_costs(plan) -> list:
  """Cost of each Kronecker layer's refresh (its block's ``refresh_cost``),
  for the assignment of blocks to devices."""
  return [table.kronecker_block(kl.layer).refresh_cost()
          for kl in plan.kronecker]


def _refresh(plan, factors, traces, inverses, lam, variant, mode,
             axis_name=None):
  """New inverse data of every Kronecker layer; with ``axis_name`` each
  device decomposes only the layers it owns (``distributed.on_owners``)."""
  inverses = list(inverses)
  failures = jnp.zeros([], jnp.int32)

  def layer_refresh(kl):
    fa, fg, lam_l = layer_factors(kl, factors[kl.layer.kernel],
                                   traces[kl.layer.kernel], variant, lam)
    return table.kronecker_block(kl.layer, mode).refresh((fa, fg), lam_l)

  refreshed = distributed.on_owners(
      [lambda kl=kl: layer_refresh(kl) for kl in plan.kronecker],
      refresh_costs(plan), axis_name)
  for kl, ((ia, ig, va, vg), ok) in zip(plan.kronecker, refreshed):
    old = inverses[kl.layer.kernel]
    # On failure keep the previous inverse: select on the refreshed block only.
    keep = lambda new, prev: jnp.where(ok, new, prev)
    new = {}
    for side, value in ((kl.a_side, ia), (kl.g_side, ig)):
      slot = getattr(old, side)
      new[side] = linalg.set_leading(slot, keep(value, linalg.leading(
          slot, value.shape)))
    if mode == "tikhonov":
      for side, vals in ((kl.a_side, va), (kl.g_side, vg)):
        prev = getattr(old, side + "_vals")
        new[side + "_vals"] = linalg.set_leading(prev, keep(vals, linalg.leading(
            prev, vals.shape)))
    inverses[kl.layer.kernel] = old._replace(**new)
    failures = failures + (~ok).astype(jnp.int32)
  return tuple(inverses), failures


def _precondition(plan, traced, grads, factors, traces, inverses, diags, lam,
                  variant, mode, fallback):
  def apply(kl, v):
    layer = kl.layer
    inv = inverses[layer.kernel]
    a_shape, g_shape = plan_lib.factor_shapes(layer)
    ia = linalg.leading(getattr(inv, kl.a_side), a_shape)
    ig = linalg.leading(getattr(inv, kl.g_side), g_shape)
    va = vg = None
    lam_l = lam
    if mode == "tikhonov":  # the damping is applied here, at today's λ
      va = linalg.leading(getattr(inv, kl.a_side + "_vals"), a_shape[:-1] or a_shape)
      vg = linalg.leading(getattr(inv, kl.g_side + "_vals"), g_shape[:-1])
      lam_l = layer_factors(kl, factors[layer.kernel], traces[layer.kernel],
                             variant, lam)[2]
    return table.kronecker_block(layer, mode, variant.product_dtype).apply(
        kronecker.KroneckerInverseData(ia, ig, va, vg), v, lam_l)

  out = plan_lib.precondition_layers(plan, grads, lam.dtype, apply)
  return diagonal.precondition_leaves(plan, grads, diags, lam, fallback, out, variant.damping_scale)
