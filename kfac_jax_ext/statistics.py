"""The one statistics pass: loss, gradient and per-layer (a, g) from one forward.

The traced jaxpr of ``loss_fn`` is re-evaluated with every layer's input ``a``
captured and a zero *probe* added to every pre-activation ``s``. One ``jax.vjp``
of ``(params, probes) -> (loss, fisher_objective)`` shares the forward pass
between two backward passes: the true loss gives the parameter gradient, the
Fisher objective ``sum_n sqrt(w_n) l_n(ŷ_n)`` (sampled or data targets) gives
``g = d objective / d probe``: the per-token output gradients of the summed loss.

Canonical per-layer statistics (tokens = all non-feature positions, K of them):
``a``: ``[K, d_in]`` layer inputs (conv: im2col patches, feature order
(C, kh, kw); embedding: the ids ``[K]``); ``g``: ``[K, d_out]`` (grouped
conv: ``[G, K, d_in]`` and ``[G, K, d_out]``, one block per group, and so
for the k slices of a stacked kernel or the L steps of a scanned one; tied
kernel: one ``(a, g)`` per use). With M the number of loss examples, the
K-FAC block of the mean loss is ``A ⊗ G``, ``A = āᵀā / K``, ``G = gᵀg / M``.
A scan is re-run with its body instrumented (``_evaluate_scan``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from kfac_jax_ext import _jax_internals as jint
from kfac_jax_ext import batch_free
from kfac_jax_ext import distributed
from kfac_jax_ext import loss_scales as scales_lib
from kfac_jax_ext import schedule
from kfac_jax_ext import state as state_lib
from kfac_jax_ext import stats_subsample
from kfac_jax_ext import tracing
from kfac_jax_ext.curvature_batch import CurvatureBatch


def evaluate_jaxpr(jaxpr, consts, args, path, probes, actions, active):
  env = dict(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  captured = {}
  for i, eqn in enumerate(jaxpr.eqns):
    invals = [jint.read_atom(env, v) for v in eqn.invars]
    acts = actions.get((path, i), ())
    for act in acts:
      if act[0] == "capture":
        captured[act[1]] = invals[act[2]]
    sub = path + (i,)
    kind = jint.call_kind(eqn)
    scan = jint.scan_parts(eqn) if sub in active else None
    if scan is not None:
      outs, sub_captured = _evaluate_scan(eqn, scan, invals, sub, probes,
                                          actions, active)
      captured.update(sub_captured)
    elif kind is not None and sub in active:
      body, body_consts = jint.call_body(eqn)
      sub_probes = {k: v for k, v in probes.items() if k[0][:len(sub)] == sub}

      def run(vals, prb, body=body, body_consts=body_consts, sub=sub):
        return evaluate_jaxpr(body, body_consts, vals, sub, prb, actions, active)

      if kind == "remat":
        run = jax.checkpoint(run, **jint.remat_options(eqn))
      outs, sub_captured = run(invals, sub_probes)
      outs = list(outs)
      captured.update(sub_captured)
    else:
      outs = jint.bind_equation(eqn, invals)
    for act in acts:
      if act[0] == "probe":
        outs[0] = outs[0] + probes[(path, i)]
      elif act[0] == "loss":
        captured[act[1]] = tuple(outs)
    for v, x in zip(eqn.outvars, outs):
      env[v] = x
  return [jint.read_atom(env, v) for v in jaxpr.outvars], captured


def _evaluate_scan(eqn, scan, invals, path, probes, actions, active):
  """A ``scan`` re-run with its body instrumented: the probes of sites in
  the body are scanned over (leading step axis), and what the body captures
  comes out stacked over the steps."""
  nc, ncar = scan.num_consts, scan.num_carry
  consts, init, xs = invals[:nc], invals[nc:nc + ncar], invals[nc + ncar:]
  sub_probes = {k: v for k, v in probes.items() if k[0][:len(path)] == path}

  def step(carry, slices):
    x_slices, prb = slices
    outs, captured = evaluate_jaxpr(scan.body.jaxpr, scan.body.consts,
                               list(consts) + list(carry) + list(x_slices), path,
                               prb, actions, active)
    return outs[:ncar], (outs[ncar:], captured)

  carry, (ys, captured) = jax.lax.scan(step, list(init), (list(xs), sub_probes),
                                       length=scan.length, reverse=scan.reverse,
                                       unroll=scan.unroll)
  return list(carry) + list(ys), captured


def instrumentation(traced: tracing.TracedLoss):
  actions = scales_lib.loss_actions(traced)
  for li, layer in enumerate(traced.layers):
    for ci, (site, operand) in enumerate(layer.captures):
      actions.setdefault(site, []).append(("capture", ("a", li, ci), operand))
    for site in layer.probes:   # one probe per site (concatenated kernels share it)
      if ("probe",) not in actions.setdefault(site, []):
        actions[site].append(("probe",))
  return actions, _active(actions)


def _active(actions) -> set:
  """The paths of the call bodies the interpreter must enter."""
  return {site[0][:n] for site in actions for n in range(1, len(site[0]) + 1)}


def _steps_shape(traced, path) -> tuple:
  """The lengths of the scans enclosing a site at ``path`` (outermost
  first): its probe is scanned over them."""
  lead = []
  for k in range(len(path)):
    scan = jint.scan_parts(traced.jaxprs[path[:k]].eqns[path[k]])
    if scan is not None:
      lead.append(scan.length)
  return tuple(lead)


def probe_zeros(traced):
  probes = {}
  for layer in traced.layers:
    for path, i in layer.probes:
      aval = traced.jaxprs[path].eqns[i].outvars[0].aval
      shape = _steps_shape(traced, path) + tuple(aval.shape)
      probes[(path, i)] = jnp.zeros(shape, aval.dtype)
  return probes


def _to_end(x, axes):
  """``x`` with ``axes`` moved last (in that order), flattened to
  ``[tokens, prod(sizes of axes)]``."""
  rest = [d for d in range(x.ndim) if d not in axes]
  size = int(np.prod([x.shape[d] for d in axes]))
  return jnp.transpose(x, rest + list(axes)).reshape(-1, size)


def _out_columns(layer, g):
  """``g [..., features]`` cut to the columns the layer's kernel makes (a
  kernel concatenated with others before the matmul, ``concatenated.py``)."""
  return g[..., slice(*layer.out_slice)] if layer.out_slice else g


def _grouped(x, groups):   # [K, G·d] -> [G, K, d]: each feature group's tokens
  return x.reshape(x.shape[0], groups, -1).transpose(1, 0, 2)


def _canonical_inputs(layer: tracing.LayerMatch, x):
  """The layer input as ``[tokens, d_in]`` (conv: im2col patches, feature
  order (C, kh, kw); grouped conv or dense: ``[G, tokens, d_in]``; embedding: the
  ids ``[tokens]``)."""
  if layer.kind == "embedding":   # the index vectors' first entry: the row
    return x[..., 0].reshape(-1)
  if layer.kind == "conv2d":
    strides, padding, lhs_dil, rhs_dil, dn, spatial = layer.conv
    x = jax.lax.conv_general_dilated_patches(
        x, spatial, strides, padding, lhs_dilation=lhs_dil, rhs_dilation=rhs_dil,
        dimension_numbers=dn)
    x = _to_end(x, (dn.out_spec[1],))
  else:   # dense: a grouped one's x_axes lead with its batch axes
    x = _to_end(x, layer.x_axes)
  return _grouped(x, layer.groups) if layer.groups > 1 else x


def _scan_statistics(layer, traced, captured, probe_grads, li):
  """``(a, g)`` of a layer inside a scan body, from its inputs and probe
  gradients stacked over the steps (of every enclosing scan, outermost
  first): per slice of a stacked kernel (``[L, K, d]``; a grouped conv: per
  slice and group, ``[L·G, K, d]``), with the steps that share a block as
  extra tokens, example-major (``[K·S, d]``; grouped: ``[G, K·S, d]``).
  An embedding's ``a`` is its ids (``[K·S]``)."""
  conv_groups = layer.slice_groups if layer.stacked else layer.groups
  one_step = dataclasses.replace(layer, steps=0, stacked=False, groups=conv_groups)
  x, dy = captured[("a", li, 0)], probe_grads[layer.probes[0]]
  # the enclosing scans' step axes lead (outermost first): flatten them
  x = x.reshape((-1,) + x.shape[x.ndim - len(layer.inputs_shape):])
  dy = dy.reshape((x.shape[0],) + dy.shape[dy.ndim - len(layer.outputs_shape):])
  a = jax.vmap(lambda x: _canonical_inputs(one_step, x))(x)
  if layer.kind == "embedding":                 # ids [S, K] -> [S, K, 1]
    a = a[..., None]
  g = _out_columns(layer, jax.vmap(lambda x: _to_end(x, layer.out_axes))(dy))
  if conv_groups > 1:                           # [S, G, K, d] per step
    g = jax.vmap(lambda x: _grouped(x, conv_groups))(g)
  else:                                         # [S, 1, K, d]
    a, g = a[:, None], g[:, None]
  slices = layer.groups // conv_groups if layer.stacked else 1

  def merge(x):   # [slices·G, K·(shared steps), d]: shared steps as tokens
    x = x.reshape((slices, -1) + x.shape[1:])   # [slices, shared, G, K, d]
    x = x.transpose(0, 2, 3, 1, 4)             # [slices, G, K, shared, d]
    return x.reshape(slices * x.shape[1], -1, x.shape[-1])

  a, g = merge(a), merge(g)
  if layer.kind == "embedding":
    a = a[..., 0]
  return (a, g) if layer.groups > 1 else (a[0], g[0])


