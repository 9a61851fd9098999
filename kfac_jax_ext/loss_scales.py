"""The factor each registered loss carries into ``loss_fn``'s value.

A loss helper returns its mean loss ``L_k``; ``loss_fn`` may return
``c·L_k`` (``2 * kfe.softmax_cross_entropy(...)``, ``0.5 * (L_1 + L_2)``,
a masked mean ``L · n / Σ mask``) plus terms that do not involve the
helpers (a penalty). The Fisher of ``c·L_k`` is ``c`` times the helper's,
so the curvature must carry ``c``: the statistics multiply the helper's
per-example weights by it (the weights enter every Fisher form linearly).

``c_k = ∂ value / ∂ L_k`` is read off the jaxpr by propagating, from each
helper's value tag, a linear coefficient through the operations a scalar
loss is usually combined with (sums, differences, negation, products and
quotients by scalars that do not depend on the losses, casts, reshapes,
``jit`` bodies). A factor that is a literal is read at trace time (a
float). A factor computed in ``loss_fn`` (``n / jnp.sum(mask)``, a
batch-dependent normaliser) is read at run time: the coefficient is then a
``RuntimeScale``, a sum of monomials ``constant · Π s_j^{±1}`` whose
scalars ``s_j`` the statistics pass captures where the product or quotient
takes them (``loss_actions``); its value is taken without gradient, and
where it is negative or not finite the loss's curvature weight is 0 on that
batch (the Fisher of a negative multiple of a loss is not positive
semi-definite). A coefficient that passes through anything else (a product
of two losses, a ``log``, a factor inside a ``scan``) is unknown
(``None``): the curvature then keeps ``c = 1`` and ``trace_loss`` warns. A
loss averaged over devices inside ``loss_fn`` (``lax.pmean``) keeps
``c = 1`` silently: the statistics are per device and averaged over the
axis anyway (``COLLECTIVE``).

Example:
  >>> loss_fn = lambda p, b: 0.5 * kfe.softmax_cross_entropy(b["x"] @ p, b["y"])
  >>> tracing.trace_loss(loss_fn, params, batch).loss_scales
  (0.5,)
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kfac_jax_ext import _jax_internals as jint
from kfac_jax_ext import losses as losses_lib

_PASS = ("convert_element_type", "copy", "reshape", "squeeze", "broadcast_in_dim")
UNKNOWN = None
COLLECTIVE = "collective"     # reduced over a device axis: the factor stays 1


class Read(NamedTuple):
  """A scalar read at run time: operand ``operand`` of the equation at
  ``site`` (``(path, index)``, as the interpreter numbers them), to the
  power ``power`` (1: a product, -1: a quotient)."""
  site: tuple
  operand: int
  power: int


class RuntimeScale(NamedTuple):
  """A factor computed in ``loss_fn``: ``Σ constant · Π Read`` over
  ``terms``, each ``(constant, (Read, ...))``."""
  terms: tuple


def _literal(v):
  return float(np.asarray(v.val)) if jint.is_literal(v) and np.ndim(v.val) == 0 else None


def _merge(terms) -> tuple:
  """Monomials with the same reads summed; zero ones dropped."""
  out: dict = {}
  for c, reads in terms:
    out[reads] = out.get(reads, 0.0) + c
  return tuple((c, reads) for reads, c in out.items() if c != 0.0)


def _special(c) -> bool:
  return c is UNKNOWN or (isinstance(c, str) and c == COLLECTIVE)


def _combine(a: dict, b: dict, sign: float) -> dict:
  out = dict(a)
  for k, c in b.items():
    old = out.get(k, ())
    out[k] = (UNKNOWN if c is UNKNOWN or old is UNKNOWN else
              COLLECTIVE if _special(c) or _special(old) else
              _merge(old + tuple((sign * x, reads) for x, reads in c)))
  return out


def _scaled(coefs: dict, factor) -> dict:
  """``coefs`` times ``factor``: a float, a ``Read`` or None (unknown)."""
  def one(c):
    if _special(c):
      return c
    if factor is None:
      return UNKNOWN
    if isinstance(factor, Read):
      return tuple((x, tuple(sorted(reads + (factor,)))) for x, reads in c)
    return _merge(tuple((x * factor, reads) for x, reads in c))
  return {k: one(c) for k, c in coefs.items()}


def _factor(eqn, path, i: int, operand: int, power: int):
  """The factor operand ``operand`` of equation ``i`` contributes: a float
  for a scalar literal, a ``Read`` for a scalar variable outside control
  flow (``path`` None inside it), else None."""
  v = eqn.invars[operand]
  lit = _literal(v)
  if lit is not None:
    return lit if power == 1 else None if lit == 0 else 1.0 / lit
  if jint.is_literal(v) or path is None or np.prod(v.aval.shape) != 1:
    return None
  return Read((path, i), operand, power)


class _Propagation:
  """Forward pass over the jaxpr: ``var -> {loss index: coefficient}``."""

  def __init__(self):
    self.count = 0     # value tags seen, in trace order (= the loss order)

  def run(self, jaxpr, in_coefs, path=()):
    """``path``: the jaxpr's path as the interpreter numbers it (None inside
    control flow, where a factor cannot be read at run time)."""
    coefs = {v: c for v, c in zip(jaxpr.invars, in_coefs) if c}
    get = lambda v: {} if jint.is_literal(v) else coefs.get(v, {})
    for i, eqn in enumerate(jaxpr.eqns):
      name = eqn.primitive.name
      ins = [get(v) for v in eqn.invars]
      if eqn.primitive is losses_lib.LOSS_VALUE_PRIMITIVE:
        coefs[eqn.outvars[0]] = {self.count: ((1.0, ()),)}
        self.count += 1
        continue
      if jint.call_kind(eqn) is not None:
        body, _ = jint.call_body(eqn)
        sub = None if path is None else path + (i,)
        for v, c in zip(eqn.outvars, self.run(body, ins, sub)):
          if c:
            coefs[v] = c
        continue
      if not any(ins):
        for body in jint.sub_jaxprs(eqn):   # tags inside control flow count
          self.run(body, [{}] * len(body.invars), None)
        continue
      if name in ("add", "sub", "add_any"):
        out = _combine(ins[0], ins[1], -1.0 if name == "sub" else 1.0)
      elif name == "neg":
        out = _scaled(ins[0], -1.0)
      elif name == "mul" and not (ins[0] and ins[1]):
        j = 0 if ins[0] else 1
        out = _scaled(ins[j], _factor(eqn, path, i, 1 - j, 1))
      elif name == "div" and not ins[1]:
        out = _scaled(ins[0], _factor(eqn, path, i, 1, -1))
      elif name in _PASS and len(ins) >= 1 and ins[0] and np.prod(
          eqn.outvars[0].aval.shape) == 1:
        out = ins[0]
      elif (name.startswith("psum") or name == "pmean") and len(ins) == 1:
        out = {k: UNKNOWN if c is UNKNOWN else COLLECTIVE for k, c in ins[0].items()}
      else:
        out = {}
        for c in ins:
          out = _combine(out, _scaled(c, None), 1.0)
      for v in eqn.outvars:
        coefs[v] = out
    return [get(v) for v in jaxpr.outvars]


def _final(c):
  if _special(c):
    return c
  if all(not reads for _, reads in c):
    return float(sum(x for x, _ in c))
  return RuntimeScale(c)


def loss_scales(closed_jaxpr, num_losses: int) -> tuple:
  """``c_k`` per registered loss (in trace order) in the first output of
  ``closed_jaxpr``: a float, a ``RuntimeScale``, or None where it cannot be
  read off."""
  prop = _Propagation()
  out = prop.run(closed_jaxpr.jaxpr, [{}] * len(closed_jaxpr.jaxpr.invars))[0]
  if prop.count != num_losses:   # a value tag the pass did not reach
    return (UNKNOWN,) * num_losses
  return tuple(_final(out.get(k, ())) for k in range(num_losses))


def checked_scales(closed_jaxpr, num_losses: int) -> tuple:
  """The factor on each registered loss (``loss_scales``): a negative one is
  refused (no Fisher), an unknown or zero one warned about and taken as 1,
  a ``RuntimeScale`` kept (read by ``registered_losses``)."""
  out = []
  for k, c in enumerate(loss_scales(closed_jaxpr, num_losses)):
    if isinstance(c, RuntimeScale):
      out.append(c)
      continue
    if c == COLLECTIVE:
      c = 1.0
    if c is not None and c < 0:
      raise ValueError(
          f"loss_fn multiplies the value of its loss helper #{k + 1} by {c:g} < 0: "
          "a negative multiple of a loss has no Fisher; minimise a loss whose "
          "helper terms carry non-negative factors.")
    if c is None or c == 0:
      why = ("is combined with other values in a way whose factor cannot be read "
             "off (a product with another loss, a nonlinear function, a factor "
             "computed inside control flow)" if c is None else
             "does not reach its loss")
      warnings.warn(
          f"loss_fn: the value of loss helper #{k + 1} {why}; its curvature is "
          "taken at factor 1. Put a factor in the helper's weights= instead.",
          stacklevel=4)
      c = 1.0
    out.append(float(c))
  return tuple(out)


def loss_actions(traced) -> dict:
  """The interpreter's actions (``statistics.evaluate_jaxpr``) that capture
  each loss tag's inputs and the scalars its ``RuntimeScale`` reads:
  ``site -> [("loss", ("loss", k))]`` and ``[("capture", ("scale", site,
  operand), operand)]`` (``traced`` a ``tracing.TracedLoss``)."""
  actions: dict = {}
  for k, site in enumerate(traced.loss_sites):
    actions.setdefault(site, []).append(("loss", ("loss", k)))
  for c in traced.loss_scales:
    for _, reads in (c.terms if isinstance(c, RuntimeScale) else ()):
      for r in reads:
        act = ("capture", ("scale", r.site, r.operand), r.operand)
        if act not in actions.setdefault(r.site, []):
          actions[r.site].append(act)
  return actions


def runtime_value(scale: RuntimeScale, captured, dtype):
  """``scale``'s value from the captured scalars, without gradient; 0 where
  it is negative or not finite (no Fisher: the loss adds no curvature)."""
  total = jnp.zeros([], dtype)
  for constant, reads in scale.terms:
    term = jnp.asarray(constant, dtype)
    for r in reads:
      s = jnp.reshape(captured[("scale", r.site, r.operand)], ()).astype(dtype)
      term = term * s if r.power == 1 else term / s
    total = total + term
  total = jax.lax.stop_gradient(total)
  return jnp.where(jnp.isfinite(total) & (total > 0), total, jnp.zeros_like(total))


def registered_losses(traced, captured) -> list:
  """One ``RegisteredLoss`` per helper call from the captured tags, its
  weights times the factor ``loss_fn`` puts on the helper's value
  (``traced.loss_scales``: the Fisher of ``c·L`` is ``c`` times ``L``'s;
  ``traced`` a ``tracing.TracedLoss``, ``captured`` the interpreter's, with
  the scalars of ``loss_actions``)."""
  kinds = [traced.jaxprs[p].eqns[i].params["kind"] for p, i in traced.loss_sites]
  scales = traced.loss_scales or (1.0,) * len(kinds)
  out = []
  for k, (kind, scale) in enumerate(zip(kinds, scales)):
    predictions, targets, weights = captured[("loss", k)]
    if isinstance(scale, RuntimeScale) or scale != 1.0:
      # bool or integer masks too; float64 when x64 is on
      dtype = jnp.promote_types(weights.dtype, jnp.result_type(float))
      weights = weights.astype(dtype) * (
          runtime_value(scale, captured, dtype) if isinstance(scale, RuntimeScale)
          else jnp.asarray(scale, dtype))
    out.append(losses_lib.RegisteredLoss(kind, predictions, targets, weights))
  return out
