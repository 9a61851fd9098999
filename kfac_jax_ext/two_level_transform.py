"""Two-level K-FAC as optax: a K-FAC/TKFAC fine level plus a coarse correction.

See ``coarse.py`` for the math. The fine level is the Kronecker-family step
(same state, schedule and options); this module keeps the running coarse
statistics, refreshes ``(F_c)⁻¹`` with the fine inverses and combines.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kfac_jax_ext import checks
from kfac_jax_ext import coarse
from kfac_jax_ext import distributed
from kfac_jax_ext import kfac_transform
from kfac_jax_ext import kronecker_family
from kfac_jax_ext import linalg
from kfac_jax_ext import plan as plan_lib
from kfac_jax_ext import schedule
from kfac_jax_ext import statistics
from kfac_jax_ext import tkfac_transform
from kfac_jax_ext import tracing
from kfac_jax_ext.blocks import kronecker
from kfac_jax_ext.blocks import woodbury
from kfac_jax_ext.state import Health, KfacState

MAX_COARSE = 4096


class TwoLevelState(NamedTuple):
  """State of ``scale_by_two_level_kfac`` (arrays only).

  Attributes:
    base: the fine level's ``KfacState``.
    curvature_due: whether the next update needs statistics (always, for the
      multiplicative and balanced corrections).
    coarse_count: accepted coarse statistics batches (EMA schedule).
    coarse_a, coarse_g: running coarse statistics ``[S, S]``; ``F_c = coarse_a
      ∘ coarse_g`` (``"kronecker"``: ``S_A``, ``S_G``; ``"exact"``: ``F_c`` and
      ones). ``S`` = one index per ≥2-D leaf (per parameter for
      ``"parameters"``); unused indices stay zero.
    coarse_inverse: ``(F_c + coarse damping)⁻¹`` of the last refresh.
    spectral: per leaf, ``(rows vector, cols vector)`` of the spectral space.
    health: coarse-level ``Health`` counters.
  """
  base: KfacState
  curvature_due: jax.Array
  coarse_count: jax.Array
  coarse_a: jax.Array
  coarse_g: jax.Array
  coarse_inverse: jax.Array
  spectral: tuple
  health: Health


class _Layer(NamedTuple):
  kl: Any          # plan_lib.KroneckerLayer
  idx: jax.Array   # its coarse indices
  basis: jax.Array  # [m, d_a, d_g]
  rank_one: Any


def _check(base, coarse_space, coarse_matrix, combine, coarse_damping, omega):
  for name, value, allowed in (
      ("base", base, ("kfac", "tkfac")),
      ("coarse_space", coarse_space, coarse.COARSE_SPACES + (None,)),
      ("coarse_matrix", coarse_matrix, coarse.COARSE_MATRICES),
      ("combine", combine, coarse.COMBINES),
      ("coarse_damping", coarse_damping, ("consistent", "identity"))):
    if value not in allowed:
      raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")
  if coarse_space == "parameters" and coarse_matrix == "kronecker":
    raise ValueError("coarse_matrix='kronecker' needs rank-one coarse vectors "
                     "(nicolaides or spectral); use coarse_matrix='exact' with "
                     "coarse_space='parameters'.")
  if len(tuple(omega)) != 2:
    raise ValueError(f"omega must be a pair (ω₁, ω₂), got {omega!r}.")


def coarse_layers(plan, spectral):
  """The Kronecker layers of the coarse level: plain dense/conv layers (an
  embedding, a grouped conv or a tied kernel keeps its fine-level block
  only) whose factors fit the spectral slots of their kernel."""
  def fits(kl):
    if spectral is None or spectral[kl.layer.kernel] is None:
      return True
    n = spectral[kl.layer.kernel][0].shape[0]
    return max(kl.d_a, kl.d_g) <= n
  return [kl for kl in plan.kronecker if kl.layer.is_plain and fits(kl)]


def _layers(plan, spectral, slots, space, dtype):
  out = []
  for kl in coarse_layers(plan, spectral):
    vec_a = vec_g = None
    if space == "spectral":
      rows, cols = spectral[kl.layer.kernel]
      vec_a = (rows if kl.a_side == "rows" else cols)[:kl.d_a]
      vec_g = (cols if kl.a_side == "rows" else rows)[:kl.d_g]
    basis, rank_one = coarse.layer_basis(space, kl.d_a, kl.d_g, vec_a, vec_g,
                                         dtype)
    idx = jnp.asarray(slots[kl.layer.kernel][:basis.shape[0]])
    out.append(_Layer(kl, idx, basis, rank_one))
  return out


def _tokens(layers, traced, cb, dtype):
  m = traced.num_examples
  return [woodbury.per_example_tokens(cb.layers[l.kl.index][0].astype(dtype),
                                      cb.layers[l.kl.index][1].astype(dtype),
                                      l.kl.has_bias, m, m) for l in layers]


def _batch_coarse(layers, tokens, size, coarse_matrix, m, dtype):
  """This batch's ``(coarse_a, coarse_g)``, scattered to ``[S, S]``."""
  if coarse_matrix == "kronecker":
    pa = [a @ l.rank_one[0] for l, (a, _) in zip(layers, tokens)]
    pg = [g @ l.rank_one[1] for l, (_, g) in zip(layers, tokens)]
    s_a, s_g = coarse.kronecker_sums(pa, pg)
    idx = jnp.concatenate([l.idx for l in layers])
    full = lambda x: jnp.zeros((size, size), dtype).at[jnp.ix_(idx, idx)].set(x)
    return full(s_a), full(s_g)
  c = jnp.concatenate([coarse.example_projections(a, g, l.basis, l.rank_one)
                       for l, (a, g) in zip(layers, tokens)], axis=1)
  idx = jnp.concatenate([l.idx for l in layers])
  fc = jnp.zeros((size, size), dtype).at[jnp.ix_(idx, idx)].set(c.T @ c / m)
  return fc, jnp.ones((size, size), dtype)


