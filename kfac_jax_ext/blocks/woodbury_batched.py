r"""Woodbury blocks per group or slice: TENGraD for grouped convs and layers
inside ``scan``.

A grouped (or depthwise) conv has one Fisher block per feature group, and a
kernel scanned over (a scan-over-layers stack ``[L, ...]``) one per slice;
a kernel closed over by a scan body is one block whose per-example gradient
sums over the steps. For block ``j`` of a layer with ``G`` blocks,

    Δ_j = (U_j U_jᵀ/n + λI)⁻¹ ∇_j = (1/λ)[∇_j − U_j (K_j/n + λI)⁻¹ U_jᵀ∇_j / n],

with ``U_j`` the per-example gradients of block ``j`` (each example's tokens
summed: its positions, and the steps that share the block). Each block is
``woodbury.Woodbury``'s, batched over a leading ``[G]`` axis in the state
(``[G, N, d]``, ``[G, N, d_a, d_g]``, ``[G, N, N]``) and ``vmap``-ed; the
batch's examples stay the leading axis of the statistics so a transform can
gather them over devices.

As for every Woodbury block, a layer's tokens must be grouped by example
(the loss examples are the leading axis of its output at each step);
``tengrad_plan`` gives the others no block.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kfac_jax_ext import linalg
from kfac_jax_ext.blocks import woodbury


@dataclasses.dataclass(frozen=True)
class BatchedWoodbury(woodbury.Woodbury):
  """``layer.groups`` Woodbury blocks (per group and/or slice), stored and
  refreshed batched (the fields are ``woodbury.Woodbury``'s, per block)."""

  @property
  def blocks(self) -> int:
    return self.layer.groups

  def init(self, a_side: str, dtype) -> woodbury.WoodburyBlock:
    return woodbury.init_layer_block(
        self.layer.d_a, self.layer.d_out, a_side, self.factored, self.capacity,
        dtype, self.initial_damping, lead=(self.blocks,))

  def batch_statistics(self, stats, num_examples, dtype):
    """``ā [n_d, G, T, d_a]``, ``g [n_d, G, T, d_g]``: examples first."""
    a, g = stats
    one = lambda x, y: super(BatchedWoodbury, self).batch_statistics(
        (x, y), num_examples, dtype)
    a, g = jax.vmap(one)(a, g)
    return jnp.moveaxis(a, 0, 1), jnp.moveaxis(g, 0, 1)

  def refresh(self, estimate, damping):
    one = lambda a, g: super(BatchedWoodbury, self).refresh((a, g), damping)
    blocks_first = jax.tree_util.tree_map(lambda x: jnp.moveaxis(x, 1, 0), tuple(estimate))
    data, ok = linalg.map_blocks(one, *blocks_first)
    return data, jnp.all(ok)

  def apply(self, inverse, v, damping):
    one = lambda inv, x: super(BatchedWoodbury, self).apply(inv, x, damping)
    return jax.vmap(one)(inverse, v)

  def refresh_cost(self) -> float:
    return self.blocks * super().refresh_cost()

  def label(self) -> str:
    return f"{self.blocks}x {super().label()}"
