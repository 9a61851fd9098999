"""Layer discovery: trace ``loss_fn`` to a jaxpr and match layer patterns.

The walk recurses into ``jax.jit``, ``jax.checkpoint``/remat and
``custom_jvp``/``custom_vjp`` bodies and follows *views* of parameter leaves
(dtype casts, reshapes, broadcasts, transposes, ``leaf ± constant``). Uses
in equations that cannot reach a registered loss's inputs are dropped
first: dead code, outputs the loss ignores, and terms added to the
registered losses (a penalty such as ``loss + c·Σw²``: it has no Fisher of
the model's predictive distribution, and its use must not make a layer's
kernel look shared; ``TracedLoss.penalty_leaves`` names them). A leaf
belongs to a layer only if that layer is
its single use; every other leaf is reported with the reason it was not
recognised (tied weights, control flow, transformed before use, ...), so
nothing is silently mis-tagged. The patterns are in ``patterns.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
import optax

from kfac_jax_ext import _jax_internals as jint
from kfac_jax_ext import batch_free
from kfac_jax_ext import loss_scales as scales_lib
from kfac_jax_ext import losses as losses_lib
from kfac_jax_ext import matching
from kfac_jax_ext import patterns
from kfac_jax_ext.patterns import LayerMatch  # noqa: F401 (tracing.LayerMatch)

Site = tuple  # (path: tuple[int, ...], eqn_index: int)
_SHIFT_BY_CONSTANT = ("add", "sub")


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
  penalty_leaves: tuple = ()  # leaves also used in terms outside the losses
  loss_scales: tuple = ()     # the factor on each registered loss (loss_scales)

  @property
  def num_examples(self) -> int:
    """M: the number of per-example losses of the first registered loss."""
    path, i = self.loss_sites[0]   # the predictions' batch shape
    return int(np.prod(self.jaxprs[path].eqns[i].outvars[0].aval.shape[:-1]))


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


def _liveness(jaxpr, live_outs, to_losses) -> tuple[list, set]:
  """Per equation, which of its outputs are live, and the live variables: a
  conservative backward pass (every input of an equation with a live output
  is live) from the outputs marked in ``live_outs``. With ``to_losses``
  the inputs of every loss tag are live too, and a call's inputs are live
  only where they reach its body's tags or live outputs."""
  live = {v for v, keep in zip(jaxpr.outvars, live_outs)
          if keep and not jint.is_literal(v)}
  per_eqn = [None] * len(jaxpr.eqns)
  for i in reversed(range(len(jaxpr.eqns))):
    eqn = jaxpr.eqns[i]
    outs = [v in live for v in eqn.outvars]
    per_eqn[i] = outs
    if to_losses and jint.call_kind(eqn) is not None:
      body, _ = jint.call_body(eqn)
      inner = _liveness(body, outs, True)[1]
      live.update(v for v, b in zip(eqn.invars, body.invars)
                  if b in inner and not jint.is_literal(v))
    elif any(outs) or jint.has_effects(eqn) or (
        to_losses and eqn.primitive is losses_lib.LOSS_TAG_PRIMITIVE):
      live.update(v for v in eqn.invars if not jint.is_literal(v))
  return per_eqn, live


def _live_outputs(jaxpr, live_outs) -> list:
  """Per equation, which of its outputs reach a registered loss's inputs
  (the loss tags) or an output marked in ``live_outs``."""
  return _liveness(jaxpr, live_outs, True)[0]