def _coarse_inverse(layers, st_a, st_g, lam, coarse_damping, size, dtype):
  """``(F_c + D)⁻¹``: ``D = λ RRᵀ`` (consistent) or ``λI``; unused indices get 1."""
  used = jnp.zeros((size,), bool)
  damp = jnp.zeros((size, size), dtype)
  for l in layers:
    used = used.at[l.idx].set(True)
    block = (jnp.einsum("kde,jde->kj", l.basis, l.basis)
             if coarse_damping == "consistent" else jnp.eye(len(l.idx), dtype=dtype))
    damp = damp.at[jnp.ix_(l.idx, l.idx)].set(lam * block)
  matrix = st_a * st_g + damp + jnp.diag(jnp.where(used, 0.0, 1.0).astype(dtype))
  inverse = jnp.linalg.inv(linalg.symmetrize(matrix))
  return inverse, linalg.all_finite(inverse)


def _apply_q(layers, inverse, xs, size, dtype):
  """``Q x = Rᵀ F_c⁻¹ R x`` per layer."""
  rx = jnp.zeros((size,), dtype)
  for l, x in zip(layers, xs):
    rx = rx.at[l.idx].set(coarse.project(l.basis, x))
  beta = inverse @ rx
  return [coarse.lift(l.basis, beta[l.idx]) for l in layers]


