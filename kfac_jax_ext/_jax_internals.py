"""Every use of JAX-internal API in the library, behind one module.

JAX changes its internals between releases (kfac-jax 0.0.8 crashes on jax >= 0.9.2
because ``Primitive.get_bind_params`` changed its return type). Everything the
library needs from ``jax.extend`` / ``jax._src`` lives here, so a JAX upgrade is
a one-file change. The rest of the package only sees the small functions below.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading

from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

import jax
from jax.extend import core as jex_core
from jax.interpreters import ad, batching, mlir

Var = jex_core.Var
Literal = jex_core.Literal
Jaxpr = jex_core.Jaxpr
ClosedJaxpr = jex_core.ClosedJaxpr
JaxprEqn = jex_core.JaxprEqn

# Call-like primitives whose body is traced code that discovery looks through.
# name -> (parameter holding the body, kind of transparency)
_JIT_NAMES = ("jit", "pjit", "closed_call", "core_call")
_REMAT_NAMES = ("remat2", "checkpoint", "remat")
_CUSTOM_NAMES = ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr")


def call_kind(eqn: JaxprEqn) -> str | None:
  """Classifies a call-like equation: "jit", "remat", "custom" or None."""
  name = eqn.primitive.name
  if name in _JIT_NAMES:
    return "jit"
  if name in _REMAT_NAMES:
    return "remat"
  if name in _CUSTOM_NAMES:
    return "custom"
  return None


def call_body(eqn: JaxprEqn) -> tuple[Jaxpr, Sequence[Any]]:
  """The (open) body jaxpr of a call-like equation and its constants."""
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    if key in eqn.params:
      body = eqn.params[key]
      if isinstance(body, ClosedJaxpr):
        return body.jaxpr, body.consts
      return body, ()
  raise NotImplementedError(f"no body found for call primitive {eqn.primitive}")


def remat_options(eqn: JaxprEqn) -> dict[str, Any]:
  """Keyword arguments of ``jax.checkpoint`` that reproduce a remat equation."""
  return dict(prevent_cse=eqn.params.get("prevent_cse", True),
              policy=eqn.params.get("policy", None))


def sub_jaxprs(eqn: JaxprEqn) -> list[Jaxpr]:
  """All jaxprs nested in an equation's parameters (control flow, calls)."""
  found = []
  for value in eqn.params.values():
    values = value if isinstance(value, (tuple, list)) else (value,)
    for v in values:
      if isinstance(v, ClosedJaxpr):
        found.append(v.jaxpr)
      elif isinstance(v, Jaxpr):
        found.append(v)
  return found


_SIZE_ONE = threading.local()   # .on: collectives as over axes of size one
_IDENTITY_COLLECTIVES = ("pvary", "pcast", "psum", "psum_invariant", "pmax",
                         "pmin", "ppermute", "pbroadcast", "all_to_all")


@contextlib.contextmanager
def one_device():
  """Within it, ``bind_equation`` applies a collective as over device axes
  of size one (the identity; ``axis_index`` 0; ``all_gather`` a new axis of
  one), as the jaxpr was traced (``make_closed_jaxpr``): a program traced
  inside ``shard_map`` or ``pmap`` then evaluates outside them, on one
  device's batch."""
  before = getattr(_SIZE_ONE, "on", False)
  _SIZE_ONE.on = True
  try:
    yield
  finally:
    _SIZE_ONE.on = before


def outside_traces(fn: Callable[[], Any]) -> Any:
  """``fn()`` run eagerly outside every transformation the caller is in
  (``jit``, ``pmap``, ``shard_map``, ``grad``), on concrete values: in a
  thread of its own (JAX keeps its trace state per thread). Inside
  ``shard_map`` an eager ``jax.vjp`` otherwise types its values as varying
  over the manual axes and rejects the concrete operands it meets. The
  caller's 64-bit mode (a thread-local ``jax.enable_x64`` context) carries
  over."""
  x64 = bool(jax.config.jax_enable_x64)
  enable = getattr(jax, "enable_x64", None)

  def run():
    if enable is None:
      return fn()
    with enable(x64):
      return fn()

  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    return pool.submit(run).result()


