"""Static plan of an update: which block serves each parameter leaf.

The optimizer state holds one entry per parameter leaf. It is laid out at
``init(params)`` either exactly, from the layers traced on an
``example_batch`` (``layout_entries``), or, without a batch, from the leaf
shapes alone: every ≥2-D leaf then gets Kronecker slots for its rows (all
axes but the last, +1 for a bias) and its last axis (+1). At update time,
tracing says which leaves form layers; the plan maps each layer onto the
entry of its kernel (A = the input side, G = the output side) when the entry
can hold the layer's factors, and says why not otherwise.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kfac_jax_ext import tracing
from kfac_jax_ext.blocks import table

NO_EXAMPLE_BATCH = (
    "its kernel's state entry cannot hold the layer's factors: the state was "
    "laid out from the parameter shapes alone (or for another batch "
    "structure); pass example_batch=<a batch> when building the optimizer so "
    "that the layout follows the traced layers")


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


@dataclasses.dataclass(frozen=True)
class Share:
  """The part of a model one transform preconditions when two transforms
  share it (``kfe.scale_by_natural_gradient``): the layers whose kernel leaf
  is in ``kernels``, or, with ``complement``, every other layer (norms
  included) and the leaves no layer owns."""
  kernels: frozenset
  complement: bool

  def owns(self, layer: tracing.LayerMatch) -> bool:
    return (layer.kernel in self.kernels) != self.complement


def restrict(plan: Plan, share: Share | None) -> Plan:
  """The plan of the layers and leaves ``share`` owns (all with None): the
  others are left out, so the transform passes their gradients through."""
  if share is None:
    return plan
  return Plan(tuple(kl for kl in plan.kronecker if share.owns(kl.layer)),
              tuple(d for d in plan.diagonal_layers if share.owns(d[1])),
              tuple(u for u in plan.unfactored_layers if share.owns(u[1])),
              plan.fallback_leaves if share.complement else ())


def factor_shapes(layer: tracing.LayerMatch) -> tuple[tuple, tuple]:
  """Shapes of a layer's ``(A, G)`` factors (its Kronecker block's):
  ``[d_a, d_a]``, ``[d_g, d_g]``, with a leading groups axis for grouped
  convs and stacked slices; an embedding's A is the diagonal ``[V]``."""
  return table.kronecker_block(layer).factor_shapes()


def largest_dense_dim(layer: tracing.LayerMatch) -> int:
  """The largest side of the layer's dense (matrix) factors: what
  ``max_factor_dim`` bounds (an embedding's diagonal factor does not count)."""
  a_shape, g_shape = factor_shapes(layer)
  return max(d for s in (a_shape, g_shape) if len(s) > 1 for d in s[-2:])


def natural_a_side(layer: tracing.LayerMatch, ndim: int) -> str:
  """The slot of a leaf's entry that holds A: ``"cols"`` only for a 2-D
  kernel used transposed (its output axis first)."""
  return "cols" if ndim == 2 and layer.kernel_perm[-1] == 0 else "rows"


def _holds(slot, shape) -> bool:
  return slot is not None and slot.ndim == len(shape) and all(
      s >= n for s, n in zip(slot.shape, shape))


def kronecker_fits(layer: tracing.LayerMatch, entry, a_side: str) -> bool:
  """Whether a leaf's ``KroneckerFactors`` entry can store the layer's
  factors with A in ``a_side``."""
  if entry is None:
    return False
  a_shape, g_shape = factor_shapes(layer)
  g_side = "cols" if a_side == "rows" else "rows"
  return _holds(getattr(entry, a_side), a_shape) and _holds(
      getattr(entry, g_side), g_shape)


def make_plan(traced: tracing.TracedLoss, entries,
              fits: Callable = kronecker_fits,
              unsupported: Callable = lambda layer: None) -> Plan:
  """Assigns every dense/conv/embedding layer to its kernel's entry.

  Args:
    traced: the traced loss.
    entries: per parameter leaf, the state entry (or None).
    fits: ``(layer, entry, a_side) -> bool``, whether the entry can hold it.
    unsupported: ``layer -> reason or None``, layers the method cannot
      precondition with its blocks.
  """
  kron, diag, unfactored = [], [], []
  for i, layer in enumerate(traced.layers):
    if layer.kind == "scale_and_shift":
      diag.append((i, layer))
      continue
    reason = unsupported(layer)
    if reason is not None:
      unfactored.append((i, layer, reason))
      continue
    entry = entries[layer.kernel]
    natural = natural_a_side(layer, len(traced.param_shapes[layer.kernel]))
    other = "cols" if natural == "rows" else "rows"
    side = next((s for s in (natural, other) if fits(layer, entry, s)), None)
    if side is not None:
      kron.append(KroneckerLayer(i, layer, side, layer.bias is not None))
    elif entry is None:
      unfactored.append((i, layer, "factor larger than max_factor_dim, or no "
                         "entry for its kernel"))
    else:
      unfactored.append((i, layer, NO_EXAMPLE_BATCH))
  return Plan(tuple(kron), tuple(diag), tuple(unfactored),
              tuple(sorted(traced.leaf_reasons)))