def scale_by_two_level_kfac(
    loss_fn: Callable[..., Any],
    *,
    base: str = "kfac",
    coarse_space: str | None = "nicolaides",
    coarse_matrix: str = "kronecker",
    combine: str = "additive",
    omega: tuple = (1.0, 1.0),
    coarse_damping: str = "consistent",
    **options,
) -> optax.GradientTransformationExtraArgs:
  r"""Two-level K-FAC: the base preconditioner plus a coarse correction.

  With ``M⁻¹`` the base (K-FAC or TKFAC) block-diagonal preconditioner,
  ``R`` the coarse space, ``F_c = R F_λ Rᵀ`` and ``Q = Rᵀ F_c⁻¹ R``:
  additive ``ω₁M⁻¹∇ + ω₂Q∇`` (Tselepidis et al. 2020), multiplicative
  ``M⁻¹∇ + Q(∇ − F_λM⁻¹∇)`` (Galerkin-optimal; Koroko et al. 2023's
  analysis) or balanced ``(I − QF_λ)M⁻¹(I − F_λQ)∇ + Q∇``. ``F_λ`` products
  use the exact Fisher of the step's statistics batch (one extra backward
  pass per step for multiplicative/balanced).

  Args:
    loss_fn: ``loss_fn(params, batch)`` using a ``kfe`` loss helper.
    base: ``"kfac"`` (default) or ``"tkfac"``.
    coarse_space: ``"nicolaides"`` (one all-ones vector per layer; default),
      ``"spectral"`` (``q_A⊗q_G`` of the smallest eigenvalues, refreshed with
      the inverses), ``"parameters"`` (``R = I``: the exact damped natural
      gradient on the layers; small models) or None (the base method).
    coarse_matrix: ``"kronecker"`` (Tselepidis: ``F_c[i,j] = (r_aᵀA_ij r_a)
      (r_gᵀG_ij r_g)`` from per-token projections, no ``d×d`` cross products)
      or ``"exact"`` (Koroko: ``(1/M) Σ_n c_n c_nᵀ``, ``c_{n,i} = r_iᵀu_{n,i}``).
      With the additive combination both are running averages with the
      factors' schedule, inverted with the fine inverses; multiplicative and
      balanced use ``F_c`` of the step's own batch (the batch of the
      Fisher-vector products) and invert it every step (``S×S``, cheap), so
      Galerkin orthogonality holds at every step.
    combine: ``"additive"`` (default), ``"multiplicative"`` or ``"balanced"``.
    omega: ``(ω₁, ω₂)`` of the additive combination.
    coarse_damping: ``"consistent"`` (``λRRᵀ``, i.e. ``λ·n_i`` for
      Nicolaides, so that ``F_c = R F_λ Rᵀ``; default) or ``"identity"``
      (``λI``, Tselepidis' code).
    **options: the base method's options (``scale_by_kfac``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (same ``update`` as
    ``scale_by_kfac``). The multiplicative and balanced combinations read
    the batch statistics on every step: with a static ``due``, call
    ``kfe.value_and_grad`` with ``due._replace(statistics=True)`` and pass it
    the ``curvature``, else ``update`` runs its own statistics pass (a
    second forward) on the steps where ``due.statistics`` is False.

  Example:
    >>> tx = optax.chain(kfe.scale_by_two_level_kfac(loss_fn, combine="balanced",
    ...                                              coarse_matrix="exact"),
    ...                  optax.sgd(0.1, momentum=0.9))
  """
  _check(base, coarse_space, coarse_matrix, combine, coarse_damping, omega)
  variant = kfac_transform.KFAC if base == "kfac" else tkfac_transform.tkfac_variant()
  name = "scale_by_two_level_kfac"
  base_init, base_step = kronecker_family.kronecker_stepper(
      loss_fn, variant, name=name, **options)
  if coarse_space is None:
    return optax.GradientTransformationExtraArgs(
        base_init, lambda u, s, p=None, **kw: base_step(
            u, s, p, **{k: kw.get(k) for k in ("batch", "key", "curvature",
                                               "due")},
            damping_override=kw.get("damping"))[:2])
  ema_decay = options.get("ema_decay", 0.95)
  inverse_every = options.get("inverse_every", 5)
  stats_every = options.get("stats_every", 1)
  fisher = options.get("fisher", "sampled")
  has_aux = options.get("has_aux", False)
  axis_name = options.get("axis_name")
  every_step = combine != "additive"

  def init_fn(params):
    base_state = base_init(params)
    shapes = [tuple(jnp.shape(x)) for x in jax.tree_util.tree_leaves(params)]
    size = sum(len(s) for s in coarse.leaf_slots(shapes, coarse_space))
    if size > MAX_COARSE:
      raise ValueError(f"coarse_space={coarse_space!r} gives {size} coarse "
                       f"vectors (more than {MAX_COARSE}); use 'nicolaides' or "
                       "'spectral' for models of this size.")
    dtype = linalg.factor_dtype()
    # one size for both sides: a layer may use either side of its kernel
    spectral = tuple(
        (jnp.ones((max(kronecker.slot_sizes(s)),), dtype),
         jnp.ones((max(kronecker.slot_sizes(s)),), dtype))
        if coarse_space == "spectral" and len(s) >= 2 else None for s in shapes)
    # Distinct buffers (no array twice in the state): the state is donatable.
    zeros = jnp.zeros((size, size), dtype)
    g0 = (jnp.zeros((size, size), dtype) if coarse_matrix == "kronecker"
          else jnp.ones((size, size), dtype))
    zero = lambda: jnp.zeros([], jnp.int32)
    return TwoLevelState(base_state, jnp.array(True), zero(), zeros, g0,
                         jnp.eye(size, dtype=dtype), spectral,
                         Health(zero(), zero()))

  def update_fn(updates, state, params=None, *, batch=None, key=None,
                curvature=None, due=None, **extra_args):
    schedule.check_due(due, name)
    # Multiplicative/balanced combinations read the batch statistics every step.
    needs_batch = None if due is None else due._replace(
        statistics=due.statistics or every_step)
    checks.check_update_args(name, params, batch, curvature, fisher,
                                       key, needs_batch)
    traced = tracing.trace_loss(loss_fn, params, batch, has_aux)
    if curvature is not None:
      cb = curvature
    elif needs_batch is not None and not needs_batch.statistics:
      cb = None         # not used: neither the base nor the coarse level reads it
    else:
      cond_due = None if (every_step or due is not None) else (
          state.base.curvature_due)
      cb = statistics.statistics_pass(traced, params, batch, key, fisher,
                                      due=cond_due, axis_name=axis_name)[2]
    stats_due = state.base.curvature_due
    refresh_due = state.base.count % inverse_every == 0
    static_stats = None if due is None else due.statistics
    static_refresh = None if due is None else due.inverses
    out, base_state, ctx = base_step(updates, state.base, params, batch=batch,
                                     key=key, curvature=cb, due=due,
                                     damping_override=extra_args.get("damping"))
    dtype = state.coarse_a.dtype
    size = state.coarse_a.shape[0]
    shapes = list(traced.param_shapes)
    slots = coarse.leaf_slots(shapes, coarse_space)
    spectral = state.spectral
    if coarse_space == "spectral":     # fresh vectors first: R is the same below
      spectral = schedule.maybe(
          inverse_every, refresh_due,
          lambda sp: _spectral_vectors(ctx.plan, base_state, sp, variant,
                                       axis_name),
          lambda sp: sp, spectral, static_refresh)
    layers = _layers(ctx.plan, spectral, slots, coarse_space, dtype)
    if not layers:
      return out, state._replace(base=base_state)
    m = traced.num_examples

    def accumulate(st):
      tokens = _tokens(layers, traced, cb, dtype)
      new_a, new_g = distributed.mean(
          _batch_coarse(layers, tokens, size, coarse_matrix, m, dtype), axis_name)
      k = (st.coarse_count + 1).astype(dtype)
      eps = 0.0 if every_step else jnp.minimum(1.0 - 1.0 / k, ema_decay)
      ok = linalg.all_finite(new_a, new_g)
      ema = lambda old, new: jnp.where(ok, eps * old + (1 - eps) * new, old)
      health = st.health._replace(nonfinite_statistics=(
          st.health.nonfinite_statistics + (~ok).astype(jnp.int32)))
      return (ema(st.coarse_a, new_a), ema(st.coarse_g, new_g),
              st.coarse_count + ok.astype(jnp.int32), health)

    # Multiplicative/balanced: F_c from the step's own batch, the batch of the
    # Fisher-vector products, so that R(∇ − F_λΔ) = 0 holds at every step.
    coarse_a, coarse_g, coarse_count, health = schedule.maybe(
        1 if every_step else stats_every, stats_due, accumulate,
        lambda st: (st.coarse_a, st.coarse_g, st.coarse_count, st.health), state,
        None if every_step else static_stats)

    def refresh(operand):
      inverse, health = operand
      new, ok = _coarse_inverse(layers, coarse_a, coarse_g, ctx.damping,
                                coarse_damping, size, dtype)
      health = health._replace(failed_inverses=health.failed_inverses + (
          ~ok).astype(jnp.int32))
      return jnp.where(ok, new, inverse), health

    inverse, health = schedule.maybe(
        1 if every_step else inverse_every, refresh_due, refresh, lambda o: o,
        (state.coarse_inverse, health), None if every_step else static_refresh)

    grads = jax.tree_util.tree_leaves(updates)
    fine = jax.tree_util.tree_leaves(out)
    mats = lambda leaves: [plan_lib.to_matrix(
        l.kl.layer, leaves[l.kl.layer.kernel],
        leaves[l.kl.layer.bias] if l.kl.has_bias else None).astype(dtype)
        for l in layers]
    v, b = mats(grads), mats(fine)
    q = lambda xs: _apply_q(layers, inverse, xs, size, dtype)
    if combine == "additive":
      w1, w2 = omega
      delta = [w1 * bi + w2 * qi for bi, qi in zip(b, q(v))]
    else:
      tokens = _tokens(layers, traced, cb, dtype)
      fvp = lambda xs: [f + ctx.damping * x for f, x in zip(distributed.mean(
          coarse.fisher_vector_product(tokens, xs, m, 0.0), axis_name), xs)]
      sub = lambda xs, ys: [x - y for x, y in zip(xs, ys)]
      if combine == "multiplicative":
        delta = [bi + ci for bi, ci in zip(b, q(sub(v, fvp(b))))]
      else:
        y = q(v)
        z = sub(v, fvp(y))
        w = mats(ctx.precondition(_write(layers, list(grads), z, shapes)))
        delta = [wi - ci + yi for wi, ci, yi in zip(w, q(fvp(w)), y)]
    fine = _write(layers, fine, delta, shapes)
    new_state = TwoLevelState(base_state, jnp.array(True) if every_step else
                              base_state.curvature_due, coarse_count, coarse_a,
                              coarse_g, inverse, spectral, health)
    treedef = jax.tree_util.tree_structure(updates)
    return jax.tree_util.tree_unflatten(treedef, fine), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _write(layers, leaves, mats, shapes):
  """Writes per-layer ``[d_a, d_g]`` matrices back into (a copy of) leaves."""
  leaves = list(leaves)
  for l, x in zip(layers, mats):
    layer = l.kl.layer
    kernel, bias = plan_lib.from_matrix(layer, x, shapes[layer.kernel],
                                        l.kl.has_bias)
    leaves[layer.kernel] = kernel.astype(leaves[layer.kernel].dtype)
    if l.kl.has_bias:
      leaves[layer.bias] = bias.astype(leaves[layer.bias].dtype)
  return leaves


def _spectral_vectors(plan, base_state, spectral, variant, axis_name=None):
  """Smallest-eigenvalue eigenvectors of each layer's effective factors
  (each device decomposes the layers it owns when ``axis_name`` is set)."""
  spectral = list(spectral)

  def vectors(kl):
    fa, fg, _ = kronecker_family.layer_factors(
        kl, base_state.factors[kl.layer.kernel],
        base_state.traces[kl.layer.kernel], variant, 0.0)
    return coarse.smallest_eigenvector(fa), coarse.smallest_eigenvector(fg)

  layers = coarse_layers(plan, spectral)
  found = distributed.on_owners(
      [lambda kl=kl: vectors(kl) for kl in layers],
      [kl.d_a ** 3 + kl.d_g ** 3 for kl in layers], axis_name)
  for kl, (va, vg) in zip(layers, found):
    rows, cols = spectral[kl.layer.kernel]
    if kl.a_side == "rows":
      rows, cols = linalg.set_leading(rows, va), linalg.set_leading(cols, vg)
    else:
      rows, cols = linalg.set_leading(rows, vg), linalg.set_leading(cols, va)
    spectral[kl.layer.kernel] = (rows, cols)
  return tuple(spectral)