def _collective_on_one_device(eqn: JaxprEqn, invals: Sequence[Any]):
  """The outputs of a collective over axes of size one, or None for any
  other equation."""
  name = eqn.primitive.name
  if call_kind(eqn) is not None and _has_collective(eqn):   # evaluate its body
    body, consts = call_body(eqn)
    env = dict(zip(body.constvars, consts))
    env.update(zip(body.invars, invals))
    for inner in body.eqns:
      env.update(zip(inner.outvars, bind_equation(
          inner, [read_atom(env, v) for v in inner.invars])))
    return [read_atom(env, v) for v in body.outvars]
  if name in _IDENTITY_COLLECTIVES:
    return list(invals)
  if name == "axis_index":
    return [jax.numpy.zeros((), eqn.outvars[0].aval.dtype)]
  if name == "all_gather":
    x = invals[0]
    return [x if eqn.params.get("tiled") else jax.numpy.expand_dims(
        x, eqn.params["all_gather_dimension"])]
  return None


def _has_collective(eqn: JaxprEqn) -> bool:
  """Whether a collective over device axes is bound in the equation's
  nested jaxprs (at any depth)."""
  for jaxpr in sub_jaxprs(eqn):
    for inner in jaxpr.eqns:
      if inner.primitive.name in _IDENTITY_COLLECTIVES + (
          "axis_index", "all_gather") or _has_collective(inner):
        return True
  return False


def bind_equation(eqn: JaxprEqn, invals: Sequence[Any]) -> list[Any]:
  """Re-applies an equation to new inputs; returns its outputs as a list.

  ``shard_map``'s invariant->varying cast (``pvary``, inserted where a
  replicated value meets a sharded one) is skipped for inputs that already
  vary over its axes: the statistics pass re-evaluates the traced loss with
  per-device (varying) parameters. Within ``one_device()`` collectives act
  as over axes of size one.
  """
  if getattr(_SIZE_ONE, "on", False):
    outs = _collective_on_one_device(eqn, invals)
    if outs is not None:
      return outs
  if eqn.primitive.name in ("pvary", "pcast") and "axes" in eqn.params:
    axes = eqn.params["axes"]
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    if all(set(axes) <= varying_axes(x) for x in invals):
      return list(invals) if eqn.primitive.multiple_results else [invals[0]]
  if len(invals) > 1 and not sub_jaxprs(eqn):
    invals = _same_varying_axes(invals)
  bind_params = eqn.primitive.get_bind_params(eqn.params)
  if isinstance(bind_params, tuple):  # jax < 0.9.2: (subfuns, params)
    subfuns, bind_params = bind_params
    out = eqn.primitive.bind(*subfuns, *invals, **bind_params)
  else:
    out = eqn.primitive.bind(*invals, **bind_params)
  return list(out) if eqn.primitive.multiple_results else [out]


def _same_varying_axes(invals: Sequence[Any]) -> list[Any]:
  """The operands cast to vary over the same manual axes: re-evaluated with
  per-device (varying) parameters, an equation that met only invariant
  values when traced (a table gathered at constant indices, a parameter
  plus a constant array, a constant grid times a parameter) would fail
  ``shard_map``'s type check. Python scalars (weakly typed) are left."""
  arrays = [is_tracer(x) or isinstance(x, (np.ndarray, jax.Array))
            for x in invals]
  axes = [varying_axes(x) if is_tracer(x) else frozenset() for x in invals]
  union = frozenset().union(*axes)
  if not union or all(a == union for a, arr in zip(axes, arrays) if arr):
    return list(invals)
  return [jax.lax.pcast(x, tuple(sorted(union - a)), to="varying")
          if arr and a != union else x for x, a, arr in zip(invals, axes, arrays)]


def read_atom(env: dict, atom: Any) -> Any:
  return atom.val if isinstance(atom, Literal) else env[atom]


def is_literal(atom: Any) -> bool:
  return isinstance(atom, Literal)


