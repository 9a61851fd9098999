"""K-FAC / KFC Kronecker blocks: ``F_l ≈ A ⊗ G``.

With ``ā = [a; 1]`` (the homogeneous coordinate folds the bias in), K tokens
and M loss examples (dense: K = M; conv: K = M·|T|; sequences: K = M·T):

    A = (1/K) Σ_tok ā āᵀ,     G = (1/M) Σ_tok g gᵀ,

which equals KFC's ``Ω ⊗ Γ`` for conv layers (and kfac-jax's ``|T|``-scaled
factors). The canonical gradient matrix ``V`` is ``[d_in(+1), d_out]`` (flax
orientation, bias as last row); in row-major vec ``(A ⊗ G) vec(V) = vec(A V G)``.

Embeddings (a gather of table rows by ids) are dense layers with one-hot
inputs: ``A = diag(f)``, ``f_v`` = the share of tokens with id v, stored as
the vector ``f``. Grouped/depthwise convs have one block per feature group,
stored batched (``[groups, d, d]``).

Damping (``damping_mode``):
* ``"tikhonov"``: exact ``(A⊗G + λI)⁻¹ vec(V) = Q_A [(Q_Aᵀ V Q_G) ⊘ (α γᵀ + λ)] Q_Gᵀ``;
* ``"factored"``: ``(A + π√λ I)⁻¹ V (G + √λ/π I)⁻¹``, π = sqrt((trA/dA)/(trG/dG)).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kfac_jax_ext import initial_arrays
from kfac_jax_ext import linalg


class KroneckerFactors(NamedTuple):
  """Running factors of a ≥2-D parameter leaf, padded to its slot sizes.

  ``rows``: ``(prod(shape[:-1]) + 1)²``; ``cols``: ``(shape[-1] + 1)²``.
  A layer uses one side as A and the other as G, sliced to its dimensions.
  """
  rows: jax.Array
  cols: jax.Array


class KroneckerInverse(NamedTuple):
  """Refreshed inverse data: damped inverses (factored mode) or eigenvectors
  and eigenvalues (tikhonov mode; ``*_vals`` are None in factored mode, so the
  state holds no zero-size arrays, which orbax cannot save)."""
  rows: jax.Array
  cols: jax.Array
  rows_vals: jax.Array | None
  cols_vals: jax.Array | None


def slot_sizes(shape) -> tuple[int, int]:
  rows = 1
  for n in shape[:-1]:
    rows *= n
  return rows + 1, shape[-1] + 1


def init_factors(shape, dtype) -> KroneckerFactors:
  r, c = slot_sizes(shape)
  return KroneckerFactors(initial_arrays.identity((r, r), dtype),
                          initial_arrays.identity((c, c), dtype))


def init_inverse(shape, dtype, mode: str) -> KroneckerInverse:
  r, c = slot_sizes(shape)
  vals = (lambda n: initial_arrays.ones((n,), dtype)) if mode == "tikhonov" else (
      lambda n: None)
  return KroneckerInverse(initial_arrays.identity((r, r), dtype),
                          initial_arrays.identity((c, c), dtype),
                          vals(r), vals(c))


def homogeneous_gram(a, has_bias: bool, weights=None):
  """``Σ_tok w ā āᵀ`` (unnormalised) with ``ā = [a; 1]`` when ``has_bias``,
  without materialising the ones column."""
  aw = a if weights is None else a * weights[:, None]
  gram = a.T @ aw
  if not has_bias:
    return gram
  s = jnp.sum(aw, axis=0)
  total = jnp.sum(weights) if weights is not None else jnp.asarray(a.shape[0], a.dtype)
  top = jnp.concatenate([gram, s[:, None]], axis=1)
  bottom = jnp.concatenate([s, total[None].astype(a.dtype)])[None, :]
  return jnp.concatenate([top, bottom], axis=0)


def batch_factors(a, g, has_bias: bool, num_examples, dtype):
  """``(A_b, G_b)`` of one batch from ``a [K, d_in]`` and ``g [K, d_out]``."""
  a = a.astype(dtype)
  g = g.astype(dtype)
  return (homogeneous_gram(a, has_bias) / a.shape[0],
          (g.T @ g) / jnp.asarray(num_examples, dtype))


def refresh(a, g, damping, mode: str):
  """Inverse data for one layer's factors.

  Returns:
    ``(inverse_a, inverse_g, vals_a, vals_g, ok)``.
  """
  if mode == "tikhonov":
    va, qa, ok_a = linalg.eigh(a)
    vg, qg, ok_g = linalg.eigh(g)
    return qa, qg, va, vg, ok_a & ok_g
  pi = linalg.pi_adjustment(a, g)
  root = jnp.sqrt(damping)
  inv_a, ok_a = linalg.damped_inverse(a, pi * root)
  inv_g, ok_g = linalg.damped_inverse(g, root / pi)
  return inv_a, inv_g, None, None, ok_a & ok_g


def precondition(v, inv_a, inv_g, vals_a, vals_g, damping, mode: str):
  """Applies the damped block inverse to the canonical gradient matrix ``v``."""
  if mode == "tikhonov":
    rotated = inv_a.T @ v @ inv_g
    rotated = rotated / (vals_a[:, None] * vals_g[None, :] + damping)
    return inv_a @ rotated @ inv_g.T
  return inv_a @ v @ inv_g


def id_counts(ids, size: int, dtype, weights=None):
  """``Σ_tok w_tok onehot(id_tok)`` as a ``[size]`` vector (w = 1 by
  default); ids outside ``[0, size)`` (dropped by the gather) count for
  nothing."""
  weights = 1.0 if weights is None else weights
  return jnp.zeros((size,), dtype).at[ids].add(weights, mode="drop")


def embedding_factors(ids, g, vocab: int, num_examples, dtype):
  """``(f, G_b)`` of an embedding: ``f_v = #{tokens with id v} / K`` (the
  diagonal of ``A = E[onehot onehotᵀ]``) and ``G_b = gᵀg / M``. Ids outside
  ``[0, vocab)`` (dropped by the gather) count for nothing."""
  g = g.astype(dtype)
  return (id_counts(ids, vocab, dtype) / ids.shape[0],
          (g.T @ g) / jnp.asarray(num_examples, dtype))


def tied_factors(layer, stats, num_examples, dtype):
  """``(R_b, C_b)`` of a kernel with several uses (``layer.kind == "tied"``),
  K-FAC-expand over the uses: every use adds its tokens to the same two
  factors in the orientation of the first use, inputs normalised by the
  tokens of all uses ``K``, output gradients by the M loss examples. A use
  whose input is on the other side (a table as embedding and as output
  projection) adds its input Gram to the column factor and its output Gram
  to the row factor. Equals ``batch_factors`` of one layer applied to all
  the uses' tokens when every use has the first one's orientation."""
  k = sum(a.shape[0] for a, _ in stats)
  rows = jnp.zeros((layer.d_in, layer.d_in), dtype)
  cols = jnp.zeros((layer.d_out, layer.d_out), dtype)
  for use, flip, (a, g) in zip(layer.uses, layer.transposed, stats):
    if use.kind == "embedding":
      a_gram = jnp.diag(id_counts(a, use.d_in, dtype))
    else:
      a_gram = a.astype(dtype).T @ a.astype(dtype)
    g = g.astype(dtype)
    a_gram, g_gram = a_gram / k, (g.T @ g) / jnp.asarray(num_examples, dtype)
    rows, cols = (rows + g_gram, cols + a_gram) if flip else (
        rows + a_gram, cols + g_gram)
  return rows, cols


def layer_batch_factors(layer, a, g, has_bias: bool, num_examples, dtype):
  """``(A_b, G_b)`` of one batch for any Kronecker layer kind (tied: ``a``
  holds the uses' statistics, ``g`` is None)."""
  if layer.kind == "tied":
    return tied_factors(layer, a, num_examples, dtype)
  if layer.kind == "embedding":
    return embedding_factors(a, g, layer.d_in, num_examples, dtype)
  if layer.groups > 1:
    return jax.vmap(lambda x, y: batch_factors(x, y, has_bias, num_examples,
                                               dtype))(a, g)
  return batch_factors(a, g, has_bias, num_examples, dtype)


def refresh_diagonal_a(f, g, damping, mode: str):
  """``refresh`` for ``A = diag(f)`` (embeddings): the A side stays a vector
  (its eigenbasis is the identity)."""
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
  """``precondition`` for ``A = diag(f)``; ``v`` is ``[V, d_out]``."""
  if mode == "tikhonov":
    rotated = (v @ inv_g) / (vals_a[:, None] * vals_g[None, :] + damping)
    return rotated @ inv_g.T
  return inv_a[:, None] * (v @ inv_g)


def refresh_layer(layer, a, g, damping, mode: str):
  """``refresh`` for any Kronecker layer kind (grouped: per group, with a
  per-group damping ``[groups]``)."""
  if layer.kind == "embedding":
    return refresh_diagonal_a(a, g, damping, mode)
  if layer.groups > 1:
    damping = jnp.broadcast_to(damping, a.shape[:1])
    *out, ok = jax.vmap(functools.partial(refresh, mode=mode))(a, g, damping)
    return (*out, jnp.all(ok))
  return refresh(a, g, damping, mode)


def precondition_layer(layer, v, inv_a, inv_g, vals_a, vals_g, damping,
                       mode: str):
  """``precondition`` for any Kronecker layer kind."""
  if layer.kind == "embedding":
    return precondition_diagonal_a(v, inv_a, inv_g, vals_a, vals_g, damping,
                                   mode)
  if layer.groups > 1:
    damping = jnp.broadcast_to(damping, v.shape[:1])
    return jax.vmap(functools.partial(precondition, mode=mode))(
        v, inv_a, inv_g, vals_a, vals_g, damping)
  return precondition(v, inv_a, inv_g, vals_a, vals_g, damping, mode)


def init_layer_entry(a_shape, g_shape, a_side: str, dtype, mode: str):
  """Exact-size ``(KroneckerFactors, KroneckerInverse)`` of one layer with A
  in ``a_side``: identities (ones for a diagonal A)."""
  sides = {a_side: a_shape, ("cols" if a_side == "rows" else "rows"): g_shape}
  factors = KroneckerFactors(initial_arrays.identity(sides["rows"], dtype),
                             initial_arrays.identity(sides["cols"], dtype))
  vals = (lambda s: None) if mode != "tikhonov" else (
      lambda s: initial_arrays.ones(s if len(s) == 1 else s[:-1], dtype))
  inverse = KroneckerInverse(initial_arrays.identity(sides["rows"], dtype),
                             initial_arrays.identity(sides["cols"], dtype),
                             vals(sides["rows"]), vals(sides["cols"]))
  return factors, inverse
