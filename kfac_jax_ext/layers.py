"""Public layer discovery: ``find_layers`` and ``describe_layers``."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from kfac_jax_ext import chains as chains_lib
from kfac_jax_ext import natural_gradient_transform
from kfac_jax_ext import plan as plan_lib
from kfac_jax_ext import tengrad_plan
from kfac_jax_ext import tracing
from kfac_jax_ext.blocks import table


@dataclasses.dataclass(frozen=True)
class Layer:
  """A layer found by tracing ``loss_fn``.

  Attributes:
    name: readable name (the module path of its parameters).
    kind: ``"dense"``, ``"conv2d"`` (a convolution over 1, 2 or 3 spatial
      axes, grouped ones included; ``describe_layers`` shows ``conv1d`` and
      ``conv3d`` for the others), ``"embedding"`` or ``"scale_and_shift"``.
    params: key paths of the parameter leaves it owns.
    inputs_shape: shape of its input (scale-and-shift: of the scaled array).
    outputs_shape: shape of its pre-activation output.
    has_bias: whether a bias is folded into the block.
  """
  name: str
  kind: str
  params: tuple
  inputs_shape: tuple
  outputs_shape: tuple
  has_bias: bool = False


def _public(traced: tracing.TracedLoss, m: tracing.LayerMatch) -> Layer:
  return Layer(name=m.name, kind=m.kind,
               params=tuple(traced.param_paths[i] for i in m.leaves),
               inputs_shape=m.inputs_shape, outputs_shape=m.outputs_shape,
               has_bias=m.bias is not None)


def find_layers(loss_fn: Callable, params: Any, batch: Any,
                has_aux: bool = False, axis_name=None) -> tuple[Layer, ...]:
  """Traces ``loss_fn(params, batch)`` (never runs it) and lists its layers.

  Args:
    loss_fn: the user's loss, calling a loss helper.
    params: parameter pytree (arrays or ``jax.ShapeDtypeStruct``).
    batch: what ``loss_fn`` takes (arrays or shape structs).
    has_aux: ``loss_fn`` returns ``(loss, aux)``.
    axis_name: the optimizer's: the ``pmap`` / ``shard_map`` data axis, for a
      ``loss_fn`` that averages over it (``BatchNorm(axis_name=...)``).

  Returns:
    One ``Layer`` per recognised layer, in forward order.

  Raises:
    ValueError: ``loss_fn`` registers no loss (call a ``kfe.*`` loss helper).

  Example:
    >>> for layer in kfe.find_layers(loss_fn, params, batch):
    ...   print(layer.name, layer.kind)
  """
  traced = tracing.trace_loss(loss_fn, params, batch, has_aux, axis_name)
  return tuple(_public(traced, m) for m in traced.layers)


def _table(rows, header):
  widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
  fmt = "  ".join("{:<%d}" % w for w in widths)
  lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
  lines += [fmt.format(*map(str, r)) for r in rows]
  return "\n".join(line.rstrip() for line in lines)


def block_label(m: tracing.LayerMatch, max_factor_dim: int = 4096,
                chosen: dict | None = None, gram_size: int = 128,
                loss_examples: int = 1) -> str:
  """The block a layer gets from the Kronecker family when the state is laid
  out from an ``example_batch``: ``kronecker d_a×d_g``, ``G× kronecker`` per
  group, ``kronecker diag(V)×D`` for an embedding, ``diagonal``, or the
  fallback when a factor exceeds ``max_factor_dim``. With ``chosen`` (the
  ``natural_gradient_transform.choose_blocks`` of the layers) a layer chosen for a
  Woodbury block shows ``woodbury n=N d_a×d_g`` (N = ``gram_size``, the
  examples in its Gram; ``G× `` in front for G groups or slices; ``per
  sequence`` after it when ``loss_examples`` > 1, the layer's sequences
  being its examples: ``tengrad_plan.layer_examples``)."""
  if m.kind == "scale_and_shift":
    return "diagonal"
  if chosen is not None:
    kind = chosen.get(m.kernel)
    if kind == "woodbury":
      return tengrad_plan.woodbury_kind(m)(
          m, capacity=gram_size, loss_examples=loss_examples).label()
    if kind is None:
      return "fallback (no block of either kind)"
  largest = plan_lib.largest_dense_dim(m)
  if largest > max_factor_dim:
    return f"fallback (factor {largest} > max_factor_dim)"
  return table.kronecker_block(m).label()


def coverage(traced: tracing.TracedLoss, max_factor_dim: int = 4096,
             chosen: dict | None = None) -> dict:
  """Share of the parameters (by count) per block kind: ``"kronecker"``,
  ``"diagonal"`` (scale-and-shift) and ``"fallback"`` (no block); with
  ``chosen`` (see ``block_label``) also ``"woodbury"``."""
  sizes = [int(np.prod(s)) for s in traced.param_shapes]
  out = {"kronecker": 0, "diagonal": 0, "fallback": 0}
  if chosen is not None:
    out = {"kronecker": 0, "woodbury": 0, "diagonal": 0, "fallback": 0}
  for m in traced.layers:
    label = block_label(m, max_factor_dim, chosen)
    kind = next(w for w in label.split() if w in out)   # "G× kind ..."
    out[kind] += sum(sizes[i] for i in m.leaves)
  out["fallback"] += sum(sizes[i] for i in traced.leaf_reasons)
  total = max(sum(sizes), 1)
  return {k: v / total for k, v in out.items()}


def describe_layers(loss_fn: Callable, params: Any, batch: Any,
                    has_aux: bool = False, fallback: str = "identity",
                    max_factor_dim: int = 4096, blocks: str | None = None,
                    gram_batch: int = 128, axis_name=None) -> str:
  """A readable table of the layers and of every parameter no layer owns.

  Args:
    loss_fn, params, batch, has_aux, axis_name: as for ``find_layers``.
    fallback: the preconditioner's ``fallback`` option, shown for the
      parameters no layer owns.
    max_factor_dim: the preconditioner's option: layers with a larger factor
      fall back.
    blocks, gram_batch: ``kfe.natural_gradient``'s options: with ``blocks``
      (``"auto"``, ``"kronecker"``, ``"woodbury"``) the table shows its
      choice of Kronecker or Woodbury block per layer, for a statistics batch
      like ``batch``.

  Returns:
    The table as a string; ``print`` it. Blocks are those of K-FAC/TKFAC with
    the state laid out from ``example_batch``; then the chains of dense
    layers (``chains.find_chains``) if any; the last line gives the share of
    the parameters per block kind.
  """
  traced = tracing.trace_loss(loss_fn, params, batch, has_aux, axis_name)
  chosen = None if blocks is None else natural_gradient_transform.choose_blocks(
      traced, blocks, gram_batch, max_factor_dim)
  rows = []
  for m in traced.layers:
    layer = _public(traced, m)
    kind = f"conv{len(m.conv[5])}d" if m.kind == "conv2d" else layer.kind
    e = traced.num_examples if chosen is None else tengrad_plan.layer_examples(
        m, traced)
    label = block_label(m, max_factor_dim, chosen, min(gram_batch, e),
                        traced.num_examples // e)
    rows.append((layer.name, kind, label,
                 ", ".join("/".join(map(str, p)) for p in layer.params),
                 layer.inputs_shape, layer.outputs_shape))
  text = f"Layers ({len(rows)}):\n" + _table(
      rows, ("name", "kind", "block", "params", "inputs", "outputs"))
  rest = [("/".join(map(str, traced.param_paths[i])), traced.param_shapes[i],
           reason, fallback) for i, reason in sorted(traced.leaf_reasons.items())]
  if rest:
    text += f"\n\nParameters no layer owns ({len(rest)}):\n" + _table(
        rest, ("param", "shape", "reason", "fallback"))
  else:
    text += "\n\nEvery parameter belongs to a layer."
  if traced.penalty_leaves:
    names = ", ".join("/".join(map(str, traced.param_paths[i]))
                      for i in traced.penalty_leaves)
    text += (f"\n\nAlso used in terms added to the registered losses (a penalty): "
             f"{names}. Their gradient is preconditioned with the blocks above; "
             "their own curvature is not in the blocks (for an L2 penalty, the "
             "aliases' weight_decay= decays the weights outside the "
             "preconditioner instead).")
  found = chains_lib.find_chains(traced)
  if found:
    text += ("\n\nChains of dense layers (cross-layer blocks with "
             "structure='block_tridiagonal'):\n" + "\n".join(
                 "  " + " -> ".join(traced.layers[i].name for i in chain)
                 for chain in found))
  share = coverage(traced, max_factor_dim, chosen)
  text += ("\n\nShare of parameters: " + ", ".join(
      f"{kind} {100 * v:.1f}%" for kind, v in share.items()))
  return text
