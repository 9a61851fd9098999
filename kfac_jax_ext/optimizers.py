"""Complete optimizers: preconditioner → KL-clip → weight decay → momentum → lr.

The pipeline of the reference K-FAC codes (``algorithms.md`` §0.5) as an
``optax.chain``.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kfac_jax_ext import adaptive_transform
from kfac_jax_ext import coarse_tokens
from kfac_jax_ext import damping_strength
from kfac_jax_ext import eager
from kfac_jax_ext import kfac_transform
from kfac_jax_ext import kronecker_family
from kfac_jax_ext import natural_gradient_transform as natural_gradient_lib
from kfac_jax_ext import tengrad_transform
from kfac_jax_ext import tkfac_transform
from kfac_jax_ext import train_step
from kfac_jax_ext import two_level_transform


class KlClipState(NamedTuple):
  count: jax.Array
  inner: Any


def clip_by_kl(inner: optax.GradientTransformation, max_kl,
               learning_rate) -> optax.GradientTransformationExtraArgs:
  r"""Wraps a preconditioner with KL-clipping (Ba, Grosse & Martens 2017).

  ``ν = min(1, sqrt(κ / (lr² Σ⟨Δ, ∇⟩)))`` and ``Δ ← νΔ``, where ``∇`` is the
  raw gradient and ``Δ`` the preconditioned one, so that afterwards
  ``lr² ν² Σ⟨Δ, ∇⟩ ≤ κ`` (equality iff clipped).

  Args:
    inner: the preconditioner (e.g. ``scale_by_kfac(...)``).
    max_kl: κ (float or array).
    learning_rate: float or schedule, the same one the optimizer applies.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return KlClipState(jnp.zeros([], jnp.int32), inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    delta, inner_state = inner.update(updates, state.inner, params, **extra_args)
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    wide = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))
    inner_product = sum(
        jnp.vdot(wide(d), wide(g))
        for d, g in zip(jax.tree_util.tree_leaves(delta),
                        jax.tree_util.tree_leaves(updates)))
    quad = jnp.asarray(lr, inner_product.dtype) ** 2 * jnp.abs(inner_product)
    nu = jnp.where(quad > 0, jnp.minimum(1.0, jnp.sqrt(max_kl / jnp.where(
        quad > 0, quad, 1.0))), 1.0)
    delta = jax.tree_util.tree_map(lambda d: (d * nu).astype(d.dtype), delta)
    return delta, KlClipState(state.count + 1, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_zero(x) -> bool:
  return isinstance(x, (int, float)) and x == 0


def with_optimizer_steps(preconditioner, learning_rate, *, momentum=0.9,
                         weight_decay=0.0, kl_clip=None, nesterov=False):
  """``chain(clip_by_kl(preconditioner), add_decayed_weights, trace, -lr)``.

  ``trace`` is ``optax.trace(momentum, nesterov)``: heavy ball ``v ← Δ + μv``,
  step ``v``; Nesterov: the step is ``Δ + μv`` with the updated ``v``.
  """
  parts = [preconditioner if kl_clip is None else
           clip_by_kl(preconditioner, kl_clip, learning_rate)]
  if not _is_zero(weight_decay):
    parts.append(optax.add_decayed_weights(weight_decay))
  if momentum is not None and not _is_zero(momentum):
    parts.append(optax.trace(decay=momentum, nesterov=nesterov))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)


def _compiled_when_eager(tx):
  """``tx`` whose whole chained ``update`` compiles as one program when
  called outside ``jit`` (``eager.compile_when_eager``)."""
  return optax.GradientTransformationExtraArgs(
      tx.init, eager.compile_when_eager(tx.update))


