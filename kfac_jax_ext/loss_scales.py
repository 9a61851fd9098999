"""The factor each registered loss carries into ``loss_fn``'s value.

A loss helper returns its mean loss ``L_k``; ``loss_fn`` may return
``c·L_k`` (``2 * kfe.softmax_cross_entropy(...)``, ``0.5 * (L_1 + L_2)``)
plus terms that do not involve the helpers (a penalty). The Fisher of
``c·L_k`` is ``c`` times the helper's, so the curvature must carry ``c``:
the statistics multiply the helper's per-example weights by it (the
weights enter every Fisher form linearly).

``c_k = ∂ value / ∂ L_k`` is read off the jaxpr by propagating, from each
helper's value tag, a linear coefficient through the operations a scalar
loss is usually combined with (sums, differences, negation, products and
quotients by constants, casts, reshapes, ``jit`` bodies). A coefficient
that passes through anything else (a product of two losses, a factor
computed from the batch, a ``log``) is unknown (``None``): the curvature
then keeps ``c = 1`` and ``trace_loss`` warns. A loss averaged over
devices inside ``loss_fn`` (``lax.pmean``) keeps ``c = 1`` silently: the
statistics are per device and averaged over the axis anyway
(``COLLECTIVE``).

Example:
  >>> loss_fn = lambda p, b: 0.5 * kfe.softmax_cross_entropy(b["x"] @ p, b["y"])
  >>> tracing.trace_loss(loss_fn, params, batch).loss_scales
  (0.5,)
"""

from __future__ import annotations

import warnings

import jax.numpy as jnp
import numpy as np

from kfac_jax_ext import _jax_internals as jint
from kfac_jax_ext import losses as losses_lib

_PASS = ("convert_element_type", "copy", "reshape", "squeeze", "broadcast_in_dim")
UNKNOWN = None
COLLECTIVE = "collective"     # reduced over a device axis: the factor stays 1


def _literal(v):
  return float(np.asarray(v.val)) if jint.is_literal(v) and np.ndim(v.val) == 0 else None


def _combine(a: dict, b: dict, sign: float) -> dict:
  out = dict(a)
  for k, c in b.items():
    old = out.get(k, 0.0)
    out[k] = (UNKNOWN if UNKNOWN in (c, old) else
              COLLECTIVE if COLLECTIVE in (c, old) else old + sign * c)
  return out


def _scaled(coefs: dict, factor) -> dict:
  return {k: c if c in (UNKNOWN, COLLECTIVE) else UNKNOWN if factor is None
          else c * factor for k, c in coefs.items()}


class _Propagation:
  """Forward pass over the jaxpr: ``var -> {loss index: coefficient}``."""

  def __init__(self):
    self.count = 0     # value tags seen, in trace order (= the loss order)

  def run(self, jaxpr, in_coefs):
    coefs = {v: c for v, c in zip(jaxpr.invars, in_coefs) if c}
    get = lambda v: {} if jint.is_literal(v) else coefs.get(v, {})
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      ins = [get(v) for v in eqn.invars]
      if eqn.primitive is losses_lib.LOSS_VALUE_PRIMITIVE:
        coefs[eqn.outvars[0]] = {self.count: 1.0}
        self.count += 1
        continue
      if jint.call_kind(eqn) is not None:
        body, _ = jint.call_body(eqn)
        for v, c in zip(eqn.outvars, self.run(body, ins)):
          if c:
            coefs[v] = c
        continue
      if not any(ins):
        for body in jint.sub_jaxprs(eqn):   # tags inside control flow count
          self.run(body, [{}] * len(body.invars))
        continue
      if name in ("add", "sub", "add_any"):
        out = _combine(ins[0], ins[1], -1.0 if name == "sub" else 1.0)
      elif name == "neg":
        out = _scaled(ins[0], -1.0)
      elif name == "mul" and not (ins[0] and ins[1]):
        j = 0 if ins[0] else 1
        out = _scaled(ins[j], _literal(eqn.invars[1 - j]))
      elif name == "div" and not ins[1]:
        d = _literal(eqn.invars[1])
        out = _scaled(ins[0], None if not d else 1.0 / d)
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


def loss_scales(closed_jaxpr, num_losses: int) -> tuple:
  """``c_k`` per registered loss (in trace order) in the first output of
  ``closed_jaxpr``: a float, or None where it cannot be read off."""
  prop = _Propagation()
  out = prop.run(closed_jaxpr.jaxpr, [{}] * len(closed_jaxpr.jaxpr.invars))[0]
  if prop.count != num_losses:   # a value tag the pass did not reach
    return (UNKNOWN,) * num_losses
  return tuple(out.get(k, 0.0) for k in range(num_losses))


def checked_scales(closed_jaxpr, num_losses: int) -> tuple:
  """The factor on each registered loss (``loss_scales``): a negative one is
  refused (no Fisher), an unknown or zero one warned about and taken as 1."""
  out = []
  for k, c in enumerate(loss_scales(closed_jaxpr, num_losses)):
    if c == COLLECTIVE:
      c = 1.0
    if c is not None and c < 0:
      raise ValueError(
          f"loss_fn multiplies the value of its loss helper #{k + 1} by {c:g} < 0: "
          "a negative multiple of a loss has no Fisher; minimise a loss whose "
          "helper terms carry non-negative factors.")
    if c is None or c == 0:
      why = ("is combined with other values in a way whose factor cannot be read "
             "off (a product with another loss, a factor computed from the batch, "
             "a nonlinear function)" if c is None else "does not reach its loss")
      warnings.warn(
          f"loss_fn: the value of loss helper #{k + 1} {why}; its curvature is "
          "taken at factor 1. Put a factor in the helper's weights= instead.",
          stacklevel=4)
      c = 1.0
    out.append(float(c))
  return tuple(out)


def registered_losses(traced, captured) -> list:
  """One ``RegisteredLoss`` per helper call from the captured tags, its
  weights times the factor ``loss_fn`` puts on the helper's value
  (``traced.loss_scales``: the Fisher of ``c·L`` is ``c`` times ``L``'s;
  ``traced`` a ``tracing.TracedLoss``, ``captured`` the interpreter's)."""
  kinds = [traced.jaxprs[p].eqns[i].params["kind"] for p, i in traced.loss_sites]
  scales = traced.loss_scales or (1.0,) * len(kinds)
  out = []
  for k, (kind, scale) in enumerate(zip(kinds, scales)):
    predictions, targets, weights = captured[("loss", k)]
    if scale != 1.0:
      weights = weights * jnp.asarray(scale, weights.dtype)
    out.append(losses_lib.RegisteredLoss(kind, predictions, targets, weights))
  return out
