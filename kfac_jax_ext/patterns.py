"""Layer patterns: a table of small matchers over traced parameter uses.

Each matcher looks at one *use* of a parameter leaf (the equation that
consumes a view of it) and either returns a ``LayerMatch`` recipe or None:

* ``dense``: any ``dot_general`` with one operand a view (transpose, reshape,
  cast) of a leaf: the contracted kernel axes are the input side, its free
  axes the output side (``[D, H, Dh]`` is a ``D × (H·Dh)`` layer,
  ``[H, Dh, D]`` an ``(H·Dh) × D`` one; Einsum kernels likewise), any number
  of token axes on the other operand; batch dimensions shared with the
  other operand (per-head or per-expert kernels) make one block per index
  of them (``groups``, as a grouped conv's);
* ``conv2d``: ``conv_general_dilated(x, W)`` over 1, 2 or 3 spatial axes
  with any stride, padding, dilation and ``feature_group_count`` G
  (grouped/depthwise: one block per group, ``groups = G``);
* ``embedding``: a ``gather`` of whole rows of a 2-D table by integer ids
  (``jnp.take``, ``nn.Embed``): a dense layer with one-hot inputs, so its
  input factor is diagonal;
* ``scale_and_shift``: ``x * s`` / ``y + b`` with ``s``, ``b`` aligned with
  the trailing axes of a batched operand (LayerNorm/BatchNorm/RMSNorm affine).

A bias added to a dense/conv output (any broadcast aligned with the output
axes) is folded in through the homogeneous coordinate.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import numpy as np

# pvary/pcast: shard_map's invariant->varying cast of a replicated parameter.
ELEMENTWISE_VIEW = {"convert_element_type", "copy", "copy_p", "reduce_precision",
                    "pvary", "pcast"}
STRUCTURAL_VIEW = ELEMENTWISE_VIEW | {"reshape", "broadcast_in_dim", "transpose",
                                      "squeeze", "expand_dims", "slice", "tile"}


@dataclasses.dataclass(frozen=True)
class View:
  """A view of a parameter leaf: the structural ops applied to it."""
  leaf: int
  chain: tuple  # ((primitive, params), ...) structural ops applied to the leaf


@dataclasses.dataclass(frozen=True)
class Use:
  """One use of a (view of a) parameter leaf by an equation."""
  leaf: int
  path: tuple
  eqn: int
  operand: int
  view: View
  primitive: str
  reason: str | None = None  # set when the use can never be part of a layer


class ScanMarker:
  """A view-chain entry for a leaf entering a ``scan`` body: ``"scan_slice"``
  (scanned over, ``xs``: the body sees ``leaf[i]`` at step i) or
  ``"scan_const"`` (closed over: the whole leaf at every step)."""

  def __init__(self, name: str):
    self.name = name

  def __repr__(self):
    return self.name


SCAN_SLICE = ScanMarker("scan_slice")
SCAN_CONST = ScanMarker("scan_const")


def scan_view(chain):
  """``(marker, steps, rest)`` when a view chain starts where the leaf
  enters a scan body; None otherwise.

  Nested scans (a scan in a scan body) are summarised: ``steps`` is the
  product of their lengths and ``marker`` is ``SCAN_SLICE`` when the
  outermost one scans over the leaf (a stacked kernel whose slices are each
  shared by the inner steps), else ``SCAN_CONST``. Only casts may stand
  between the markers, and only the outermost may be a ``SCAN_SLICE``; other
  nestings give None."""
  if not chain or not isinstance(chain[0][0], ScanMarker):
    return None
  marker, steps, k = chain[0][0], chain[0][1]["length"], 1
  while k < len(chain) and (isinstance(chain[k][0], ScanMarker)
                            or chain[k][0].name in ELEMENTWISE_VIEW):
    if chain[k][0] is SCAN_SLICE:
      return None
    if chain[k][0] is SCAN_CONST:
      steps *= chain[k][1]["length"]
    k += 1
  rest = chain[1:]
  if any(isinstance(p, ScanMarker) for p, _ in chain[k:]):
    return None
  return marker, steps, tuple(x for x in rest if not isinstance(x[0], ScanMarker))


@dataclasses.dataclass(frozen=True)
class LayerMatch:
  """A matched layer and the jaxpr sites the statistics pass instruments.

  ``captures``: (site, operand index) of the layer input ``x`` (embedding: the
  ids); ``probes``: sites whose output gets a zero probe (its gradient is
  ``g``). ``kernel_perm``: leaf axes ordered (input axes..., output axes...)
  so that ``kernel.transpose(kernel_perm).reshape(d_in·groups?, d_out)`` is
  the canonical matrix (``plan.to_matrix``); ``n_in`` of them are inputs.
  ``x_axes``: the contracted axes of ``x`` in the order of the kernel's input
  axes; ``out_axes``: the output-feature axes of the pre-activation in the
  order of the kernel's output axes. ``groups``: conv feature groups, or
  the size of a dense layer's batch axes (one block each, ``d_in``/``d_out``
  per group; a grouped dense layer's ``x_axes`` and ``out_axes`` start with
  its batch axes, so both sides flatten group-major).
  """
  kind: str
  name: str
  kernel: int | None = None
  bias: int | None = None
  scale: int | None = None
  shift: int | None = None
  captures: tuple = ()
  probes: tuple = ()
  kernel_perm: tuple = ()
  n_in: int = 1
  x_axes: tuple = ()
  out_axes: tuple = ()
  conv: tuple = ()          # (window_strides, padding, lhs_dil, rhs_dil, dn, spatial)
  groups: int = 1
  inputs_shape: tuple = ()
  outputs_shape: tuple = ()
  d_in: int = 0
  d_out: int = 0
  uses: tuple = ()          # tied/stacked: one LayerMatch per use of the kernel
  transposed: tuple = ()    # tied: per use, whether its input is the G side
  stacked: bool = False     # a kernel [k, ...] whose slices are k layers
  steps: int = 0            # inside a scan of this length (0: not in a scan)
  slice_groups: int = 1     # stacked conv: feature groups per slice (groups =
                            # slices × slice_groups blocks)
  out_slice: tuple = ()     # (start, stop): the output columns it makes of a
                            # product with concatenated kernels
  example_map: tuple = ()   # a batch-free layer read per example: (a chain per
                            # probe, own inputs shape, own outputs shape)

  @property
  def leaves(self) -> tuple[int, ...]:
    return tuple(i for i in (self.kernel, self.bias, self.scale, self.shift)
                 if i is not None)

  @property
  def d_a(self) -> int:
    """Size of the input-side factor (``d_in`` + 1 with a bias)."""
    return self.d_in + int(self.bias is not None)

  @property
  def is_plain(self) -> bool:
    """A dense/conv layer with one dense ``[d_a, d_out]`` block, outside any
    scan."""
    return self.kind in ("dense", "conv2d") and self.groups == 1 and not self.steps


def simulate(shape, chain) -> np.ndarray:
  """Replays a view chain on an integer iota: where each leaf element lands."""
  x = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
  with jax.ensure_compile_time_eval():
    for prim, params in chain:
      if prim is SCAN_SLICE:
        x = x[0]
        continue
      if prim.name in ELEMENTWISE_VIEW or prim is SCAN_CONST:
        continue
      x = np.asarray(prim.bind(x, **params))
  return x


def matrix_perm(view: np.ndarray, leaf_shape, rows: tuple, cols: tuple):
  """``(perm, n_in)`` with ``leaf.transpose(perm).reshape(R, C)`` equal to the
  view's matrix over axes ``rows`` × ``cols``; None if no transpose does it."""
  d_in = math.prod(view.shape[a] for a in rows)
  target = view.transpose(tuple(rows) + tuple(cols)).reshape(d_in, -1)
  iota = np.arange(int(np.prod(leaf_shape)), dtype=np.int32).reshape(leaf_shape)
  for perm in itertools.permutations(range(len(leaf_shape))):
    t = iota.transpose(perm)
    for n_in in range(1, len(perm)):
      if math.prod(t.shape[:n_in]) == d_in and np.array_equal(
          t.reshape(d_in, -1), target):
        return perm, n_in
  return None