def _layer_statistics(layer, traced, captured, probe_grads, li):
  if layer.steps and layer.kind != "scale_and_shift":
    return _scan_statistics(layer, traced, captured, probe_grads, li)
  if layer.uses:   # tied: per use, in its own orientation; stacked: per slice
    per_use = tuple(_layer_statistics(use, traced, {("a", li, 0): captured[
        ("a", li, ci)]}, probe_grads, li) for ci, use in enumerate(layer.uses))
    return tuple(jnp.stack(x) for x in zip(*per_use)) if layer.stacked else per_use
  if layer.kind in ("dense", "conv2d", "embedding"):   # batch_free: per example
    x, g = batch_free.per_example(layer, captured[("a", li, 0)],
                                  [probe_grads[site] for site in layer.probes])
    g = _out_columns(layer, _to_end(g, layer.out_axes))
    return (_canonical_inputs(layer, x), _grouped(g, layer.groups) if layer.groups > 1 else g)
  return _scale_shift_statistics(layer, traced, captured, probe_grads, li)


def _scale_shift_statistics(layer, traced, captured, probe_grads, li):
  """Per-token gradients ``(u_scale, u_shift)`` ``[K, size]`` of a
  scale-and-shift layer; inside a scan, ``[L, K, size]`` per step (leaves
  scanned over) or the steps as extra tokens (leaves shared by the steps)."""
  leaf = layer.scale if layer.scale is not None else layer.shift
  size = int(np.prod(traced.param_shapes[leaf][int(layer.stacked):]))
  lead = (traced.param_shapes[leaf][0],) if layer.stacked else ()

  out_ndim, features_at = len(layer.outputs_shape), list(layer.out_axes)
  features = [n if d in features_at else 1 for d, n in enumerate(layer.outputs_shape)]

  def tokens(u):   # the feature axes last (a channels-first layer's too)
    n, rest = u.ndim - out_ndim, [d for d in range(out_ndim) if d not in features_at]
    u = jnp.transpose(u, list(range(n)) + [n + d for d in rest + features_at])
    if layer.steps and not layer.stacked:    # [L, ...] -> steps as tokens
      return u.reshape(-1, size)
    return u.reshape(lead + (-1, size))

  u_scale = u_shift = None
  k = 0
  if layer.scale is not None:
    g = probe_grads[layer.probes[0]]
    x = jnp.broadcast_to(captured[("a", li, 0)], g.shape)
    if len(layer.captures) > 1:   # the scale's per-feature multiplier (BatchNorm)
      r = captured[("a", li, 1)]    # in a scan: [L, features], stacked per step
      n_scans = len(_steps_shape(traced, layer.captures[1][0][0]))
      if np.prod(r.shape[n_scans:]) == np.prod(features):   # onto the features
        r = r.reshape(r.shape[:n_scans] + (1,) * (g.ndim - n_scans - out_ndim)
                      + tuple(features))
      else:   # broadcast as it is (e.g. one value)
        r = r.reshape(r.shape[:n_scans] + (1,) * (g.ndim - r.ndim)
                      + r.shape[n_scans:])
      x = x * jnp.broadcast_to(r, g.shape)
    u_scale = tokens(x * g)
    k = 1
  if layer.shift is not None:
    u_shift = tokens(probe_grads[layer.probes[k]])
  return (u_scale, u_shift)


