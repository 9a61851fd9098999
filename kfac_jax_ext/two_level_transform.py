"""Two-level K-FAC as optax: a K-FAC/TKFAC fine level plus a coarse correction.

See ``coarse.py`` for the math and ``coarse_level.py`` for its per-layer
pieces. The fine level is the Kronecker-family step (same state, schedule and
options); this module keeps the running coarse statistics, refreshes
``(F_c)⁻¹`` with the fine inverses (or every step) and combines.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from kfac_jax_ext import checks
from kfac_jax_ext import coarse
from kfac_jax_ext import coarse_level as level
from kfac_jax_ext import coarse_model
from kfac_jax_ext import coarse_model_bases
from kfac_jax_ext import coarse_refresh
from kfac_jax_ext import coarse_tokens
from kfac_jax_ext import curvature_products
from kfac_jax_ext import distributed
from kfac_jax_ext import eager
from kfac_jax_ext import kronecker_family
from kfac_jax_ext import kronecker_variants
from kfac_jax_ext import linalg
from kfac_jax_ext import relative_damping
from kfac_jax_ext import schedule
from kfac_jax_ext import statistics
from kfac_jax_ext import tracing
from kfac_jax_ext import two_level_state
from kfac_jax_ext.two_level_state import TwoLevelState

MAX_COARSE = 4096


def scale_by_two_level_kfac(
    loss_fn: Callable[..., Any],
    *,
    base: str = "kfac",
    coarse_space: str | None = "nicolaides",
    coarse_matrix: str | None = None,
    combine: str = "additive",
    omega: tuple = (1.0, 1.0),
    coarse_damping: str = "consistent",
    fisher_products: str = "statistics",
    fine_scale: str = "model",
    coarse_batch: int | None = None,
    coarse_statistics: str = "batch",
    spectral_iterations: int | None = None,
    residual_refresh: str = "step",
    scale_batch: int | str | None = "coarse_batch",
    model_refresh: str = "statistics",
    **options,
) -> optax.GradientTransformationExtraArgs:
  r"""Two-level K-FAC: the base preconditioner plus a coarse correction.

  With ``M⁻¹`` the base (K-FAC or TKFAC) block-diagonal preconditioner,
  ``R`` the coarse space, ``F_c = R F_λ Rᵀ`` and ``Q = Rᵀ F_c⁻¹ R``:
  additive ``ω₁M⁻¹∇ + ω₂Q∇`` (Tselepidis et al. 2020), multiplicative
  ``M⁻¹∇ + Q(∇ − F_λM⁻¹∇)`` (Galerkin-optimal; Koroko et al. 2023's
  analysis) or balanced ``(I − QF_λ)M⁻¹(I − F_λQ)∇ + Q∇``. ``F`` is the
  Fisher of the step's batch (``fisher_products``).

  Args:
    loss_fn: ``loss_fn(params, batch)`` using a ``kfe`` loss helper.
    base: ``"kfac"`` (default) or ``"tkfac"``.
    coarse_space: ``"nicolaides"`` (one all-ones vector per layer; default),
      ``"spectral"`` (``q_A⊗q_G`` of the smallest eigenvalues, refreshed with
      the inverses), ``"parameters"`` (``R = I``: the exact damped natural
      gradient on the layers; small models), Koroko et al.'s
      ``"krylov_nicolaides"`` (``{1, M_l⁻¹1}``, fixed between refreshes;
      rank one with factored damping: ``coarse_krylov``), their
      per-step spaces from the residual ``res = ∇ − F_λM⁻¹∇`` (one
      Fisher-vector product per step; per statistics step with
      ``residual_refresh="statistics"``): ``"residual"`` (``M_l⁻¹res_l``),
      ``"krylov_residual"`` (``{res_l, M_l⁻¹res_l}``), or None (the base).
    coarse_matrix: with ``fisher_products="statistics"``: ``"kronecker"``
      (Tselepidis: ``F_c[i,j] = (r_aᵀA_ij r_a)(r_gᵀG_ij r_g)`` from per-token
      projections; the default for the additive combination with Nicolaides
      or spectral) or ``"exact"`` (Koroko: ``(1/M) Σ_n c_n c_nᵀ``,
      ``c_{n,i} = r_iᵀu_{n,i}``; the default otherwise, so that the
      multiplicative and balanced ``F_c`` is ``R F_λ Rᵀ`` of their products).
      Additive with a fixed space: running averages on the factors' schedule,
      inverted with the fine inverses; otherwise the step's batch's ``F_c``,
      inverted every step (``S×S``): Galerkin orthogonality at every step.
    combine: ``"additive"`` (default), ``"multiplicative"`` or ``"balanced"``.
    omega: ``(ω₁, ω₂)`` of the additive combination.
    coarse_damping: ``"consistent"`` (``λRRᵀ``, i.e. ``λ·n_i`` for
      Nicolaides, so that ``F_c = R F_λ Rᵀ``; default) or ``"identity"``
      (``λI``, Tselepidis' code).
    fisher_products: the ``F`` of ``F_λ v`` and of a per-step ``F_c``:
      ``"statistics"`` (default: ``(1/M)Σ u_n u_nᵀ`` of the statistics pass's
      per-example gradients, sampled or empirical per ``fisher``; rank ≤ M)
      or ``"ggn"`` (the exact Fisher = GGN ``(1/M)Σ J_nᵀH_nJ_n`` of the
      batch: one forward-mode and one transposed pass per product, one
      forward-mode pass per coarse vector for ``F_c``; no statistics pass
      needed on non-refresh steps) or ``"mixed"`` (the exact GGN for the
      products used at full size, which ``M⁻¹`` amplifies: balanced's
      ``F_λQ∇`` and the residual ``∇ − F_λM⁻¹∇`` of the per-step spaces; the
      statistics for ``F_c`` and the products only projected on R; needs
      combine="balanced" or a per-step space) or ``"kronecker"`` (multiplicative
      and balanced on a space fixed between statistics steps, a residual one
      with ``residual_refresh="statistics"``: Tselepidis' model of the whole
      Fisher ``F̃_ij = A_ij ⊗ G_ij`` from the last statistics batch, α measured
      there; ``coarse_model``, ``coarse_model_bases``).
    fine_scale: multiplicative and balanced only. ``"model"`` (default):
      the fine step is ``αM⁻¹``, α the quadratic model's ``xᵀr / xᵀF_λx``
      of ``x = M⁻¹r`` (``r = ∇`` multiplicative, ``∇ − F_λQ∇`` balanced;
      docs/methods.md); ``"none"``: α = 1 (Galerkin orthogonal: both);
      ``"both"`` (``"kronecker"`` only): ``αf + γQ∇``, each part its own
      model ratio (``coarse_model.step``). Other leaves get ``αM⁻¹∇``.
    coarse_batch: the coarse level's ``F`` (products, ``F_c``; with
      ``"kronecker"`` the model's tokens) from the statistics' first ``n =
      min(M, coarse_batch)`` examples (per device): unbiased, at ``n/M`` of
      the products' cost. ``None`` (default): all ``M``.
    coarse_statistics: a per-step correction's ``F``: ``"batch"`` (default:
      each step's), ``"stored"`` (the last statistics batch's tokens, kept;
      Koroko et al.'s code; needs ``example_batch``) or ``"subsample"``
      (each step's first ``coarse_batch`` rows; ``coarse_tokens``).
    spectral_iterations: ``"spectral"`` only. None (default): ``eigh`` of
      every factor per refresh; ``k``: k steps of inverse iteration with the
      base's ``(A + γI)⁻¹`` (``coarse.inverse_iteration``).
    residual_refresh: ``"residual"``, ``"krylov_residual"``: ``"step"``
      (default: rebuilt from every step's residual) or ``"statistics"``
      (with its ``F_c`` on statistics steps only; ``coarse_refresh``).
    scale_batch: ``"kronecker"`` only: the examples α (γ) are measured on, held
      till the next statistics step: ``"coarse_batch"`` (default: the model's
      ``n``), None (all ``M``: ``M·P`` per direction) or ``k`` (``min(M, k)``).
    model_refresh: ``"kronecker"``: the model rebuilt on every statistics step
      (``"statistics"``) or at ``count % stats_every == 0`` only (``"period"``).
    **options: the base method's options (``scale_by_kfac``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (same ``update`` as
    ``scale_by_kfac``). A per-step correction with ``fisher_products=
    "statistics"`` reads the batch statistics every step: with a static
    ``due``, pass ``kfe.value_and_grad``'s ``curvature`` for
    ``due._replace(statistics=True)``, else ``update`` runs its own pass.

  Example:
    >>> tx = optax.chain(kfe.scale_by_two_level_kfac(
    ...     loss_fn, combine="multiplicative", fisher_products="ggn"),
    ...     optax.sgd(0.1, momentum=0.9))
  """
  checks.check_two_level_choices(base, coarse_space, coarse_matrix, combine,
                                 coarse_damping, omega, fisher_products)
  checks.check_two_level_options(fine_scale, coarse_batch, fisher_products, options,
                                 coarse_space, spectral_iterations)
  coarse_tokens.check(coarse_statistics, fisher_products, options, coarse_batch)
  coarse_refresh.check(residual_refresh, coarse_space, fisher_products)
  coarse_model.check(fisher_products, combine, coarse_space, coarse_matrix, options,
                     residual_refresh, scale_batch, fine_scale, model_refresh)
  variant = (kronecker_variants.KFAC if base == "kfac"
             else kronecker_variants.tkfac_variant())
  name = "scale_by_two_level_kfac"
  if coarse_space is None:     # the base method
    return kronecker_family.scale_by_kronecker(loss_fn, variant, name=name,
                                               **options)
  relative_damping.require_absolute(options, "scale_by_two_level_kfac damps "
                                    "its fine and coarse levels (I12-I13)")
  modelled = fisher_products == "kronecker"
  coarse_matrix = coarse_matrix or coarse.default_matrix(fisher_products, combine,
                                                         coarse_space)
  base_init, base_step = kronecker_family.kronecker_stepper(
      loss_fn, variant, name=name, **options)
  ema_decay, inverse_every, stats_every = (options.get(k, d) for k, d in (
      ("ema_decay", 0.95), ("inverse_every", 5), ("stats_every", 1)))
  fisher, has_aux, axis_name = (options.get("fisher", "sampled"),
                                options.get("has_aux", False), options.get("axis_name"))
  ggn = fisher_products == "ggn"
  scaled = {"model": True, "none": False}.get(fine_scale, fine_scale)  # or "both"
  every_step = coarse_tokens.per_step(combine, coarse_space, fisher_products,
                                      residual_refresh)
  refreshed = coarse_refresh.active(residual_refresh, coarse_space)
  per_step_space = coarse_space in coarse.PER_STEP_SPACES and not refreshed
  # the per-step products need statistics' tokens: the step's, or stored ones
  stored = every_step and not ggn and coarse_statistics == "stored"
  subsample = every_step and not ggn and coarse_statistics == "subsample"
  tokens_every_step = every_step and not ggn and not stored and not subsample

  def init_fn(params):
    base_state = base_init(params)
    tokens = (lambda spectral: coarse_tokens.initial(
        loss_fn, params, options["example_batch"], has_aux, base_state.factors,
        variant.unsupported, spectral, coarse_batch, linalg.factor_dtype(),
        axis_name)) if stored else None
    return two_level_state.initial(
        base_state, params, coarse_space, coarse_matrix, MAX_COARSE,
        krylov_factored=options.get("damping_mode", "factored") == "factored",
        refreshed=refreshed, tokens=tokens, modelled=modelled)

  def update_fn(updates, state, params=None, *, batch=None, key=None,
                curvature=None, due=None, **extra_args):
    schedule.check_due(due, name)
    needs_batch = None if due is None else due._replace(
        statistics=due.statistics or tokens_every_step)
    checks.check_update_args(name, params, batch, curvature, fisher, key,
                             needs_batch)
    coarse_tokens.check_key(subsample, fisher, key)
    traced = tracing.trace_loss(loss_fn, params, batch, has_aux)
    if curvature is not None:
      cb = curvature
    elif needs_batch is not None and not needs_batch.statistics:
      cb = None         # not used: neither the base nor the coarse level reads it
    else:
      cond_due = None if (tokens_every_step or due is not None) else (
          state.base.curvature_due)
      cb = statistics.statistics_pass(traced, params, batch, key, fisher,
                                      due=cond_due, axis_name=axis_name)[2]
    stats_due = state.base.curvature_due
    refresh_due = state.base.count % inverse_every == 0
    static_stats, static_refresh = ((None, None) if due is None
                                    else (due.statistics, due.inverses))
    out, base_state, ctx = base_step(updates, state.base, params, batch=batch,
                                     key=key, curvature=cb, due=due,
                                     damping_override=extra_args.get("damping"))
    dtype, size = state.coarse_a.dtype, state.coarse_a.shape[0]
    shapes = list(traced.param_shapes)
    slots = coarse.leaf_slots(shapes, coarse_space)
    spectral = state.spectral
    if coarse_space == "spectral":     # fresh vectors first: R is the same below
      spectral = schedule.maybe(
          inverse_every, refresh_due,
          lambda sp: level.spectral_vectors(ctx.plan, base_state, sp, variant,
                                            axis_name, spectral_iterations),
          lambda sp: sp, spectral, static_refresh)
    krylov = state.krylov
    if coarse_space == "krylov_nicolaides":   # M⁻¹1 with the fresh inverses
      krylov = schedule.maybe(
          inverse_every, refresh_due,
          lambda k: level.krylov_vectors(
              ctx.plan, k, base_state.inverses, ctx.precondition,
              jax.tree_util.tree_leaves(updates), shapes, dtype),
          lambda k: k, krylov, static_refresh)
    layers = level.static_layers(ctx.plan, spectral, slots, coarse_space, dtype,
                                 krylov)
    if not layers:
      return out, state._replace(base=base_state)
    # the coarse level's examples: the first min(M, coarse_batch)
    m = coarse_tokens.examples(traced.num_examples, coarse_batch)
    tokens_of, n_sub = coarse_tokens.subsampled(   # "subsample": its own pass between
        subsample, loss_fn, params, batch, traced, key, fisher, coarse_batch,
        has_aux, axis_name, layers, dtype)
    m = n_sub or m
    stored_toks, tokens_ok = coarse_tokens.kept(    # the last statistics batch's
        stored, state.tokens, lambda: level.tokens(layers, traced, cb, dtype, m),
        stats_every, stats_due, static_stats)
    grads = jax.tree_util.tree_leaves(updates)
    fine = jax.tree_util.tree_leaves(out)
    v = level.to_matrices(layers, grads, dtype)
    b = unscaled = level.to_matrices(layers, fine, dtype)   # M⁻¹∇ per layer
    if ggn:
      operator = curvature_products.fisher_operator(traced, params, batch,
                                                    axis_name=axis_name)
      fvp = level.ggn_fvp(layers, operator, grads, shapes, ctx.damping, dtype)
    elif every_step:
      if stored:
        toks = stored_toks
      elif subsample:   # the statistics step's first n, else a pass of its own
        toks = schedule.maybe(stats_every, stats_due, lambda _: tokens_of(cb, True),
                              lambda _: tokens_of(cb, False), None, static_stats)
      else:
        toks = level.tokens(layers, traced, cb, dtype, m)
      fvp = level.statistics_fvp(toks, m, ctx.damping, axis_name)
    # "mixed": the products used at full size (fed to M⁻¹ or a basis) from
    # the exact GGN; F_c and the projected ones from the statistics
    full_fvp = level.ggn_fvp(layers, curvature_products.fisher_operator(
        traced, params, batch, axis_name=axis_name), grads, shapes,
        ctx.damping, dtype) if fisher_products == "mixed" else None
    # Balanced steps, and multiplicative ones on a fixed space, need F_λx
    # only projected (R F_λx, xᵀF_λx) or lifted (F_λRᵀβ): half the token passes
    projected = (every_step and not ggn and combine != "additive" and (
        combine == "balanced" or not per_step_space))
    sub = lambda xs, ys: [x - y for x, y in zip(xs, ys)]
    precondition = lambda xs: level.to_matrices(layers, ctx.precondition(
        level.write(layers, grads, xs, shapes)), dtype)
    if modelled:     # the Kronecker model's products: no per-step statistics
      toks_of = lambda n: (lambda: level.tokens(layers, traced, cb, dtype, n), n)
      args = (combine, layers, state, toks_of(m)[0], v, b, precondition, scaled, size,
              dtype, m, ctx.damping, coarse_damping, coarse_model.model_schedule(
                  model_refresh, stats_every, stats_due, static_stats, state.base.count),
              axis_name, toks_of(coarse_tokens.scale_examples(traced.num_examples, m,
                                                              scale_batch)))
      delta, alpha, inverse, model, coarse_count, health, *bases = (
          coarse_model_bases.corrected(coarse_space, *args) if refreshed
          else coarse_model.corrected(*args))   # (bases: [the kept basis])
      coarse_a, coarse_g = state.coarse_a, state.coarse_g
    else:
      if refreshed:     # a statistics step's residual basis, kept till the next
        bases, bases_ok = schedule.maybe(
            stats_every, stats_due, lambda old: coarse_refresh.rebuilt(
                coarse_space, layers, old, sub(v, level.statistics_fvp(
                    level.tokens(layers, traced, cb, dtype, m), m, ctx.damping,
                    axis_name)(unscaled)), precondition),
            lambda old: (old, jnp.array(True)), state.bases, static_stats)
        layers, tokens_ok = coarse_refresh.stored_layers(layers, bases), tokens_ok & bases_ok
      residual, alpha = None, jnp.ones([], dtype)
      if per_step_space or (combine == "multiplicative" and not projected):
        fb = (full_fvp or fvp)(b)
        if scaled and combine == "multiplicative":
          alpha = level.model_scale(b, v, fb)
          b, fb = [alpha * x for x in b], [alpha * x for x in fb]
        residual = sub(v, fb)
      if per_step_space:
        layers = level.per_step_bases(coarse_space, layers, residual,
                                       precondition)
      coeffs = (level.example_coefficients(layers, toks, size, dtype)
                if projected else None)

      def batch_matrices():
        if ggn:
          return level.ggn_coarse(layers, operator, grads, shapes, size, dtype)
        step_toks = (toks if every_step
                     else level.tokens(layers, traced, cb, dtype, m))
        return distributed.mean(level.batch_coarse(
            layers, step_toks, size, coarse_matrix, m, dtype, coeffs), axis_name)

      def accumulate(st):
        new_a, new_g = batch_matrices()
        k = (st.coarse_count + 1).astype(dtype)
        eps = 0.0 if every_step or refreshed else jnp.minimum(1.0 - 1.0 / k, ema_decay)
        ok = linalg.all_finite(new_a, new_g)
        ema = lambda old, new: jnp.where(ok, eps * old + (1 - eps) * new, old)
        health = st.health._replace(nonfinite_statistics=(
            st.health.nonfinite_statistics + (~(ok & tokens_ok)).astype(jnp.int32)))
        return (ema(st.coarse_a, new_a), ema(st.coarse_g, new_g),
                st.coarse_count + ok.astype(jnp.int32), health, ok)

      coarse_a, coarse_g, coarse_count, health, stats_ok = schedule.maybe(
          1 if every_step else stats_every, stats_due, accumulate,
          lambda st: (st.coarse_a, st.coarse_g, st.coarse_count, st.health,
                      jnp.array(True)), state,
          None if every_step else static_stats)
      # A per-step basis has no previous F_c⁻¹ to fall back on: a failed step
      # drops the correction (Q = 0) and is counted. (A refreshed basis keeps
      # its previous F_c with it, hence its previous F_c⁻¹.)
      per_step = per_step_space

      def refresh(operand):
        inverse, health = operand
        new, ok = level.coarse_inverse(layers, coarse_a, coarse_g, ctx.damping,
                                       coarse_damping, size, dtype)
        ok = ok & stats_ok if per_step else ok
        health = health._replace(failed_inverses=health.failed_inverses + (
            ~ok).astype(jnp.int32))
        keep = jnp.zeros_like(inverse) if per_step else inverse
        return jnp.where(ok, new, keep), health

      period, due_now, static_now = ((stats_every, stats_due, static_stats) if refreshed
                                     else (inverse_every, refresh_due, static_refresh))
      inverse, health = schedule.maybe(
          1 if every_step else period, due_now, refresh, lambda o: o,
          (state.coarse_inverse, health), None if every_step else static_now)

      q = lambda xs: level.apply_q(layers, inverse, xs, size, dtype)
      if combine == "additive":
        w1, w2 = omega
        delta = [w1 * bi + w2 * qi for bi, qi in zip(b, q(v))]
      elif projected:
        sf = level.StatisticsFisher(toks, coeffs, m, ctx.damping, axis_name)
        combined = (level.projected_multiplicative if combine == "multiplicative"
                    else level.projected_balanced)
        delta, alpha = combined(sf, layers, inverse, v, b, precondition, scaled,
                                size, dtype, lifted=full_fvp)
      elif combine == "multiplicative":
        delta = [bi + ci for bi, ci in zip(b, q(residual))]
      else:
        y = q(v)
        z = sub(v, fvp(y))                  # ggn only: the others are projected
        w = precondition(z)
        fw = fvp(w)
        if scaled:
          alpha = level.model_scale(w, z, fw)
        delta = [alpha * (wi - ci) + yi for wi, ci, yi in zip(w, q(fw), y)]
    # Non-finite products (e.g. from a skipped, non-finite statistics batch)
    # leave the fine step alone; counted as a failed coarse inverse.
    ok = linalg.all_finite(alpha, *delta)
    health = health._replace(failed_inverses=health.failed_inverses + (
        ~ok).astype(jnp.int32))
    # balanced needs M⁻¹∇ only here: in a branch, the base's is dead code
    delta = (jax.lax.cond(ok, lambda d: d, lambda d: precondition(v), delta)
             if combine == "balanced" else
             [jnp.where(ok, d, u) for d, u in zip(delta, unscaled)])
    if scaled and combine != "additive":   # the other leaves: αM⁻¹∇ too
      alpha = jnp.where(ok, alpha, 1.0)
      fine = [(alpha * x).astype(x.dtype) for x in fine]
    fine = level.write(layers, fine, delta, shapes)
    kept_bases = ((bases[0] if modelled else bases) if refreshed else ())
    new_state = TwoLevelState(
        base_state, jnp.array(True) if tokens_every_step else base_state.curvature_due,
        coarse_count, coarse_a, coarse_g, inverse, spectral, health, krylov,
        stored_toks, kept_bases, model if modelled else state.model)
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(updates), fine), new_state

  return optax.GradientTransformationExtraArgs(
      init_fn, eager.compile_when_eager(update_fn))
