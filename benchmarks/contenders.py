"""The optimizers a benchmark compares, each as a jitted whole step.

``make_contender(name, task)`` gives a ``Contender`` whose ``step`` takes the
hyper-parameters as traced arrays, so one compilation serves the whole sweep.

* ``adam``: ``optax.adam(lr)``; ``sgd``: ``optax.sgd(lr, momentum=0.9)``.
* ``muon``: ``optax.contrib.muon(lr, consistent_rms=0.2)`` per its documented
  contract: Muon (Nesterov momentum 0.95, 5 Newton–Schulz steps) on the
  weight matrices, dense kernels and conv kernels (``[h, w, c_in, c_out]``
  orthogonalized as ``h·w·c_in × c_out``, as Keller Jordan's CIFAR-10
  runs do); Adam on everything else, embedding tables and learned
  positions included (Muon's authors keep embeddings on Adam).
  ``consistent_rms=0.2`` scales each Muon update to AdamW's RMS (Liu et
  al. 2025, "Muon is Scalable", which optax recommends), so one learning
  rate serves both parts; the sweep is Adam's grid and the next value up
  (``tasks`` grid ``muon``). The output layer stays on Muon.
* ``shampoo``: Google's ``distributed_shampoo`` (``precondition-opt``, the
  ``bench`` extra) at its documented defaults, grafted to normalized RMSProp,
  preconditioners every ``task.period`` steps (``shampoo_compat``); swept
  from a decade below Adam's learning rates to Adam's largest (``tasks``
  grid ``shampoo``: its optimum lies below Adam's).
* ``kfac``, ``tkfac``, ``tengrad``, ``two_level_kfac``: the kfac_jax_ext
  aliases with momentum 0.9 (Nesterov's form if ``task.nesterov``: ``run
  --nesterov``), KL-clip ``task.kl_clip``, statistics and inverses
  refreshed every ``task.period`` steps, every other option at its default
  (K-FAC: ``damping_mode="factored"``, the π-adjusted damping kfac-jax uses;
  TENGraD: ``gram_batch`` = the batch size, capped at 1000), and the state
  laid out from an ``example_batch`` (so every layer kind gets its block). The step is
  the fused one: ``kfe.value_and_grad`` computes loss, gradient and curvature
  statistics in one pass, statistics only on refresh steps. The schedule
  is static (``kfe.due_at`` of the step number, as kfac-jax's
  ``global_step_int``): one program for refresh steps, one for the others,
  neither with a conditional. Curvature EMA ``task.ema_decay`` (TENGraD
  keeps no running average).
* ``tengrad_gramN``: ``tengrad`` with ``gram_batch=N`` (a subsample of the
  batch for its blocks).
* ``tengrad_everyN``: ``tengrad`` with its factors and Gram matrices
  refreshed every N steps instead of ``task.period`` (N = 1: every step's
  blocks are the exact damped Fisher blocks of that step's batch, no reuse),
  whatever ``run --period`` says; swept like ``tengrad``.
  ``tengrad_empirical_everyN``: the same with the empirical Fisher (the
  data's targets, ``fisher="empirical"``): with N = 1 the gradient lies in
  the span of the block's per-example gradients, so no part of it is scaled
  by ``1/λ`` alone.
* ``kfac_statsN``: ``kfac`` with ``stats_batch=N`` (curvature statistics
  from the batch's first N examples, Martens & Grosse §8), swept like
  ``kfac``.
* ``two_level_COMBINE_SPACE`` (``TWO_LEVEL_VARIANTS``): two-level K-FAC
  with that combination and coarse space, swept like ``two_level_kfac``;
  ``two_level_COMBINE_SPACE_ggn``: its Fisher-vector products and per-step
  ``F_c`` with the batch's exact GGN (``fisher_products="ggn"``);
  ``two_level_COMBINE_SPACE_mixed``: the products it uses at full size
  from the exact GGN, ``F_c`` and the projected ones from the statistics
  (``fisher_products="mixed"``); ``two_level_COMBINE_SPACE_kronecker``
  (multiplicative and balanced on Nicolaides, spectral, Krylov–Nicolaides,
  and on residual or Krylov-residual with the basis rebuilt on statistics
  steps, ``residual_refresh="statistics"``): their products from
  Tselepidis' Kronecker model of the whole Fisher from the last statistics
  batch (``fisher_products="kronecker"``: no statistics pass between
  statistics steps); ``…_kronecker_batchN``: the model's tokens from the
  statistics' first N examples (``coarse_batch=N``); ``…_kronecker[_batchN]_both``:
  ``fine_scale="both"`` (the fine and the coarse step each scaled by its
  own quadratic-model ratio, α and γ, with the statistics' Fisher);
  ``…_scaleall``: those scales from all the statistics' examples
  (``scale_batch=None``) while the model keeps its first N;
  ``…_modelperiod``: the model rebuilt on the task's statistics period
  only, not on each step of a refresh warm-up (``model_refresh="period"``);
  ``two_level_COMBINE_SPACE_storedN`` (or
  ``_stored``: all examples; statistics' products): the per-step correction from the tokens of
  the last statistics batch's first N examples (``coarse_statistics=
  "stored"``, ``coarse_batch=N``; Koroko et al.'s code, whose Fisher batch
  is a quarter of the batch): no statistics pass between refreshes;
  ``two_level_COMBINE_SPACE_subsampleN``: between the fine level's
  statistics steps the correction's Fisher from a statistics pass over the
  step's first N rows only (``coarse_statistics="subsample"``,
  ``coarse_batch=N``), on statistics steps the first N of the full pass;
  ``two_level_COMBINE_spectral[_kronecker]_iterK``: the spectral space by K steps of
  warm-started inverse iteration per refresh (``spectral_iterations=K``)
  instead of an eigendecomposition, at the spectral variant's setting;
  ``two_level_COMBINE_RESIDUAL_refreshed`` (RESIDUAL ``residual`` or
  ``krylov_residual``): the residual basis rebuilt on statistics steps only,
  with its ``F_c``, and kept between (``residual_refresh="statistics"``),
  swept on its own; ``two_level_COMBINE_SPACE_klN`` (also after
  ``_storedN``, ``_subsampleN``, ``_iterK`` or ``_refreshed``): the variant with KL-clip κ = N instead
  of the task's (Koroko et al.'s reference runs use κ = 1, almost no
  clipping: the Galerkin correction of the multiplicative and balanced
  combinations sets the step's scale itself), swept on its own.
* ``natural_gradient``: ``kfe.natural_gradient`` (``blocks="auto"``: per
  layer the cheaper exactly damped Kronecker or Woodbury block,
  ``gram_batch`` as ``tengrad``), swept like the others.
* ``kfac_tridiagonal``: ``kfac`` with ``structure="block_tridiagonal"``
  (M&G §4.3: cross-layer factors between consecutive dense layers), swept
  like the others.
* ``kfac_adaptive``: ``kfe.kfac(loss, "adaptive", momentum="adaptive",
  damping_adaptation=True)`` (Martens & Grosse's α, μ and λ), settings in
  ``ADAPTIVE``, not swept; ``kfac_jax_adaptive``: kfac-jax's ``Optimizer``
  with its three adaptive options and the same settings.
* ``tengrad_adaptive``: ``kfe.tengrad`` with the same adaptive α, μ and λ
  (``gram_batch`` as ``tengrad``).
* ``kfac_relative``: ``kfac`` with ``damping_scale="relative"`` (λ in units
  of each block's mean eigenvalue), swept over one λ grid for every task
  (``tasks.RELATIVE_DAMPINGS``); ``kfac_adaptive_relative``:
  ``kfac_adaptive`` with it, λ₀ = ``ADAPTIVE_RELATIVE_DAMPING`` on every task;
  ``tengrad_relative`` and ``tengrad_adaptive_relative`` the same for
  ``tengrad`` (``λ_l = λ·tr(K)/(n·min(n, P_l))``).
* ``kfac_adaptive_relative_modelN``: ``kfac_adaptive_relative`` with
  ``model_batch=N`` (the quadratic model's Fisher from the batch's first N
  examples).
* ``kfac_adaptive_gamma``, ``kfac_adaptive_relative_gamma``: those two with
  M&G §6.6's separate preconditioner damping γ²
  (``preconditioner_damping_adaptation=True``: re-tuned at each refresh).
* ``kfac_jax``: kfac-jax 0.0.8's ``Optimizer`` with the same fixed learning
  rate, momentum 0.9, damping, ``norm_constraint = kl_clip``,
  ``curvature_ema = task.ema_decay`` and
  ``curvature_update_period = inverse_update_period = period``
  (no adaptive learning rate, momentum or damping); layers by its automatic
  registration. Needs the ``bench`` extra; on jax >= 0.9.2 it runs with the
  one-function shim of ``kfac_jax_compat``.

Every jitted step donates its carry (params and optimizer state), as kfac-jax
does, so no optimizer pays for copying its state into fresh buffers.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kfac_jax_ext as kfe
from kfac_jax_ext import coarse
from kfac_jax_ext import coarse_tokens

from benchmarks import contender_names as names
from benchmarks.contender_names import (  # noqa: F401  (re-exported)
    ADAPTIVE_MODEL, NATURAL, OPTIMIZERS, TWO_LEVEL_VARIANTS, known,
    refresh_period, settings_name)


def _gram_batch(task) -> int:
  """TENGraD's ``gram_batch`` in the benchmark: the batch size, capped at 1000."""
  batch = len(jax.tree_util.tree_leaves(task.sample_batch(np.random.default_rng(0)))[0])
  return min(batch, 1000)