def aligned(view: np.ndarray, leaf_shape, out_shape, axes) -> bool:
  """Whether ``view`` broadcast to ``out_shape`` puts the leaf on ``axes``."""
  try:
    v = np.broadcast_to(view, out_shape)
  except ValueError:
    return False
  shape = [1] * len(out_shape)
  for ax, n in zip(axes, leaf_shape):
    shape[ax] = n
  iota = np.arange(int(np.prod(leaf_shape)), dtype=np.int32).reshape(shape)
  try:
    return np.array_equal(v, np.broadcast_to(iota, out_shape))
  except ValueError:
    return False


def match_dense(use, eqn, leaf_shape):
  """``dot_general(x, view(W))``. Batch dimensions shared by ``x`` and the
  kernel (per-head weights, ``"...hi,hij->...hj"``; per-expert kernels,
  ``"ecd,edf->ecf"``) make a grouped dense layer: one block per index of
  the batch axes, whose inputs are ``x``'s slices along them."""
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  p = use.operand
  cw, cx = (tuple(lc), tuple(rc)) if p == 0 else (tuple(rc), tuple(lc))
  bw, bx = (tuple(lb), tuple(rb)) if p == 0 else (tuple(rb), tuple(lb))
  w_ndim = len(eqn.invars[p].aval.shape)
  fw = tuple(d for d in range(w_ndim) if d not in cw and d not in bw)
  if not cw or not fw:
    return None
  view = simulate(leaf_shape, use.view.chain)
  # columns group-major: (batch axes..., free axes...)
  found = matrix_perm(view, leaf_shape, cw, bw + fw)
  if found is None:
    return None
  perm, n_in = found
  s_ndim = len(eqn.outvars[0].aval.shape)
  nb = len(bw)   # output: (batch axes, lhs free axes, rhs free axes)
  free = (tuple(range(nb, nb + len(fw))) if p == 0 else
          tuple(range(s_ndim - len(fw), s_ndim)))
  return dict(kind="dense", x_operand=1 - p, x_axes=bx + cx,
              out_axes=tuple(range(nb)) + free, kernel_perm=perm, n_in=n_in,
              groups=math.prod(view.shape[a] for a in bw))


