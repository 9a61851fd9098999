"""Static plan of an update: which block serves each parameter leaf.

The optimizer state is laid out per parameter leaf at ``init(params)`` (no
batch is available there): every ≥2-D leaf gets Kronecker slots for its rows
(all axes but the last, +1 for a bias) and its last axis (+1), every leaf a
diagonal. At update time, tracing says which leaves form layers; the plan maps
each layer onto its kernel's slots (A = the input side, G = the output side).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from kfac_jax_ext import tracing


@dataclasses.dataclass(frozen=True)
class KroneckerLayer:
  index: int                 # position in traced.layers
  layer: tracing.LayerMatch
  a_side: str                # "rows" or "cols": the slot holding A
  has_bias: bool

  @property
  def d_a(self) -> int:
    return self.layer.d_in + int(self.has_bias)

  @property
  def d_g(self) -> int:
    return self.layer.d_out

  @property
  def g_side(self) -> str:
    return "cols" if self.a_side == "rows" else "rows"


@dataclasses.dataclass(frozen=True)
class Plan:
  kronecker: tuple           # KroneckerLayer
  diagonal_layers: tuple     # (index, LayerMatch) scale-and-shift
  unfactored_layers: tuple   # (index, LayerMatch, reason): dense/conv w/o slots
  fallback_leaves: tuple     # leaves no layer owns, order of CurvatureBatch


def make_plan(traced: tracing.TracedLoss, factors) -> Plan:
  kron, diag, unfactored = [], [], []
  for i, layer in enumerate(traced.layers):
    if layer.kind == "scale_and_shift":
      diag.append((i, layer))
      continue
    slots = factors[layer.kernel]
    ndim = len(traced.param_shapes[layer.kernel])
    out_last = layer.kernel_perm[-1] == ndim - 1
    if slots is None:
      unfactored.append((i, layer, "factor larger than max_factor_dim"))
    elif out_last or ndim == 2:
      a_side = "rows" if out_last else "cols"
      kron.append(KroneckerLayer(i, layer, a_side, layer.bias is not None))
    else:
      unfactored.append((i, layer, "kernel output axis is not its last axis"))
  return Plan(tuple(kron), tuple(diag), tuple(unfactored),
              tuple(sorted(traced.leaf_reasons)))


def to_matrix(layer: tracing.LayerMatch, kernel, bias=None):
  """Kernel (+ bias row) as the canonical ``[d_in(+1), d_out]`` matrix."""
  m = jnp.transpose(kernel, layer.kernel_perm).reshape(layer.d_in, layer.d_out)
  if bias is not None:
    m = jnp.concatenate([m, bias.reshape(1, layer.d_out).astype(m.dtype)], axis=0)
  return m


def from_matrix(layer: tracing.LayerMatch, m, kernel_shape, has_bias: bool):
  """Inverse of ``to_matrix``: ``(kernel, bias or None)``."""
  perm = layer.kernel_perm
  kernel = m[:layer.d_in].reshape(tuple(kernel_shape[p] for p in perm))
  kernel = jnp.transpose(kernel, tuple(np.argsort(perm)))
  return kernel, (m[layer.d_in] if has_bias else None)