MOMENTUM = 0.9
# The adaptive runs (no sweep), both libraries, every task: the adaptive
# rule of kfac-jax's examples for its MNIST autoencoder and classifier
# (examples/*/pipeline.py: M&G's λ₀ = 150, T₁ = 5, decay 0.95, λ in
# [1e-5, 1000]); statistics, inverses and EMA as the swept natural-gradient
# runs of the task (task.period, task.ema_decay); no weight decay (Adam has
# none either).
ADAPTIVE = {"initial_damping": 150.0, "interval": 5, "decay": 0.95,
            "min_damping": 1e-5, "max_damping": 1000.0}
# kfac_adaptive_relative: λ₀ with damping_scale="relative", the mean
# eigenvalue of each block, the same on every task (the swept kfac_relative
# chose λ = 1 on the transformer, before any adaptive run; later on all three)
ADAPTIVE_RELATIVE_DAMPING = 1.0


def muon_dimension_numbers(params):
  """Muon's reshaping per leaf: dense kernels as they are, conv kernels
  ``[h, w, c_in, c_out]`` as ``h·w·c_in × c_out``; None (Adam) for biases,
  norms, embedding tables, learned positions and anything else."""
  from optax.contrib import MuonDimensionNumbers

  def spec(path, x):
    names = jax.tree_util.keystr(path).lower()
    if any(word in names for word in ("embed", "position", "bias", "scale")):
      return None
    if x.ndim == 2:
      return MuonDimensionNumbers(reduction_axis=0, output_axis=1)
    if x.ndim == 4:
      return MuonDimensionNumbers(reduction_axis=(0, 1, 2), output_axis=3)
    return None
  return jax.tree_util.tree_map_with_path(spec, params)