def _adaptive(precondition, loss_fn, learning_rate, momentum, weight_decay,
              kl_clip, nesterov, adaptation, options, default_damping):
  """The alias with Martens & Grosse's adaptive α, μ and/or λ around it."""
  if isinstance(learning_rate, str):
    if nesterov:
      raise ValueError("nesterov applies to the fixed learning rate's momentum "
                       "(optax.trace); with learning_rate='adaptive' the quadratic "
                       "model chooses the step and the momentum: drop nesterov.")
    if kl_clip is not None:
      raise ValueError("kl_clip limits a fixed learning rate's step; with "
                       "learning_rate='adaptive' the quadratic model chooses the "
                       "step size: drop kl_clip.")
    inner = precondition if _is_zero(weight_decay) else optax.chain(
        precondition, optax.add_decayed_weights(weight_decay))
    momentum = None if momentum is None or _is_zero(momentum) else momentum
  else:
    if isinstance(momentum, str):
      raise ValueError("momentum='adaptive' solves for the step size and the "
                       "momentum together: it needs learning_rate='adaptive'.")
    inner = with_optimizer_steps(precondition, learning_rate, momentum=momentum,
                                 weight_decay=weight_decay, kl_clip=kl_clip,
                                 nesterov=nesterov)
    momentum = None
  return adaptive_transform.quadratic_model_step(
      inner, loss_fn, learning_rate=learning_rate, momentum=momentum,
      weight_decay=weight_decay,
      damping=options.get("damping", default_damping),
      has_aux=options.get("has_aux", False),
      axis_name=options.get("axis_name"), **adaptation)


def _optimizer_alias(scale_by: Callable, method_options: Callable, name: str,
                     doc: str, shared: Callable = kronecker_family.kronecker_stepper,
                     statistics_every_step: Callable = lambda options: False,
                     statistics_with_inverses: bool = False) -> Callable:
  """``name(loss_fn, learning_rate, *, momentum, weight_decay, kl_clip, ...)``.

  Its ``__signature__`` lists every option explicitly (taken from the shared
  transform and the method), so ``optax.inject_hyperparams`` can bind them.
  The optimizer it returns records its refresh schedule for
  ``kfe.make_train_step``; ``statistics_every_step(options)``: whether its
  update reads the batch's statistics on every step;
  ``statistics_with_inverses``: the method takes statistics only when it
  refreshes (TENGraD), so its schedule's ``stats_every`` is ``inverse_every``.
  """
  default_damping = inspect.signature(shared).parameters["damping"].default

  def optimizer(loss_fn, learning_rate, *, momentum=0.9, weight_decay=0.0,
                kl_clip=None, nesterov=False, damping_adaptation=False,
                damping_adaptation_interval=5, damping_adaptation_decay=0.95,
                min_damping=1e-8, max_damping=1e8,
                preconditioner_damping_adaptation=False,
                preconditioner_damping_decay=damping_strength.DEFAULT_DECAY,
                model_batch=None, **options):
    precondition = scale_by(loss_fn, **options)
    setting = lambda key: options.get(key, defaults[key])
    plan = train_step.StepSchedule(
        setting("inverse_every" if statistics_with_inverses else "stats_every"),
        setting("inverse_every"),
        damping_adaptation_interval if damping_adaptation else None,
        setting("fisher"), setting("has_aux"), statistics_every_step(options),
        setting("axis_name"), options.get("stats_batch"))
    if nesterov not in (True, False):
      raise ValueError(f"{name}: nesterov must be True or False, got {nesterov!r}.")
    if nesterov and (momentum is None or _is_zero(momentum)):
      raise ValueError(f"{name}: nesterov=True needs a momentum (e.g. momentum=0.9); "
                       f"got momentum={momentum!r}.")
    if not (isinstance(learning_rate, str) or isinstance(momentum, str)
            or damping_adaptation or preconditioner_damping_adaptation):
      if model_batch is not None:
        raise ValueError(
            f"{name}: model_batch is the batch of the adaptive mode's quadratic "
            "model; with a fixed learning rate and no damping_adaptation there "
            "is none: drop model_batch (stats_batch= subsamples the statistics).")
      return train_step.remember_schedule(_compiled_when_eager(
          with_optimizer_steps(precondition, learning_rate, momentum=momentum,
                               weight_decay=weight_decay, kl_clip=kl_clip,
                               nesterov=nesterov)), plan)
    adaptation = dict(damping_adaptation=damping_adaptation,
                      damping_adaptation_interval=damping_adaptation_interval,
                      damping_adaptation_decay=damping_adaptation_decay,
                      min_damping=min_damping, max_damping=max_damping,
                      preconditioner_damping_adaptation=(
                          preconditioner_damping_adaptation),
                      preconditioner_damping_interval=setting("inverse_every"),
                      preconditioner_damping_decay=preconditioner_damping_decay,
                      model_batch=model_batch)
    return train_step.remember_schedule(_compiled_when_eager(_adaptive(
        precondition, loss_fn, learning_rate, momentum, weight_decay, kl_clip,
        nesterov, adaptation, options, default_damping)), plan)

  own = [p for p in inspect.signature(optimizer).parameters.values()
         if p.kind is not inspect.Parameter.VAR_KEYWORD]
  extra = [p for fn in (method_options, shared)
           for p in inspect.signature(fn).parameters.values()
           if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name != "name"]
  optimizer.__signature__ = inspect.Signature(own + extra)
  defaults = {p.name: p.default for p in extra}
  optimizer.__name__ = optimizer.__qualname__ = name
  optimizer.__doc__ = doc
  return optimizer


