"""Layer discovery: trace ``loss_fn`` to a jaxpr and match layer patterns.

The walk recurses into ``jax.jit``, ``jax.checkpoint``/remat and
``custom_jvp``/``custom_vjp`` bodies and follows *views* of parameter leaves
(dtype casts, reshapes, broadcasts, transposes, ``leaf ± constant``). Uses
in equations that cannot reach the loss (dead code, outputs the loss
ignores) are dropped first. A leaf belongs to a layer only if that layer is
its single use; every other leaf is reported with the reason it was not
recognised (tied weights, control flow, transformed before use, ...), so
nothing is silently mis-tagged. The patterns are in ``patterns.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from kfac_jax_ext import _jax_internals as jint
from kfac_jax_ext import losses as losses_lib
from kfac_jax_ext import patterns
from kfac_jax_ext.patterns import LayerMatch

Site = tuple  # (path: tuple[int, ...], eqn_index: int)
_SHIFT_BY_CONSTANT = ("add", "sub")


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


def _live_outputs(jaxpr, live_outs) -> list:
  """Per equation, which of its outputs can reach a live output of
  ``jaxpr`` (a conservative backward pass: every input of an equation with a
  live output is live)."""
  live = {v for v, keep in zip(jaxpr.outvars, live_outs)
          if keep and not jint.is_literal(v)}
  per_eqn = [None] * len(jaxpr.eqns)
  for i in reversed(range(len(jaxpr.eqns))):
    eqn = jaxpr.eqns[i]
    outs = [v in live for v in eqn.outvars]
    per_eqn[i] = outs
    if any(outs) or jint.has_effects(eqn):
      live.update(v for v in eqn.invars if not jint.is_literal(v))
  return per_eqn


class _Walker:
  """Collects live parameter-leaf uses and loss tags over nested jaxprs."""

  def __init__(self):
    self.uses: list[_Use] = []
    self.loss_sites: list[Site] = []
    self.jaxprs: dict[tuple, Any] = {}

  def walk(self, jaxpr, path, views, live_outs):
    self.jaxprs[path] = jaxpr
    live = _live_outputs(jaxpr, live_outs)
    for i, eqn in enumerate(jaxpr.eqns):
      name = eqn.primitive.name
      in_views = [None if jint.is_literal(v) else views.get(v) for v in eqn.invars]
      if eqn.primitive is losses_lib.LOSS_TAG_PRIMITIVE:
        self.loss_sites.append((path, i))
      if name in patterns.STRUCTURAL_VIEW and in_views and in_views[0] is not None:
        v = in_views[0]
        views[eqn.outvars[0]] = _View(v.leaf, v.chain + ((eqn.primitive, dict(
            eqn.params)),))
        continue
      if name in _SHIFT_BY_CONSTANT and _shifted_view(eqn, in_views):
        # leaf ± constant (e.g. RMSNorm's ``1 + scale``): the Jacobian is ±I,
        # so the leaf's curvature is that of the shifted value.
        views[eqn.outvars[0]] = next(v for v in in_views if v is not None)
        continue
      if jint.call_kind(eqn) is not None:
        body, _ = jint.call_body(eqn)
        inner = {bv: iv for bv, iv in zip(body.invars, in_views) if iv is not None}
        self.walk(body, path + (i,), inner, live[i])
        continue
      nested = jint.sub_jaxprs(eqn)
      if any(live[i]):
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


def _shifted_view(eqn, in_views) -> bool:
  """``view + c``, ``c + view`` or ``view - c`` with ``c`` a scalar literal."""
  a, b = eqn.invars
  va, vb = in_views
  if va is not None and vb is None:
    return jint.is_literal(b) and np.ndim(b.val) == 0
  if vb is not None and va is None and eqn.primitive.name == "add":
    return jint.is_literal(a) and np.ndim(a.val) == 0
  return False


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
    if has_aux and not (isinstance(out, (tuple, list)) and len(out) == 2):
      raise ValueError("with has_aux=True, loss_fn must return (loss, aux); it "
                       f"returned {type(out).__name__}.")
    loss = out[0] if has_aux else out
    if not has_aux and isinstance(out, (tuple, list)):
      raise ValueError(f"loss_fn returned a {type(out).__name__} of "
                       f"{len(out)} items, not a scalar loss: if it returns "
                       "(loss, aux), pass has_aux=True.")
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
    message = (f"tracing loss_fn(params, batch) failed for a batch of shapes "
               f"{shapes}: {e}")
    try:
      error = type(e)(message)
    except TypeError:   # a JAX error type whose constructor takes no message
      error = ValueError(message)
    raise error from e

  walker = _Walker()
  n = len(param_leaves)
  views = {v: _View(i, ()) for i, v in enumerate(closed.jaxpr.invars[:n])}
  walker.walk(closed.jaxpr, (), views,
              [i == 0 for i in range(len(closed.jaxpr.outvars))])
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
  return "/".join(map(str, paths[leaf][:-1] or paths[leaf])) or str(leaf)


def _bias(walker, jaxpr, use, out_axes, single, at_operand, shapes):
  """``(probe eqn, bias leaf)``: the single ``add`` of a bias leaf aligned with
  ``out_axes`` that consumes the layer output, if any."""
  s = jaxpr.eqns[use.eqn].outvars[0]
  cons = _consumers(jaxpr, s)
  if len(cons) == 1 and cons[0][0] is not None:
    ci, cj = cons[0]
    b = at_operand.get((use.path, ci, 1 - cj))
    if (jaxpr.eqns[ci].primitive.name == "add" and b is not None
        and single.get(b.leaf) is b
        and len(shapes[b.leaf]) == len(out_axes) and patterns.aligned(
            patterns.simulate(shapes[b.leaf], b.view.chain), shapes[b.leaf],
            s.aval.shape, out_axes)):
      return ci, b.leaf
  return use.eqn, None


def _tied(uses, matched):
  """One ``"tied"`` layer for a kernel whose every use is a dense or
  embedding pattern, in the orientation of its first use; None otherwise."""
  if any(u.reason for u in uses):
    return None
  ms = [matched(u) for u in sorted(uses, key=lambda u: u.path + (u.eqn,))]
  if any(m is None or m[1].kind not in ("dense", "embedding") for m in ms):
    return None
  per_use = tuple(layer for _, layer in ms)
  ref = per_use[0]
  ref_in = set(ref.kernel_perm[:ref.n_in])
  ref_out = set(ref.kernel_perm[ref.n_in:])
  transposed = []
  for layer in per_use:
    inputs = set(layer.kernel_perm[:layer.n_in])
    if inputs not in (ref_in, ref_out):
      return None   # the uses split the kernel's axes differently
    transposed.append(inputs == ref_out)
  return dataclasses.replace(
      ref, kind="tied", captures=sum((l.captures for l in per_use), ()),
      probes=sum((l.probes for l in per_use), ()), uses=per_use,
      transposed=tuple(transposed))


def _stacked(uses, shape, matched):
  """One ``stacked`` layer for a kernel ``[k, ...]`` whose uses are its k
  slices ``W[j]``, each once, each a dense layer of the same shape."""
  if any(u.reason for u in uses) or len(uses) != shape[0]:
    return None
  per_slice = {}
  for u in uses:
    found = patterns.leading_slice(u.view.chain, shape)
    if found is None or found[0] in per_slice:
      return None
    j, rest = found
    m = matched(dataclasses.replace(u, view=_View(u.leaf, rest)), shape[1:])
    if m is None or m[1].kind != "dense":
      return None
    per_slice[j] = m[1]
  layers = tuple(per_slice[j] for j in range(shape[0]))
  first = layers[0]
  if any((l.kernel_perm, l.n_in, l.d_in, l.d_out) != (
      first.kernel_perm, first.n_in, first.d_in, first.d_out) for l in layers):
    return None
  return dataclasses.replace(
      first, groups=shape[0], stacked=True, uses=layers,
      captures=sum((l.captures for l in layers), ()),
      probes=sum((l.probes for l in layers), ()))


def _match_layers(walker, shapes, paths, n):
  by_leaf: dict[int, list[_Use]] = {i: [] for i in range(n)}
  at_operand: dict[tuple, _Use] = {}   # (path, eqn, operand) -> parameter use
  for u in walker.uses:
    by_leaf[u.leaf].append(u)
    at_operand[(u.path, u.eqn, u.operand)] = u
  single = {i: us[0] for i, us in by_leaf.items() if len(us) == 1 and not us[0].reason}
  taken: set[int] = set()
  found = []  # (site, LayerMatch)

  def matched(use, shape=None):
    """The use's pattern and LayerMatch (no bias), or None; ``shape``: the
    shape the use's view chain starts from (default: the leaf's)."""
    shape = shapes[use.leaf] if shape is None else shape
    jaxpr = walker.jaxprs[use.path]
    eqn = jaxpr.eqns[use.eqn]
    matcher = patterns.MATCHERS.get(use.primitive)
    m = matcher(use, eqn, shape) if matcher else None
    if m is None or (use.path, use.eqn, m["x_operand"]) in at_operand:
      return None  # no pattern, or the layer input is itself a parameter
    x = eqn.invars[m["x_operand"]]
    d_in, d_out = patterns.layer_sizes(m, shape)
    if m["kind"] == "embedding":
      d_in = shape[0]
    out_axes = tuple(a % len(eqn.outvars[0].aval.shape) for a in m["out_axes"])
    return m, LayerMatch(
        kind=m["kind"], name=_module_name(paths, use.leaf), kernel=use.leaf,
        captures=(((use.path, use.eqn), m["x_operand"]),),
        probes=((use.path, use.eqn),), kernel_perm=tuple(m["kernel_perm"]),
        n_in=m["n_in"], x_axes=tuple(a % max(len(x.aval.shape), 1)
                                     for a in m["x_axes"]),
        out_axes=out_axes, conv=m.get("conv", ()), groups=m.get("groups", 1),
        inputs_shape=tuple(x.aval.shape),
        outputs_shape=tuple(eqn.outvars[0].aval.shape), d_in=d_in, d_out=d_out)

  for leaf, use in sorted(single.items(), key=lambda kv: kv[1].path + (kv[1].eqn,)):
    if leaf in taken:
      continue
    found_use = matched(use)
    if found_use is None:
      continue
    m, layer = found_use
    if m["kind"] != "embedding":
      out_eqn, bias = _bias(walker, walker.jaxprs[use.path], use,
                            layer.out_axes, single, at_operand, shapes)
      if bias is not None and not (layer.groups > 1 and len(shapes[bias]) != 1):
        layer = dataclasses.replace(layer, bias=bias,
                                    probes=((use.path, out_eqn),))
    taken.update(layer.leaves)
    found.append(((use.path, use.eqn), layer))

  for leaf, uses in by_leaf.items():
    if len(uses) < 2:
      continue
    layer = _tied(uses, matched) or _stacked(uses, shapes[leaf], matched)
    if layer is not None:
      taken.add(leaf)
      first = min(uses, key=lambda u: u.path + (u.eqn,))
      found.append(((first.path, first.eqn), layer))

  groups: dict[str, dict] = {}
  for leaf, use in single.items():
    if leaf in taken or use.primitive not in ("mul", "add"):
      continue
    eqn = walker.jaxprs[use.path].eqns[use.eqn]
    if (use.path, use.eqn, 1 - use.operand) in at_operand:
      continue  # both operands are parameters
    if patterns.scale_shift_axes(use, eqn, shapes[leaf]) is None:
      continue
    out_shape = eqn.outvars[0].aval.shape
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

  found.sort(key=lambda t: t[0][0] + (t[0][1],))   # forward (program) order
  reasons = {i: _reason(walker, by_leaf[i], shapes[i])
             for i in range(n) if i not in taken}
  return tuple(layer for _, layer in found), reasons


def _reason(walker, uses, shape) -> str:
  """Why no layer owns a leaf, naming the cause."""
  if not uses:
    return "not used by loss_fn"
  if len(uses) > 1:
    prims = sorted({u.primitive for u in uses})
    if all(u.primitive in ("slice", "dynamic_slice") or any(
        p.name == "slice" for p, _ in u.view.chain) for u in uses):
      return (f"sliced into {len(uses)} parts ({', '.join(prims)}) that are "
              "not all dense layers of one shape over leading-axis slices")
    if not any(u.primitive in patterns.MATCHERS for u in uses):
      return (f"transformed before use ({', '.join(prims)} of the parameter, "
              "e.g. weight standardisation): its statistics are not those of "
              "a layer pattern")
    return f"used {len(uses)} times ({', '.join(prims)}): tied or shared"
  use = uses[0]
  if use.reason:
    return use.reason
  eqn = walker.jaxprs[use.path].eqns[use.eqn]
  if use.primitive in ("slice", "dynamic_slice") or any(
      p.name == "slice" for p, _ in use.view.chain):
    return ("only a slice of it is used: a block needs the whole kernel (or "
            "all its leading-axis slices as layers of one shape)")
  out = eqn.outvars[0].aval.shape if eqn.outvars else ()
  if int(np.prod(out)) <= int(np.prod(shape)) and use.primitive not in (
      "dot_general", "conv_general_dilated", "gather"):
    return (f"transformed before use ('{use.primitive}' of the parameter alone, "
            "e.g. weight standardisation): its statistics are not those of a "
            "layer pattern")
  if use.primitive == "conv_general_dilated" and eqn.params["batch_group_count"] != 1:
    return "conv with batch_group_count > 1: no pattern"
  if use.primitive == "dot_general" and any(eqn.params["dimension_numbers"][1]):
    return ("dot_general with batch dimensions on the parameter (per-head "
            "weights): no pattern")
  return f"used by '{use.primitive}' in no recognised layer pattern"