def _muon(lr):
  from optax.contrib import muon
  return muon(lr, consistent_rms=0.2,
              muon_weight_dimension_numbers=muon_dimension_numbers)


class Contender(NamedTuple):
  """An optimizer made ready to train one task.

  Attributes:
    name: its name in ``OPTIMIZERS``.
    family: ``"adam"``, ``"sgd"``, ``"muon"``, ``"natural"``,
      ``"woodbury"`` (TENGraD: a damping grid reaching higher),
      ``"relative"`` (``damping_scale="relative"``: one grid for every task) or
      ``"adaptive"``: the sweep grid it uses.
    init: ``(params, hp) -> carry``.
    step: ``(carry, batch, key, hp, i) -> (carry, loss)``; ``hp`` holds
      ``lr`` and ``damping`` as float32 arrays, ``i`` is the step (int).
    params: ``carry -> params``.
    warmup: steps that trigger every compilation of ``step``.
  """
  name: str
  family: str
  init: Callable
  step: Callable
  params: Callable
  warmup: int


def _optax(name, task, make):
  grad_fn = jax.value_and_grad(task.loss_fn)

  @functools.partial(jax.jit, donate_argnums=0)
  def step(carry, batch, key, hp):
    params, state = carry
    loss, grads = grad_fn(params, batch)
    updates, state = make(hp["lr"]).update(grads, state, params)
    return (optax.apply_updates(params, updates), state), loss

  def init(params, hp):    # a copy: the step donates its carry
    params = jax.tree_util.tree_map(jnp.copy, params)
    return params, make(hp["lr"]).init(params)

  return Contender(name, name, init,
                   lambda carry, batch, key, hp, i: step(carry, batch, key, hp),
                   lambda carry: carry[0], warmup=1)


