"""Koroko et al.'s Krylov–Nicolaides coarse space: ``{1_l, M_l⁻¹1_l}`` per layer.

``M_l⁻¹1`` (``1`` the layer's all-ones ``[d_a, d_g]`` matrix) is recomputed
with the fine inverses and kept in the state between refreshes. Two forms:

* a **factored** base (``damping_mode="factored"``, K-FAC's default, K-FAC
  or TKFAC): ``M_l⁻¹V = Ā⁻¹ V Ḡ⁻¹`` with the damped factor inverses, so
  ``M_l⁻¹1 = (Ā⁻¹1)(Ḡ⁻¹1)ᵀ`` is rank one. The state keeps its two vectors
  (a ``(rows, cols)`` pair per leaf, as the spectral space), computed from
  the refreshed inverses with two matrix-vector products, and the layer's
  basis carries a ``coarse.RankOne`` form: the per-example projections
  ``r_kᵀu_n`` cost ``O(MT(d_a + d_g))`` instead of a pass over the layer
  (``M T d_a d_g``) per vector.
* otherwise (``"tikhonov"``: ``M_l⁻¹`` is not a Kronecker product of two
  matrices) the full matrix, from ``M⁻¹`` applied to the ones.

Both give the same span, hence the same ``Q``; the basis is
``coarse.normalized_basis`` of ``{11ᵀ, M_l⁻¹1}`` in both.
"""

from __future__ import annotations

import jax.numpy as jnp

from kfac_jax_ext import coarse
from kfac_jax_ext import initial_arrays
from kfac_jax_ext import linalg
from kfac_jax_ext.blocks import kronecker


def slots(shapes, dtype, factored: bool):
  """Per ≥2-D leaf, a slot for ``M_l⁻¹1``: ``(rows, cols)`` vectors when
  ``factored``, else a ``(rows, cols)``-shaped matrix; None for ≤1-D
  leaves. Zeros: no second vector until the first refresh."""
  def one(shape):
    if len(shape) < 2:
      return None
    rows, cols = kronecker.slot_sizes(shape)
    if factored:
      return (initial_arrays.zeros((rows,), dtype),
              initial_arrays.zeros((cols,), dtype))
    return initial_arrays.zeros((rows, cols), dtype)
  return tuple(one(s) for s in shapes)


def refreshed(kls, krylov, inverses, precondition, dtype):
  """``krylov`` with every coarse layer's ``M_l⁻¹1`` from the refreshed
  inverses.

  Args:
    kls: the coarse layers' ``plan.KroneckerLayer``s.
    krylov: the state's slots (``slots``).
    inverses: the base state's refreshed ``KroneckerInverse`` per leaf (the
      factored form reads the damped ``Ā⁻¹``, ``Ḡ⁻¹`` from it).
    precondition: per-layer ``[d_a, d_g]`` matrices ↦ their ``M_l⁻¹`` images
      (the matrix form).
    dtype: the coarse level's dtype.

  Returns:
    The new slots.
  """
  krylov = list(krylov)
  if kls and isinstance(krylov[kls[0].layer.kernel], tuple):
    for kl in kls:
      inv = inverses[kl.layer.kernel]
      inv_a = linalg.leading(getattr(inv, kl.a_side), (kl.d_a, kl.d_a))
      inv_g = linalg.leading(getattr(inv, kl.g_side), (kl.d_g, kl.d_g))
      p, q = jnp.sum(inv_a, axis=1), jnp.sum(inv_g, axis=1)    # Ā⁻¹1, Ḡ⁻¹1
      if kl.a_side != "rows":
        p, q = q, p
      rows, cols = krylov[kl.layer.kernel]
      krylov[kl.layer.kernel] = (linalg.set_leading(rows, p.astype(rows.dtype)),
                                 linalg.set_leading(cols, q.astype(cols.dtype)))
    return tuple(krylov)
  mats = precondition([jnp.ones((kl.d_a, kl.d_g), dtype) for kl in kls])
  for kl, m in zip(kls, mats):
    krylov[kl.layer.kernel] = linalg.set_leading(krylov[kl.layer.kernel],
                                                 oriented(kl, m))
  return tuple(krylov)


def layer_basis(kl, slot, dtype):
  """The layer's ``(basis [2, d_a, d_g], RankOne or None)`` from its slot.

  The factored form is ``coarse.normalized_basis`` of ``{11ᵀ, pqᵀ}``
  (``p = Ā⁻¹1``, ``q = Ḡ⁻¹1``) worked out on the atoms, never
  materializing a ``[d_a, d_g]`` matrix: ``c = ⟨11ᵀ, pqᵀ⟩/⟨11ᵀ, 11ᵀ⟩ =
  (Σp)(Σq)/(d_a d_g)``, and the ∞-norm of ``pqᵀ − c11ᵀ`` is, row by row, at
  ``q``'s largest or smallest entry. ``basis`` is then only read by the
  exact-GGN products (XLA drops it elsewhere).
  """
  ones = jnp.ones((kl.d_a, kl.d_g), dtype)
  if not isinstance(slot, tuple):
    second = oriented(kl, linalg.leading(slot, oriented_shape(kl)))
    return coarse.normalized_basis([ones, second.astype(dtype)]), None
  rows, cols = slot
  p = (rows if kl.a_side == "rows" else cols)[:kl.d_a].astype(dtype)
  q = (cols if kl.a_side == "rows" else rows)[:kl.d_g].astype(dtype)
  c = jnp.sum(p) * jnp.sum(q) / (kl.d_a * kl.d_g)
  before = jnp.max(jnp.abs(p)) * jnp.max(jnp.abs(q))
  size = jnp.max(jnp.maximum(jnp.abs(p * jnp.max(q) - c),
                             jnp.abs(p * jnp.min(q) - c)))
  keep = size > coarse.SPAN_TOL * before
  second = jnp.where(keep, jnp.stack([-c, jnp.ones_like(c)]) /
                     jnp.where(keep, size, 1.0), 0.0)
  mixing = jnp.stack([jnp.array([1.0, 0.0], dtype), second.astype(dtype)])
  atoms = coarse.RankOne(jnp.stack([jnp.ones_like(p), p]),
                         jnp.stack([jnp.ones_like(q), q]), mixing)
  basis = jnp.einsum("kj,jd,je->kde", mixing, atoms.rows, atoms.cols)
  return basis, atoms


def oriented_shape(kl):
  """The ``[d_a, d_g]`` matrix's shape in its leaf's (rows, cols) slot."""
  return (kl.d_a, kl.d_g) if kl.a_side == "rows" else (kl.d_g, kl.d_a)


def oriented(kl, x):
  """``[d_a, d_g]`` ↔ the leaf's (rows, cols) orientation (a transpose or
  nothing: its own inverse)."""
  return x if kl.a_side == "rows" else x.T
