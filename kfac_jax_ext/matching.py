"""Layer matching over the live parameter uses of a traced loss.

The layer matchers (``LAYER_MATCHERS``) run in order over the uses, each
claiming leaves the earlier ones left: kernels concatenated before one
matmul are a layer each (``concatenated.py``); a leaf with one use matched
by a pattern (``patterns.MATCHERS``) is a layer, with the bias added to its
output folded in; a leaf with several uses is one layer when every use is a
dense/embedding pattern (``tied``, K-FAC-expand over the uses) or when its
uses are its k leading-axis slices, each a dense layer of one shape
(``stacked``); scale-and-shift leaves are grouped by module. Inside a scan
body a kernel in ``xs`` is stacked over the steps, one closed over is
shared by them. Every other leaf gets a reason that names the cause.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from kfac_jax_ext import _jax_internals as jint
from kfac_jax_ext import bias_fold
from kfac_jax_ext import broadcast_inputs
from kfac_jax_ext import concatenated
from kfac_jax_ext import patterns
from kfac_jax_ext.patterns import LayerMatch


def _module_name(paths, leaf) -> str:
  """A leaf's module path (its key path without the last key)."""
  return "/".join(map(str, paths[leaf][:-1] or paths[leaf])) or str(leaf)


def _tied(uses, matched):
  """One ``"tied"`` layer for a kernel whose every use is a dense or
  embedding pattern, in the orientation of its first use; None otherwise."""
  if any(u.reason for u in uses):
    return None
  ms = [matched(u) for u in sorted(uses, key=lambda u: u.path + (u.eqn,))]
  if any(m is None or m[1].kind not in ("dense", "embedding") or m[1].steps
         for m in ms):
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
    m = matched(dataclasses.replace(u, view=patterns.View(u.leaf, rest)), shape[1:])
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


@dataclasses.dataclass(frozen=True)
class _Uses:
  """The live parameter uses of a traced loss, indexed for the matchers."""
  jaxprs: dict
  shapes: tuple
  paths: tuple
  by_leaf: dict          # leaf -> [Use]
  at_operand: dict       # (path, eqn, operand) -> Use
  single: dict           # leaf -> its only Use (without a reason)

  def name(self, leaf) -> str:
    return _module_name(self.paths, leaf)


def _match_use(ctx: _Uses, use, shape=None):
  """The use's pattern and LayerMatch (no bias), or None; ``shape``: the
  shape the use's view chain starts from (default: the leaf's). Inside a
  scan body only dense and conv layers match: stacked (one block per step,
  and per group of a grouped conv) for a kernel in ``xs``, shared over the
  steps for one closed over (also in nested scans, ``patterns.scan_view``),
  and embedding tables closed over."""
  shape = whole = ctx.shapes[use.leaf] if shape is None else shape
  steps, marker = 0, None
  in_scan = patterns.scan_view(use.view.chain)
  if in_scan is not None:
    marker, steps, rest = in_scan
    shape = shape[1:] if marker is patterns.SCAN_SLICE else shape
    use = dataclasses.replace(use, view=patterns.View(use.leaf, rest))
  eqn = ctx.jaxprs[use.path].eqns[use.eqn]
  matcher = patterns.MATCHERS.get(use.primitive)
  m = matcher(use, eqn, shape) if matcher else None
  x_use = None if m is None else ctx.at_operand.get((use.path, use.eqn,
                                                     m["x_operand"]))
  if m is None or (x_use is not None
                   and not broadcast_inputs.repeated(ctx.shapes, x_use)):
    return None  # no pattern, or the layer input is a parameter (not repeated)
  if steps and not (m["kind"] in ("dense", "conv2d") or (
      m["kind"] == "embedding" and marker is patterns.SCAN_CONST)):
    return None   # in a scan: dense layers, convs, a table closed over
  if steps:   # slices: the leading axis a stacked kernel is scanned over
    m = dict(m, steps=steps, marker=marker,
             slices=whole[0] if marker is patterns.SCAN_SLICE else 1)
  x = eqn.invars[m["x_operand"]]
  d_in, d_out = patterns.layer_sizes(m, shape)
  if m["kind"] == "embedding":
    d_in = shape[0]
  out_axes = tuple(a % len(eqn.outvars[0].aval.shape) for a in m["out_axes"])
  layer = LayerMatch(
      kind=m["kind"], name=ctx.name(use.leaf), kernel=use.leaf,
      captures=(((use.path, use.eqn), m["x_operand"]),),
      probes=((use.path, use.eqn),), kernel_perm=tuple(m["kernel_perm"]),
      n_in=m["n_in"], x_axes=tuple(a % max(len(x.aval.shape), 1)
                                   for a in m["x_axes"]),
      out_axes=out_axes, conv=m.get("conv", ()), groups=m.get("groups", 1),
      inputs_shape=tuple(x.aval.shape),
      outputs_shape=tuple(eqn.outvars[0].aval.shape), d_in=d_in, d_out=d_out)
  if m.get("steps"):   # a stacked kernel: a block per slice (and group)
    stacked = m["marker"] is patterns.SCAN_SLICE
    layer = dataclasses.replace(
        layer, steps=m["steps"], stacked=stacked,
        groups=m["slices"] * layer.groups if stacked else layer.groups,
        slice_groups=layer.groups if stacked else 1)
  return m, layer