def _fused(name, family, task, make, warmup, damping_every=None,
           statistics_every_step=False, stats_batch=None, fisher="sampled"):
  """A kfac_jax_ext contender: ``make(hp)`` builds the optimizer; the step is
  the fused one with the static schedule of the task's period.
  ``statistics_every_step``: the optimizer reads the batch statistics on
  every step (two-level's per-step corrections), so the one pass takes them
  every step (else ``update`` would run a second pass of its own).
  ``stats_batch``: the optimizer's (statistics from the first n examples).
  ``fisher``: the optimizer's (``"sampled"`` or ``"empirical"`` targets)."""
  value_and_grad = kfe.value_and_grad(task.loss_fn, stats_batch=stats_batch,
                                      fisher=fisher)

  @functools.partial(jax.jit, static_argnames="due", donate_argnums=0)
  def step(carry, batch, key, hp, due):
    params, state = carry
    opt = make(hp)
    pass_due = due._replace(statistics=True) if statistics_every_step else due
    loss, grads, curvature = value_and_grad(params, batch, key, due=pass_due)
    updates, state = opt.update(grads, state, params, batch=batch, key=key,
                                curvature=curvature, due=due)
    return (optax.apply_updates(params, updates), state), loss

  def init(params, hp):    # a copy: the step donates its carry
    params = jax.tree_util.tree_map(jnp.copy, params)
    return params, make(hp).init(params)

  def run_step(carry, batch, key, hp, i):
    due = kfe.due_at(i, stats_every=task.period, inverse_every=task.period,
                     damping_every=damping_every,
                     refresh_warmup=task.refresh_warmup)
    return step(carry, batch, key, hp, due=due)

  return Contender(name, family, init, run_step, lambda carry: carry[0],
                   warmup=warmup)


def _natural(name, task, alias, options):
  if not name.startswith("tengrad"):      # TENGraD keeps no running average
    options = {"ema_decay": task.ema_decay, **options}
  # the state laid out per traced layer: attention kernels, embeddings and
  # grouped convs get blocks
  options = {"example_batch": task.sample_batch(np.random.default_rng(0)),
             **options}

  def make(hp):
    return alias(task.loss_fn, hp["lr"], damping=hp["damping"], momentum=MOMENTUM,
                 nesterov=task.nesterov, kl_clip=task.kl_clip, stats_every=task.period,
                 inverse_every=task.period, **options)

  per_step = coarse_tokens.statistics_every_step(options)
  family = ("relative" if options.get("damping_scale") == "relative" else
            "woodbury" if name.startswith("tengrad") else "natural")
  return _fused(name, family, task, make, warmup=2,
                statistics_every_step=per_step,
                stats_batch=options.get("stats_batch"),
                fisher=options.get("fisher", "sampled"))


def _adaptive(task, name):
  """``kfac_adaptive`` / ``tengrad_adaptive`` and their ``_relative``:
  the alias with M&G's adaptive α, μ and λ (settings ``ADAPTIVE``; the
  relative one: λ in units of each block's mean eigenvalue, from
  ``ADAPTIVE_RELATIVE_DAMPING``)."""
  a = ADAPTIVE
  batch = task.sample_batch(np.random.default_rng(0))
  gamma = name.endswith("_gamma")
  name = name.removesuffix("_gamma")
  model_batch = names.suffix_count(name, ADAPTIVE_MODEL)
  full_name = name
  if model_batch is not None:
    name = "kfac_adaptive_relative"
  kfac = name in ("kfac_adaptive", "kfac_adaptive_relative")
  options = (dict(ema_decay=task.ema_decay, damping_mode="factored") if kfac else
             dict(gram_batch=_gram_batch(task)))
  family, initial = "adaptive", a["initial_damping"]
  if name.endswith("_relative"):
    options["damping_scale"] = "relative"
    family, initial = "adaptive_relative", ADAPTIVE_RELATIVE_DAMPING
  alias = kfe.kfac if kfac else kfe.tengrad
  opt = alias(task.loss_fn, "adaptive", momentum="adaptive",
              damping=initial, damping_adaptation=True,
              damping_adaptation_interval=a["interval"],
              damping_adaptation_decay=a["decay"],
              min_damping=a["min_damping"], max_damping=a["max_damping"],
              stats_every=task.period, inverse_every=task.period,
              example_batch=batch, preconditioner_damping_adaptation=gamma,
              model_batch=model_batch, **options)
  return _fused(full_name + ("_gamma" if gamma else ""), family, task, lambda hp: opt,
                warmup=2 * task.period + 1, damping_every=a["interval"])


