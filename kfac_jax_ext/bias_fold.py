"""A bias added to a dense or conv layer's output, folded into its block.

K-FAC treats ``s = W x + b`` as one layer with the homogeneous input
``ā = [x, 1]``: the bias is the extra row of the canonical ``[d_in + 1,
d_out]`` matrix and shares the kernel's ``A ⊗ G`` block. A bias leaf is
folded when the layer's output ``s`` is consumed by a single ``add`` of a
view of the leaf that lines up with the output's feature axes, or by a
single ``transpose`` whose output is so consumed (``jnp.einsum`` often moves its
``dot_general`` output's axes back into the order the user wrote, e.g.
``[H, J, N, T] -> [N, T, H, J]`` for ``"...hi,hij->...hj"``, before the bias).
A transpose is looked through when it keeps the feature axes in their
order. When it keeps the token axes in theirs too, the statistics are read
at the add (``g`` with the feature axes moved last flattens exactly as
before it); when it reorders them (an equinox ``Linear`` mapped over a
scan's ``[T, B, D]`` outputs, moved back to ``[B, T, C]``), they are read at
the layer's own output, whose tokens are in its input's order: the add's
gradient is the same array, rearranged, so the bias row's gradient (the
sum of ``g`` over the tokens) is unchanged. An ``add`` of another array of
the output's shape that is no parameter (an LSTM's ``W_ih x + W_hh h +
b``) is looked through as well, the statistics again read at the layer's
own output (the sum's gradient is the output's; reading there keeps the
other layer's output out of what ``chains`` takes as this layer's). The
bias leaf may have size-1 axes for the token axes (Griffin's ``[2, 1, 1, D]``
for ``"...td,cdD->c...tD"``): its elements, in order, must be the features'.
A reshape or squeeze that keeps each feature axis as an axis of its own
(token axes merged or split, size-1 axes inserted or dropped) is looked
through too: a per-example model under ``jax.vmap`` computes its conv on
``[N, H, W, C]`` and reshapes it to ``[N, 1, H, W, C]`` before the bias;
equinox's channels-first conv then squeezes that axis and adds a ``[C, 1,
1]`` bias.

Example (the bias of a per-head kernel after einsum's transpose):
  >>> y = jnp.einsum("...hi,hij->...hj", x, w) + b     # b: [H, J]
"""

from __future__ import annotations

import dataclasses
import math

from kfac_jax_ext import patterns


@dataclasses.dataclass(frozen=True)
class FoldedBias:
  """Where the layer's statistics are read once its bias is folded.

  ``probe``: the equation whose output gets the zero probe (the ``add``);
  ``leaf``: the bias leaf; ``out_axes``/``outputs_shape``: the feature axes
  and shape of that output (moved by the transposes and reshapes in
  between, if any)."""
  probe: int
  leaf: int
  out_axes: tuple
  outputs_shape: tuple


def _consumers(jaxpr, var):
  """``[(eqn, operand)]`` reading ``var``; ``(None, None)`` for an output."""
  found = [(i, j) for i, e in enumerate(jaxpr.eqns) for j, v in enumerate(e.invars)
           if v is var]
  if any(v is var for v in jaxpr.outvars):
    found.append((None, None))
  return found


def _only_consumer(jaxpr, var):
  cons = _consumers(jaxpr, var)
  return cons[0] if len(cons) == 1 and cons[0][0] is not None else None


def _through_transpose(jaxpr, k, out_axes):
  """``(var, out_axes)`` after equation ``k`` when it is an order-keeping
  transpose (see the module docstring); None otherwise."""
  eqn = jaxpr.eqns[k]
  if eqn.primitive.name != "transpose":
    return None
  perm = tuple(eqn.params["permutation"])
  new = {old: new for new, old in enumerate(perm)}
  features = [new[a] for a in out_axes]
  if features != sorted(features):
    return None
  return eqn.outvars[0], tuple(features)


def _axis_map(old, new):
  """``{old axis: new axis}`` for the axes of size > 1 that a row-major
  reshape from ``old`` to ``new`` keeps as axes of their own (merging or
  splitting only other axes, inserting or dropping size-1 axes)."""
  kept, i, j = {}, 0, 0
  while i < len(old) or j < len(new):
    if i < len(old) and old[i] == 1:
      i += 1
      continue
    if j < len(new) and new[j] == 1:
      j += 1
      continue
    if i == len(old) or j == len(new):
      return kept
    group_old, group_new, p_old, p_new = [i], [j], old[i], new[j]
    i, j = i + 1, j + 1
    while p_old != p_new:
      if p_old < p_new:
        group_old.append(i)
        p_old *= old[i]
        i += 1
      else:
        group_new.append(j)
        p_new *= new[j]
        j += 1
    if len(group_old) == 1 and len(group_new) == 1:
      kept[group_old[0]] = group_new[0]
  return kept