def _concatenated_layers(ctx: _Uses, taken: set):
  """Kernels concatenated before one matmul: a layer each."""
  return concatenated.match_concatenated(ctx.jaxprs, ctx.at_operand, ctx.single,
                                         ctx.shapes, ctx.name)


def _single_use_layers(ctx: _Uses, taken: set):
  """A leaf with one use matched by a pattern, with its bias folded in."""
  found = []
  for leaf, use in sorted(ctx.single.items(),
                          key=lambda kv: kv[1].path + (kv[1].eqn,)):
    if leaf in taken:
      continue
    found_use = _match_use(ctx, use)
    if found_use is None:
      continue
    m, layer = found_use
    if m["kind"] != "embedding":
      bias = bias_fold.find_bias(ctx.jaxprs[use.path], use, layer.out_axes,
                                 ctx.single, ctx.at_operand, ctx.shapes,
                                 m.get("marker"))
      if bias is not None and bias.leaf not in taken:   # one layer's bias
        layer = dataclasses.replace(
            layer, bias=bias.leaf, probes=((use.path, bias.probe),),
            out_axes=bias.out_axes, outputs_shape=bias.outputs_shape)
    taken.update(layer.leaves)
    found.append(((use.path, use.eqn), layer))
  return found


def _multi_use_layers(ctx: _Uses, taken: set):
  """A leaf with several uses: tied (every use a dense/embedding pattern) or
  stacked (its leading-axis slices, each a dense layer of one shape)."""
  found = []
  matched = lambda use, shape=None: _match_use(ctx, use, shape)
  for leaf, uses in ctx.by_leaf.items():
    if len(uses) < 2 or leaf in taken:
      continue
    layer = _tied(uses, matched) or _stacked(uses, ctx.shapes[leaf], matched)
    if layer is not None:
      taken.add(leaf)
      first = min(uses, key=lambda u: u.path + (u.eqn,))
      found.append(((first.path, first.eqn), layer))
  return found


def _rescaled_scale(ctx: _Uses, use, eqn, shape):
  """BatchNorm in training mode: ``v = s ⊙ r`` with ``r = rsqrt(var + ε)``
  per feature (one value for the whole batch), then ``y ⊙ v`` per example.
  The per-example gradient of ``s`` is ``r ⊙ Σ_pos y ⊙ g`` (``g`` at the
  second product), so ``s`` is a scale whose input is ``y ⊙ r``. Returns
  ``(the use at the second product, its equation, the capture of r)`` or
  None (any other use of ``s`` alone stays "transformed before use")."""
  out = eqn.outvars[0]
  other = eqn.invars[1 - use.operand]
  if (use.primitive != "mul" or jint.is_literal(other)
      or int(np.prod(out.aval.shape)) != int(np.prod(shape))):
    return None
  jaxpr = ctx.jaxprs[use.path]
  if any(v is out for v in jaxpr.outvars):
    return None
  consumers = [(k, e) for k, e in enumerate(jaxpr.eqns)
               if any(v is out for v in e.invars)]
  if len(consumers) != 1 or consumers[0][1].primitive.name != "mul":
    return None
  k, second = consumers[0]
  operand = next(j for j, v in enumerate(second.invars) if v is out)
  if any(v is out for v in second.invars[:operand] + second.invars[operand + 1:]) or (
      (use.path, k, 1 - operand) in ctx.at_operand):
    return None
  moved = dataclasses.replace(use, eqn=k, operand=operand)
  if patterns.scale_shift_axes(moved, second, shape) is None:
    return None
  return moved, second, (((use.path, use.eqn), 1 - use.operand),)


