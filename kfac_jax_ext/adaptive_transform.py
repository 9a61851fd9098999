"""Adaptive step size, momentum and damping from the quadratic model (M&G §6–7).

``quadratic_model_step(inner, loss_fn, ...)`` wraps a preconditioner (any of
the four methods) as an optax transformation whose output is the final update
``δ`` (add it to the parameters; no learning rate follows):

* ``learning_rate="adaptive"``: ``inner`` gives the preconditioned gradient
  ``Δ`` (plus ``ηθ`` with weight decay η); ``d = −Δ`` and ``δ = αd + μδ₀``
  with ``(α, μ)`` minimising the quadratic model with the exact Fisher of
  the batch (``quadratic_model``; ``momentum`` ``"adaptive"``, a number or
  None). Costs one forward pass linearised plus one forward-mode pass per
  vector (two with momentum): ``curvature_products.curvature_forms``.
* a numeric ``learning_rate``: ``inner`` is the whole optimizer chain and its
  output is ``δ`` as it is; only the damping is adapted (below).
* ``damping_adaptation=True``: every ``T₁`` updates λ moves by the
  Levenberg–Marquardt rule from ``ρ = (h(θ+δ) − h(θ)) / M(δ)``, measured on
  the same batch with **one extra forward pass** (``loss_fn`` at ``θ+δ``),
  as kfac-jax does; with a numeric learning rate that update also pays the
  forward-mode pass for ``M(δ)``. λ lives in the state (``state.damping``)
  and is passed to ``inner.update(..., damping=λ)``, so the preconditioner's
  next refresh uses it. A non-finite ρ keeps λ and is counted.
* ``model_batch=n``: the model's curvature (the forward-mode passes above)
  from the batch's first ``n`` examples, an unbiased estimate of the batch's
  Fisher at ``n/M`` of those passes' cost; the gradient term stays the
  whole batch's, and ρ compares the whole batch's losses at ``θ`` and
  ``θ+δ`` (one more forward pass on the adaptation updates).
* the model's damping term is ``½(λ + η)‖δ‖²``, also around a
  preconditioner with ``damping_scale="relative"`` (``λ_l = λ·u_l``);
  ``damping_units=kfe.damping_units_of(pre)`` makes it ``½λ Σ_l u_l‖δ_l‖² +
  ½η‖δ‖²``, the preconditioner's units (``kfac_jax_ext.model_damping``).
* ``preconditioner_damping_adaptation=True`` (M&G §6.6): the preconditioner
  gets its own damping ``γ²`` instead of λ, re-tuned greedily at its
  refreshes among ``{γ, ω₂γ, γ/ω₂}`` by the model value of each one's best
  step (``kfac_jax_ext.damping_strength``); λ then damps only the model.

Example:
  >>> tx = kfe.kfac(loss_fn, learning_rate="adaptive", momentum="adaptive",
  ...               damping=1.0, damping_adaptation=True, example_batch=batch)
  >>> state = tx.init(params)
  >>> updates, state = tx.update(grads, state, params, batch=batch, key=key)
  >>> params = optax.apply_updates(params, updates)     # state.damping: λ
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kfac_jax_ext import curvature_products
from kfac_jax_ext import damping_strength as strength_lib
from kfac_jax_ext import distributed
from kfac_jax_ext import eager
from kfac_jax_ext import linalg
from kfac_jax_ext import quadratic_model as qm
from kfac_jax_ext import schedule
from kfac_jax_ext import stats_subsample
from kfac_jax_ext import tracing


class AdaptiveHealth(NamedTuple):
  """Counters: λ adaptations skipped for a non-finite ρ or model value, and
  steps whose ``(α, μ)`` were not finite (or the model had no minimiser
  along ``d``), which fell back to the last finite α with μ = 0."""
  skipped_adaptations: jax.Array
  fallback_steps: jax.Array


class AdaptiveState(NamedTuple):
  """State of ``quadratic_model_step`` (arrays only).

  Attributes:
    count: updates so far.
    damping: λ, used by the next update (and the preconditioner's refresh).
    previous_update: ``δ₀``, the last update (shaped like the params).
    learning_rate: the last α (adaptive learning rate; else 0).
    momentum: the last μ (adaptive learning rate; else 0).
    rho: the last measured reduction ratio ρ (NaN before the first).
    health: ``AdaptiveHealth``.
    inner: the wrapped transformation's state.
    preconditioner_damping: the damping the preconditioner got at the last
      update: ``γ²`` with ``preconditioner_damping_adaptation`` (M&G §6.6,
      ``kfac_jax_ext.damping_strength``), else λ.
  """
  count: jax.Array
  damping: jax.Array
  previous_update: Any
  learning_rate: jax.Array
  momentum: jax.Array
  rho: jax.Array
  health: AdaptiveHealth
  inner: Any
  preconditioner_damping: jax.Array


def _check(learning_rate, momentum, damping, damping_adaptation, decay, bounds):
  adaptive_lr = isinstance(learning_rate, str)
  if adaptive_lr and learning_rate != "adaptive":
    raise ValueError(f"learning_rate must be a number, a schedule or "
                     f"'adaptive', got {learning_rate!r}.")
  if isinstance(momentum, str):
    if momentum != "adaptive":
      raise ValueError(f"momentum must be a number, None or 'adaptive', got "
                       f"{momentum!r}.")
    if not adaptive_lr:
      raise ValueError("momentum='adaptive' solves for the step size and the "
                       "momentum together: it needs learning_rate='adaptive'.")
  if damping_adaptation and callable(damping):
    raise ValueError("damping_adaptation=True adapts λ from its initial value: "
                     "pass damping= as a number, not a schedule.")
  for name, value in (("damping_adaptation_decay", decay),):
    if isinstance(value, (int, float)) and not 0 < value < 1:
      raise ValueError(f"{name} must lie in (0, 1), got {value!r}.")
  lo, hi = bounds
  if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and not (
      0 <= lo <= hi):
    raise ValueError(f"need 0 <= min_damping <= max_damping, got ({lo}, {hi}).")
  return adaptive_lr


def quadratic_model_step(
    inner: optax.GradientTransformation,
    loss_fn: Callable[..., Any],
    *,
    learning_rate: Any = "adaptive",
    momentum: Any = "adaptive",
    weight_decay: float = 0.0,
    damping: float | Callable = 1e-3,
    damping_adaptation: bool = False,
    damping_adaptation_interval: int = 5,
    damping_adaptation_decay: float = 0.95,
    min_damping: float = 1e-8,
    max_damping: float = 1e8,
    has_aux: bool = False,
    axis_name: str | None = None,
    damping_units: Callable | None = None,
    preconditioner_damping_adaptation: bool = False,
    preconditioner_damping_interval: int | None = None,
    preconditioner_damping_decay: float = strength_lib.DEFAULT_DECAY,
    model_batch: int | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Martens & Grosse's adaptive α, μ and λ around a preconditioner.

  Args:
    inner: with ``learning_rate="adaptive"``, the preconditioner (its
      output ``Δ`` is an ascent direction, like ``scale_by_kfac``'s; add
      weight decay inside it); otherwise the whole optimizer chain (its
      output is the update).
    loss_fn: ``loss_fn(params, batch)`` calling a ``kfe`` loss helper; the
      model's Fisher is that of its registered losses.
    learning_rate: ``"adaptive"`` or the number/schedule the chain in
      ``inner`` already applies (then only λ is adapted).
    momentum: ``"adaptive"``, a fixed μ, or None (adaptive learning rate only).
    weight_decay: η; the model is of ``h = loss + η‖θ‖²/2`` with curvature
      ``F + (λ + η)I``.
    damping: λ (the initial λ with ``damping_adaptation``); passed to
      ``inner.update`` as ``damping=``.
    damping_adaptation: adapt λ by the Levenberg–Marquardt rule.
    damping_adaptation_interval: T₁, updates between adaptations.
    damping_adaptation_decay: ω₁ = decay ** T₁ (M&G: 19/20).
    min_damping, max_damping: the range λ is clipped to.
    has_aux: ``loss_fn`` returns ``(loss, aux)``.
    axis_name: the pmap/shard_map data axis (forms and losses are averaged).
    damping_units: the units of λ in the model's damping term ``½λδᵀDδ``:
      ``damping_units(inner_state, params, batch)`` returns ``δ ↦ Dδ``;
      ``kfe.damping_units_of(pre)`` gives the units of a preconditioner
      ``pre`` built with ``damping_scale="relative"`` (``D = diag(u_l I_l)``,
      the model damped as the preconditioner is; ``kfac_jax_ext.model_damping``
      has the measurements that keep it opt-in). None (default): ``D = I``.
    preconditioner_damping_adaptation: M&G §6.6: the preconditioner gets its
      own damping ``γ²`` (from the initial λ) instead of λ; on every update
      that refreshes its inverses the update is computed for ``γ'²`` with
      ``γ' ∈ {γ, ω₂γ, γ/ω₂}`` (three preconditioner updates, one set of
      forward-mode passes), each with its α, μ, and the γ' with the lowest
      model value ``M(δ)`` is kept with its inverses (``state.
      preconditioner_damping``). Needs ``learning_rate="adaptive"``.
    preconditioner_damping_interval: T₂, the preconditioner's
      ``inverse_every`` (the aliases pass it): with ``due`` the trial runs
      when ``due.inverses``, else when ``count % T₂ == 0``.
    preconditioner_damping_decay: ``ω₂ = decay ** T₂`` (M&G: √(19/20)).
    model_batch: the model's Fisher ``F`` from the batch's first ``n``
      examples (every array leaf cut to its first ``n`` rows, as
      ``stats_batch``; under ``axis_name`` each device's first ``n``);
      None (default) or ``n`` ≥ the batch: all of it. Measured unstable at
      32–64 of 128 (``docs/methods.md``): keep ``n`` in the hundreds.

  Returns:
    An ``optax.GradientTransformationExtraArgs``: ``update(grads, state,
    params, *, batch, key=None, due=None, **extra)`` returns the update to
    add to the parameters. ``grads`` must be the gradient of the mean loss
    (averaged over devices). Static ``due``: ``due.damping`` says whether
    this update adapts λ (``kfe.due_at(..., damping_every=T₁)``).

  Example:
    >>> tx = kfe.quadratic_model_step(
    ...     optax.chain(kfe.scale_by_kfac(loss_fn, example_batch=batch),
    ...                 optax.add_decayed_weights(1e-5)),
    ...     loss_fn, weight_decay=1e-5, damping=1.0, damping_adaptation=True)
  """
  adaptive_lr = _check(learning_rate, momentum, damping, damping_adaptation,
                       damping_adaptation_decay, (min_damping, max_damping))
  strength_adaptation = preconditioner_damping_adaptation
  strength_interval = preconditioner_damping_interval
  strength_lib.check(strength_adaptation, learning_rate, strength_interval,
                     preconditioner_damping_decay)
  omega2 = (strength_lib.omega(preconditioner_damping_decay, strength_interval)
            if strength_adaptation else None)
  inner = optax.with_extra_args_support(inner)
  distributed.check_axis_name(axis_name, "quadratic_model_step")
  name = "quadratic_model_step"
  stats_subsample.check_examples(model_batch, "model_batch", name)

  def init_fn(params):
    dtype = linalg.factor_dtype()
    lam0 = damping(0) if callable(damping) else damping
    zero = lambda: jnp.zeros([], jnp.int32)
    return AdaptiveState(
        zero(), jnp.asarray(lam0, dtype),
        jax.tree_util.tree_map(jnp.zeros_like, params), jnp.zeros([], dtype),
        jnp.zeros([], dtype), jnp.full([], jnp.nan, dtype),
        AdaptiveHealth(zero(), zero()), inner.init(params),
        jnp.asarray(lam0, dtype))

  def update_fn(updates, state, params=None, *, batch=None, due=None, **extra):
    if params is None or batch is None:
      raise ValueError(f"{name}: update needs params and batch= (the model is "
                       "evaluated on the batch).")
    schedule.check_due(due, name)
    dtype = state.damping.dtype
    lam = (state.damping if damping_adaptation else
           jnp.asarray(schedule.value_at(damping, state.count), dtype))
    traced = tracing.trace_loss(loss_fn, params, batch, has_aux)
    # the model's curvature: the batch's first model_batch examples
    model_inputs, model_traced = stats_subsample.statistics_inputs(
        loss_fn, params, batch, traced, model_batch, has_aux, "model_batch")
    whole_batch = model_traced is traced
    eta = jnp.asarray(weight_decay, dtype)
    grad_h = jax.tree_util.tree_map(lambda g, p: g + eta * p, updates, params)

    def precondition(strength):
      return inner.update(updates, state.inner, params, batch=batch, due=due,
                          damping=strength, **extra)

    def damping_form_of(inner_state):
      weigh = (lambda x: x) if damping_units is None else damping_units(
          inner_state, params, batch)
      # the damping term's forms: λ⟨x, Dy⟩ + η⟨x, y⟩ (D = I: (λ + η)⟨x, y⟩)
      return lambda x, y: (lam * qm.tree_vdot(x, weigh(y))
                           + eta * qm.tree_vdot(x, y))

    def solve_along(strengths):
      """Each γ'² in ``strengths``: its preconditioned direction, α and μ
      from the model (one set of forward-mode passes for all) and M(δ)."""
      runs = [precondition(s) for s in strengths]
      damping_form = damping_form_of(runs[0][1])   # units do not depend on γ
      directions = [jax.tree_util.tree_map(jnp.negative, out) for out, _ in runs]
      vectors = directions + ([] if momentum is None else [state.previous_update])
      loss, fisher = curvature_products.curvature_forms(
          model_traced, params, model_inputs, vectors, axis_name=axis_name)
      solved = []
      for i in range(len(strengths)):
        index = [i] if momentum is None else [i, len(strengths)]
        k = len(index)
        damped = jnp.asarray([[damping_form(vectors[r], vectors[s])
                               for s in index] for r in index])
        q = jnp.zeros((2, 2), dtype).at[:k, :k].set(
            fisher[np.ix_(index, index)] + damped)
        b = jnp.zeros([2], dtype).at[:k].set(
            jnp.stack([qm.tree_vdot(grad_h, vectors[r]) for r in index]))
        c, ok = qm.solve_coefficients(q, b, momentum=momentum,
                                      use_previous=state.count > 0)
        solved.append((q, b, c, ok, qm.model_change(q, b, c)))
      if len(strengths) == 1:
        index = jnp.zeros([], jnp.int32)
      else:
        index = strength_lib.best_candidate(
            jnp.stack([s[4] for s in solved]), jnp.stack([s[3] for s in solved]))
      out, inner_state = strength_lib.select(index, runs)
      q, b, c, ok, _ = strength_lib.select(index, solved)
      return (out, inner_state, loss, q, b, c, ok,
              strength_lib.select(index, list(strengths)))

    health = state.health
    alpha, mu = jnp.zeros([], dtype), jnp.zeros([], dtype)
    strength = lam
    if adaptive_lr:
      if strength_adaptation:
        current = state.preconditioner_damping
        trial = lambda _: solve_along(strength_lib.candidates(
            current, omega2, (min_damping, max_damping)))
        (out, inner_state, loss, q, b, c, ok, strength) = schedule.maybe(
            strength_interval, state.count % strength_interval == 0, trial,
            lambda _: solve_along([current]), None,
            None if due is None else due.inverses)
      else:
        out, inner_state, loss, q, b, c, ok, _ = solve_along([lam])
      c = jnp.where(ok, c, jnp.stack([state.learning_rate, 0.0]).astype(dtype))
      health = health._replace(fallback_steps=health.fallback_steps + (~ok))
      d = jax.tree_util.tree_map(jnp.negative, out)
      delta = jax.tree_util.tree_map(
          lambda x, y: (c[0] * x + c[1] * y).astype(x.dtype), d,
          state.previous_update)
      predicted = qm.model_change(q, b, c)
      alpha, mu = c[0], c[1]
    else:   # the model's damping forms are needed only to measure M(δ)
      delta, inner_state = precondition(lam)
      damping_form = damping_form_of(inner_state)

    rho, skipped = state.rho, health.skipped_adaptations
    if damping_adaptation:
      def adapt(operand):
        lam_now, skipped_now = operand
        if adaptive_lr:
          loss0, change = loss, predicted
        else:
          loss0, fisher1 = curvature_products.curvature_forms(
              model_traced, params, model_inputs, [delta], axis_name=axis_name)
          change = (0.5 * (fisher1[0, 0] + damping_form(delta, delta))
                    + qm.tree_vdot(grad_h, delta))
        moved = jax.tree_util.tree_map(lambda p, x: p + x.astype(p.dtype),
                                       params, delta)
        def loss_at(p):
          value = loss_fn(p, batch)
          return distributed.mean(value[0] if has_aux else value, axis_name)
        loss1 = loss_at(moved)
        if not whole_batch:      # the forms' loss is the sub-batch's
          loss0 = loss_at(params)
        decay_change = 0.5 * eta * (qm.tree_vdot(moved, moved)
                                    - qm.tree_vdot(params, params))
        actual = loss1.astype(dtype) - loss0.astype(dtype) + decay_change
        ratio = qm.reduction_ratio(actual, change.astype(dtype))
        new_lam, adapted = qm.adapt_damping(
            lam_now, ratio, omega=jnp.asarray(damping_adaptation_decay, dtype)
            ** damping_adaptation_interval, bounds=(min_damping, max_damping))
        return new_lam, ratio.astype(dtype), skipped_now + (~adapted)

      lam, rho, skipped = schedule.maybe(
          damping_adaptation_interval,
          state.count % damping_adaptation_interval == 0, adapt,
          lambda operand: (operand[0], state.rho, operand[1]), (lam, skipped),
          None if due is None else due.damping)
    health = health._replace(skipped_adaptations=skipped)
    new_state = AdaptiveState(state.count + 1, lam.astype(dtype), delta,
                              alpha.astype(dtype), mu.astype(dtype), rho,
                              health, inner_state, strength.astype(dtype))
    return delta, new_state

  return optax.GradientTransformationExtraArgs(
      init_fn, eager.compile_when_eager(update_fn))