def _through_reshape(jaxpr, k, out_axes):
  """``(var, out_axes)`` after equation ``k`` when it is a ``reshape`` or
  ``squeeze`` that keeps every feature axis as an axis of its own (only the
  token axes merge or split, size-1 axes come and go): ``vmap`` over
  examples of a per-example model splits ``[N, ...]`` into ``[N, 1, ...]``,
  and equinox's per-example conv squeezes that axis again. Row-major order
  is kept, so the tokens flatten as before. None otherwise."""
  eqn = jaxpr.eqns[k]
  if eqn.primitive.name not in ("reshape", "squeeze") or eqn.params.get(
      "dimensions") and eqn.primitive.name == "reshape":
    return None
  old, new = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
  f = len(out_axes)
  if (tuple(out_axes) == tuple(range(len(old) - f, len(old))) and len(new) >= f
      and tuple(new[len(new) - f:]) == tuple(old[len(old) - f:])):
    # trailing feature axes kept as they are (sizes 1 included)
    return eqn.outvars[0], tuple(range(len(new) - f, len(new)))
  kept = _axis_map(old, new)
  if any(a not in kept for a in out_axes):
    return None
  return eqn.outvars[0], tuple(kept[a] for a in out_axes)


def _moves_tokens(eqn, out_axes) -> bool:
  """Whether a looked-through ``transpose`` reorders the token axes."""
  if eqn.primitive.name != "transpose":
    return False
  tokens = [a for a in eqn.params["permutation"] if a not in out_axes]
  return tokens != sorted(tokens)


def _sum_of_layers(jaxpr, con, at_operand, path) -> bool:
  """Whether equation ``con[0]`` adds to ``s`` (operand ``con[1]``) an
  array of its shape that is no parameter (another layer's output: an
  LSTM's ``W_ih x + W_hh h + b``): the sum's gradient is ``s``'s, so a bias
  added after it is ``s``'s layer's bias exactly."""
  eqn = jaxpr.eqns[con[0]]
  if eqn.primitive.name != "add" or (path, con[0], 1 - con[1]) in at_operand:
    return False
  return eqn.invars[0].aval.shape == eqn.invars[1].aval.shape


_LOOK_THROUGH = {"transpose": _through_transpose,
                 "reshape": _through_reshape, "squeeze": _through_reshape}


def find_bias(jaxpr, use, out_axes, single, at_operand, shapes,
              marker=None) -> FoldedBias | None:
  """The bias leaf ``add``-ed to the output of ``use``'s equation (directly
  or after order-keeping transposes and token-axis reshapes) aligned with
  ``out_axes``; None if there is none. Inside a scan body the bias must
  enter the scan as the kernel does (both scanned or both closed over:
  ``marker``)."""
  s = jaxpr.eqns[use.eqn].outvars[0]
  at_use = FoldedBias(use.eqn, -1, tuple(out_axes), tuple(s.aval.shape))
  read_at_use = False   # the tokens reordered, or another layer's output added
  con = _only_consumer(jaxpr, s)
  while con is not None:
    name = jaxpr.eqns[con[0]].primitive.name
    if name in _LOOK_THROUGH:
      moved = _LOOK_THROUGH[name](jaxpr, con[0], out_axes)
      if moved is None:
        return None
      read_at_use |= _moves_tokens(jaxpr.eqns[con[0]], out_axes)
    elif _sum_of_layers(jaxpr, con, at_operand, use.path):
      moved, read_at_use = (jaxpr.eqns[con[0]].outvars[0], out_axes), True
    else:
      break
    s, out_axes = moved
    con = _only_consumer(jaxpr, s)
  if con is None:
    return None
  ci, cj = con
  b = at_operand.get((use.path, ci, 1 - cj))
  if jaxpr.eqns[ci].primitive.name != "add" or b is None or single.get(b.leaf) is not b:
    return None
  shape, chain = shapes[b.leaf], b.view.chain
  in_scan = patterns.scan_view(chain)
  if (in_scan[0] if in_scan else None) is not marker:
    return None
  if in_scan is not None:
    chain = in_scan[2]
    shape = shape[1:] if marker is patterns.SCAN_SLICE else shape
  # the leaf may carry size-1 axes (a [C, 1, 1, D] bias): only its order counts
  features = tuple(s.aval.shape[a] for a in out_axes)
  if math.prod(shape) == math.prod(features) and patterns.aligned(
      patterns.simulate(shape, chain), features, s.aval.shape, out_axes):
    if read_at_use:   # the same gradient, at the layer's own output
      return dataclasses.replace(at_use, leaf=b.leaf)
    return FoldedBias(ci, b.leaf, tuple(out_axes), tuple(s.aval.shape))
  return None