def evaluate_losses(traced: tracing.TracedLoss, p_leaves, b_leaves):
  """``loss_fn`` re-evaluated from its jaxpr at ``p_leaves``: returns
  ``(outputs, registered)`` with ``outputs`` the flat outputs of ``loss_fn``
  (the loss first) and ``registered`` one ``RegisteredLoss`` per loss helper
  call, in trace order. Differentiable in ``p_leaves``."""
  actions = scales_lib.loss_actions(traced)
  closed = traced.closed_jaxpr
  outs, captured = evaluate_jaxpr(closed.jaxpr, closed.consts,
                             list(p_leaves) + list(b_leaves), (), {}, actions,
                             _active(actions))
  return outs, scales_lib.registered_losses(traced, captured)


def statistics_pass(traced: tracing.TracedLoss, params, batch, key,
                    fisher: str, due=None, axis_name=None):
  """Runs the fused pass. Returns ``(outputs, grads, CurvatureBatch)``.

  ``outputs`` is what ``loss_fn`` returned; ``grads`` the gradient of its loss
  with respect to ``params`` (same tree). Given a boolean ``due``, the
  statistics-only work (the sampled-target backward, im2col) runs under
  ``lax.cond(due, ...)`` (zeros otherwise) while the forward and the gradient
  stay outside it: XLA CPU runs convolutions inside conditional branches
  several times slower (``jax.grad`` of the Fashion-MNIST CNN, batch 128:
  86 ms outside, 585 ms inside; ``python -m benchmarks.cpu_facts``).
  With ``axis_name`` (inside pmap/shard_map) sampled targets are drawn by
  global example index (``distributed.example_offset``); the statistics
  stay per device (the transforms reduce them).
  """
  p_leaves = jax.tree_util.tree_leaves(params)
  b_leaves = jax.tree_util.tree_leaves(batch)
  closed = traced.closed_jaxpr
  actions, active = instrumentation(traced)
  if fisher == "sampled" and key is None:
    raise ValueError("fisher='sampled' draws targets from the model: pass a PRNG "
                     "key (update(..., key=key)) on statistics steps.")

  def forward(p, probes):
    outs, captured = evaluate_jaxpr(closed.jaxpr, closed.consts, list(p) + b_leaves,
                               (), probes, actions, active)
    registered = scales_lib.registered_losses(traced, captured)
    m0 = registered[0].num_examples
    objective = 0.0
    for k, reg in enumerate(registered):
      sub_key = None if key is None else jax.random.fold_in(key, k)
      rows = reg.predictions.shape[0] if reg.predictions.ndim > 1 else 1
      objective = objective + reg.fisher_objective(
          sub_key, fisher, scale=float(np.sqrt(m0 / reg.num_examples)),
          offset=distributed.example_offset(rows, axis_name))
    a_captures = {k: v for k, v in captured.items() if k[0] == "a"}
    return (outs[0], objective), (outs, a_captures)

  # Per-device gradients under shard_map (see distributed.per_device).
  p_leaves, probes = distributed.per_device((p_leaves, probe_zeros(traced)),
                                            axis_name)
  (loss, objective), vjp_fn, (outs, captured) = jax.vjp(
      forward, p_leaves, probes, has_aux=True)
  grads, _ = vjp_fn((jnp.ones_like(loss), jnp.zeros_like(objective)))
  grads = jax.tree_util.tree_unflatten(traced.param_treedef, grads)
  outputs = jax.tree_util.tree_unflatten(traced.out_treedef, outs)

  def curvature(_):
    obj_grads, probe_grads = vjp_fn((jnp.zeros_like(loss),
                                     jnp.ones_like(objective)))
    layers = tuple(_layer_statistics(layer, traced, captured, probe_grads, li)
                   for li, layer in enumerate(traced.layers))
    fallback = tuple(obj_grads[i] for i in sorted(traced.leaf_reasons))
    return CurvatureBatch(layers, fallback,
                          jnp.asarray(traced.num_examples, jnp.float32), fisher)

  if due is None:
    return outputs, grads, curvature(None)
  shapes = jax.eval_shape(curvature, None)
  zeros = lambda _: jax.tree_util.tree_map(jint.zeros_like_struct, shapes)
  return outputs, grads, jax.lax.cond(due, curvature, zeros, None)


