"""Two-level K-FAC's coarse level (``algorithms.md`` §4): spaces, matrices, FVPs.

Notation: ``M⁻¹`` the base (K-FAC/TKFAC) preconditioner, ``R`` the coarse
space (rows = coarse vectors, each supported on one layer), ``F_λ = F + λI``
with ``F = (1/M) Σ_n u_n u_nᵀ`` the Fisher of the statistics batch (``u_n``:
per-example gradients of the summed loss), ``F_c = R F_λ Rᵀ`` and
``Q = Rᵀ F_c⁻¹ R``.

* additive:        ``Δ = ω₁ M⁻¹∇ + ω₂ Q∇`` (Tselepidis et al.);
* multiplicative:  ``Δ = M⁻¹∇ + Q(∇ − F_λ M⁻¹∇)`` — Galerkin: ``R(∇ − F_λΔ) = 0``;
* balanced:        ``Δ = (I − QF_λ) M⁻¹ (I − F_λQ)∇ + Q∇``.

Coarse vectors of a layer are ``[m, d_a, d_g]`` matrices in the layer's
canonical orientation: ``"nicolaides"`` one all-ones vector; ``"spectral"``
``q_A ⊗ q_G`` (eigenvectors of the smallest eigenvalues of the factors, ∞-norm
1); ``"parameters"`` one unit vector per parameter (``R = I``; small models).
Koroko et al.'s Krylov spaces (two vectors per layer):
``"krylov_nicolaides"`` ``{1, M_l⁻¹1}`` (fixed between refreshes, like
``"spectral"``: ``M⁻¹1`` is recomputed with the inverses) and, built every
step (or every statistics step: ``coarse_refresh``) from
``res = ∇ − F_λM⁻¹∇``, ``"residual"`` ``M_l⁻¹res_l`` and
``"krylov_residual"`` ``{res_l, M_l⁻¹res_l}``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kfac_jax_ext.blocks import kronecker


class RankOne(NamedTuple):
  """A layer's coarse vectors as combinations of rank-one atoms:
  ``basis[k] = Σ_j mixing[k, j] rows[j] cols[j]ᵀ``.

  Attributes:
    rows: ``[n, d_a]`` the atoms' ``ā``-side vectors.
    cols: ``[n, d_g]`` their ``g``-side vectors.
    mixing: ``[m, n]`` (Nicolaides, spectral: ``[[1]]``; Krylov–Nicolaides
      with a factored base: the Gram–Schmidt of ``{11ᵀ, M_l⁻¹11ᵀ}``).
  """
  rows: jax.Array
  cols: jax.Array
  mixing: jax.Array


COARSE_SPACES = ("nicolaides", "spectral", "parameters", "residual",
                 "krylov_nicolaides", "krylov_residual")
PER_STEP_SPACES = ("residual", "krylov_residual")
RANK_ONE_SPACES = ("nicolaides", "spectral")
NEEDS_RESIDUAL = ("residual", "krylov_residual")
COARSE_MATRICES = ("kronecker", "exact")
COMBINES = ("additive", "multiplicative", "balanced")
# a basis vector whose part outside the previous ones' span is below this
# fraction of it (∞-norms) is dropped (``normalized_basis``)
SPAN_TOL = 1e-6


def default_matrix(fisher_products: str, combine: str, space) -> str:
  """``coarse_matrix=None``'s choice: ``"kronecker"`` for the model's
  products and for the additive step on a rank-one space with statistics
  products (Tselepidis), else ``"exact"`` (``F_c = R F_λ Rᵀ`` of the products)."""
  return ("kronecker" if fisher_products == "kronecker" or (
      fisher_products == "statistics" and combine == "additive"
      and space in RANK_ONE_SPACES) else "exact")


def leaf_slots(shapes, space: str) -> list:
  """Per leaf, the coarse indices it may host (``[]`` for ≤1-D leaves)."""
  slots, start = [], 0
  for shape in shapes:
    if len(shape) < 2:
      slots.append([])
      continue
    rows, cols = kronecker.slot_sizes(shape)   # each +1 for a folded bias
    size = rows * cols if space == "parameters" else vectors_per_layer(space)
    slots.append(list(range(start, start + size)))
    start += size
  return slots


def vectors_per_layer(space: str) -> int:
  """Coarse vectors per layer of a space other than ``"parameters"``."""
  return 2 if space.startswith("krylov") else 1


def normalized_basis(vectors, tol: float = SPAN_TOL):
  """``[m, d_a, d_g]`` from one layer's vectors: each orthogonalised against
  the previous ones (Gram–Schmidt; the span, hence ``Q``, is unchanged) and
  scaled to ∞-norm 1; a vector (numerically) in the span of the previous ones
  becomes zero, an unused coarse index."""
  out = []
  for v in vectors:
    tiny = jnp.finfo(v.dtype).tiny
    before = jnp.max(jnp.abs(v))
    for u in out:
      v = v - jnp.vdot(u, v) / jnp.maximum(jnp.vdot(u, u), tiny) * u
    size = jnp.max(jnp.abs(v))
    keep = size > tol * before
    out.append(jnp.where(keep, v / jnp.where(keep, size, 1.0), 0.0))
  return jnp.stack(out)


def layer_basis(space: str, d_a: int, d_g: int, vec_a=None, vec_g=None,
                dtype=jnp.float32):
  """The layer's coarse vectors ``[m, d_a, d_g]`` and their ``RankOne``
  form (None for ``"parameters"``)."""
  if space == "nicolaides":
    r_a, r_g = jnp.ones((d_a,), dtype), jnp.ones((d_g,), dtype)
  elif space == "spectral":
    r_a, r_g = vec_a, vec_g
  else:
    return jnp.eye(d_a * d_g, dtype=dtype).reshape(-1, d_a, d_g), None
  return jnp.outer(r_a, r_g)[None], RankOne(r_a[None], r_g[None],
                                            jnp.ones((1, 1), dtype))


def signed_unit(v):
  """``v`` scaled to ∞-norm 1 with its largest-magnitude entry +1."""
  big = v[jnp.argmax(jnp.abs(v))]
  return v / jnp.where(big != 0, big, 1.0)


def smallest_eigenvector(x):
  """Eigenvector of the smallest eigenvalue, scaled to ∞-norm 1 with its
  largest-magnitude entry +1: a sign fixed by the matrix, not by the solver
  (the coarse statistics are running averages over refreshes)."""
  _, vecs = jnp.linalg.eigh(0.5 * (x + x.T))
  return signed_unit(vecs[:, 0])


def inverse_iteration(damped_inverse, previous, steps: int):
  """``steps`` of inverse iteration toward the smallest eigenvector of ``X``
  from ``previous``, with ``damped_inverse = (X + γI)⁻¹`` (the fine level's
  refreshed inverse): ``v ← (X + γI)⁻¹v``, scaled as
  ``smallest_eigenvector`` after every step.

  Each step multiplies the components along ``X``'s eigenvectors by
  ``1/(μ_i + γ)``, so the iterate converges to the smallest eigenvector at
  the rate ``(μ_1 + γ)/(μ_2 + γ)``; warm-started at every refresh from the
  last vector, it tracks slowly moving factors at ``O(d²)`` a step instead
  of an ``O(d³)`` eigendecomposition. A non-finite result keeps
  ``previous``.

  Example:
    >>> v = inverse_iteration(jnp.linalg.inv(x + 0.1 * jnp.eye(n)), v, 2)
  """
  v = jax.lax.fori_loop(0, steps, lambda _, v: signed_unit(damped_inverse @ v),
                        previous)
  return jnp.where(jnp.all(jnp.isfinite(v)), v, previous)


def project(basis, v, rank_one=None):
  """``R_l vec(V)`` for ``V [d_a, d_g]`` (with ``rank_one``, a ``RankOne``:
  ``T [p_jᵀ V q_j]_j``, one read of ``V``, the basis not materialized)."""
  if rank_one is not None:
    on_atoms = jnp.sum(rank_one.rows.T * (v @ rank_one.cols.T), axis=0)
    return rank_one.mixing @ on_atoms
  return jnp.einsum("kde,de->k", basis, v)


def lift(basis, beta, rank_one=None):
  """``R_lᵀ β`` as a ``[d_a, d_g]`` matrix (with ``rank_one``:
  ``Σ_j (Tᵀβ)_j p_j q_jᵀ``, one GEMM of inner size ``n``)."""
  if rank_one is not None:
    weights = rank_one.mixing.T @ beta
    return (rank_one.rows.T * weights) @ rank_one.cols
  return jnp.einsum("k,kde->de", beta, basis)


def gram(basis, rank_one=None):
  """``R_l R_lᵀ [m, m]`` (with ``rank_one``: ``T (PᵀP ∘ QᵀQ) Tᵀ`` from the
  atoms' inner products)."""
  if rank_one is not None:
    atoms = (rank_one.rows @ rank_one.rows.T) * (rank_one.cols @ rank_one.cols.T)
    return rank_one.mixing @ atoms @ rank_one.mixing.T
  return jnp.einsum("kde,jde->kj", basis, basis)


def example_projections(a, g, basis, rank_one):
  """``c_{n,k} = r_kᵀ u_n = Σ_t ā_ntᵀ R_k g_nt`` for tokens ``a [M,T,d_a]``,
  ``g [M,T,d_g]``: ``[M, m]``. With ``rank_one`` (a ``RankOne``) from the
  atoms' per-token projections, ``O(MT(d_a + d_g))`` a vector instead of a
  pass over the layer's ``MT·d_a·d_g``."""
  if rank_one is not None:
    on_atoms = jnp.sum((a @ rank_one.rows.T) * (g @ rank_one.cols.T), axis=1)
    return on_atoms @ rank_one.mixing.T
  return jnp.einsum("ntd,kde,nte->nk", a, basis, g)


def kronecker_sums(pa, pg):
  """Tselepidis' coarse statistics from per-token projections.

  ``pa[l]``: ``[M, T_l]`` of ``r_aᵀ ā``, ``pg[l]``: ``[M, T_l]`` of
  ``r_gᵀ g``. Returns ``(S_A, S_G)`` with ``S_A[i,j] = r_aiᵀ A_ij r_aj``,
  ``S_G[i,j] = r_giᵀ G_ij r_gj`` and ``F_c ≈ S_A ∘ S_G``: with equal token
  counts ``A_ij = (1/K)Σ_tok ā_i ā_jᵀ``, ``G_ij = (1/M)Σ_tok g_i g_jᵀ`` (the
  K-FAC scaling, so the diagonal is ``1ᵀ(A_i⊗G_i)1`` for Nicolaides); with
  different token counts (conv maps of different sizes, dense after conv)
  the tokens are pooled per example: mean of ``pa``, ``Σ_t pg/√T``.
  """
  m = pa[0].shape[0]
  n = len(pa)
  s_a = [[None] * n for _ in range(n)]
  s_g = [[None] * n for _ in range(n)]
  for i in range(n):
    for j in range(n):
      ti, tj = pa[i].shape[1], pa[j].shape[1]
      if ti == tj:
        s_a[i][j] = jnp.sum(pa[i] * pa[j]) / (m * ti)
        s_g[i][j] = jnp.sum(pg[i] * pg[j]) / m
      else:
        s_a[i][j] = jnp.sum(pa[i].mean(1) * pa[j].mean(1)) / m
        s_g[i][j] = jnp.sum(pg[i].sum(1) * pg[j].sum(1)) / (m * (ti * tj) ** 0.5)
  return jnp.array(s_a), jnp.array(s_g)


def example_products(tokens, vs):
  """``s_n = Σ_l u_{n,l}ᵀ v_l`` from the tokens ``[(a [M,T,d_a], g [M,T,d_g])]``
  and ``vs [d_a, d_g]``: ``[M]`` (the first half of ``F v``)."""
  return sum(jnp.sum((a @ v) * g, axis=(1, 2)) for (a, g), v in zip(tokens, vs))


def combine_examples(tokens, s, num_examples):
  """``(1/M) Σ_n s_n u_{n,l}`` per layer, ``[d_a, d_g]`` (the second half)."""
  return [jnp.einsum("n,ntd,nte->de", s, a, g) / num_examples
          for a, g in tokens]


def fisher_vector_product(tokens, vs, num_examples, damping):
  """``F_λ v`` on the layers: ``(Fv)_l = (1/M) Σ_n (Σ_l' u_{n,l'}ᵀv_l') u_{n,l}``
  from the tokens ``[(a [M,T,d_a], g [M,T,d_g])]`` and ``vs [d_a, d_g]``."""
  s = example_products(tokens, vs)
  return [f + damping * v for f, v in
          zip(combine_examples(tokens, s, num_examples), vs)]
