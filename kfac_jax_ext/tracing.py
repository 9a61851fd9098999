"""Layer discovery: trace ``loss_fn`` to a jaxpr and match layer patterns.

The walk recurses into ``jax.jit``, ``jax.checkpoint``/remat and
``custom_jvp``/``custom_vjp`` bodies and follows *views* of parameter leaves
(dtype casts, reshapes, broadcasts, transposes). A leaf belongs to a layer only
if that layer is its single use; every other leaf is reported with the reason
it was not recognised (tied weights, unknown primitive, control flow, ...), so
nothing is silently mis-tagged. Patterns:

* dense: ``dot_general(x, W)`` with ``W`` a 2-D leaf (or its transpose), one
  contracting axis, no batch axes, optionally followed by ``+ b`` along the
  output axis (bias folded in by the homogeneous coordinate);
* conv2d: ``conv_general_dilated(x, W)`` with feature/batch groups 1, any
  stride, padding, dilation; the kernel's output-feature axis must be its last
  axis (HWIO, as in flax); optional bias add as above;
* scale_and_shift: ``x * s`` and ``y + b`` with ``s``/``b`` leaves aligned with
  the trailing axes (LayerNorm / BatchNorm affine), grouped by module.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Callable

import jax
import numpy as np

from kfac_jax_ext import _jax_internals as jint
from kfac_jax_ext import losses as losses_lib

# pvary/pcast: shard_map's invariant->varying cast of a replicated parameter.
_ELEMENTWISE_VIEW = {"convert_element_type", "copy", "copy_p", "reduce_precision",
                     "pvary", "pcast"}
_STRUCTURAL = _ELEMENTWISE_VIEW | {"reshape", "broadcast_in_dim", "transpose",
                                   "squeeze", "expand_dims"}

Site = tuple  # (path: tuple[int, ...], eqn_index: int)


@dataclasses.dataclass(frozen=True)
class _View:
  leaf: int
  chain: tuple  # ((primitive, params), ...) structural ops applied to the leaf


@dataclasses.dataclass(frozen=True)
class _Use:
  leaf: int
  path: tuple
  eqn: int
  operand: int
  view: _View
  primitive: str
  reason: str | None = None  # set when the use can never be part of a layer


@dataclasses.dataclass(frozen=True)
class LayerMatch:
  """A matched layer and the jaxpr sites the statistics pass instruments.

  ``captures``: (site, operand index) of the layer input ``x``;
  ``probes``: sites whose output gets a zero probe (its gradient is ``g``).
  ``kernel_perm``: leaf axes ordered (input axes..., output axis) so that
  ``kernel.transpose(kernel_perm).reshape(d_in, d_out)`` is the canonical matrix.
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
  x_axis: int = -1          # contracting (feature) axis of the layer input
  out_axis: int = -1        # output-feature axis of the pre-activation
  conv: tuple = ()          # (window_strides, padding, lhs_dil, rhs_dil, dn, spatial)
  inputs_shape: tuple = ()
  outputs_shape: tuple = ()
  d_in: int = 0
  d_out: int = 0

  @property
  def leaves(self) -> tuple[int, ...]:
    return tuple(i for i in (self.kernel, self.bias, self.scale, self.shift)
                 if i is not None)


@dataclasses.dataclass(frozen=True)
class TracedLoss:
  """``loss_fn`` traced once: its jaxpr, layers, registered losses, leaf info."""
  closed_jaxpr: Any
  param_treedef: Any
  param_paths: tuple      # readable key path per leaf
  param_shapes: tuple
  batch_treedef: Any
  out_treedef: Any
  layers: tuple           # LayerMatch, forward order
  loss_sites: tuple       # sites of the loss tags
  leaf_reasons: dict      # leaf -> why no layer owns it
  jaxprs: dict            # path -> Jaxpr (for the interpreter)

  @property
  def num_examples(self) -> int:
    """M: the number of per-example losses of the first registered loss."""
    path, i = self.loss_sites[0]
    return int(np.prod(self.jaxprs[path].eqns[i].outvars[2].aval.shape))


def _key_name(k) -> Any:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return str(k)


def readable_path(keypath) -> tuple:
  names = tuple(_key_name(k) for k in keypath)
  if len(names) > 1 and names[-1] == "value":  # flax nnx Variable leaves
    names = names[:-1]
  return names


