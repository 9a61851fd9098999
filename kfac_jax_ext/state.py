"""Optimizer state of the curvature preconditioners (arrays only)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Health(NamedTuple):
  """Counters users can read: statistics batches skipped for being non-finite,
  and per-layer inverse refreshes that failed (the previous inverse was kept)."""
  nonfinite_statistics: jax.Array
  failed_inverses: jax.Array


class KfacState(NamedTuple):
  """State of the Kronecker-family preconditioners (``scale_by_kfac``,
  ``scale_by_tkfac``); arrays only, one entry per parameter leaf.

  Attributes:
    count: number of ``update`` calls so far.
    statistics_count: accepted statistics batches (drives the EMA schedule).
    curvature_due: whether the next ``update`` is a statistics step.
    factors: per leaf, ``KroneckerFactors`` or None.
    traces: per leaf, a running scalar of the method (TKFAC: the block trace
      δ; K-FAC: unused) or None.
    inverses: per leaf, ``KroneckerInverse`` or None.
    diagonals: per leaf, running diagonal Fisher (scale/shift and fallback).
    health: ``Health`` counters.
  """
  count: jax.Array
  statistics_count: jax.Array
  curvature_due: jax.Array
  factors: tuple
  traces: tuple
  inverses: tuple
  diagonals: tuple
  health: Health


def curvature_due(opt_state) -> jax.Array:
  """Whether any curvature preconditioner in ``opt_state`` wants statistics now.

  Finds every kfac_jax_ext preconditioner state (K-FAC, TKFAC, TENGraD, ...):
  the NamedTuples of this package that carry a ``curvature_due`` flag.
  """
  is_ours = lambda x: (isinstance(x, tuple) and hasattr(x, "curvature_due")
                       and type(x).__module__.startswith("kfac_jax_ext"))
  found = [s.curvature_due for s in jax.tree_util.tree_leaves(
      opt_state, is_leaf=is_ours) if is_ours(s)]
  if not found:
    raise ValueError("opt_state contains no kfac_jax_ext preconditioner state.")
  return jnp.any(jnp.stack(found))


class TengradState(NamedTuple):
  """State of ``scale_by_tengrad`` (arrays only, one entry per parameter leaf).

  Attributes:
    count: number of ``update`` calls so far.
    curvature_due: whether the next ``update`` refreshes the stored batch.
    blocks: per leaf, a ``WoodburyBlock`` (≥2-D leaves) or None.
    diagonals: per leaf, the diagonal Fisher of the last statistics batch
      (scale-and-shift layers and the ``"diagonal"`` fallback).
    health: ``Health`` counters.
  """
  count: jax.Array
  curvature_due: jax.Array
  blocks: tuple
  diagonals: tuple
  health: Health
