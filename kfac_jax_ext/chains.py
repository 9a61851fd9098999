"""Chains of dense layers for the block-tridiagonal K-FAC inverse.

Layer ``j`` follows layer ``i`` when ``j``'s input is computed from ``i``'s
pre-activation (its probed output, bias included) by elementwise operations
only: activations (``tanh``, ``logistic``, ``relu`` as ``max`` with a
constant or a ``custom_jvp`` call, ...), scaling or shifting by constants,
dtype casts. Each equation on the way must have that one value as its only
non-constant input and keep its shape, so the tokens of ``i``'s output are
the tokens of ``j``'s input, one for one (the cross-layer statistics
``E[ā_i ā_jᵀ]`` and ``E[g_i g_jᵀ]`` pair them up). Only plain dense layers
(one ``d_in × d_out`` block, one input and one output feature axis, outside
any scan) take part; a layer feeding several layers links to the first.

Example:
  >>> chains = find_chains(tracing.trace_loss(loss_fn, params, batch))
  >>> # ((0, 1, 2, 3),): layers 0 → 1 → 2 → 3 of traced.layers
"""

from __future__ import annotations

import numpy as np

from kfac_jax_ext import _jax_internals as jint
from kfac_jax_ext import tracing

ELEMENTWISE = frozenset({
    "tanh", "logistic", "max", "min", "exp", "exp2", "log1p", "expm1",
    "integer_pow", "mul", "add", "sub", "neg", "div", "convert_element_type",
    "abs", "erf", "sqrt", "rsqrt", "pow", "sin", "cos", "square", "sign",
    "copy", "copy_p", "custom_jvp_call", "pjit", "jit"})


def _chainable(layer) -> bool:
  return (layer.kind == "dense" and layer.is_plain and layer.n_in == 1
          and not layer.out_slice
          and len(layer.out_axes) == 1 and len(layer.x_axes) == 1
          and len(layer.captures) == 1 and len(layer.probes) == 1
          and not layer.example_map)   # probed where it meets the batch


def _producers(jaxpr) -> dict:
  return {v: i for i, eqn in enumerate(jaxpr.eqns) for v in eqn.outvars}


def _source(jaxpr, producers, var, stop: dict):
  """Walks back from ``var`` through shape-preserving elementwise equations
  with one non-constant input; returns the layer in ``stop`` (probe eqn
  index → layer) reached first, or None."""
  while True:
    i = producers.get(var)
    if i is None:
      return None
    if i in stop:
      return stop[i]
    eqn = jaxpr.eqns[i]
    if eqn.primitive.name not in ELEMENTWISE or len(eqn.outvars) != 1:
      return None
    inputs = {v for v in eqn.invars if not jint.is_literal(v)}
    if len(inputs) != 1:
      return None
    (source,) = inputs
    if np.shape(source.aval) != np.shape(eqn.outvars[0].aval):
      return None
    var = source


def find_chains(traced: tracing.TracedLoss) -> tuple:
  """Maximal chains (≥ 2 layers) as tuples of indices into ``traced.layers``."""
  layers = traced.layers
  successor = {}
  by_path: dict = {}
  for li, layer in enumerate(layers):
    if _chainable(layer):
      (path, i), = layer.probes
      by_path.setdefault(path, {})[i] = li
  for lj, layer in enumerate(layers):
    if not _chainable(layer):
      continue
    (path, i), operand = layer.captures[0]
    stop = by_path.get(path, {})
    if not stop:
      continue
    jaxpr = traced.jaxprs[path]
    x = jaxpr.eqns[i].invars[operand]
    if jint.is_literal(x):
      continue
    li = _source(jaxpr, _producers(jaxpr), x, stop)
    if li is not None and li != lj and li not in successor:
      successor[li] = lj
  has_predecessor = set(successor.values())
  chains = []
  for start in sorted(successor):
    if start in has_predecessor:
      continue
    chain = [start]
    while chain[-1] in successor:
      chain.append(successor[chain[-1]])
    chains.append(tuple(chain))
  return tuple(chains)
