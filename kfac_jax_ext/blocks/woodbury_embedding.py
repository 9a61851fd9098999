r"""TENGraD's exact Woodbury block for an embedding table.

An embedding looks up rows of a table ``W [V, d]`` by ids; example n's
gradient is ``U_n = Σ_t e_{id_nt} g_ntᵀ`` (``e_v``: the one-hot of id v;
``g_nt``: the output gradient of its t-th lookup), so with the n examples of
the statistics batch

    K_nm = ⟨U_n, U_m⟩ = Σ_{t,t'} [id_nt = id_mt'] (g_nt · g_mt'),
    Uᵀvec(V) = (Σ_t ⟨V[id_nt], g_nt⟩)_n,     U w = Σ_n w_n Σ_t e_{id_nt} g_ntᵀ,

and ``Δ = (UUᵀ/n + λI)⁻¹ ∇ = (1/λ)[∇ − U (K/n + λI)⁻¹ Uᵀ∇ / n]`` as for
every Woodbury block. The block stores the batch's ids ``[N, T]`` and output
gradients ``[N, T, d]`` (``T`` lookups per example), never a ``[V, d]``
gradient per example; the Gram costs ``n²T²d``. Ids outside ``[0, V)``
(dropped by the gather) count for nothing.

Example::

  block = EmbeddingWoodbury(layer, capacity=128, gram_size=64, examples=64,
                            positions=32)
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kfac_jax_ext import initial_arrays
from kfac_jax_ext import linalg
from kfac_jax_ext.blocks import woodbury


class EmbeddingWoodburyBlock(NamedTuple):
  """State of an embedding's Woodbury block: the statistics batch's ``ids
  [N, T]`` (int32) and output gradients ``g [N, T, d]`` (zero rows pad fewer
  than N examples), ``(K/n + λ_r I)⁻¹ [N, N]``, ``n`` and ``λ_r``."""
  ids: jax.Array
  g: jax.Array
  gram_inverse: jax.Array
  examples: jax.Array
  damping: jax.Array


def lookup_gram(ids, g, vocab: int):
  """``K_nm = Σ_{t,t'} [id_nt = id_mt'] (g_nt·g_mt')`` for ``ids [n, T]``,
  ``g [n, T, d]``; ids outside ``[0, vocab)`` (dropped lookups) match
  nothing."""
  valid = (ids >= 0) & (ids < vocab)
  same = ((ids[:, None, :, None] == ids[None, :, None, :])      # [n, n, T, T]
          & valid[:, None, :, None] & valid[None, :, None, :])
  gg = jnp.einsum("nte,mse->nmts", g, g)
  return jnp.sum(jnp.where(same, gg, 0.0), axis=(2, 3))


def apply_lookups(v, ids, g, gram_inverse, n, damping):
  """``(UUᵀ/n + λI)⁻¹ vec(V)`` for the table gradient ``v [V, d]``."""
  s = jnp.sum(v.at[ids].get(mode="fill", fill_value=0) * g, axis=(1, 2))
  w = gram_inverse @ s / n
  uw = jnp.zeros_like(v).at[ids].add(w[:, None, None] * g, mode="drop")
  return (v - uw) / damping


@dataclasses.dataclass(frozen=True)
class EmbeddingWoodbury(woodbury.Woodbury):
  """The Woodbury block of an embedding table (``positions``: its ``T``
  lookups per loss example)."""

  def init(self, a_side: str, dtype) -> EmbeddingWoodburyBlock:
    del a_side   # the table's rows are ids: one orientation
    n, t, d = self.capacity, self.positions, self.layer.d_out
    return EmbeddingWoodburyBlock(
        initial_arrays.zeros((n, t), jnp.int32),
        initial_arrays.zeros((n, t, d), dtype),
        initial_arrays.zeros((n, n), dtype), initial_arrays.ones([], dtype),
        jnp.full([], self.initial_damping, dtype))

  def batch_statistics(self, stats, num_examples, dtype):
    """``ids [n_d, T]``, ``g [n_d, T, d]`` of the first ``examples``; a
    negative id counts from the end (as the gather reads it), an id the
    gather drops becomes ``V`` (out of range everywhere)."""
    ids, g = stats
    t = ids.shape[0] // num_examples
    n, vocab = self.examples, self.layer.d_in
    ids = ids.reshape(num_examples, t)[:n].astype(jnp.int32)
    ids = jnp.where(ids < 0, ids + vocab, ids)
    ids = jnp.where((ids >= 0) & (ids < vocab), ids, vocab)
    return ids, self.output_gradients(
        g.astype(dtype).reshape(num_examples, t, -1)[:n])

  def refresh(self, estimate, damping):
    ids, g = estimate
    n, dtype = ids.shape[0], g.dtype
    gram = lookup_gram(ids, g, self.layer.d_in)
    inverse, ok, damping = self.invert_padded(
        gram, n, self.layer.d_in * g.shape[-1], damping)
    data = EmbeddingWoodburyBlock(
        woodbury.pad_examples(ids, self.capacity),
        woodbury.pad_examples(g, self.capacity), inverse,
        jnp.asarray(n, dtype), jnp.asarray(damping, dtype))
    return data, ok & linalg.all_finite(g, inverse)

  def apply(self, inverse, v, damping):
    del damping   # the refresh's λ_r
    return apply_lookups(v, inverse.ids, inverse.g, inverse.gram_inverse,
                         inverse.examples, inverse.damping)

  def refresh_cost(self) -> float:
    """``n²T²d + n³``."""
    n, t = self.gram_size, self.positions
    return n * n * t * t * self.layer.d_out + n ** 3

  def label(self) -> str:
    return super().label("embedding")

  def store(self, entry, data, a_side):
    del entry, a_side   # the entry is laid out exactly
    return data

  def load(self, entry, a_side):
    del a_side
    return entry