def _kfac_options(*, structure="block_diagonal"):
  """K-FAC's own options (see ``scale_by_kfac``)."""


kfac = _optimizer_alias(kfac_transform.scale_by_kfac, _kfac_options, "kfac", """\
K-FAC optimizer: ``scale_by_kfac`` → KL-clip → weight decay → momentum → lr.

Args:
  loss_fn: ``loss_fn(params, batch)`` using a ``kfe`` loss helper.
  learning_rate: float or optax schedule, or ``"adaptive"``: the step size
    α minimising the quadratic model with the exact Fisher of the batch
    (Martens & Grosse §7; see ``quadratic_model_step``).
  momentum: heavy-ball momentum (no dampening); 0 or None: off;
    ``"adaptive"`` (needs ``learning_rate="adaptive"``): μ from the model too.
  nesterov: Nesterov's form of that momentum (``optax.trace(μ, nesterov=
    True)``: the step is ``Δ + μv`` after ``v ← Δ + μv``), numeric
    learning rates only. From step 50 on it made more progress per step
    than heavy ball on every benchmark task (docs/performance.md).
  weight_decay: added to the preconditioned direction (``Δ + wd·θ``); in
    the adaptive model it is η of ``h = loss + η‖θ‖²/2``.
  kl_clip: κ for KL-clipping (``clip_by_kl``), or None (numeric lr only).
  damping_adaptation: adapt λ (``damping=`` is the initial λ) by the
    Levenberg–Marquardt rule every ``damping_adaptation_interval`` updates,
    with ``ω₁ = damping_adaptation_decay ** interval``, within
    ``[min_damping, max_damping]``; λ is ``state.damping``.
  preconditioner_damping_adaptation: (``learning_rate="adaptive"``) M&G
    §6.6: the preconditioner's damping ``γ²`` (``state.
    preconditioner_damping``, from ``damping=``) is re-tuned at each refresh
    of the inverses among ``{γ, ω₂γ, γ/ω₂}``, ``ω₂ =
    preconditioner_damping_decay ** inverse_every``, by the quadratic
    model's value at each one's best step; λ then damps only the model.
  model_batch: (adaptive α/μ or λ) the quadratic model's Fisher from the
    batch's first n examples (its forward-mode passes at n/M of the cost;
    the gradient and ρ's losses stay the whole batch's); None: all of it.
  **options: ``scale_by_kfac``'s options (damping, damping_mode, fisher,
    stats_every, inverse_every, ema_decay, fallback, max_factor_dim, has_aux).

Returns:
  An ``optax.GradientTransformationExtraArgs``; ``update`` needs ``params``,
  ``batch=`` and (sampled Fisher) ``key=``. Works under
  ``optax.inject_hyperparams(kfe.kfac, static_args=("loss_fn",))``.

Example:
  >>> opt = kfe.kfac(loss_fn, learning_rate=0.1, damping=1e-3)
  >>> state = opt.init(params)
  >>> updates, state = opt.update(grads, state, params, batch=batch, key=key)
  >>> adaptive = kfe.kfac(loss_fn, "adaptive", momentum="adaptive", damping=1.0,
  ...                     damping_adaptation=True)     # no tuning
""")