def _scale_and_shift_layers(ctx: _Uses, taken: set):
  """Elementwise scale (``mul``) and shift (``add``) leaves, one layer per
  module (LayerNorm/BatchNorm affine, BatchNorm's training-mode scale
  included: ``_rescaled_scale``), in or out of scans."""
  groups: dict[str, dict] = {}
  for leaf, use in ctx.single.items():
    if leaf in taken or use.primitive not in ("mul", "add"):
      continue
    eqn = ctx.jaxprs[use.path].eqns[use.eqn]
    if (use.path, use.eqn, 1 - use.operand) in ctx.at_operand:
      continue  # both operands are parameters
    shape, steps, marker = ctx.shapes[leaf], 0, None
    in_scan = patterns.scan_view(use.view.chain)
    if in_scan is not None:   # per step: leaf[i] (scanned) or the leaf (shared)
      marker, steps, rest = in_scan
      shape = shape[1:] if marker is patterns.SCAN_SLICE else shape
      use = dataclasses.replace(use, view=patterns.View(use.leaf, rest))
    multiplier = ()
    axes = patterns.scale_shift_axes(use, eqn, shape)
    if axes is None:
      rescaled = _rescaled_scale(ctx, use, eqn, shape)
      if rescaled is None:
        continue
      use, eqn, multiplier = rescaled
      axes = patterns.scale_shift_axes(use, eqn, shape)
    out_shape = eqn.outvars[0].aval.shape
    role = "scale" if use.primitive == "mul" else "shift"
    new = lambda: dict(
        site=(use.path, use.eqn), captures=(), probes=(), scale=None,
        shift=None, inputs_shape=tuple(out_shape), steps=steps, marker=marker,
        axes=axes)
    g = groups.setdefault(ctx.name(leaf), new())
    if g[role] is not None or (g["steps"], g["marker"], g["axes"]) != (
        steps, marker, axes):
      # a second scale (or shift) in one module, as CaiT's layer scales
      # gamma_1 and gamma_2, or one along other axes: a layer of its own,
      # named by the leaf's path
      g = groups.setdefault("/".join(map(str, ctx.paths[leaf])), new())
      if g[role] is not None:
        continue
    g[role] = leaf
    g["probes"] += ((use.path, use.eqn),)
    if role == "scale":   # its input, then (BatchNorm) its per-feature multiplier
      g["captures"] += (((use.path, use.eqn), 1 - use.operand),) + multiplier
    g["site"] = min(g["site"], (use.path, use.eqn))
    taken.add(leaf)
  return [(g["site"], LayerMatch(
      kind="scale_and_shift", name=name, scale=g["scale"], shift=g["shift"],
      captures=g["captures"], probes=g["probes"], inputs_shape=g["inputs_shape"],
      outputs_shape=g["inputs_shape"], out_axes=g["axes"], steps=g["steps"],
      stacked=g["marker"] is patterns.SCAN_SLICE)) for name, g in groups.items()]


# The layer matchers, in order: each ``(uses, taken) -> [(site, LayerMatch)]``
# claims leaves not yet ``taken`` (and adds them to it).
LAYER_MATCHERS = (_concatenated_layers, _single_use_layers, _multi_use_layers,
                  _scale_and_shift_layers, broadcast_inputs.layers)


def match_layers(uses, jaxprs, shapes, paths, n, penalty_leaves=frozenset()):
  """Layers from the live parameter uses of a traced loss: ``(layers in
  forward order, {leaf: reason} for every leaf no layer owns)``;
  ``penalty_leaves``: leaves also used in terms outside the registered
  losses (for the reason of those used nowhere else)."""
  by_leaf: dict[int, list[patterns.Use]] = {i: [] for i in range(n)}
  at_operand: dict[tuple, patterns.Use] = {}
  for u in uses:
    by_leaf[u.leaf].append(u)
    at_operand[(u.path, u.eqn, u.operand)] = u
  single = {i: us[0] for i, us in by_leaf.items() if len(us) == 1 and not us[0].reason}
  ctx = _Uses(jaxprs, tuple(shapes), tuple(paths), by_leaf, at_operand, single)
  taken: set[int] = set()
  found = []  # (site, LayerMatch)
  for matcher in LAYER_MATCHERS:
    for site, layer in matcher(ctx, taken):
      taken.update(layer.leaves)
      found.append((site, layer))
  found.sort(key=lambda t: t[0][0] + (t[0][1],))   # forward (program) order
  reasons = {i: _reason(jaxprs, by_leaf[i], shapes[i], i in penalty_leaves)
             for i in range(n) if i not in taken}
  return _unique_names(tuple(layer for _, layer in found), paths), reasons


def _unique_names(layers, paths):
  """Layers named by their module path, except where a module holds several
  (a LoRA module's ``lora_a`` and ``lora_b``, a bias left apart from its
  kernel): those are named by their first leaf's path."""
  counts: dict[str, int] = {}
  for layer in layers:
    counts[layer.name] = counts.get(layer.name, 0) + 1
  return tuple(
      dataclasses.replace(layer, name="/".join(map(str, paths[layer.leaves[0]])))
      if counts[layer.name] > 1 and layer.leaves else layer for layer in layers)


def _reason(jaxprs, uses, shape, in_penalty=False) -> str:
  """Why no layer owns a leaf, naming the cause."""
  if not uses and in_penalty:
    return ("used only in terms added to the registered losses (a penalty): "
            "no Fisher of the model's predictions")
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
  eqn = jaxprs[use.path].eqns[use.eqn]
  if sum(isinstance(prim, patterns.ScanMarker) for prim, _ in use.view.chain) > 1 and (
      patterns.scan_view(use.view.chain) is None):
    return (f"used by '{use.primitive}' inside nested scans that scan over it "
            "below the outermost scan (or reshape it between them): no block yet")
  if patterns.scan_view(use.view.chain) is not None:
    return (f"used by '{use.primitive}' inside a scan body, where only dense "
            "and conv layers (and embedding tables closed over) get a block")
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