def make_closed_jaxpr(fn: Callable[..., Any], *args: Any,
                      axis_names: Sequence[str] = ()) -> ClosedJaxpr:
  """``fn`` traced; ``axis_names`` bound as mapped axes (of size 1), as
  ``pmap`` / ``shard_map`` would bind them, so that collectives over them
  (``BatchNorm(axis_name=...)``) trace outside those transforms."""
  return jax.make_jaxpr(fn, axis_env=[(name, 1) for name in axis_names] or None)(*args)


def make_identity_primitive(name: str) -> Callable[..., tuple]:
  """A multiple-results identity primitive that survives jit, grad, vmap, remat.

  Used to tag values (the loss helpers' predictions and targets) so that a jaxpr
  walk can find them; it lowers to nothing and its derivative is the identity.

  Returns:
    ``bind(*arrays, **static_params) -> tuple(arrays)``.
  """
  prim = jex_core.Primitive(name)
  prim.multiple_results = True
  prim.def_impl(lambda *xs, **_: tuple(xs))
  prim.def_abstract_eval(lambda *avals, **_: tuple(avals))

  def jvp(primals, tangents, **params):
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    return prim.bind(*primals, **params), tangents

  ad.primitive_jvps[prim] = jvp
  batching.primitive_batchers[prim] = (
      lambda args, dims, **params: (prim.bind(*args, **params), dims))
  mlir.register_lowering(
      prim, mlir.lower_fun(lambda *xs, **_: tuple(xs), multiple_results=True))

  def bind(*xs, **params):
    return tuple(prim.bind(*xs, **params))

  bind.primitive = prim
  return bind


def varying_axes(x) -> frozenset:
  """Manual axes over which ``x`` varies inside ``shard_map`` (its type's
  ``mat.varying`` in jax 0.10, ``vma`` in earlier releases); empty outside."""
  aval = jax.typeof(x)
  mat = getattr(aval, "mat", None)
  if mat is not None and hasattr(mat, "varying"):
    return frozenset(mat.varying)
  return frozenset(getattr(aval, "vma", frozenset()))


def zeros_like_struct(struct) -> jax.Array:
  """Zeros of a ``jax.eval_shape`` result, varying over the same manual axes
  (``lax.cond`` inside ``shard_map`` needs branches of equal types)."""
  x = jax.numpy.zeros(struct.shape, struct.dtype)
  mat = getattr(struct, "manual_axis_type", None)
  varying = tuple(sorted(mat.varying)) if mat is not None else tuple(
      sorted(getattr(struct, "vma", ())))
  return jax.lax.pcast(x, varying, to="varying") if varying else x


def all_gather_replicated(x, axis_name) -> jax.Array:
  """``all_gather`` along axis 0 (tiled) typed as invariant over the axis
  (its value is the same on every device; jax >= 0.10 types it varying by
  default, which would make the state varying inside ``shard_map``)."""
  try:
    return jax.lax.all_gather(x, axis_name, axis=0, tiled=True, to="invarying")
  except TypeError:   # jax without the ``to`` argument
    return jax.lax.all_gather(x, axis_name, axis=0, tiled=True)


def has_effects(eqn: JaxprEqn) -> bool:
  """Whether an equation has side effects (kept alive without live outputs)."""
  return bool(getattr(eqn, "effects", ()))


class ScanParts(NamedTuple):
  """What a ``scan`` equation needs to be re-run with an instrumented body."""
  body: ClosedJaxpr
  num_consts: int
  num_carry: int
  length: int
  reverse: bool
  unroll: Any


def scan_parts(eqn: JaxprEqn) -> ScanParts | None:
  """The parts of a ``lax.scan`` equation (operands: consts, carry, xs), or
  None for any other equation."""
  if eqn.primitive.name != "scan":
    return None
  p = eqn.params
  return ScanParts(p["jaxpr"], p["num_consts"], p["num_carry"], p["length"],
                   p["reverse"], p.get("unroll", 1))


def is_tracer(x) -> bool:
  """True for a value being traced (inside jit, grad, vmap, shard_map...)."""
  return isinstance(x, jax.core.Tracer)


def tracing_now() -> bool:
  """True while JAX is tracing (inside jit, eval_shape, make_jaxpr...)."""
  from jax._src import core as src_core   # no public equivalent
  return not src_core.trace_state_clean()