def _simulate(shape, chain) -> np.ndarray:
  """Replays a view chain on an integer iota: where each leaf element lands."""
  x = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
  with jax.ensure_compile_time_eval():
    for prim, params in chain:
      if prim.name in _ELEMENTWISE_VIEW:
        continue
      x = np.asarray(prim.bind(x, **params))
  return x


def _as_permutation(view: np.ndarray, shape) -> tuple | None:
  iota = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
  for perm in itertools.permutations(range(len(shape))):
    t = iota.transpose(perm)
    if t.shape == view.shape and np.array_equal(t, view):
      return perm
  return None


def _aligned(view: np.ndarray, leaf_shape, out_shape, axes) -> bool:
  """Whether ``view`` broadcast to ``out_shape`` puts the leaf on ``axes``."""
  try:
    v = np.broadcast_to(view, out_shape)
  except ValueError:
    return False
  shape = [1] * len(out_shape)
  for ax, n in zip(axes, leaf_shape):
    shape[ax] = n
  iota = np.arange(int(np.prod(leaf_shape)), dtype=np.int32).reshape(shape)
  return np.array_equal(v, np.broadcast_to(iota, out_shape))


class _Walker:
  """Collects parameter-leaf uses and loss tags over nested jaxprs."""

  def __init__(self):
    self.uses: list[_Use] = []
    self.loss_sites: list[Site] = []
    self.jaxprs: dict[tuple, Any] = {}

  def walk(self, jaxpr, path, views):
    self.jaxprs[path] = jaxpr
    for i, eqn in enumerate(jaxpr.eqns):
      name = eqn.primitive.name
      in_views = [None if jint.is_literal(v) else views.get(v) for v in eqn.invars]
      if eqn.primitive is losses_lib.LOSS_TAG_PRIMITIVE:
        self.loss_sites.append((path, i))
      if name in _STRUCTURAL and in_views and in_views[0] is not None:
        v = in_views[0]
        views[eqn.outvars[0]] = _View(v.leaf, v.chain + ((eqn.primitive, dict(
            eqn.params)),))
        continue
      if jint.call_kind(eqn) is not None:
        body, _ = jint.call_body(eqn)
        inner = {bv: iv for bv, iv in zip(body.invars, in_views) if iv is not None}
        self.walk(body, path + (i,), inner)
        continue
      nested = jint.sub_jaxprs(eqn)
      for j, v in enumerate(in_views):
        if v is not None:
          reason = (f"used inside control flow '{name}'" if nested else None)
          self.uses.append(_Use(v.leaf, path, i, j, v, name, reason))
      if nested:
        for body in nested:  # loss tags or leaves captured as constants
          self._scan_nested(body, path + (i,), name)

  def _scan_nested(self, jaxpr, path, name):
    for eqn in jaxpr.eqns:
      if eqn.primitive is losses_lib.LOSS_TAG_PRIMITIVE:
        raise ValueError(f"a loss helper is called inside control flow "
                         f"'{name}'; call it at the top level of loss_fn.")
      for body in jint.sub_jaxprs(eqn):
        self._scan_nested(body, path, name)


def _match_dense(use, eqn, shapes):
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  if lb or rb or len(lc) != 1 or len(rc) != 1 or len(shapes[use.leaf]) != 2:
    return None
  perm = _as_permutation(_simulate(shapes[use.leaf], use.view.chain),
                         shapes[use.leaf])
  if perm is None:
    return None
  p = use.operand
  cw = (lc if p == 0 else rc)[0]
  cx = (rc if p == 0 else lc)[0]
  leaf_in = perm[cw]
  leaf_out = 1 - leaf_in
  s_ndim = len(eqn.outvars[0].aval.shape)
  out_axis = 0 if p == 0 else s_ndim - 1
  return dict(kind="dense", x_operand=1 - p, x_axis=cx, out_axis=out_axis,
              kernel_perm=(leaf_in, leaf_out))


