"""The Kronecker-family variants: what K-FAC and TKFAC keep and how they damp.

A ``kronecker_family.KroneckerVariant`` per method, shared by the transforms
built on the Kronecker shell (``kfac_transform``, ``tkfac_transform``, the
two-level fine level), so that no transform imports another.
"""

from __future__ import annotations

import jax.numpy as jnp

from kfac_jax_ext import kronecker_family
from kfac_jax_ext.blocks import trace_restricted


def _statistics(block, stats, num_examples, dtype):
  fa, fg = block.batch_statistics(stats, num_examples, dtype)
  return fa, fg, jnp.zeros(fa.shape[:-2] if fa.ndim > 2 else (), dtype)


KFAC = kronecker_family.KroneckerVariant(
    batch_statistics=_statistics,
    effective_factors=lambda side_a, side_g, trace: (side_a, side_g),
    layer_damping=lambda damping, layer, side_a, side_g, trace: damping)


def tkfac_variant(factors: str = "weighted", trace: str = "tokens",
                  conv_damping: float | None = None
                  ) -> kronecker_family.KroneckerVariant:
  """The TKFAC ``KroneckerVariant`` for the given options."""
  if factors not in ("weighted", "unweighted"):
    raise ValueError(f"factors must be 'weighted' or 'unweighted', got {factors!r}.")
  if trace not in ("tokens", "exact"):
    raise ValueError(f"trace must be 'tokens' or 'exact', got {trace!r}.")
  if isinstance(conv_damping, (int, float)) and conv_damping < 0:
    raise ValueError(f"conv_damping must be non-negative, got {conv_damping!r}.")

  def layer_damping(damping, layer, side_a, side_g, delta):
    if conv_damping is None or layer.kind != "conv2d":
      return damping
    size = side_a.shape[0] * side_g.shape[0]   # per group for grouped convs
    return damping + conv_damping * delta / size

  def batch_statistics(block, stats, m, dtype):
    if block.layer.kind == "tied":
      return trace_restricted.tied_statistics(block.layer, stats, m, dtype,
                                              factors)
    return trace_restricted.batch_statistics(
        *stats, block.has_bias, m, dtype, factors=factors, trace=trace,
        layer=block.layer)

  return kronecker_family.KroneckerVariant(
      batch_statistics=batch_statistics,
      effective_factors=trace_restricted.effective_factors,
      layer_damping=layer_damping,
      unsupported=lambda layer: (
          "TKFAC's trace='exact' has no tied-kernel block (its uses' "
          "per-example gradients add up); use trace='tokens'"
          if layer.kind == "tied" and trace == "exact" else None))
