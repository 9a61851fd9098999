"""Two-level K-FAC's Galerkin corrections from the Kronecker model of the Fisher.

``fisher_products="kronecker"``. The fine level models each layer's Fisher
block as ``A_ii ⊗ G_ii``; Tselepidis et al.'s coarse matrix extends the model
to every pair of layers, ``F̃_ij = A_ij ⊗ G_ij`` with the cross-layer factors
``A_ij = E[ā_i ā_jᵀ]``, ``G_ij = E[g_i g_jᵀ]`` (the same tokens, K-FAC's
scaling; pooled per example where two layers' token counts differ, as
``coarse.kronecker_sums``). This module takes the multiplicative and
balanced combinations' products from that model too. On rank-one coarse
atoms ``r_k = p_k q_kᵀ`` (layer ``i``) they read ``F̃`` only through

    a_kj = A_ji p_k = E[(p_kᵀā_i) ā_j]     [d_aj]
    c_kj = G_ji q_k = E[(q_kᵀg_i) g_j]     [d_gj]

    (R F̃ x)_k = Σ_j a_kjᵀ X_j c_kj                 (projected)
    (F̃ Rᵀβ)_j = Σ_k β_k a_kj c_kjᵀ                 (lifted)
    (R F̃ Rᵀ)_kl = (a_kj(l)ᵀ p_l)(c_kj(l)ᵀ q_l)     (Tselepidis' F_c)

(coarse vectors mixing several atoms, Krylov–Nicolaides', by the layer's
``RankOne.mixing``). Each costs ``O(S·P)`` (``S`` atoms, ``P`` coarse-layer
parameters) instead of a pass over the batch's tokens, and ``a``, ``c`` come
from the last statistics batch (as Koroko et al.'s code takes its Fisher
from the last statistics batch): between statistics steps no statistics
pass. Not a running average: one that lags the network (decay 0.8) made the
multiplicative step diverge on the MNIST autoencoder, where the last batch's
tracks K-FAC per step (docs/methods.md). ``F_c`` is formed from the same
``a``, ``c`` every step, so Galerkin orthogonality ``R(∇ − F̃_λΔ) = 0`` holds
exactly for the model's ``F̃_λ = F̃ + λI``.

Memory and cost: the state holds ``S × n_j`` numbers twice per ≥2-D leaf
(``n_j`` its larger slot size: ``S·Σ_j n_j``, e.g. 8 × 4322 on the MNIST
autoencoder; it grows with the square of the layer count), and a statistics
step projects every layer's tokens on every atom, ``O(S·K·Σ_j(d_aj +
d_gj))`` for ``K`` tokens: meant for models of tens of layers, as the
coarse level's ``S × S`` matrix is.

The fine step's model scale (``fine_scale="model"``) needs ``xᵀF x`` of a
full-size ``x``, which the model cannot give cheaply (every pair of
layers); it is measured with the statistics' Fisher on the statistics steps
(``α = xᵀr / xᵀF_λx``, one pass over the tokens there) and held until the
next one. ``fine_scale="both"`` measures the coarse part's ``γ = yᵀ∇ /
yᵀF_λy`` (``y = Q∇``) the same way: on residual spaces the model
underestimates the Fisher along the coarse vectors (they are where it is
wrong), so ``y`` solved in it is too long (docs/methods.md). The
projections keep ``Q``: ``γy + α(I − QF̃_λ)x`` is then exactly the
combination for the model corrected along the coarse space, ``F̂ = F̃_λ +
(1/γ − 1)F̃_λQF̃_λ`` (``RF̂Rᵀ = RF̃_λRᵀ/γ``, ``Q̂ = γQ``, ``F̂Q̂ = F̃_λQ``);
``γQ`` in the projections too, with ``F̃_λ`` unchanged, is no model's
combination (tried: it blew up early on the MNIST autoencoder's sweep
batches; docs/methods.md).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kfac_jax_ext import coarse
from kfac_jax_ext import coarse_level as level
from kfac_jax_ext import distributed
from kfac_jax_ext import initial_arrays
from kfac_jax_ext import linalg
from kfac_jax_ext import schedule
from kfac_jax_ext import stats_subsample
from kfac_jax_ext.blocks import kronecker

SPACES = ("nicolaides", "spectral", "krylov_nicolaides")


class ModelState(NamedTuple):
  """The Kronecker model's projections and the held model scale.

  Attributes:
    a: per ≥2-D leaf ``j``, ``[S, n_j]``: row ``k`` holds ``a_kj`` in its first
      ``d_aj`` entries (``n_j`` = the leaf's larger slot size); None for ≤1-D
      leaves.
    c: the same for ``c_kj`` (first ``d_gj`` entries).
    scale: the fine step's ``α`` of the last statistics step (1 before).
    coarse_scale: the coarse step's ``γ`` of the last statistics step
      (``fine_scale="both"``; 1 otherwise and before).
  """
  a: tuple
  c: tuple
  scale: jax.Array
  coarse_scale: jax.Array


def check(fisher_products, combine, coarse_space, coarse_matrix, options,
          residual_refresh="step", scale_batch="coarse_batch",
          fine_scale="model", model_refresh="statistics") -> None:
  """Raises ``ValueError`` where ``fisher_products="kronecker"`` cannot apply
  (the residual spaces: ``coarse_model_bases``), or ``scale_batch`` is set
  where no model scale is measured on its own."""
  if scale_batch != "coarse_batch":
    if isinstance(scale_batch, str) or (
        fisher_products != "kronecker" or coarse_space is None or fine_scale == "none"):
      raise ValueError(f"scale_batch chooses the examples of the model scales α, γ "
                       f"that fisher_products='kronecker' measures on statistics "
                       f"steps (fine_scale 'model' or 'both'); got scale_batch="
                       f"{scale_batch!r} with fisher_products={fisher_products!r}, "
                       f"fine_scale={fine_scale!r}, coarse_space={coarse_space!r}: "
                       "pass None (all examples), a positive int, or leave it unset.")
    stats_subsample.check_examples(scale_batch, "scale_batch",
                                   "scale_by_two_level_kfac")
  if model_refresh != "statistics" and (model_refresh != "period" or (
      fisher_products != "kronecker" or coarse_space is None)):
    raise ValueError(f"model_refresh is 'statistics' or 'period' (the Kronecker "
                     f"model's rebuild, fisher_products='kronecker'); got "
                     f"{model_refresh!r} with fisher_products={fisher_products!r}, "
                     f"coarse_space={coarse_space!r}: leave it unset.")
  if fisher_products != "kronecker" or coarse_space is None:
    return
  if combine == "additive":
    raise ValueError("fisher_products='kronecker' models the products of the "
                     "multiplicative and balanced combinations; the additive one "
                     "uses none (its coarse_matrix='kronecker' is the same F_c): "
                     "pass combine='multiplicative' or 'balanced', or "
                     "fisher_products='statistics'.")
  if coarse_space not in SPACES and not (
      coarse_space in coarse.PER_STEP_SPACES and residual_refresh == "statistics"):
    raise ValueError(f"fisher_products='kronecker' needs coarse vectors fixed "
                     f"between statistics steps ({SPACES}, or a residual space "
                     f"with residual_refresh='statistics'); coarse_space="
                     f"{coarse_space!r} is built from each step's residual: "
                     "pass residual_refresh='statistics', or fisher_products="
                     "'statistics' or 'mixed'.")
  if (coarse_space == "krylov_nicolaides"
      and options.get("damping_mode", "factored") != "factored"):
    raise ValueError("fisher_products='kronecker' with coarse_space="
                     "'krylov_nicolaides' needs its vector M⁻¹1 as a rank-one "
                     "atom, which factored damping gives: pass damping_mode="
                     "'factored' (the default) or coarse_space='nicolaides'.")
  if coarse_matrix not in (None, "kronecker"):
    raise ValueError(f"fisher_products='kronecker' forms F_c = R F̃ Rᵀ from its "
                     f"own model (Tselepidis' Kronecker F_c); coarse_matrix="
                     f"{coarse_matrix!r} would break Galerkin orthogonality: "
                     "leave coarse_matrix unset.")


def initial(shapes, size: int, dtype) -> ModelState:
  """Zeros for every leaf's projections: no correction before the first
  statistics step (``F_c`` is then ``λRRᵀ``)."""
  def one(shape):
    if len(shape) < 2:
      return None
    return initial_arrays.zeros((size, max(kronecker.slot_sizes(shape))), dtype)
  return ModelState(tuple(one(s) for s in shapes), tuple(one(s) for s in shapes),
                    initial_arrays.ones((), dtype), initial_arrays.ones((), dtype))


def batch_projections(layers, toks):
  """This batch's ``(a_kj, c_kj)`` for every atom ``k`` of every coarse layer
  ``i`` and every coarse layer ``j``: per ``j`` a pair ``([n, d_aj],
  [n, d_gj])`` per ``i`` (``n`` = layer i's atoms)."""
  pa = [a @ l.rank_one.rows.T for l, (a, _) in zip(layers, toks)]   # [M,T,n]
  pg = [g @ l.rank_one.cols.T for l, (_, g) in zip(layers, toks)]
  m = toks[0][0].shape[0]
  out = []
  for a_j, g_j in toks:
    row = []
    for i in range(len(layers)):
      ti, tj = pa[i].shape[1], a_j.shape[1]
      if ti == tj:
        row.append((jnp.einsum("mtk,mtd->kd", pa[i], a_j) / (m * tj),
                    jnp.einsum("mtk,mte->ke", pg[i], g_j) / m))
      else:
        row.append((jnp.einsum("mk,md->kd", pa[i].mean(1), a_j.mean(1)) / m,
                    jnp.einsum("mk,me->ke", pg[i].sum(1), g_j.sum(1))
                    / (m * (ti * tj) ** 0.5)))
    out.append(row)
  return out


def replaced(model: ModelState, layers, toks, axis_name):
  """``(model, ok)`` with this statistics batch's projections; a non-finite
  batch keeps the old model (``ok`` False)."""
  batch = distributed.mean(batch_projections(layers, toks), axis_name)
  a, c = list(model.a), list(model.c)
  for l_j, row in zip(layers, batch):
    kernel = l_j.kl.layer.kernel
    for l_i, (a_ij, c_ij) in zip(layers, row):
      a[kernel] = a[kernel].at[l_i.idx, :l_j.kl.d_a].set(a_ij)
      c[kernel] = c[kernel].at[l_i.idx, :l_j.kl.d_g].set(c_ij)
  ok = linalg.all_finite(*[x for x in a + c if x is not None])
  keep = lambda old, new: None if old is None else jnp.where(ok, new, old)
  return model._replace(a=tuple(map(keep, model.a, a)),
                        c=tuple(map(keep, model.c, c))), ok


def _mixing(layers, size, dtype):
  """The block-diagonal ``[S, S]`` atoms → coarse vectors map."""
  t = jnp.zeros((size, size), dtype)
  for l in layers:
    t = t.at[jnp.ix_(l.idx, l.idx)].set(l.rank_one.mixing)
  return t


class ModelFisher(NamedTuple):
  """``F̃_λ`` on the coarse layers, through the model's projections.

  Attributes:
    layers: the ``CoarseLayer``s (rank-one atoms).
    model: the ``ModelState``.
    mixing: ``_mixing`` of the layers.
    damping: ``λ``.
  """
  layers: Any
  model: ModelState
  mixing: jax.Array
  damping: Any

  def _a(self, l):
    return self.model.a[l.kl.layer.kernel][:, :l.kl.d_a]

  def _c(self, l):
    return self.model.c[l.kl.layer.kernel][:, :l.kl.d_g]

  def project(self, xs, size, dtype):
    """``R F̃_λ x`` ``[S]``."""
    on_atoms = sum(jnp.sum((self._a(l) @ x) * self._c(l), axis=1)
                   for l, x in zip(self.layers, xs))
    return self.mixing @ on_atoms + self.damping * level.project_all(
        self.layers, xs, size, dtype)

  def lift(self, beta):
    """``F̃_λ Rᵀβ`` per layer."""
    w = self.mixing.T @ beta
    return [(self._a(l).T * w) @ self._c(l) + self.damping * x
            for l, x in zip(self.layers, level.lift_all(self.layers, beta))]

  def coarse_matrix(self, size, dtype):
    """``R F̃ Rᵀ`` ``[S, S]`` (undamped; as the model's products give it)."""
    cols = []
    for l in self.layers:
      on_a = self._a(l) @ l.rank_one.rows.T       # [S, n_l]
      on_c = self._c(l) @ l.rank_one.cols.T
      cols.append((l.idx, on_a * on_c))
    atoms = jnp.zeros((size, size), dtype)
    for idx, block in cols:
      atoms = atoms.at[:, idx].set(block)
    return self.mixing @ atoms @ self.mixing.T


def coarse_inverse(fisher: ModelFisher, lam, coarse_damping, size, dtype):
  """``(F_c + D)⁻¹`` of the model's ``F_c`` (not symmetrized: where the
  spectral or Krylov atoms were refreshed after the last statistics step,
  ``a``, ``c`` hold the previous atoms, and Galerkin orthogonality needs
  ``F_c`` exactly as the products give it); ``(inverse, ok)``."""
  damp, used = level.coarse_damping_matrix(fisher.layers, lam, coarse_damping,
                                           size, dtype)
  matrix = (fisher.coarse_matrix(size, dtype) * used[:, None] * used[None, :]
            + damp)
  inverse = jnp.linalg.inv(matrix)
  return inverse, linalg.all_finite(inverse)


def _statistics_coefficients(toks, m, lam, xs, rs, axis_name):
  """Each direction's quadratic-model scale with the statistics' Fisher,
  ``c_i = x_iᵀr_i / x_iᵀF_λx_i`` (1 where the denominator is not positive
  and finite; one forward pass over the tokens per direction): ``[len(xs)]``."""
  s = [coarse.example_products(toks, x) for x in xs]
  fisher = distributed.mean(jnp.stack([jnp.vdot(u, u) for u in s]) / m, axis_name)
  return jnp.stack([
      level.model_ratio(sum(jnp.vdot(u, w) for u, w in zip(x, r)),
                        f + lam * sum(jnp.vdot(u, u) for u in x))
      for x, r, f in zip(xs, rs, fisher)])


def step(combine, fisher: ModelFisher, inverse, v, b, precondition, scaled,
         size, dtype, coefficients_of):
  """The multiplicative or balanced step with the model's products.

  Both are ``αf + γy`` with ``y = Qv`` (``Q = RᵀF_c⁻¹R``) and ``f = x −
  QF̃_λx``: ``x = b`` multiplicative (``αb + RᵀF_c⁻¹(Rv − αRF̃_λb)``),
  ``x = w = M⁻¹(v − F̃_λy)`` balanced; ``γ = 1`` (Galerkin orthogonality
  ``R(v − F̃_λΔ) = 0`` for any α) unless ``scaled == "both"`` (then the
  combination of ``F̂ = F̃_λ + (1/γ − 1)F̃_λQF̃_λ``: ``Q̂ = γQ``, ``F̂Q̂ = F̃_λQ``).

  Args:
    combine: ``"multiplicative"`` or ``"balanced"``.
    fisher: the ``ModelFisher``.
    inverse: ``(F_c + D)⁻¹`` from ``coarse_inverse``.
    v: ``∇`` per coarse layer; b: ``M⁻¹∇`` per coarse layer.
    precondition: per-layer matrices ↦ ``M⁻¹`` of them.
    scaled: the ``fine_scale``: False (α = 1), True (``"model"``: α =
      ``xᵀr / xᵀF_λx``, ``r = v`` multiplicative, ``r = v − F̃_λy``
      balanced) or ``"both"`` (each part's own scale in the quadratic model
      ``−vᵀΔ + ½ΔᵀF_λΔ``: ``α = fᵀv / fᵀF_λf``, ``γ = yᵀv / yᵀF_λy``;
      Galerkin orthogonality then only where γ = 1).
    size, dtype: ``S`` and the coarse dtype.
    coefficients_of: ``(xs, rs) ↦`` the directions' model scales
      (measured on statistics steps, else held; ``scale_of``).

  Returns:
    ``(Δ per layer, [α, γ])``.
  """
  one = jnp.ones([], dtype)
  both = isinstance(scaled, str) and scaled == "both"
  if combine == "multiplicative" and not both:
    alpha = coefficients_of([b], [v])[0] if scaled else one
    beta = inverse @ (level.project_all(fisher.layers, v, size, dtype)
                      - alpha * fisher.project(b, size, dtype))
    lifted = level.lift_all(fisher.layers, beta)
    return [alpha * x + y for x, y in zip(b, lifted)], jnp.stack([alpha, one])
  beta = inverse @ level.project_all(fisher.layers, v, size, dtype)
  y = level.lift_all(fisher.layers, beta)
  z = v
  w = b
  if combine == "balanced":
    z = [x - f for x, f in zip(v, fisher.lift(beta))]
    w = precondition(z)
  qfw = level.lift_all(fisher.layers, inverse @ fisher.project(w, size, dtype))
  f = [x - q for x, q in zip(w, qfw)]
  if both:
    alpha, gamma = coefficients_of([f, y], [v, v])
  else:
    alpha, gamma = (coefficients_of([w], [z])[0] if scaled else one), one
  return [alpha * x + gamma * yi for x, yi in zip(f, y)], jnp.stack([alpha, gamma])


def updated(model: ModelState, layers, toks_of, count, stats_every, stats_due,
            static_stats, axis_name, health):
  """The model after this step's statistics (on statistics steps), the
  accepted-batch count and ``health`` (a non-finite batch is counted)."""
  def accumulate(operand):
    old, n, h = operand
    new, ok = replaced(old, layers, toks_of(), axis_name)
    h = h._replace(nonfinite_statistics=h.nonfinite_statistics
                   + (~ok).astype(jnp.int32))
    return new, n + ok.astype(jnp.int32), h
  return schedule.maybe(stats_every, stats_due, accumulate, lambda o: o,
                        (model, count, health), static_stats)


def model_schedule(model_refresh, stats_every, stats_due, static_stats, count):
  """``(period, due, static)`` of the model's rebuild: every statistics step,
  or (``"period"``) those at ``count % stats_every == 0`` only, decided at run
  time (a refresh warm-up's extra ones keep the model)."""
  if model_refresh == "period" and static_stats:
    return stats_every, count % stats_every == 0, None
  return stats_every, stats_due, static_stats


def scale_of(model, toks_of, m, lam, stats_every, stats_due, static_stats,
             axis_name):
  """``(xs, rs) ↦`` the model scales for ``step``: on statistics steps each
  direction's with the statistics' Fisher (``toks_of()``: their tokens;
  ``_statistics_coefficients``), else the held ``[α, γ]`` (as many as
  ``xs``). ``model``: a ``ModelState`` or ``BasesModelState``."""
  held = jnp.stack([model.scale, model.coarse_scale])
  return lambda xs, rs: schedule.maybe(
      stats_every, stats_due,
      lambda _: _statistics_coefficients(toks_of(), m, lam, xs, rs, axis_name),
      lambda _: held[:len(xs)], None, static_stats).astype(model.scale.dtype)


def corrected(combine, layers, state, toks_of, v, b, precondition, scaled,
              size, dtype, m, lam, coarse_damping, schedule_of_stats,
              axis_name, scale_tokens=None):
  """One multiplicative or balanced correction with the model's products.

  Args:
    combine: ``"multiplicative"`` or ``"balanced"``.
    layers: the ``CoarseLayer``s (rank-one atoms).
    state: the ``TwoLevelState`` (its ``model``, ``coarse_count``, ``health``
      and previous ``coarse_inverse``).
    toks_of: ``() ↦`` the statistics' tokens of the coarse layers (called on
      statistics steps only).
    v, b: ``∇`` and ``M⁻¹∇`` per coarse layer.
    precondition: per-layer matrices ↦ ``M⁻¹`` of them.
    scaled: ``fine_scale="model"``.
    size, dtype, m: ``S``, the coarse dtype, the statistics' examples.
    lam: ``λ``; coarse_damping: ``"consistent"`` or ``"identity"``.
    schedule_of_stats: ``(stats_every, stats_due, static_stats)``.
    axis_name: the data-parallel axis, or None.
    scale_tokens: ``(tokens_of, n)`` of the model scales' examples
      (``scale_batch``); None: ``(toks_of, m)``.

  Returns:
    ``(Δ per layer, α, inverse, model, coarse_count, health)``. A failed
    ``F_c`` inverse keeps the previous one and is counted.
  """
  every, due, static = schedule_of_stats
  model, count, health = updated(state.model, layers, toks_of, state.coarse_count,
                                 every, due, static, axis_name, state.health)
  fisher = ModelFisher(layers, model, _mixing(layers, size, dtype), lam)
  new, ok = coarse_inverse(fisher, lam, coarse_damping, size, dtype)
  inverse = jnp.where(ok, new, state.coarse_inverse)
  health = health._replace(failed_inverses=health.failed_inverses
                           + (~ok).astype(jnp.int32))
  delta, (alpha, gamma) = step(combine, fisher, inverse, v, b, precondition,
                               scaled, size, dtype, scale_of(
                                   model, *(scale_tokens or (toks_of, m)), lam,
                                   every, due, static, axis_name))
  return (delta, alpha, inverse, model._replace(scale=alpha, coarse_scale=gamma),
          count, health)