def value_and_grad(loss_fn: Callable, *, has_aux: bool = False,
                   fisher: str = "sampled", axis_name=None,
                   stats_batch: int | None = None) -> Callable:
  """Loss, gradient and curvature statistics from one forward pass.

  Args:
    loss_fn: ``loss_fn(params, batch)`` calling one of the loss helpers.
    has_aux: ``loss_fn`` returns ``(loss, aux)``.
    fisher: ``"sampled"`` (true Fisher) or ``"empirical"``; must match the
      preconditioner's own ``fisher`` option (``update`` raises otherwise:
      the ``CurvatureBatch`` records it).
    axis_name: inside ``pmap``/``shard_map``, the data axis (the
      preconditioner's ``axis_name``): sampled targets are then drawn by global
      example index, so they do not depend on the sharding. The gradient is
      this device's; average it over the axis as usual.
    stats_batch: the optimizer's: statistics of the first n examples only
      (``kfac_jax_ext.stats_subsample``); value and gradient of all.

  Returns:
    ``fn(params, batch, key=None, *, opt_state=None, due=None) -> (value,
    grads, curvature)`` where ``value`` is what ``loss_fn`` returns. Given
    ``opt_state``, the statistics are computed only when a preconditioner in
    it is due for a statistics step (otherwise ``curvature`` holds zeros and
    is ignored), inside ``lax.cond``. Given ``due`` (a static ``kfe.Due``,
    see ``kfac_jax_ext.schedule``) no conditional is compiled: with
    ``due.statistics`` the statistics are computed, without it this is
    ``jax.value_and_grad(loss_fn)`` and ``curvature`` is None. Pass the same
    ``due`` to ``update``.

  Example:
    >>> vg = kfe.value_and_grad(loss_fn)
    >>> loss, grads, curv = vg(params, batch, key, opt_state=state)
    >>> updates, state = tx.update(grads, state, params, batch=batch, key=key,
    ...                            curvature=curv)
  """
  if fisher not in ("sampled", "empirical"):
    raise ValueError(f"value_and_grad: fisher must be 'sampled' or 'empirical' "
                     f"(the preconditioner's own fisher option), got {fisher!r}.")
  stats_subsample.check_examples(stats_batch, "stats_batch", "value_and_grad")

  def fn(params, batch, key=None, *, opt_state=None, due=None):
    schedule.check_due(due, "value_and_grad")
    if due is not None and not due.statistics:
      params = distributed.per_device(params, axis_name)
      value, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(params, batch)
      return value, grads, None
    traced = tracing.trace_loss(loss_fn, params, batch, has_aux)
    cond_due = None
    if due is None and opt_state is not None:
      cond_due = state_lib.curvature_due(opt_state)
    s_batch, s_traced = stats_subsample.statistics_inputs(
        loss_fn, params, batch, traced, stats_batch, has_aux)
    if s_traced is traced:
      return statistics_pass(traced, params, batch, key, fisher, due=cond_due,
                             axis_name=axis_name)
    value, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(
        distributed.per_device(params, axis_name), batch)
    return value, grads, statistics_pass(s_traced, params, s_batch, key, fisher,
                                         due=cond_due, axis_name=axis_name)[2]

  return fn
