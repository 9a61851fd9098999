"""K-FAC's block-tridiagonal inverse (Martens & Grosse 2015, §4.3, App. B).

For a chain of layers 1..L (the output of layer i feeds layer i+1), the
Fisher's diagonal blocks are approximated by ``Ā_i ⊗ G_i`` and its first
off-diagonal blocks by ``Ā_{i,i+1} ⊗ G_{i,i+1}`` with the cross-layer
factors ``Ā_{i,i+1} = E[ā_i ā_{i+1}ᵀ]``, ``G_{i,i+1} = E[g_i g_{i+1}ᵀ]``.
The approximation ``F̂`` agrees with these blocks on the tridiagonal and
has a block-tridiagonal inverse (a directed Gaussian model on the chain,
layer i given layer i+1):

    F̂⁻¹ = Ξᵀ Λ Ξ,   Ξ_{ii} = I,  Ξ_{i,i+1} = −Ψ_i,
    Ψ_i = Ψ^A_i ⊗ Ψ^G_i,  Ψ^A_i = Ā_{i,i+1} Ā_{i+1}⁻¹,  Ψ^G_i = G_{i,i+1} G_{i+1}⁻¹,
    Λ = diag(Σ_1⁻¹, ..., Σ_{L−1}⁻¹, (Ā_L ⊗ G_L)⁻¹),
    Σ_i = Ā_i ⊗ G_i − Ψ^A_i Ā_{i+1} Ψ^Aᵀ_i ⊗ Ψ^G_i G_{i+1} Ψ^Gᵀ_i.

``Σ_i = A₁⊗G₁ − A₂⊗G₂`` is inverted exactly by the generalized
eigendecomposition (App. B): with ``A₁^{-1/2} A₂ A₁^{-1/2} = E diag(s) Eᵀ``
and ``P_A = A₁^{-1/2} E`` (so ``P_Aᵀ A₁ P_A = I``, ``P_Aᵀ A₂ P_A = diag(s)``),
and the same for G,

    Σ⁻¹ vec(X) = vec(P_A [(P_Aᵀ X P_G) ⊘ (1 − s_A s_Gᵀ)] P_Gᵀ).

Damping (§6.3): the diagonal factors are damped (factored Tikhonov,
``Ā_i + π_i√λ I``, ``G_i + √λ/π_i I``) before the construction; the cross
factors are not. Matrices follow ``blocks/kronecker.py``: a gradient is
``V [d_in(+1), d_out]`` and ``(A ⊗ G) vec(V) = vec(A V Gᵀ)`` (row-major).

Example:
  >>> link = link_inverse(a_i, g_i, a_next, g_next, a_cross, g_cross)
  >>> last = (jnp.linalg.inv(a_L), jnp.linalg.inv(g_L))
  >>> out = apply_chain_inverse([link_1, ..., link_{L-1}], last, [v_1, ..., v_L])
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax.numpy as jnp

from kfac_jax_ext import linalg


class LinkInverse(NamedTuple):
  """What ``F̂⁻¹`` needs from link i → i+1 (all ``[.., ..]`` matrices).

  Attributes:
    psi_a, psi_g: ``Ψ^A_i [d_i, d_{i+1}]``, ``Ψ^G_i [o_i, o_{i+1}]``.
    basis_a, basis_g: ``P_A [d_i, d_i]``, ``P_G [o_i, o_i]``.
    scale: ``1 / (1 − s_A s_Gᵀ)``, ``[d_i, o_i]``.
  """
  psi_a: jnp.ndarray
  psi_g: jnp.ndarray
  basis_a: jnp.ndarray
  basis_g: jnp.ndarray
  scale: jnp.ndarray


def _inv_sqrt(x):
  vals, vecs = jnp.linalg.eigh(linalg.symmetrize(x))
  vals = jnp.maximum(vals, jnp.finfo(x.dtype).tiny)
  return (vecs / jnp.sqrt(vals)[None, :]) @ vecs.T


def generalized_basis(first, second):
  """``(P, s)`` with ``Pᵀ first P = I`` and ``Pᵀ second P = diag(s)`` for SPD
  ``first`` and symmetric ``second``."""
  root = _inv_sqrt(first)
  s, e = jnp.linalg.eigh(linalg.symmetrize(root @ second @ root))
  return root @ e, s


def link_inverse(a_i, g_i, a_next, g_next, a_cross, g_cross):
  """``LinkInverse`` of link i → i+1 from the damped diagonal factors of both
  layers and the (undamped) cross factors ``Ā_{i,i+1}``, ``G_{i,i+1}``.

  Returns:
    ``(LinkInverse, ok)``; ``ok`` is False when a result is not finite or
    ``Σ_i`` is not positive definite (``s_A s_Gᵀ ≥ 1`` somewhere).
  """
  psi_a = linalg.solve_spd_right(a_cross, a_next)
  psi_g = linalg.solve_spd_right(g_cross, g_next)
  basis_a, s_a = generalized_basis(a_i, psi_a @ a_next @ psi_a.T)
  basis_g, s_g = generalized_basis(g_i, psi_g @ g_next @ psi_g.T)
  gap = 1.0 - s_a[:, None] * s_g[None, :]
  ok = jnp.all(gap > 0) & linalg.all_finite(psi_a, psi_g, basis_a, basis_g, gap)
  scale = 1.0 / jnp.where(gap > 0, gap, 1.0)
  return LinkInverse(psi_a, psi_g, basis_a, basis_g, scale), ok


def block_diagonal_link(a_i, g_i, d_next: int, o_next: int) -> LinkInverse:
  """The link with ``Ψ = 0``: ``Σ_i = Ā_i ⊗ G_i``, block-diagonal K-FAC."""
  return LinkInverse(jnp.zeros((a_i.shape[0], d_next), a_i.dtype),
                     jnp.zeros((g_i.shape[0], o_next), g_i.dtype),
                     _inv_sqrt(a_i), _inv_sqrt(g_i),
                     jnp.ones((a_i.shape[0], g_i.shape[0]), a_i.dtype))


def apply_sigma_inverse(link: LinkInverse, x):
  """``Σ_i⁻¹ vec(x)`` for ``x [d_i, o_i]``."""
  y = link.basis_a.T @ x @ link.basis_g
  return link.basis_a @ (y * link.scale) @ link.basis_g.T


def apply_chain_inverse(links: Sequence[LinkInverse], last, vs):
  """``F̂⁻¹ v`` for a chain: ``vs[i]`` is layer i's ``V_i [d_i, o_i]``;
  ``links[i]`` links layer i to i+1; ``last = (Ā_L⁻¹, G_L⁻¹)`` (damped).

  One backward sweep ``u = Ξ v``, the block solves ``w = Λ u``, one
  forward sweep ``Ξᵀ w``.
  """
  n = len(vs)
  assert len(links) == n - 1, (len(links), n)
  u = [vs[i] - links[i].psi_a @ vs[i + 1] @ links[i].psi_g.T
       for i in range(n - 1)] + [vs[-1]]
  w = [apply_sigma_inverse(links[i], u[i]) for i in range(n - 1)]
  w.append(last[0] @ u[-1] @ last[1])
  out = [w[0]]
  for i in range(1, n):
    out.append(w[i] - links[i - 1].psi_a.T @ w[i - 1] @ links[i - 1].psi_g)
  return out
