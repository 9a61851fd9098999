r"""Embedding blocks: a Kronecker block whose A is diagonal.

An embedding (a gather of table rows by ids) is a dense layer with one-hot
inputs, so ``A = E[onehot onehotᵀ] = diag(f)``, ``f_v`` = the share of the
K tokens with id v, stored as the vector ``f [V]``; ``G = (1/M) Σ_tok g gᵀ``
as for a dense layer. The A side's eigenbasis is the identity, so a refresh
decomposes G only:

* ``"tikhonov"``: ``Δ = [(V Q_G) ⊘ (f γᵀ + λ)] Q_Gᵀ``;
* ``"factored"``: ``Δ = diag(f + π√λ)⁻¹ V (G + √λ/π I)⁻¹``.

Ids outside ``[0, V)`` (dropped by the gather) count for nothing.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kfac_jax_ext import linalg
from kfac_jax_ext.blocks import kronecker


def id_counts(ids, size: int, dtype, weights=None):
  """``Σ_tok w_tok onehot(id_tok)`` as a ``[size]`` vector (w = 1 by
  default); ids outside ``[0, size)`` (dropped by the gather) count for
  nothing."""
  weights = 1.0 if weights is None else weights
  return jnp.zeros((size,), dtype).at[ids].add(weights, mode="drop")


def embedding_factors(ids, g, vocab: int, num_examples, dtype):
  """``(f, G_b)`` of an embedding: ``f_v = #{tokens with id v} / K`` (the
  diagonal of ``A``) and ``G_b = gᵀg / M``."""
  g = g.astype(dtype)
  return (id_counts(ids, vocab, dtype) / ids.shape[0],
          (g.T @ g) / jnp.asarray(num_examples, dtype))


def refresh_diagonal_a(f, g, damping, mode: str):
  """``kronecker.refresh`` for ``A = diag(f)``: the A side stays a vector."""
  f = jnp.maximum(f, 0.0)
  if mode == "tikhonov":
    vg, qg, ok = linalg.eigh(g)
    return f, qg, f, vg, ok & linalg.all_finite(f)
  pi = linalg.pi_adjustment(f, g)
  root = jnp.sqrt(damping)
  inv_a = 1.0 / (f + pi * root)
  inv_g, ok_g = linalg.damped_inverse(g, root / pi)
  return inv_a, inv_g, None, None, ok_g & linalg.all_finite(inv_a)


def precondition_diagonal_a(v, inv_a, inv_g, vals_a, vals_g, damping, mode):
  """``kronecker.precondition`` for ``A = diag(f)``; ``v`` is ``[V, d_out]``."""
  if mode == "tikhonov":
    rotated = (v @ inv_g) / (vals_a[:, None] * vals_g[None, :] + damping)
    return rotated @ inv_g.T
  return inv_a[:, None] * (v @ inv_g)


@dataclasses.dataclass(frozen=True)
class Embedding(kronecker.Kronecker):
  """The block of an embedding table ``[V, d]`` (A = ``diag(f)``, ``[V]``)."""

  def factor_shapes(self) -> tuple[tuple, tuple]:
    return (self.layer.d_in,), (self.layer.d_out, self.layer.d_out)

  def batch_statistics(self, stats, num_examples, dtype):
    """``(f, G_b)`` from ``stats = (ids [K], g [K, d_out])``."""
    ids, g = stats
    return embedding_factors(ids, g, self.layer.d_in, num_examples, dtype)

  def refresh(self, estimate, damping):
    *out, ok = refresh_diagonal_a(*estimate, damping, self.mode)
    return kronecker.KroneckerInverseData(*out), ok

  def apply(self, inverse, v, damping):
    return precondition_diagonal_a(v, *inverse, damping, self.mode)

  def refresh_cost(self) -> float:
    """``V + d_g³``: only G is decomposed."""
    return self.layer.d_in + self.layer.d_out ** 3

  def label(self) -> str:
    return f"kronecker diag({self.layer.d_in})x{self.layer.d_out}"