def match_conv(use, eqn, leaf_shape):
  """``conv_general_dilated(x, view(W))`` over any number of spatial axes
  (1-D: ``nn.Conv(f, (k,))``, a temporal conv; 2-D; 3-D: video), grouped or
  not (kind ``"conv2d"`` whatever the number)."""
  prm = eqn.params
  if use.operand != 1 or prm["batch_group_count"] != 1 or len(
      eqn.invars[1].aval.shape) != len(leaf_shape):
    return None
  view = simulate(leaf_shape, use.view.chain)
  dn = prm["dimension_numbers"]
  rhs = dn.rhs_spec
  found = matrix_perm(view, leaf_shape, (rhs[1],) + tuple(rhs[2:]), (rhs[0],))
  if found is None:
    return None
  groups = int(prm["feature_group_count"])
  spatial = tuple(eqn.invars[1].aval.shape[d] for d in rhs[2:])
  conv = (prm["window_strides"], prm["padding"], prm["lhs_dilation"],
          prm["rhs_dilation"], dn, spatial)
  return dict(kind="conv2d", x_operand=0, x_axes=(dn.lhs_spec[1],),
              out_axes=(dn.out_spec[1],), kernel_perm=found[0], n_in=found[1],
              conv=conv, groups=groups)


def match_embedding(use, eqn, leaf_shape):
  """``gather`` of whole rows of a 2-D table by an index array.

  Two forms: ``jnp.take(table, ids, axis=0)`` (``nn.Embed``: one index per
  lookup, the row axis collapsed) and ``table[i]`` of one id mapped with
  ``jax.vmap`` (``equinox.nn.Embedding``: a ``(row, column)`` index pair
  whose column start is 0 because the slice spans the whole row, under
  ``CLIP`` or ``PROMISE_IN_BOUNDS``; the row axis kept as a size-1 axis).
  Either way the ids are the index vectors' first entries."""
  if use.operand != 0 or len(leaf_shape) != 2 or any(   # shard_map's pvary: a view
      getattr(p, "name", None) not in ELEMENTWISE_VIEW for p, _ in use.view.chain):
    return None
  dn = eqn.params["dimension_numbers"]
  idx_shape = eqn.invars[1].aval.shape
  out_ndim = len(eqn.outvars[0].aval.shape)
  if (tuple(getattr(dn, "operand_batching_dims", ())) or not idx_shape
      or tuple(eqn.params["slice_sizes"]) != (1, leaf_shape[1])):
    return None
  take = (tuple(dn.collapsed_slice_dims) == (0,) and tuple(dn.start_index_map)
          == (0,) and tuple(dn.offset_dims) == (out_ndim - 1,)
          and idx_shape[-1] == 1)
  mode = str(eqn.params.get("mode", "")).rsplit(".", 1)[-1]
  row_of_pair = (tuple(dn.start_index_map) == (0, 1) and idx_shape[-1] == 2
                 and mode in ("CLIP", "PROMISE_IN_BOUNDS")
                 and ((tuple(dn.collapsed_slice_dims) == (0,)
                       and tuple(dn.offset_dims) == (out_ndim - 1,))
                      or (tuple(dn.collapsed_slice_dims) == ()
                          and tuple(dn.offset_dims) == (out_ndim - 2,
                                                        out_ndim - 1))))
  if not (take or row_of_pair):
    return None
  return dict(kind="embedding", x_operand=1, x_axes=(), out_axes=(out_ndim - 1,),
              kernel_perm=(0, 1), n_in=1)