class _Walker:
  """Collects live parameter-leaf uses and loss tags over nested jaxprs."""

  def __init__(self):
    self.uses: list[patterns.Use] = []
    self.penalty_leaves: set[int] = set()   # used where only the value reaches
    self.loss_sites: list[Site] = []
    self.jaxprs: dict[tuple, Any] = {}

  def walk(self, jaxpr, path, views, live_outs, value_outs=None):
    """``live_outs``: the outputs that reach a registered loss's inputs;
    ``value_outs``: those that reach the loss value (a use there that
    reaches no loss's inputs is a penalty's)."""
    self.jaxprs[path] = jaxpr
    live = _live_outputs(jaxpr, live_outs)
    value = _liveness(jaxpr, live_outs if value_outs is None else value_outs,
                      False)[0]
    for i, eqn in enumerate(jaxpr.eqns):
      name = eqn.primitive.name
      in_views = [None if jint.is_literal(v) else views.get(v) for v in eqn.invars]
      if eqn.primitive is losses_lib.LOSS_TAG_PRIMITIVE:
        self.loss_sites.append((path, i))
      if name in patterns.STRUCTURAL_VIEW and in_views and in_views[0] is not None:
        v = in_views[0]
        views[eqn.outvars[0]] = patterns.View(v.leaf, v.chain + ((eqn.primitive, dict(
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
        self.walk(body, path + (i,), inner, live[i], value[i])
        continue
      scan = jint.scan_parts(eqn)
      if scan is not None and any(v is not None for v in in_views):
        self._walk_scan(eqn, scan, path + (i,), in_views, live[i], value[i])
        continue
      nested = jint.sub_jaxprs(eqn)
      if any(live[i]):
        for j, v in enumerate(in_views):
          if v is not None:
            reason = (f"used inside control flow '{name}'" if nested else None)
            self.uses.append(patterns.Use(v.leaf, path, i, j, v, name, reason))
      elif any(value[i]):
        self.penalty_leaves.update(v.leaf for v in in_views if v is not None)
      if nested:
        for body in nested:  # loss tags or leaves captured as constants
          self._scan_nested(body, path + (i,), name)

  def _walk_scan(self, eqn, scan, path, in_views, live_outs, value_outs):
    """Into a scan body: a leaf in ``xs`` is seen as ``leaf[i]`` at step i,
    one closed over (``consts``) as the whole leaf at every step; a leaf
    passed as the initial carry is a use with a reason. ``live_outs`` and
    ``value_outs``: the scan's outputs that reach the losses' inputs and the
    loss value (a use in the body that reaches only the value, such as a
    penalty accumulated in the carry, is a penalty's)."""
    is_live = any(live_outs)
    inner = {}
    body = scan.body.jaxpr
    for k, (bv, iv) in enumerate(zip(body.invars, in_views)):
      if iv is None:
        continue
      if scan.num_consts <= k < scan.num_consts + scan.num_carry:
        if is_live:
          self.uses.append(patterns.Use(iv.leaf, path[:-1], path[-1], k, iv, "scan",
                                "carried through a scan as its initial state"))
        continue
      marker = (patterns.SCAN_CONST if k < scan.num_consts
                else patterns.SCAN_SLICE)
      inner[bv] = patterns.View(iv.leaf, iv.chain + ((marker, {"length": scan.length}),))
    if is_live:
      self.walk(body, path, inner, _body_outputs(scan, live_outs, True),
                _body_outputs(scan, value_outs, False))
    else:
      self._scan_nested(body, path, "scan")

  def _scan_nested(self, jaxpr, path, name):
    for eqn in jaxpr.eqns:
      if eqn.primitive is losses_lib.LOSS_TAG_PRIMITIVE:
        raise ValueError(f"a loss helper is called inside control flow "
                         f"'{name}'; call it at the top level of loss_fn.")
      for body in jint.sub_jaxprs(eqn):
        self._scan_nested(body, path, name)


def _body_outputs(scan, scan_outs, to_losses) -> list:
  """The scan body's outputs (carry, then per-step outputs, as the scan's)
  that reach what the scan's ``scan_outs`` reach: a carry is live when the
  scan returns it live or the body's live outputs read it at the next
  step (a fixed point over the carry)."""
  body, outs = scan.body.jaxpr, [bool(o) for o in scan_outs]
  carry_in = body.invars[scan.num_consts:scan.num_consts + scan.num_carry]
  while True:
    live = _liveness(body, outs, to_losses)[1]
    new = [o or (k < scan.num_carry and carry_in[k] in live)
           for k, o in enumerate(outs)]
    if new == outs:
      return outs
    outs = new


def _shifted_view(eqn, in_views) -> bool:
  """``view + c``, ``c + view`` or ``view - c`` with ``c`` a scalar literal."""
  a, b = eqn.invars
  va, vb = in_views
  if va is not None and vb is None:
    return jint.is_literal(b) and np.ndim(b.val) == 0
  if vb is not None and va is None and eqn.primitive.name == "add":
    return jint.is_literal(a) and np.ndim(a.val) == 0
  return False


def _check_not_masked(params) -> None:
  """``optax.masked`` / ``optax.multi_transform`` hand a transform only its
  own leaves (the others ``optax.MaskedNode``): ``loss_fn`` cannot run."""
  masked_node = getattr(optax, "MaskedNode", None)
  is_masked = lambda x: masked_node is not None and isinstance(x, masked_node)
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_masked)[0]
  masked = [jax.tree_util.keystr(k) for k, v in flat if is_masked(v)]
  if masked:
    raise ValueError(
        f"params has {len(masked)} masked leaves ({', '.join(masked[:3])}"
        f"{', ...' if len(masked) > 3 else ''}): optax.masked and "
        "optax.multi_transform give a transform only its own parameters, but "
        "the curvature needs loss_fn(params, batch) on the whole model. "
        "Give it all the parameters, or write loss_fn(trained, batch) taking "
        "the other parameters from batch (as when fine-tuning adapters with "
        "the base frozen) and give those their own optimizer and gradient.")


def trace_loss(loss_fn: Callable, params, batch, has_aux: bool = False,
               axis_name=None) -> TracedLoss:
  """Traces ``loss_fn(params, batch)`` (never runs it) and matches layers.
  ``axis_name`` (a name or a tuple of names): the data axes of the
  ``pmap`` / ``shard_map`` the loss runs under, bound while tracing outside
  them (a ``BatchNorm(axis_name=...)`` averages over them)."""
  _check_not_masked(params)
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

  names = (() if axis_name is None else (axis_name,) if isinstance(axis_name, str)
           else tuple(axis_name))
  try:
    closed = jint.make_closed_jaxpr(flat_fn, param_leaves, batch_leaves,
                                    axis_names=names)
  except (TypeError, ValueError, NameError) as e:
    shapes = jax.tree_util.tree_map(lambda x: tuple(np.shape(x)), batch)
    message = (f"tracing loss_fn(params, batch) failed for a batch of shapes "
               f"{shapes}: {e}")
    if isinstance(e, NameError) and "axis name" in str(e):
      message += ("\nloss_fn averages over a device axis (e.g. BatchNorm(axis_name="
                  "...)): pass that axis_name= to the optimizer (and to "
                  "kfe.describe_layers / kfe.find_layers), as under pmap or "
                  "shard_map.")
    try:
      error = type(e)(message)
    except Exception:   # a JAX error type whose constructor takes no message
      error = ValueError(message)
    raise error from e

  walker = _Walker()
  n = len(param_leaves)
  views = {v: patterns.View(i, ()) for i, v in enumerate(closed.jaxpr.invars[:n])}
  walker.walk(closed.jaxpr, (), views, [False] * len(closed.jaxpr.outvars),
              [i == 0 for i in range(len(closed.jaxpr.outvars))])
  if not walker.loss_sites:
    raise ValueError(
        "loss_fn registers no loss: compute its loss with kfe.softmax_cross_entropy, "
        "kfe.sigmoid_cross_entropy or kfe.squared_error so that the curvature "
        "knows the model's predictive distribution.")
  shapes = tuple(tuple(np.shape(x)) for x in param_leaves)
  layers, reasons = matching.match_layers(walker.uses, walker.jaxprs, shapes,
                                          param_paths, n,
                                          frozenset(walker.penalty_leaves))
  layers, free = batch_free.resolve(closed, layers, walker.jaxprs, n)
  reasons = {**reasons, **free}
  return TracedLoss(closed, param_treedef, param_paths, shapes, batch_treedef,
                    store["out_treedef"], layers, tuple(walker.loss_sites),
                    reasons, walker.jaxprs, tuple(sorted(walker.penalty_leaves)),
                    scales_lib.checked_scales(closed, len(walker.loss_sites)))