def _kfac_jax(task, adaptive=False):
  try:
    import kfac_jax
  except ImportError as e:
    raise ImportError("kfac-jax is not installed: pip install -e '.[bench]'") from e
  from benchmarks import kfac_jax_compat
  kfac_jax_compat.apply()
  if adaptive:
    a = ADAPTIVE
    options = dict(
        use_adaptive_learning_rate=True, use_adaptive_momentum=True,
        use_adaptive_damping=True, initial_damping=a["initial_damping"],
        damping_adaptation_interval=a["interval"],
        damping_adaptation_decay=a["decay"], min_damping=a["min_damping"],
        max_damping=a["max_damping"], curvature_ema=task.ema_decay,
        curvature_update_period=task.period, inverse_update_period=task.period)
  else:
    options = dict(
        use_adaptive_learning_rate=False, learning_rate_schedule=None,
        use_adaptive_momentum=False, momentum_schedule=None,
        use_adaptive_damping=False, damping_schedule=None,
        norm_constraint=task.kl_clip, curvature_ema=task.ema_decay,
        curvature_update_period=task.period, inverse_update_period=task.period)
  opt = kfac_jax.Optimizer(
      value_and_grad_func=jax.value_and_grad(task.kfac_jax_loss_fn), l2_reg=0.0,
      estimation_mode="fisher_gradients", multi_device=False, num_burnin_steps=0,
      **options)
  first_batch = jax.tree_util.tree_map(jnp.asarray,
                                       task.sample_batch(np.random.default_rng(0)))

  def init(params, hp):    # kfac-jax donates the params: step on a copy
    params = jax.tree_util.tree_map(jnp.copy, params)
    return params, opt.init(params, jax.random.PRNGKey(0), first_batch)

  def step(carry, batch, key, hp, i):
    params, state = carry
    fixed = {} if adaptive else dict(
        learning_rate=hp["lr"], momentum=jnp.asarray(MOMENTUM, jnp.float32),
        damping=hp["damping"])
    params, state, stats = opt.step(params, state, key, batch=batch,
                                    global_step_int=i, **fixed)
    return (params, state), stats["loss"]

  if adaptive:
    return Contender("kfac_jax_adaptive", "adaptive", init, step,
                     lambda carry: carry[0], warmup=2 * task.period + 1)
  return Contender("kfac_jax", "natural", init, step, lambda carry: carry[0],
                   warmup=2 * task.period + 1)