MATCHERS = {"dot_general": match_dense, "conv_general_dilated": match_conv,
            "gather": match_embedding}


def leading_slice(chain, leaf_shape):
  """``(j, rest)`` when a view chain starts by taking ``leaf[j]`` (a unit
  ``slice`` of the leading axis, then that axis dropped); None otherwise."""
  if len(chain) < 2 or chain[0][0].name != "slice":
    return None
  (_, sl), (p1, prm1) = chain[0], chain[1]
  start, limit = tuple(sl["start_indices"]), tuple(sl["limit_indices"])
  strides = sl.get("strides")
  if (strides not in (None, (1,) * len(start)) or limit[0] - start[0] != 1
      or any(start[1:]) or limit[1:] != tuple(leaf_shape[1:])):
    return None
  if p1.name == "squeeze" and tuple(prm1["dimensions"]) == (0,):
    return start[0], chain[2:]
  if p1.name == "reshape" and tuple(prm1["new_sizes"]) == tuple(leaf_shape[1:]):
    return start[0], chain[2:]
  return None


def layer_sizes(m: dict, leaf_shape) -> tuple[int, int]:
  """``(d_in, d_out)`` per group of a matched kernel."""
  perm, n_in = m["kernel_perm"], m["n_in"]
  d_in = math.prod(leaf_shape[a] for a in perm[:n_in])
  d_out = math.prod(leaf_shape[a] for a in perm[n_in:])
  return d_in, d_out // m.get("groups", 1)


def scale_shift_axes(use, eqn, leaf_shape):
  """The output's feature axes, those the leaf's elements run along in
  order (its size-1 axes broadcast: a channels-first ``[C, 1, 1]`` scale of
  ``[N, C, H, W]`` runs along axis 1 only), when ``eqn`` is a batched
  ``mul``/``add`` of a view of the leaf; None otherwise (e.g. ``1 + scale``
  alone, or a view that reorders the leaf). Inside a scan body, ``use``
  has its scan marker stripped and ``leaf_shape`` is the per-step shape."""
  return feature_axes(leaf_shape, use.view.chain,
                      tuple(eqn.outvars[0].aval.shape))


def feature_axes(leaf_shape, chain, out_shape):
  """The axes of ``out_shape`` the leaf's elements run along, in order,
  when its view (``chain``) broadcasts over the others (more elements than
  the leaf); None otherwise."""
  view = simulate(leaf_shape, chain)
  if view.ndim > len(out_shape) or math.prod(out_shape) <= math.prod(leaf_shape):
    return None
  view = view.reshape((1,) * (len(out_shape) - view.ndim) + view.shape)
  # the leaf's elements vary along its axes; the broadcast ones repeat them
  axes = tuple(d for d in range(view.ndim) if view.shape[d] > 1 and not np.all(
      np.take(view, [0], axis=d) == view))
  if any(view.shape[d] != out_shape[d] for d in axes) or not aligned(
      view, tuple(out_shape[d] for d in axes), out_shape, axes):
    return None
  return axes