def _match_conv(use, eqn, shapes):
  prm = eqn.params
  shape = shapes[use.leaf]
  if (use.operand != 1 or prm["feature_group_count"] != 1
      or prm["batch_group_count"] != 1 or len(shape) != 4):
    return None
  perm = _as_permutation(_simulate(shape, use.view.chain), shape)
  if perm is None:
    return None
  dn = prm["dimension_numbers"]
  rhs = dn.rhs_spec
  spatial = tuple(eqn.invars[1].aval.shape[d] for d in rhs[2:])
  kernel_perm = (perm[rhs[1]],) + tuple(perm[d] for d in rhs[2:]) + (perm[rhs[0]],)
  conv = (prm["window_strides"], prm["padding"], prm["lhs_dilation"],
          prm["rhs_dilation"], dn, spatial)
  return dict(kind="conv2d", x_operand=0, x_axis=dn.lhs_spec[1],
              out_axis=dn.out_spec[1], kernel_perm=kernel_perm, conv=conv)


def _consumers(jaxpr, var):
  found = [(i, j) for i, e in enumerate(jaxpr.eqns) for j, v in enumerate(e.invars)
           if v is var]
  if any(v is var for v in jaxpr.outvars):
    found.append((None, None))
  return found


def trace_loss(loss_fn: Callable, params, batch, has_aux: bool = False) -> TracedLoss:
  """Traces ``loss_fn(params, batch)`` (never runs it) and matches layers."""
  flat_params, param_treedef = jax.tree_util.tree_flatten_with_path(params)
  param_paths = tuple(readable_path(k) for k, _ in flat_params)
  param_leaves = [v for _, v in flat_params]
  batch_leaves, batch_treedef = jax.tree_util.tree_flatten(batch)
  store = {}

  def flat_fn(p_leaves, b_leaves):
    out = loss_fn(jax.tree_util.tree_unflatten(param_treedef, p_leaves),
                  jax.tree_util.tree_unflatten(batch_treedef, b_leaves))
    loss = out[0] if has_aux else out
    if np.shape(loss) != ():
      raise ValueError(f"loss_fn must return a scalar loss, got shape "
                       f"{np.shape(loss)}" + ("" if has_aux else
                       "; with has_aux=True it returns (loss, aux)"))
    leaves, store["out_treedef"] = jax.tree_util.tree_flatten(out)
    return leaves

  try:
    closed = jint.make_closed_jaxpr(flat_fn, param_leaves, batch_leaves)
  except (TypeError, ValueError) as e:
    shapes = jax.tree_util.tree_map(lambda x: tuple(np.shape(x)), batch)
    raise type(e)(f"tracing loss_fn(params, batch) failed for a batch of shapes "
                  f"{shapes}: {e}") from e

  walker = _Walker()
  n = len(param_leaves)
  views = {v: _View(i, ()) for i, v in enumerate(closed.jaxpr.invars[:n])}
  walker.walk(closed.jaxpr, (), views)
  if not walker.loss_sites:
    raise ValueError(
        "loss_fn registers no loss: compute its loss with kfe.softmax_cross_entropy, "
        "kfe.sigmoid_cross_entropy or kfe.squared_error so that the curvature "
        "knows the model's predictive distribution.")
  shapes = tuple(tuple(np.shape(x)) for x in param_leaves)
  layers, reasons = _match_layers(walker, shapes, param_paths, n)
  return TracedLoss(closed, param_treedef, param_paths, shapes, batch_treedef,
                    store["out_treedef"], layers, tuple(walker.loss_sites),
                    reasons, walker.jaxprs)


def _module_name(paths, leaf) -> str:
  """A leaf's module path (its key path without the last key)."""
  return "/".join(map(str, paths[leaf][:-1])) or str(leaf)