def _tkfac_options(*, factors="weighted", trace="tokens", conv_damping=None):
  """TKFAC's own options (see ``scale_by_tkfac``)."""


tkfac = _optimizer_alias(tkfac_transform.scale_by_tkfac, _tkfac_options, "tkfac",
                         """\
TKFAC optimizer: ``scale_by_tkfac`` → KL-clip → weight decay → momentum → lr.

Same signature as ``kfe.kfac`` plus TKFAC's ``factors``, ``trace`` and
``conv_damping`` (see ``scale_by_tkfac``).

Example:
  >>> opt = kfe.tkfac(loss_fn, learning_rate=0.1, damping=1e-3)
""")


tengrad = _optimizer_alias(
    tengrad_transform.scale_by_tengrad, lambda: None, "tengrad", """\
TENGraD optimizer: ``scale_by_tengrad`` → KL-clip → weight decay → momentum → lr.

Same shape as ``kfe.kfac``; options are ``scale_by_tengrad``'s (damping,
gram_batch, conv_gram, fisher, inverse_every, fallback, has_aux).

Example:
  >>> opt = kfe.tengrad(loss_fn, learning_rate=0.01, damping=0.1, gram_batch=128)
""", shared=tengrad_transform.scale_by_tengrad, statistics_with_inverses=True)


def _two_level_options(*, base="kfac", coarse_space="nicolaides",
                       coarse_matrix=None, combine="additive",
                       omega=(1.0, 1.0), coarse_damping="consistent",
                       fisher_products="statistics", fine_scale="model",
                       coarse_batch=None, coarse_statistics="batch",
                       spectral_iterations=None, residual_refresh="step",
                       scale_batch="coarse_batch", model_refresh="statistics"):
  """Two-level K-FAC's own options (see ``scale_by_two_level_kfac``)."""


two_level_kfac = _optimizer_alias(
    two_level_transform.scale_by_two_level_kfac, _two_level_options,
    "two_level_kfac", statistics_every_step=coarse_tokens.statistics_every_step,
    doc="""\
Two-level K-FAC optimizer: ``scale_by_two_level_kfac`` → KL-clip → weight
decay → momentum → lr.

Same signature as ``kfe.kfac`` plus ``base``, ``coarse_space``,
``coarse_matrix``, ``combine``, ``omega``, ``coarse_damping``,
``fisher_products``, ``fine_scale``, ``coarse_batch``,
``coarse_statistics``, ``spectral_iterations``, ``residual_refresh``,
``scale_batch`` and ``model_refresh``.

KL clip: ``clip_by_kl`` reads ``∇ᵀΔ`` as the step's KL. The
``combine="multiplicative"`` and ``"balanced"`` steps are model-consistent
(``∇ᵀΔ ≈ ΔᵀF_λΔ``); K-FAC's ``∇ᵀΔ`` understates its KL (up to 75× on the
autoencoder), so a ``kl_clip`` tuned for ``kfac`` clips them far harder:
give them κ ≈ 1, as Koroko et al.'s reference runs do (docs/methods.md,
two-level section, has both measurements).

Example:
  >>> opt = kfe.two_level_kfac(loss_fn, learning_rate=0.1, damping=1e-2,
  ...                          combine="multiplicative", coarse_matrix="exact",
  ...                          kl_clip=1.0)
""")


natural_gradient = _optimizer_alias(
    natural_gradient_lib.scale_by_natural_gradient, lambda: None,
    "natural_gradient", shared=natural_gradient_lib.scale_by_natural_gradient,
    doc="""\
Natural-gradient optimizer with a Kronecker or a Woodbury block per layer:
``scale_by_natural_gradient`` → KL-clip → weight decay → momentum → lr.

Same signature as ``kfe.kfac``; options are ``scale_by_natural_gradient``'s
(blocks, example_batch (required), damping, gram_batch, conv_gram, fisher,
stats_every, inverse_every, ema_decay, fallback, max_factor_dim, ...).

Example:
  >>> opt = kfe.natural_gradient(loss_fn, learning_rate=0.1, damping=1e-2,
  ...                            blocks="auto", example_batch=batch)
""")