def make_contender(name: str, task) -> Contender:
  """The ``Contender`` of optimizer ``name`` on ``task``.

  Raises:
    ValueError: unknown name. ImportError: kfac-jax not installed.
  """
  if name == "adam":
    return _optax(name, task, optax.adam)
  if name == "sgd":
    return _optax(name, task, lambda lr: optax.sgd(lr, momentum=MOMENTUM))
  if name == "muon":
    return _optax(name, task, _muon)
  if name == "shampoo":
    from benchmarks import shampoo_compat
    return _optax(name, task, lambda lr: shampoo_compat.shampoo(lr, task.period))
  if name == "kfac":   # π-adjusted factored damping, as kfac-jax's blocks
    return _natural(name, task, kfe.kfac, {"damping_mode": "factored"})
  if name == "kfac_relative":   # λ in units of each block's mean eigenvalue
    return _natural(name, task, kfe.kfac, {"damping_mode": "factored",
                                           "damping_scale": "relative"})
  if names.suffix_count(name, "kfac_stats") is not None:   # M&G §8's subsample
    return _natural(name, task, kfe.kfac, {
        "damping_mode": "factored",
        "stats_batch": names.suffix_count(name, "kfac_stats")})
  if name == "kfac_tridiagonal":   # M&G §4.3 over chains of dense layers
    return _natural(name, task, kfe.kfac, {"damping_mode": "factored",
                                           "structure": "block_tridiagonal"})
  if name == "tkfac":
    return _natural(name, task, kfe.tkfac, {})
  if name in ("tengrad", "natural_gradient", "tengrad_relative"):
    alias = kfe.natural_gradient if name == "natural_gradient" else kfe.tengrad
    scale = {"damping_scale": "relative"} if name == "tengrad_relative" else {}
    return _natural(name, task, alias, {"gram_batch": _gram_batch(task), **scale})
  if names.tengrad_gram(name) is not None:
    return _natural(name, task, kfe.tengrad, {"gram_batch": names.tengrad_gram(name)})
  if names.tengrad_every(name) is not None:   # its own refresh period
    fisher = "empirical" if name.startswith("tengrad_empirical") else "sampled"
    return _natural(name, task._replace(period=names.tengrad_every(name)), kfe.tengrad,
                    {"gram_batch": _gram_batch(task), "fisher": fisher})
  if name == "two_level_kfac":
    return _natural(name, task, kfe.two_level_kfac, {})
  if names.two_level_spectral_iterations(name) is not None:
    variant, steps = names.two_level_spectral_iterations(name)
    combine = variant[len("two_level_"):].split("_", 1)[0]
    products = "kronecker" if variant.endswith("_kronecker") else "statistics"
    return _natural(name, task, kfe.two_level_kfac,
                    {"combine": combine, "coarse_space": "spectral",
                     "spectral_iterations": steps, "fisher_products": products})
  if names.two_level_kl_clip(name) is not None:
    variant, kappa = names.two_level_kl_clip(name)
    return make_contender(variant, task._replace(kl_clip=float(kappa)))._replace(name=name)
  if names.two_level_refreshed(name) is not None:   # the basis kept between
    variant = names.two_level_refreshed(name)       # statistics steps
    combine, space = variant[len("two_level_"):].split("_", 1)
    return _natural(name, task, kfe.two_level_kfac,
                    {"combine": combine, "coarse_space": space,
                     "residual_refresh": "statistics"})
  if names.two_level_subsample(name) is not None:   # the step's first N rows
    variant, rows = names.two_level_subsample(name)
    combine, space = variant[len("two_level_"):].split("_", 1)
    return _natural(name, task, kfe.two_level_kfac,
                    {"combine": combine, "coarse_space": space,
                     "coarse_statistics": "subsample", "coarse_batch": rows})
  if (name in TWO_LEVEL_VARIANTS or names.two_level_stored(name) is not None
      or names.two_level_model_batch(name) is not None
      or names.two_level_both(name) is not None
      or names.two_level_scale_all(name) is not None
      or names.two_level_model_period(name) is not None):
    periodic = names.two_level_model_period(name)  # not rebuilt in the warm-up
    scale_all = names.two_level_scale_all(periodic or name)   # α (γ): all examples
    name_ = scale_all or periodic or name
    both = names.two_level_both(name_)            # α and γ from the model
    variant, stored = names.two_level_stored(both or name_) or (both or name_, False)
    variant, model_rows = names.two_level_model_batch(variant) or (variant, None)
    products = next((p for p in ("ggn", "mixed", "kronecker")
                     if variant.endswith("_" + p)),
                    "statistics")
    combine, space = variant[len("two_level_"):].removesuffix(
        "_" + products).split("_", 1)
    extra = ({} if stored is False else
             {"coarse_statistics": "stored", "coarse_batch": stored})
    if products == "kronecker" and space in coarse.PER_STEP_SPACES:
      extra["residual_refresh"] = "statistics"     # the model's only schedule
    if model_rows is not None:                     # the model's first N examples
      extra["coarse_batch"] = model_rows
    if both is not None:
      extra["fine_scale"] = "both"
    if scale_all is not None:
      extra["scale_batch"] = None
    if periodic is not None:
      extra["model_refresh"] = "period"
    return _natural(name, task, kfe.two_level_kfac,
                    {"combine": combine, "coarse_space": space,
                     "fisher_products": products, **extra})
  if name == "kfac_jax":
    return _kfac_jax(task)
  if name in ("kfac_adaptive", "tengrad_adaptive", "kfac_adaptive_relative",
              "kfac_adaptive_gamma", "kfac_adaptive_relative_gamma",
              "tengrad_adaptive_relative") or names.suffix_count(
                  name, ADAPTIVE_MODEL) is not None:
    return _adaptive(task, name)
  if name == "kfac_jax_adaptive":
    return _kfac_jax(task, adaptive=True)
  raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(OPTIMIZERS)}")


def grid_points(contender: Contender, grids: dict) -> list:
  """The sweep's hyper-parameter settings: lr (× damping for natural methods);
  one setting, the initial λ, for the adaptive ones (nothing to sweep)."""
  if contender.family == "adaptive":
    return [{"lr": "adaptive", "damping": ADAPTIVE["initial_damping"]}]
  if contender.family == "adaptive_relative":
    return [{"lr": "adaptive", "damping": ADAPTIVE_RELATIVE_DAMPING}]
  grid = grids[contender.family]
  dampings = grid.get("damping", [0.0])
  return [{"lr": float(lr), "damping": float(d)} for lr in grid["lr"] for d in dampings]