def _match_layers(walker, shapes, paths, n):
  by_leaf: dict[int, list[_Use]] = {i: [] for i in range(n)}
  at_operand: dict[tuple, _Use] = {}   # (path, eqn, operand) -> parameter use
  for u in walker.uses:
    by_leaf[u.leaf].append(u)
    at_operand[(u.path, u.eqn, u.operand)] = u
  single = {i: us[0] for i, us in by_leaf.items() if len(us) == 1 and not us[0].reason}
  taken: set[int] = set()
  found = []  # (site, LayerMatch)

  for leaf, use in sorted(single.items(), key=lambda kv: (kv[1].path, kv[1].eqn)):
    jaxpr = walker.jaxprs[use.path]
    eqn = jaxpr.eqns[use.eqn]
    m = None
    if use.primitive == "dot_general":
      m = _match_dense(use, eqn, shapes)
    elif use.primitive == "conv_general_dilated":
      m = _match_conv(use, eqn, shapes)
    if m is None or (use.path, use.eqn, m["x_operand"]) in at_operand:
      continue  # no pattern, or the layer input is itself a parameter
    s = eqn.outvars[0]
    out_eqn, bias = use.eqn, None
    cons = _consumers(jaxpr, s)
    if len(cons) == 1 and cons[0][0] is not None:
      ci, cj = cons[0]
      b = at_operand.get((use.path, ci, 1 - cj))
      if (jaxpr.eqns[ci].primitive.name == "add" and b is not None
          and single.get(b.leaf) is b and len(shapes[b.leaf]) == 1):
        view = _simulate(shapes[b.leaf], b.view.chain)
        out_shape = s.aval.shape
        if _aligned(view, shapes[b.leaf], out_shape,
                    (m["out_axis"] % len(out_shape),)):
          out_eqn, bias = ci, b.leaf
    x = eqn.invars[m["x_operand"]]
    kshape = shapes[leaf]
    d_in = int(np.prod([kshape[a] for a in m["kernel_perm"][:-1]]))
    layer = LayerMatch(
        kind=m["kind"], name=_module_name(paths, leaf),
        kernel=leaf, bias=bias, captures=(((use.path, use.eqn), m["x_operand"]),),
        probes=((use.path, out_eqn),), kernel_perm=m["kernel_perm"],
        x_axis=m["x_axis"] % len(x.aval.shape),
        out_axis=m["out_axis"] % len(s.aval.shape), conv=m.get("conv", ()),
        inputs_shape=tuple(x.aval.shape), outputs_shape=tuple(s.aval.shape),
        d_in=d_in, d_out=int(kshape[m["kernel_perm"][-1]]))
    taken.update(layer.leaves)
    found.append(((use.path, use.eqn), layer))

  groups: dict[str, dict] = {}
  for leaf, use in single.items():
    if leaf in taken or use.primitive not in ("mul", "add"):
      continue
    eqn = walker.jaxprs[use.path].eqns[use.eqn]
    if (use.path, use.eqn, 1 - use.operand) in at_operand:
      continue  # both operands are parameters
    out_shape = eqn.outvars[0].aval.shape
    k = len(shapes[leaf])
    if k > len(out_shape):
      continue
    axes = tuple(range(len(out_shape) - k, len(out_shape)))
    if not _aligned(_simulate(shapes[leaf], use.view.chain), shapes[leaf],
                    out_shape, axes):
      continue
    name = _module_name(paths, leaf)
    g = groups.setdefault(name, dict(site=(use.path, use.eqn), captures=(),
                                     probes=(), scale=None, shift=None,
                                     inputs_shape=tuple(out_shape)))
    role = "scale" if use.primitive == "mul" else "shift"
    if g[role] is not None:
      continue
    g[role] = leaf
    g["probes"] += ((use.path, use.eqn),)
    if role == "scale":
      g["captures"] += (((use.path, use.eqn), 1 - use.operand),)
    g["site"] = min(g["site"], (use.path, use.eqn))
    taken.add(leaf)
  for name, g in groups.items():
    found.append((g["site"], LayerMatch(
        kind="scale_and_shift", name=name, scale=g["scale"], shift=g["shift"],
        captures=g["captures"], probes=g["probes"], inputs_shape=g["inputs_shape"],
        outputs_shape=g["inputs_shape"])))

  found.sort(key=lambda t: t[0])
  reasons = {}
  for i in range(n):
    if i in taken:
      continue
    us = by_leaf[i]
    if not us:
      reasons[i] = "not used by loss_fn"
    elif len(us) > 1:
      prims = sorted({u.primitive for u in us})
      reasons[i] = f"used {len(us)} times ({', '.join(prims)}): tied or shared"
    elif us[0].reason:
      reasons[i] = us[0].reason
    else:
      reasons[i] = f"used by '{us[0].primitive}' in no recognised layer pattern"
  return tuple(layer for _, layer in found), reasons