def to_matrix(layer: tracing.LayerMatch, kernel, bias=None):
  """Kernel (+ bias row) as the canonical ``[d_in(+1), d_out]`` matrix
  (``[groups, d_in(+1), d_out]`` for a grouped conv or the slices of a
  stacked kernel)."""
  if layer.stacked:   # per slice (and per group of a stacked grouped conv)
    one = dataclasses.replace(layer, stacked=False, groups=layer.slice_groups)
    m = jax.vmap(lambda w: to_matrix(one, w))(kernel)
    m = m.reshape((-1,) + m.shape[-2:]) if layer.slice_groups > 1 else m
  elif layer.groups > 1:
    m = jnp.transpose(kernel, layer.kernel_perm).reshape(
        layer.d_in, layer.groups, layer.d_out).transpose(1, 0, 2)
  else:
    m = jnp.transpose(kernel, layer.kernel_perm).reshape(layer.d_in, layer.d_out)
  if bias is not None:   # the bias row, per group or slice
    b = bias.reshape(m.shape[:-2] + (1, layer.d_out)).astype(m.dtype)
    m = jnp.concatenate([m, b], axis=-2)
  return m


def layer_ag(stats, layer: tracing.LayerMatch):
  """A layer's entry of ``CurvatureBatch.layers`` as ``(a, g)``; a tied
  kernel's entry holds its uses' statistics: ``(uses' stats, None)``."""
  return (stats, None) if layer.kind == "tied" else stats


def from_matrix(layer: tracing.LayerMatch, m, kernel_shape, has_bias: bool):
  """Inverse of ``to_matrix``: ``(kernel, bias or None)``; the bias flat
  (``[d_out]``, per slice or group in order): callers reshape it to the bias
  leaf's own shape (an Einsum's ``[heads, features]``)."""
  perm = layer.kernel_perm
  if layer.stacked:   # per slice: [slices(·groups), d_a, d_out]
    one = dataclasses.replace(layer, stacked=False, groups=layer.slice_groups)
    per_slice = m.reshape((kernel_shape[0], -1) + m.shape[-2:]) if (
        layer.slice_groups > 1) else m
    kernel, bias = jax.vmap(lambda x: from_matrix(one, x, kernel_shape[1:],
                                                  has_bias))(per_slice)
    return kernel, bias
  permuted = tuple(kernel_shape[p] for p in perm)
  if layer.groups > 1:
    kernel = m[:, :layer.d_in].transpose(1, 0, 2).reshape(permuted)
    bias = m[:, layer.d_in].reshape(-1) if has_bias else None
  else:
    kernel = m[:layer.d_in].reshape(permuted)
    bias = m[layer.d_in] if has_bias else None
  return jnp.transpose(kernel, tuple(np.argsort(perm))), bias


def layer_matrix(kl: KroneckerLayer, grads, dtype):
  """A planned layer's gradient as its canonical matrix (``to_matrix``),
  in ``dtype``; ``grads`` are the flat parameter leaves."""
  bias = grads[kl.layer.bias] if kl.has_bias else None
  return to_matrix(kl.layer, grads[kl.layer.kernel], bias).astype(dtype)


def write_layer(out: list, kl: KroneckerLayer, delta, grads) -> None:
  """Writes a layer's preconditioned matrix ``delta`` back into the flat
  leaves ``out`` (kernel and bias, each in its gradient's dtype)."""
  kernel_grad = grads[kl.layer.kernel]
  dk, db = from_matrix(kl.layer, delta, kernel_grad.shape, kl.has_bias)
  out[kl.layer.kernel] = dk.astype(kernel_grad.dtype)
  if kl.has_bias:
    bias_grad = grads[kl.layer.bias]   # e.g. an Einsum's [heads, features]
    out[kl.layer.bias] = db.reshape(bias_grad.shape).astype(bias_grad.dtype)


def precondition_layers(plan: Plan, grads, dtype, apply) -> list:
  """The flat leaves ``grads`` with every planned layer's kernel and bias
  replaced by ``apply(kl, v)``, ``v`` its canonical matrix in ``dtype``;
  the other leaves as they are."""
  out = list(grads)
  for kl in plan.kronecker:
    write_layer(out, kl, apply(kl, layer_matrix(kl, grads, dtype)), grads)
  return out
