r"""TENGraD's exact Woodbury block for a kernel with several uses.

A tied kernel (a table used as embedding and as output projection, a
weight applied twice) has one Fisher block; example n's gradient sums its
uses' token gradients, each in the kernel's orientation (that of its first
use, ``blocks/tied.py``):

    U_n = Σ_uses Σ_{t∈n} r_t c_tᵀ,

with ``r`` the token's row-side vector (its input ``a``, a one-hot id for an
embedding use, or its output gradient ``g`` for a use whose input is on the
column side) and ``c`` the other. The block stores the explicit ``U
[N, d_in, d_out]`` (memory ``N·d_in·d_out``; ``init`` checks it fits) and
applies ``Δ = (1/λ)[∇ − U (K/n + λI)⁻¹ Uᵀ∇ / n]`` with ``K = UUᵀ``, as the
explicit layout of ``woodbury.Woodbury`` does. Each use's tokens must be
grouped by example. Ids outside ``[0, V)`` count for nothing.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kfac_jax_ext import linalg
from kfac_jax_ext.blocks import woodbury


def _use_gradients(use, flip, a, g, n, num_examples, shape, dtype):
  """One use's contribution to ``U [n, d_in, d_out]`` (the kernel's
  orientation) from its tokens, grouped example-major."""
  t = g.shape[0] // num_examples
  g = g.astype(dtype).reshape(num_examples, t, -1)[:n]
  if use.kind == "embedding":     # a: ids; the table's id axis is rows or cols
    ids = a.reshape(num_examples, t)[:n]
    ids = jnp.where(ids < 0, ids + use.d_in, ids)
    rows = jnp.broadcast_to(jnp.arange(n)[:, None], ids.shape)
    out = jnp.zeros((n,) + shape, dtype)
    if flip:    # [n, d_in, V]: the ids index the columns
      return out.at[rows, :, ids].add(g, mode="drop")
    return out.at[rows, ids].add(g, mode="drop")
  a = a.astype(dtype).reshape(num_examples, t, -1)[:n]
  if flip:
    return jnp.einsum("nte,ntd->ned", g, a)     # rows: g, columns: a
  return jnp.einsum("ntd,nte->nde", a, g)


@dataclasses.dataclass(frozen=True)
class TiedWoodbury(woodbury.Woodbury):
  """The Woodbury block of a tied kernel (explicit per-example gradients;
  ``factored`` is ignored)."""

  def init(self, a_side: str, dtype) -> woodbury.WoodburyBlock:
    return woodbury.init_layer_block(self.layer.d_in, self.layer.d_out,
                                     a_side, False, self.capacity, dtype,
                                     self.initial_damping)

  def batch_statistics(self, stats, num_examples, dtype):
    """``U [n_d, d_in, d_out]`` of the first ``examples`` examples, summed
    over the uses (``stats``: one ``(a, g)`` per use), over ``√R``
    (``output_gradients``)."""
    shape = (self.layer.d_in, self.layer.d_out)
    return self.output_gradients(sum(
        _use_gradients(use, flip, a, g, self.examples, num_examples, shape,
                       dtype)
        for use, flip, (a, g) in zip(self.layer.uses, self.layer.transposed,
                                     stats)))

  def refresh(self, estimate, damping):
    u = estimate
    n, dtype = u.shape[0], u.dtype
    gram = woodbury.explicit_gram(u)
    inverse, ok, damping = self.invert_padded(gram, n, u.shape[1] * u.shape[2],
                                              damping)
    data = woodbury.WoodburyInverseData(
        None, None, woodbury.pad_examples(u, self.capacity), inverse,
        jnp.asarray(n, dtype), jnp.asarray(damping, dtype))
    return data, ok & linalg.all_finite(*jax.tree_util.tree_leaves(data))

  def refresh_cost(self) -> float:
    """``n²·d_in·d_out + n³``."""
    n = self.gram_size
    return n * n * self.layer.d_in * self.layer.d_out + n ** 3

  def label(self) -> str:
    return super().label("tied")
