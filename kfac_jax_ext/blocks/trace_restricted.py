"""TKFAC (Gao et al., AAAI 2021): Kronecker blocks with the exact block trace.

Per token (dense: an example; conv: an (example, location) pair) let
``α = ‖ā‖²`` and ``β = ‖g‖²``. With M loss examples:

* ``factors="weighted"``: ``P = Σ β āāᵀ / M``, ``Q = Σ α ggᵀ / M``;
* ``factors="unweighted"``: K-FAC's ``A``, ``G``;
* ``δ = tr F``: ``Σ_tok α β / M`` (``trace="tokens"``: exact for dense layers,
  the spatially-uncorrelated trace for conv) or ``(1/M) Σ_n ‖Σ_t ā_t g_tᵀ‖²``
  (``trace="exact"``, the trace of the exact per-example block);

and the block is ``F̃ = δ · Φ ⊗ Ψ`` with ``Φ = P/trP``, ``Ψ = Q/trQ``, so
``tr F̃ = δ`` and ``trΦ = trΨ = 1``. Running averages are kept of the
un-normalised P, Q and δ, so the identity holds for the averages too. With
constant token norms ``F̃ = A ⊗ G`` (K-FAC); for one example ``F̃`` is exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kfac_jax_ext import gram
from kfac_jax_ext import linalg
from kfac_jax_ext.blocks import embedding
from kfac_jax_ext.blocks import kronecker
from kfac_jax_ext.blocks import tied


def exact_block_trace(a, g, has_bias: bool, num_examples: int):
  """``(1/M) Σ_n ‖Σ_{t∈n} ā_t g_tᵀ‖²_F``, tokens grouped example-major.

  Uses the Gram form ``Σ_{t,t'} (ā_t·ā_t')(g_t·g_t')`` when ``T²(d_a+d_g) <
  d_a d_g``, else the explicit per-example gradients.
  """
  k = a.shape[0]
  if k % num_examples:
    raise ValueError(f"trace='exact' needs the {k} tokens of a layer to split "
                     f"evenly over the {num_examples} loss examples.")
  per = k // num_examples
  if has_bias:
    a = jnp.concatenate([a, jnp.ones((k, 1), a.dtype)], axis=1)
  a = a.reshape(num_examples, per, a.shape[-1])
  g = g.reshape(num_examples, per, g.shape[-1])
  d_a, d_g = a.shape[-1], g.shape[-1]
  if per * per * (d_a + d_g) < d_a * d_g:
    gram = jnp.einsum("ntd,nsd->nts", a, a) * jnp.einsum("nte,nse->nts", g, g)
    return jnp.sum(gram) / num_examples
  u = jnp.einsum("ntd,nte->nde", a, g)
  return jnp.sum(u * u) / num_examples


def _embedding_statistics(ids, g, vocab, num_examples, dtype, factors, trace):
  """``batch_statistics`` of an embedding: one-hot inputs have ``α = 1``, so
  ``P = diag(Σ_tok β onehot) / M`` (a vector), ``Q = gᵀg / M`` and
  ``δ = Σ β / M`` (``trace="exact"``: ids equal within an example pair up)."""
  g = g.astype(dtype)
  m = jnp.asarray(num_examples, dtype)
  beta = jnp.sum(g * g, axis=1)
  if factors == "weighted":
    side_a = embedding.id_counts(ids, vocab, dtype, beta) / m
    side_g = g.T @ g / m
  else:
    side_a, side_g = embedding.embedding_factors(ids, g, vocab, num_examples,
                                                 dtype)
  if trace == "exact":
    per = ids.shape[0] // num_examples
    same = (ids.reshape(num_examples, per, 1) == ids.reshape(num_examples, 1, per))
    gg = jnp.einsum("ntd,nsd->nts", g.reshape(num_examples, per, -1),
                    g.reshape(num_examples, per, -1))
    delta = jnp.sum(jnp.where(same, gg, 0.0)) / m
  else:
    delta = jnp.sum(beta) / m
  return side_a, side_g, delta


def tied_statistics(layer, stats, num_examples, dtype, factors: str):
  """``(P or R, Q or C, δ)`` of a kernel with several uses (``trace="tokens"``).

  Every use's tokens add to the two factors in the first use's orientation
  (``blocks/tied.py``): a token's gradient is ``r cᵀ`` with ``r`` on the row
  side (its input ``ā``, or its output gradient ``g`` for a use whose input
  is on the column side) and ``c`` on the other, so with ``ρ = ‖r‖²``,
  ``γ = ‖c‖²``: ``P = Σ γ r rᵀ / M``, ``Q = Σ ρ c cᵀ / M``,
  ``δ = Σ ρ γ / M`` over the tokens of all uses (an embedding use's input is
  one-hot: ``‖ā‖² = 1``, ``Σ γ r rᵀ = diag(Σ γ onehot)``). ``"unweighted"``
  keeps K-FAC's tied factors (``tied.tied_factors``) with the same δ."""
  m = jnp.asarray(num_examples, dtype)
  rows = jnp.zeros((layer.d_in, layer.d_in), dtype)
  cols = jnp.zeros((layer.d_out, layer.d_out), dtype)
  delta = jnp.zeros((), dtype)
  for use, flip, (a, g) in zip(layer.uses, layer.transposed, stats):
    g = g.astype(dtype)
    beta = jnp.sum(g * g, axis=1)
    if use.kind == "embedding":
      alpha = jnp.ones_like(beta)
      a_side = jnp.diag(embedding.id_counts(a, use.d_in, dtype, beta)) / m
    else:
      a = a.astype(dtype)
      alpha = jnp.sum(a * a, axis=1)
      a_side = (a * beta[:, None]).T @ a / m
    g_side = (g * alpha[:, None]).T @ g / m
    rows, cols = (rows + g_side, cols + a_side) if flip else (
        rows + a_side, cols + g_side)
    delta = delta + jnp.sum(alpha * beta) / m
  if factors == "unweighted":
    rows, cols = tied.tied_factors(layer, stats, num_examples, dtype)
  return rows, cols, delta


def batch_statistics(a, g, has_bias, num_examples, dtype, *, factors: str,
                     trace: str, layer=None):
  """``(P or A, Q or G, δ)`` of one batch; see the module docstring.
  Embeddings and grouped convs (``layer``) are handled per their layout."""
  if layer is not None and layer.kind == "embedding":
    return _embedding_statistics(a, g, layer.d_in, num_examples, dtype,
                                 factors, trace)
  if layer is not None and layer.groups > 1:
    return jax.vmap(lambda x, y: batch_statistics(
        x, y, has_bias, num_examples, dtype, factors=factors, trace=trace))(a, g)
  a = a.astype(dtype)
  g = g.astype(dtype)
  alpha = jnp.sum(a * a, axis=1) + (1.0 if has_bias else 0.0)
  beta = jnp.sum(g * g, axis=1)
  m = jnp.asarray(num_examples, dtype)
  if factors == "weighted":
    side_a = kronecker.homogeneous_gram(a, has_bias, beta) / m
    side_g = gram.symmetric_gram(g * alpha[:, None], g) / m
  else:
    side_a, side_g = kronecker.batch_factors(a, g, has_bias, num_examples, dtype)
  if trace == "exact":
    delta = exact_block_trace(a, g, has_bias, num_examples)
  else:
    delta = jnp.sum(alpha * beta) / m
  return side_a, side_g, delta


def _unit_trace(x):
  t = linalg.trace(x)
  return x / jnp.where(t > 0, t, 1.0)


def effective_factors(side_a, side_g, delta):
  """``(δΦ, Ψ)``: their Kronecker product is ``δ Φ⊗Ψ``."""
  return delta * _unit_trace(side_a), _unit_trace(side_g)
