"""The coarse level of two-level K-FAC, per layer: bases, ``F_c``, ``Q``, ``F_λ v``.

``coarse.py`` has the math on one layer's ``[d_a, d_g]`` matrices; this module
applies it to the Kronecker layers of a plan (``CoarseLayer``: the layer, its
coarse indices and its basis) and moves matrices between the layers and the
parameter leaves. Two sources of curvature (``fisher_products``):

* ``"statistics"``: the Fisher of the statistics pass's per-example
  gradients ``u_n`` (sampled or empirical, per ``fisher``):
  ``F = (1/M) Σ_n u_n u_nᵀ``, from the captured tokens.
* ``"ggn"``: the exact Fisher (= GGN) of the batch, ``(1/M) Σ_n J_nᵀH_nJ_n``
  (``curvature_products.fisher_operator``): ``F_λ v`` is one forward-mode and
  one transposed pass, ``F_c = R F Rᵀ`` one forward-mode pass per coarse
  vector. Its expectation is what the sampled Fisher estimates, without the
  sampling noise of a rank-≤M matrix.

``"mixed"`` (in ``two_level_transform``) takes the second only for the
products used at full size (``projected_balanced``'s ``lifted``, the
residual of the per-step spaces) and the first for the rest.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kfac_jax_ext import coarse
from kfac_jax_ext import coarse_krylov
from kfac_jax_ext import distributed
from kfac_jax_ext import initial_arrays
from kfac_jax_ext import kronecker_family
from kfac_jax_ext import linalg
from kfac_jax_ext import plan as plan_lib
from kfac_jax_ext.blocks import kronecker
from kfac_jax_ext.blocks import woodbury


class CoarseLayer(NamedTuple):
  kl: Any            # plan_lib.KroneckerLayer
  idx: jax.Array     # its coarse indices
  basis: jax.Array   # [m, d_a, d_g]
  rank_one: Any      # coarse.RankOne or None


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


def static_layers(plan, spectral, slots, space, dtype, krylov=None):
  """``CoarseLayer``s of a space fixed between refreshes (Nicolaides,
  spectral, Krylov–Nicolaides from ``krylov``, parameters); the per-step
  spaces get a placeholder basis that ``per_step_bases`` replaces."""
  out = []
  for kl in coarse_layers(plan, spectral):
    vec_a = vec_g = None
    if space == "spectral":
      rows, cols = spectral[kl.layer.kernel]
      vec_a = (rows if kl.a_side == "rows" else cols)[:kl.d_a]
      vec_g = (cols if kl.a_side == "rows" else rows)[:kl.d_g]
    if space == "krylov_nicolaides":
      basis, rank_one = coarse_krylov.layer_basis(kl, krylov[kl.layer.kernel],
                                                  dtype)
      out.append(CoarseLayer(kl, jnp.asarray(slots[kl.layer.kernel][:2]),
                             basis, rank_one))
      continue
    if space in coarse.PER_STEP_SPACES:
      basis, rank_one = None, None
      count = coarse.vectors_per_layer(space)
    else:
      basis, rank_one = coarse.layer_basis(space, kl.d_a, kl.d_g, vec_a, vec_g,
                                           dtype)
      count = basis.shape[0]
    idx = jnp.asarray(slots[kl.layer.kernel][:count])
    out.append(CoarseLayer(kl, idx, basis, rank_one))
  return out


def coarse_size(shapes, space, limit: int) -> int:
  """``S``: the coarse indices of ``space`` on leaves of these shapes
  (``ValueError`` above ``limit``)."""
  size = sum(len(s) for s in coarse.leaf_slots(shapes, space))
  if size > limit:
    raise ValueError(f"coarse_space={space!r} gives {size} coarse vectors (more "
                     f"than {limit}); use 'nicolaides' or 'spectral' for models "
                     "of this size.")
  return size


def spectral_slots(shapes, dtype):
  """Per ≥2-D leaf, the spectral space's ``(rows, cols)`` vectors, one size
  for both (a layer may use either side of its kernel); None elsewhere."""
  ones = lambda s: initial_arrays.ones((max(kronecker.slot_sizes(s)),), dtype)
  return [(ones(s), ones(s)) if len(s) >= 2 else None for s in shapes]


def krylov_vectors(plan, krylov, inverses, precondition, leaves, shapes, dtype):
  """``krylov`` with every coarse layer's ``M_l⁻¹1`` from the refreshed
  ``inverses`` (``coarse_krylov.refreshed``; ``precondition``: ``M⁻¹`` on
  parameter leaves, ``leaves``: any leaves of the parameters' shapes)."""
  layers = [CoarseLayer(kl, None, None, None) for kl in coarse_layers(plan, None)]
  zeros = [jnp.zeros_like(x) for x in leaves]
  through = lambda mats: to_matrices(
      layers, precondition(write(layers, zeros, mats, shapes)), dtype)
  return coarse_krylov.refreshed([l.kl for l in layers], krylov, inverses,
                                 through, dtype)


def per_step_bases(space, layers, residual, precondition):
  """The layers with this step's basis (``algorithms.md`` §4.2).

  ``"residual"``: ``M_l⁻¹ res_l``; ``"krylov_residual"``:
  ``{res_l, M_l⁻¹res_l}``, with ``res = ∇ − F_λM⁻¹∇`` (``residual``: its
  per-layer matrices) and ``precondition`` mapping per-layer matrices
  through ``M⁻¹``. See ``coarse.normalized_basis``.
  """
  first = residual
  second = precondition(first)
  out = []
  for l, r, mr in zip(layers, first, second):
    vectors = [mr] if space == "residual" else [r, mr]
    out.append(l._replace(basis=coarse.normalized_basis(vectors), rank_one=None))
  return out


def tokens(layers, traced, cb, dtype, n=None):
  """Per layer, ``(ā [n,T,d_a], g [n,T,d_g])`` of the statistics batch's
  first ``n`` examples (default: all ``M``)."""
  m = traced.num_examples
  n = m if n is None else n
  return [woodbury.per_example_tokens(cb.layers[l.kl.index][0].astype(dtype),
                                      cb.layers[l.kl.index][1].astype(dtype),
                                      l.kl.has_bias, m, n) for l in layers]


def example_coefficients(layers, toks, size, dtype):
  """``C [M, S]``: ``C[n, k] = r_kᵀu_n``, the statistics' per-example
  gradients projected on the coarse vectors (0 at unused indices)."""
  idx = jnp.concatenate([l.idx for l in layers])
  c = jnp.concatenate([coarse.example_projections(a, g, l.basis, l.rank_one)
                       for l, (a, g) in zip(layers, toks)], axis=1)
  return jnp.zeros((c.shape[0], size), dtype).at[:, idx].set(c)


def batch_coarse(layers, toks, size, coarse_matrix, m, dtype, coeffs=None):
  """This batch's ``(coarse_a, coarse_g)`` from the statistics, scattered to
  ``[S, S]`` (``F_c = coarse_a ∘ coarse_g`` before damping); ``coeffs``:
  ``example_coefficients`` when already computed."""
  if coarse_matrix == "kronecker":
    idx = jnp.concatenate([l.idx for l in layers])
    full = lambda x: jnp.zeros((size, size), dtype).at[jnp.ix_(idx, idx)].set(x)
    pa = [a @ l.rank_one.rows[0] for l, (a, _) in zip(layers, toks)]
    pg = [g @ l.rank_one.cols[0] for l, (_, g) in zip(layers, toks)]
    s_a, s_g = coarse.kronecker_sums(pa, pg)
    return full(s_a), full(s_g)
  c = example_coefficients(layers, toks, size, dtype) if coeffs is None else coeffs
  return c.T @ c / m, jnp.ones((size, size), dtype)


def ggn_coarse(layers, operator, leaves, shapes, size, dtype):
  """``(R F Rᵀ, ones)`` with F the batch's exact GGN, scattered to ``[S, S]``."""
  zeros = [jnp.zeros_like(x) for x in leaves]
  vectors = []
  for j, l in enumerate(layers):
    for k in range(l.basis.shape[0]):
      mats = [jnp.zeros_like(o.basis[0]) for o in layers]
      mats[j] = l.basis[k]
      vectors.append(write(layers, zeros, mats, shapes))
  q = operator.forms(vectors).astype(dtype)
  idx = jnp.concatenate([l.idx for l in layers])
  return (jnp.zeros((size, size), dtype).at[jnp.ix_(idx, idx)].set(q),
          jnp.ones((size, size), dtype))


def coarse_damping_matrix(layers, lam, coarse_damping, size, dtype):
  """``(D, used)``: ``D = λ RRᵀ`` (consistent) or ``λI`` per layer's indices,
  plus 1 on the diagonal of indices without a vector (unused, or a zero
  Krylov vector); ``used`` marks the others."""
  used = jnp.zeros((size,), bool)
  damp = jnp.zeros((size, size), dtype)
  for l in layers:
    rrt = coarse.gram(l.basis, l.rank_one)
    used = used.at[l.idx].set(linalg.diagonal(rrt) > 0)
    block = (rrt if coarse_damping == "consistent"
             else jnp.eye(len(l.idx), dtype=dtype))
    damp = damp.at[jnp.ix_(l.idx, l.idx)].set(lam * block)
  return damp + jnp.diag(jnp.where(used, 0.0, 1.0).astype(dtype)), used


def coarse_inverse(layers, st_a, st_g, lam, coarse_damping, size, dtype):
  """``(F_c + D)⁻¹`` (``coarse_damping_matrix``)."""
  damp, _ = coarse_damping_matrix(layers, lam, coarse_damping, size, dtype)
  inverse = jnp.linalg.inv(linalg.symmetrize(st_a * st_g + damp))
  return inverse, linalg.all_finite(inverse)


def project_all(layers, xs, size, dtype):
  """``R x`` scattered to ``[S]``."""
  rx = jnp.zeros((size,), dtype)
  for l, x in zip(layers, xs):
    rx = rx.at[l.idx].set(coarse.project(l.basis, x, l.rank_one))
  return rx


def lift_all(layers, beta):
  """``Rᵀβ`` per layer."""
  return [coarse.lift(l.basis, beta[l.idx], l.rank_one) for l in layers]


def apply_q(layers, inverse, xs, size, dtype):
  """``Q x = Rᵀ F_c⁻¹ R x`` per layer."""
  return lift_all(layers, inverse @ project_all(layers, xs, size, dtype))


class StatisticsFisher(NamedTuple):
  """The statistics' ``F_λ`` on the coarse layers, for the products of a
  fixed coarse space that need only part of ``F_λ x``: with ``s_n = u_nᵀx``,
  ``R F x = Cᵀs/M`` and ``xᵀF x = sᵀs/M`` need no transposed pass, and
  ``F Rᵀβ = (1/M) Σ_n (Cβ)_n u_n`` no forward one.

  Attributes:
    toks: per layer, the statistics' ``(ā, g)`` tokens.
    coeffs: ``example_coefficients`` (``C [M, S]``).
    m: examples of the statistics batch (per device).
    damping: ``λ``.
    axis_name: the data-parallel axis (the Fisher is the devices' mean).
  """
  toks: Any
  coeffs: Any
  m: int
  damping: Any
  axis_name: Any = None


def coarse_product(fisher: StatisticsFisher, layers, xs, size, dtype):
  """``(R F_λ x [S], xᵀF_λx)`` with one forward pass over the tokens."""
  s = coarse.example_products(fisher.toks, xs)
  rfx, xfx = distributed.mean((fisher.coeffs.T @ s / fisher.m,
                               jnp.vdot(s, s) / fisher.m), fisher.axis_name)
  lam = fisher.damping
  return (rfx + lam * project_all(layers, xs, size, dtype),
          xfx + lam * sum(jnp.vdot(x, x) for x in xs))


def lifted_product(fisher: StatisticsFisher, layers, beta):
  """``F_λ Rᵀβ`` per layer with one transposed pass over the tokens."""
  fx = distributed.mean(coarse.combine_examples(
      fisher.toks, fisher.coeffs @ beta, fisher.m), fisher.axis_name)
  return [f + fisher.damping * x for f, x in zip(fx, lift_all(layers, beta))]


def statistics_fvp(toks, m, damping, axis_name):
  """``xs ↦ F_λ xs`` on the layers, F from the statistics' tokens."""
  def fvp(xs):
    fx = distributed.mean(coarse.fisher_vector_product(toks, xs, m, 0.0),
                          axis_name)
    return [f + damping * x for f, x in zip(fx, xs)]
  return fvp


def ggn_fvp(layers, operator, leaves, shapes, damping, dtype):
  """``xs ↦ F_λ xs`` on the layers, F the batch's exact GGN restricted to
  the layers' parameters."""
  zeros = [jnp.zeros_like(x) for x in leaves]

  def fvp(xs):
    fx = operator.product(write(layers, zeros, xs, shapes))
    return [f + damping * x for f, x in zip(to_matrices(layers, fx, dtype), xs)]
  return fvp


def model_scale(x, r, fx):
  """``α = xᵀr / xᵀF_λx`` (``fx = F_λx``, per-layer matrices): the scale
  minimising the quadratic model ``½αxᵀF_λx − αxᵀr``; 1 when undefined."""
  den = sum(jnp.vdot(a, b) for a, b in zip(x, fx))
  return model_ratio(sum(jnp.vdot(a, b) for a, b in zip(x, r)), den)


def model_ratio(num, den):
  """``num / den`` where ``den > 0`` and both are finite, else 1 (the
  model scale's guard)."""
  ok = (den > 0) & jnp.isfinite(num) & jnp.isfinite(den)
  return jnp.where(ok, num / jnp.where(ok, den, 1.0), 1.0)


def projected_multiplicative(fisher, layers, inverse, v, b, precondition,
                             scaled, size, dtype, lifted=None):
  """The multiplicative step ``αb + Rᵀ F_c⁻¹(Rv − αR F_λb)`` (``b = M⁻¹v``;
  ``α = bᵀv / bᵀF_λb`` when ``scaled``, else 1) with one forward pass over
  the tokens. Returns ``(Δ per layer, α)``."""
  del precondition, lifted             # the signature of projected_balanced
  rfb, bfb = coarse_product(fisher, layers, b, size, dtype)
  alpha = (model_ratio(sum(jnp.vdot(x, y) for x, y in zip(b, v)), bfb)
           if scaled else jnp.ones([], dtype))
  beta = inverse @ (project_all(layers, v, size, dtype) - alpha * rfb)
  return [alpha * x + c for x, c in zip(b, lift_all(layers, beta))], alpha


def projected_balanced(fisher, layers, inverse, v, b, precondition, scaled,
                       size, dtype, lifted=None):
  """The balanced step ``α(w − QF_λw) + y`` with ``y = Qv``,
  ``z = v − F_λy``, ``w = M⁻¹z`` (``α = wᵀz / wᵀF_λw`` when ``scaled``):
  one transposed and one forward pass over the tokens (``lifted``: another
  ``xs ↦ F_λxs`` for ``F_λy``, the product ``M⁻¹`` is applied to, e.g. the
  exact GGN's). Returns ``(Δ per layer, α)``."""
  del b
  beta = inverse @ project_all(layers, v, size, dtype)
  y = lift_all(layers, beta)
  fy = (lifted_product(fisher, layers, beta) if lifted is None
        else lifted(y))
  z = [x - f for x, f in zip(v, fy)]
  w = precondition(z)
  rfw, wfw = coarse_product(fisher, layers, w, size, dtype)
  alpha = (model_ratio(sum(jnp.vdot(x, y) for x, y in zip(w, z)), wfw)
           if scaled else jnp.ones([], dtype))
  qfw = lift_all(layers, inverse @ rfw)
  return [alpha * (x - c) + yi for x, c, yi in zip(w, qfw, y)], alpha


def to_matrices(layers, leaves, dtype):
  """Per layer, its kernel (+ bias row) as the ``[d_a, d_g]`` matrix."""
  return [plan_lib.to_matrix(
      l.kl.layer, leaves[l.kl.layer.kernel],
      leaves[l.kl.layer.bias] if l.kl.has_bias else None).astype(dtype)
      for l in layers]


def write(layers, leaves, mats, shapes):
  """Writes per-layer ``[d_a, d_g]`` matrices back into (a copy of) leaves."""
  leaves = list(leaves)
  for l, x in zip(layers, mats):
    layer = l.kl.layer
    kernel, bias = plan_lib.from_matrix(layer, x, shapes[layer.kernel],
                                        l.kl.has_bias)
    leaves[layer.kernel] = kernel.astype(leaves[layer.kernel].dtype)
    if l.kl.has_bias:
      old = leaves[layer.bias]
      leaves[layer.bias] = bias.reshape(old.shape).astype(old.dtype)
  return leaves


def spectral_vectors(plan, base_state, spectral, variant, axis_name=None,
                     iterations=None):
  """Smallest-eigenvalue eigenvectors of each layer's effective factors
  (each device decomposes the layers it owns when ``axis_name`` is set);
  with ``iterations=k`` instead k steps of ``coarse.inverse_iteration`` with
  the base's refreshed damped inverses from the previous vectors (tikhonov
  mode: the base's eigenvectors, read directly)."""
  spectral = list(spectral)
  layers = coarse_layers(plan, spectral)

  def vectors(kl):
    fa, fg, _ = kronecker_family.layer_factors(
        kl, base_state.factors[kl.layer.kernel],
        base_state.traces[kl.layer.kernel], variant, 0.0)
    return coarse.smallest_eigenvector(fa), coarse.smallest_eigenvector(fg)

  def iterated(kl):
    inverse, found = base_state.inverses[kl.layer.kernel], []
    for side, d in ((kl.a_side, kl.d_a), (kl.g_side, kl.d_g)):
      matrix = linalg.leading(getattr(inverse, side), (d, d))
      previous = spectral[kl.layer.kernel][side == "cols"][:d]
      found.append(coarse.inverse_iteration(matrix, previous, iterations)
                   if inverse.rows_vals is None else coarse.signed_unit(matrix[:, 0]))
    return tuple(found)

  found = distributed.on_owners(
      [lambda kl=kl: (vectors if iterations is None else iterated)(kl)
       for kl in layers],
      [(kl.d_a ** 3 + kl.d_g ** 3) if iterations is None else
       (kl.d_a ** 2 + kl.d_g ** 2) * iterations for kl in layers], axis_name)
  for kl, (va, vg) in zip(layers, found):
    rows, cols = spectral[kl.layer.kernel]
    if kl.a_side == "rows":
      rows, cols = linalg.set_leading(rows, va), linalg.set_leading(cols, vg)
    else:
      rows, cols = linalg.set_leading(rows, vg), linalg.set_leading(cols, va)
    spectral[kl.layer.kernel] = (rows, cols)
  return tuple(spectral)
