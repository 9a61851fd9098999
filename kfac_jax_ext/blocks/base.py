r"""The interface every curvature block implements.

A block is a small immutable object bound to one traced layer (a
``tracing.LayerMatch``) and its method's options, with pure functions on
exact-size arrays:

* ``init(a_side, dtype)``: the layer's state entry (identities: the first
  update before any statistics is the plain gradient, up to damping);
* ``batch_statistics(stats, num_examples, dtype)``: one batch's curvature
  estimate from the layer's entry of the statistics pass (inputs ``a``,
  output gradients ``g``); a transform keeps a running average of it
  (Kronecker) or stores it (Woodbury);
* ``refresh(estimate, damping)``: ``(inverse, ok)``, the data that applies
  ``(F_l + λI)⁻¹`` (or the method's approximation of it); ``ok`` is False
  when a decomposition failed or is non-finite, and the transform then keeps
  the previous inverse;
* ``apply(inverse, v, damping)``: the damped inverse applied to the layer's
  canonical gradient matrix ``v`` (``[d_a, d_g]``, with a leading axis for
  groups or slices; ``plan.to_matrix``);
* ``refresh_cost()``: the refresh's FLOP count up to a constant, used to
  spread refreshes over devices (``distributed.on_owners``) and to choose
  between block kinds per layer (``kfe.scale_by_natural_gradient``).

The transforms (``kronecker_family``, ``woodbury_family``) own the schedule,
the running averages, the failure handling and the state's layout per
parameter leaf; they reach a layer's block through ``blocks.table``. A new
block kind is one file with a subclass and one line in that table.

Example::

  block = table.kronecker_block(layer, mode="tikhonov")
  a_b, g_b = block.batch_statistics(curvature.layers[i], m, jnp.float32)
  inverse, ok = block.refresh((a_b, g_b), damping=1e-3)
  delta = block.apply(inverse, plan.to_matrix(layer, grad_w, grad_b), 1e-3)
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import jax

from kfac_jax_ext import patterns


@dataclasses.dataclass(frozen=True)
class CurvatureBlock(abc.ABC):
  """A layer's curvature block (see the module doc for the contract).

  Attributes:
    layer: the traced layer the block serves.
  """
  layer: patterns.LayerMatch

  @property
  def has_bias(self) -> bool:
    return self.layer.bias is not None

  @abc.abstractmethod
  def init(self, a_side: str, dtype) -> Any:
    """The layer's state entry, exact size, with A in ``a_side``."""

  @abc.abstractmethod
  def batch_statistics(self, stats, num_examples: int, dtype) -> Any:
    """One batch's estimate from the layer's ``CurvatureBatch`` entry."""

  @abc.abstractmethod
  def refresh(self, estimate, damping) -> tuple[Any, jax.Array]:
    """``(inverse, ok)`` of the damped block for ``estimate``."""

  @abc.abstractmethod
  def apply(self, inverse, v, damping) -> jax.Array:
    """The damped inverse applied to the canonical gradient matrix ``v``."""

  @abc.abstractmethod
  def refresh_cost(self) -> float:
    """FLOPs of a refresh, up to a constant."""

  @abc.abstractmethod
  def label(self) -> str:
    """What ``kfe.describe_layers`` shows for the block."""
