"""Kernels concatenated before one matmul (flax's ``nn.OptimizedLSTMCell``).

``y = x @ concatenate([W_1, ..., W_k], axis=1) (+ concatenate([b_1, ..., b_k]))``
computes k dense layers at once: column block j of ``y`` is ``x W_j + b_j``.
Each ``W_j`` (with its ``b_j``) is matched as its own dense layer: the input
``x`` and, as ``g``, the columns of the output gradient that ``W_j`` makes
(``LayerMatch.out_slice``). Its Kronecker block ``A ⊗ G_j`` is then the one
the unfused computation gets (``nn.LSTMCell``: one ``Dense`` per gate).

Only this exact form matches: every operand of the ``concatenate`` a whole
2-D leaf used nowhere else (casts allowed; inside a scan body, all closed
over or all scanned over), the concatenated kernel's one consumer a
``dot_general`` contracting its rows with no batch dimensions; a bias is
folded when the product's one consumer adds a reshaped concatenation of 1-D
leaves of the same widths. Anything else is left to the other patterns
(which report the ``concatenate`` as the reason).

Example:
  >>> cell = nn.OptimizedLSTMCell(64)          # 8 leaves, 8 dense layers
  >>> kfe.describe_layers(loss_fn, params, batch)
"""

from __future__ import annotations

import numpy as np

from kfac_jax_ext import patterns
from kfac_jax_ext.patterns import LayerMatch


def _context(use, shapes):
  """``(marker, steps, shape)`` of a use whose view is the whole leaf (casts
  allowed), inside a scan body or not; None otherwise."""
  chain, shape, marker, steps = use.view.chain, shapes[use.leaf], None, 0
  in_scan = patterns.scan_view(chain)
  if in_scan is not None:
    marker, steps, chain = in_scan
    shape = shape[1:] if marker is patterns.SCAN_SLICE else shape
  if any(p.name not in patterns.ELEMENTWISE_VIEW for p, _ in chain):
    return None
  return marker, steps, tuple(shape)


def _parts(path, i, eqn, at_operand, single, shapes, ndim):
  """The leaves concatenated by equation i along its last axis, with their
  common scan context; None unless every operand is a whole ``ndim``-D
  leaf used only here."""
  if eqn.params["dimension"] != ndim - 1:
    return None
  uses = [at_operand.get((path, i, j)) for j in range(len(eqn.invars))]
  if any(u is None or single.get(u.leaf) is not u for u in uses):
    return None
  contexts = [_context(u, shapes) for u in uses]
  if any(c is None or len(c[2]) != ndim for c in contexts) or len(
      {c[:2] for c in contexts}) != 1:
    return None
  return [u.leaf for u in uses], contexts[0][:2], [c[2][-1] for c in contexts]


def _only_consumer(jaxpr, var):
  """``(eqn index, operand)`` of the one equation that reads ``var``, past
  dtype casts (``promote_dtype``); None if there is not exactly one."""
  while True:
    found = [(k, j) for k, e in enumerate(jaxpr.eqns)
             for j, v in enumerate(e.invars) if v is var]
    if len(found) != 1 or var in jaxpr.outvars:
      return None
    eqn = jaxpr.eqns[found[0][0]]
    if eqn.primitive.name not in patterns.ELEMENTWISE_VIEW:
      return found[0]
    var = eqn.outvars[0]


def _producer(jaxpr, producers, var):
  """The equation that makes ``var``, before any dtype casts (or None)."""
  k = producers.get(var)
  while k is not None and jaxpr.eqns[k].primitive.name in patterns.ELEMENTWISE_VIEW:
    k = producers.get(jaxpr.eqns[k].invars[0])
  return k


def _biases(path, jaxpr, producers, product, widths, context, at_operand,
            single, shapes):
  """The bias leaves added to ``product`` as a reshaped concatenation of
  the same widths, or None."""
  consumer = _only_consumer(jaxpr, product)
  if consumer is None or jaxpr.eqns[consumer[0]].primitive.name != "add":
    return None
  other = jaxpr.eqns[consumer[0]].invars[1 - consumer[1]]
  k = _producer(jaxpr, producers, other)
  if k is None or jaxpr.eqns[k].primitive.name != "reshape":
    return None
  shape = jaxpr.eqns[k].outvars[0].aval.shape
  if any(d != 1 for d in shape[:-1]) or shape[-1] != sum(widths):
    return None
  k = _producer(jaxpr, producers, jaxpr.eqns[k].invars[0])
  if k is None or jaxpr.eqns[k].primitive.name != "concatenate":
    return None
  found = _parts(path, k, jaxpr.eqns[k], at_operand, single, shapes, 1)
  if found is None or found[1] != context or found[2] != list(widths):
    return None
  return found[0]


def match_concatenated(jaxprs, at_operand, single, shapes, module_name):
  """``[(site, LayerMatch)]``: a dense layer per concatenated kernel."""
  found = []
  for path, jaxpr in jaxprs.items():
    producers = {v: k for k, e in enumerate(jaxpr.eqns) for v in e.outvars}
    for i, eqn in enumerate(jaxpr.eqns):
      if eqn.primitive.name != "concatenate":
        continue
      parts = _parts(path, i, eqn, at_operand, single, shapes, 2)
      consumer = parts and _only_consumer(jaxpr, eqn.outvars[0])
      if not consumer:
        continue
      leaves, context, widths = parts
      dot = jaxpr.eqns[consumer[0]]
      if dot.primitive.name != "dot_general" or consumer[1] != 1:
        continue
      (lc, rc), (lb, rb) = dot.params["dimension_numbers"]
      if lb or rb or tuple(rc) != (0,) or (path, consumer[0], 0) in at_operand:
        continue
      x, out = dot.invars[0], dot.outvars[0]
      biases = _biases(path, jaxpr, producers, out, widths, context,
                       at_operand, single, shapes) or [None] * len(leaves)
      marker, steps = context
      stacked = marker is patterns.SCAN_SLICE
      starts = np.cumsum([0] + widths[:-1])
      for leaf, bias, start, width in zip(leaves, biases, starts, widths):
        found.append(((path, consumer[0]), LayerMatch(
            kind="dense", name=module_name(leaf), kernel=leaf, bias=bias,
            captures=(((path, consumer[0]), 0),), probes=((path, consumer[0]),),
            kernel_perm=(0, 1), n_in=1, x_axes=(lc[0] % len(x.aval.shape),),
            out_axes=(len(out.aval.shape) - 1,), inputs_shape=tuple(x.aval.shape),
            outputs_shape=tuple(out.aval.shape[:-1]) + (width,),
            d_in=shapes[leaf][-2], d_out=width, steps=steps, stacked=stacked,
            groups=shapes[leaf][0] if stacked else 1,
            out_slice=(int(start), int(start) + width))))
  return found
