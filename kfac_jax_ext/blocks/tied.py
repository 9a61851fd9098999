r"""Tied kernels: one Kronecker block for a kernel with several uses.

K-FAC *expand* over the uses (``../shared/spec/weight_sharing.md``): every
use adds its tokens to the same two factors, in the orientation of the first
use; inputs are normalised by the tokens of all uses ``K``, output gradients
by the M loss examples. A use whose input is on the other side (a table as
embedding and as output projection) adds its input Gram to the column factor
and its output Gram to the row factor:

    R = (1/K) Σ_{uses u, tok} a aᵀ (+ (1/M) Σ g gᵀ of flipped uses),
    C = (1/M) Σ_{uses u, tok} g gᵀ (+ (1/K) Σ a aᵀ of flipped uses).

This equals ``Kronecker.batch_statistics`` applied to all the uses' tokens
when every use has the first one's orientation. Refresh and apply are the
dense block's.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from kfac_jax_ext.blocks import embedding
from kfac_jax_ext.blocks import kronecker


def tied_factors(layer, stats, num_examples, dtype):
  """``(R_b, C_b)`` of a kernel with several uses (``layer.kind == "tied"``)
  from the uses' ``(a, g)`` (an embedding use's ``a``: its ids)."""
  k = sum(a.shape[0] for a, _ in stats)
  rows = jnp.zeros((layer.d_in, layer.d_in), dtype)
  cols = jnp.zeros((layer.d_out, layer.d_out), dtype)
  for use, flip, (a, g) in zip(layer.uses, layer.transposed, stats):
    if use.kind == "embedding":
      a_gram = jnp.diag(embedding.id_counts(a, use.d_in, dtype))
    else:
      a_gram = a.astype(dtype).T @ a.astype(dtype)
    g = g.astype(dtype)
    a_gram, g_gram = a_gram / k, (g.T @ g) / jnp.asarray(num_examples, dtype)
    rows, cols = (rows + g_gram, cols + a_gram) if flip else (
        rows + a_gram, cols + g_gram)
  return rows, cols


@dataclasses.dataclass(frozen=True)
class Tied(kronecker.Kronecker):
  """The block of a kernel used by several layers (``stats``: one ``(a, g)``
  per use)."""

  def batch_statistics(self, stats, num_examples, dtype):
    return tied_factors(self.layer, stats, num_examples, dtype)
