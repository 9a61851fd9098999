r"""Layers whose output does not depend on the batch: learned position tables.

A GPT-style position embedding ``nn.Embed(T, D)(jnp.arange(T))``, T5's and
Swin's relative position biases (a table gathered at constant buckets), a
dense layer on a constant grid: the layer runs once, on constants, and its
output ``y`` is broadcast over the examples where it meets the batch
(``x + y``). The gradient at ``y`` is then the *sum* over the examples, and
``g gᵀ`` of that sum is not the Fisher's ``Σ_n g_n g_nᵀ``: the statistics
must be read per example, after the broadcast. Such a layer is the same
function as the layer applied to its constants broadcast over the batch
first, and gets exactly that layer's statistics:

* its gradient is probed at each ``add`` that meets the batch (a
  ``frontier``, whose leading axis is the examples' and repeats ``y``), and
  mapped back, example by example, through the view chain between ``y``
  and that ``add`` (transposes, reshapes, slices, broadcasts over heads,
  additions of other constants): ``g_n[j] = Σ_{e: idx(e)=j} ∂L/∂out[n, e]``,
  summed over the uses (T5's bias computed once and added in every layer)
  and over the steps of a scan that closes over ``y`` (the same in a
  scanned stack);
* its inputs are the constants repeated for every example.

The layer then reads as ``[N, ...]`` (``inputs_shape``, ``outputs_shape``),
its tokens are example-major, and every method (K-FAC, TKFAC, TENGraD, the
two-level coarse level, weight sharing) treats it as the per-example layer.
Where that does not hold, the layer gets no block and a reason: its output
reaches the batch through another operation (a product, a nonlinearity:
Swin V2's ``16·sigmoid`` of its position MLP), or it is a conv, a
scale-and-shift, a tied or stacked kernel, or inside a scan. A batch-free
layer output already repeated over its leading axis (Perceiver latents
broadcast before the layer, an RNN's first step from a zero state; checked
at random parameters, one compiled evaluation per program) has its
per-example gradients there and is left as it is (the check runs outside
the caller's transformations, collectives as over one device), and so is
one where that check still cannot run, and every one in a batch of one
example (the sum over it is the example's).

Example:
  >>> pos = nn.Embed(T, D)(jnp.arange(T))      # [T, D], no batch axis
  >>> h = tok + pos                            # probed here, [N, T, D]
"""

from __future__ import annotations

import dataclasses
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from kfac_jax_ext import _jax_internals as jint
from kfac_jax_ext import patterns

_BROADCAST = object()    # chain entry: numpy broadcasting to params["shape"]
_REMAPPED = ("dense", "embedding")


def dependent_vars(jaxprs: dict, n_params: int) -> dict:
  """``{path: set of vars}``: the variables of each jaxpr the tracing
  walked (calls and scan bodies; path ``()`` the loss's, whose inputs after
  the ``n_params`` parameter leaves are the batch's) that depend on the
  batch. A scan's carry depends on it if its initial value or the body's
  carry output does (a fixed point); other control flow's outputs if any
  operand does."""
  out: dict = {}
  top = jaxprs[()]
  _walk(top, (), [k >= n_params for k in range(len(top.invars))], out)
  return out


def _walk(jaxpr, path, dep_in, out) -> list:
  dep = {v for v, d in zip(jaxpr.invars, dep_in) if d}
  for i, eqn in enumerate(jaxpr.eqns):
    ins = [not jint.is_literal(v) and v in dep for v in eqn.invars]
    scan = jint.scan_parts(eqn)
    if jint.call_kind(eqn) is not None:
      outs = _walk(jint.call_body(eqn)[0], path + (i,), ins, out)
    elif scan is not None:
      c, n = scan.num_consts, scan.num_carry
      carry = ins[c:c + n]
      while True:
        outs = _walk(scan.body.jaxpr, path + (i,), ins[:c] + carry + ins[c + n:], out)
        new = [a or b for a, b in zip(carry, outs[:n])]
        if new == carry:
          break
        carry = new
    else:
      outs = [any(ins)] * len(eqn.outvars)
    dep.update(v for v, d in zip(eqn.outvars, outs) if d)
  out[path] = dep
  return [not jint.is_literal(v) and v in dep for v in jaxpr.outvars]


def _replay(shape, chain) -> np.ndarray:
  """Where each element of ``y`` (shape ``shape``) lands after ``chain``."""
  x = np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
  with jax.ensure_compile_time_eval():
    for prim, params in chain:
      if prim is _BROADCAST:
        x = np.broadcast_to(x, params["shape"])
      elif prim.name not in patterns.ELEMENTWISE_VIEW:
        x = np.asarray(prim.bind(x, **params))
  return x


def _frontiers(jaxprs, deps, site):
  """Follows the probed output at ``site`` along every use to where it
  meets the batch. Returns ``[(frontier site, chain)]`` (one per use: T5's
  bias computed once and added in every layer) or a reason."""
  path, i = site
  shape = jaxprs[path].eqns[i].outvars[0].aval.shape
  found = []

  def follow(path, var, chain):   # a reason, or None with ``found`` extended
    jaxpr = jaxprs[path]
    users = [(k, e) for k, e in enumerate(jaxpr.eqns)
             if any(v is var for v in e.invars)]
    if any(v is var for v in jaxpr.outvars):
      parent = jaxprs[path[:-1]].eqns[path[-1]] if path else None
      if parent is None or jint.call_kind(parent) is None:
        return "it leaves a scan body or is returned by loss_fn"
      out = parent.outvars[[k for k, v in enumerate(jaxpr.outvars) if v is var][0]]
      why = follow(path[:-1], out, chain)    # out of a call body
      if why:
        return why
    for k, eqn in users:
      why = use(path, k, eqn, var, chain)
      if why:
        return why
    return None

  def use(path, k, eqn, var, chain):
    operand = [j for j, v in enumerate(eqn.invars) if v is var]
    name = eqn.primitive.name
    scan = jint.scan_parts(eqn)
    if len(operand) != 1:
      return f"it is used twice by '{name}'"
    if jint.call_kind(eqn) is not None:     # into a call
      return follow(path + (k,), jint.call_body(eqn)[0].invars[operand[0]], chain)
    if (scan is not None and operand[0] < scan.num_consts
        and path + (k,) in jaxprs):        # closed over by a scan: each step
      return follow(path + (k,), scan.body.jaxpr.invars[operand[0]], chain)
    out = eqn.outvars[0]
    adds = name == "add" or (name == "sub" and operand == [0])
    if not adds and not (name in patterns.STRUCTURAL_VIEW and operand == [0]):
      return f"it reaches the batch through '{name}'"
    chain = chain + ((_BROADCAST, {"shape": tuple(out.aval.shape)}) if adds
                     else (eqn.primitive, dict(eqn.params)),)
    if out not in deps.get(path, ()):
      return follow(path, out, chain)
    if not adds:
      return f"it reaches the batch through '{name}'"
    idx = _replay(shape, chain)
    if idx.ndim == 0 or not np.all(idx == idx[:1]):
      return ("where it meets the batch it is not repeated over the leading "
              "(example) axis")
    found.append(((path, k), chain))
    return None

  why = follow(path, jaxprs[path].eqns[i].outvars[0], ())
  return why or (found if found else "it never meets the batch")


_CACHE: list = []   # (the jaxpr's text, input shapes, constants; sites; values)


def _values_at(closed, sites):
  """The probed outputs' values at ``sites`` at random inputs: one compiled
  evaluation of the jaxpr (XLA keeps only what they need), cached by the
  program (``init``, ``update`` and ``describe_layers`` trace the same);
  evaluated outside the caller's transformations with collectives as over
  one device (``_jax_internals.outside_traces``, ``one_device``: under
  ``shard_map`` too); None where it still cannot run."""
  key = (str(closed.jaxpr), tuple(closed.in_avals),
         tuple(const_key(c) for c in closed.consts), tuple(sites))
  for cached, values in _CACHE:
    if cached == key:
      return values

  def run(jaxpr, consts, args, path, found):
    env = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for k, eqn in enumerate(jaxpr.eqns):
      invals = [jint.read_atom(env, v) for v in eqn.invars]
      sub = path + (k,)
      if jint.call_kind(eqn) is not None and any(s[0][:len(sub)] == sub for s in sites):
        body, body_consts = jint.call_body(eqn)
        outs = run(body, body_consts, invals, sub, found)
      else:
        outs = jint.bind_equation(eqn, invals)
      if (path, k) in sites:
        found[(path, k)] = outs[0]
      env.update(zip(eqn.outvars, outs))
    return [jint.read_atom(env, v) for v in jaxpr.outvars]

  inputs = random_inputs(closed)

  def evaluate(args):
    found = {}
    run(closed.jaxpr, closed.consts, args, (), found)
    return found

  def compute():   # outside the caller's traces, collectives as on one device
    with jax.ensure_compile_time_eval(), jint.one_device():
      return {k: np.asarray(v) for k, v in jax.jit(evaluate)(inputs).items()}

  try:
    values = jint.outside_traces(compute)
  except Exception:   # pylint: disable=broad-except  (e.g. an unbound axis name)
    values = None
  _CACHE[:] = ([(key, values)] + _CACHE)[:8]
  return values


def const_key(c):
  """A constant's value as a cache key (an abstract one: its identity):
  a jaxpr's text does not show its constants' values."""
  try:
    x = np.asarray(c)
  except Exception:   # pylint: disable=broad-except  (a tracer)
    return id(c)
  return x.shape, str(x.dtype), hashlib.sha1(x.tobytes()).hexdigest()


def _repeated(value) -> bool:
  """Whether ``value`` repeats one slice along its leading axis."""
  if value is None or value.ndim == 0 or value.shape[0] < 2:
    return False
  scale = float(np.max(np.abs(value))) or 1.0
  return bool(np.allclose(value, value[:1], rtol=1e-5, atol=1e-6 * scale))


def random_inputs(closed, integers: int = 0):
  """Pseudo-random inputs for ``closed``: floats ``N(0, 1/fan_in)`` (fan-in:
  all but the last axis), so that no tanh or softmax saturates (a saturated
  softmax has exactly zero derivatives and would hide a dependence) and
  nothing overflows; integers and booleans ``integers`` (0: ids stay in
  range of any table). Drawn by numpy: no program to compile per shape
  (``jax.random`` took 70 ms per leaf)."""
  rng = np.random.default_rng(1)
  def one(aval):
    if jnp.issubdtype(aval.dtype, jnp.floating):
      fan_in = max(int(np.prod(aval.shape[:-1])), 1) if aval.ndim > 1 else 1
      return (rng.standard_normal(aval.shape) / np.sqrt(fan_in)).astype(aval.dtype)
    if jnp.issubdtype(aval.dtype, np.integer) or aval.dtype == np.bool_:
      return np.full(aval.shape, integers, aval.dtype)
    with jax.ensure_compile_time_eval():   # e.g. PRNG keys
      return jnp.zeros(aval.shape, aval.dtype)
  return [one(a) for a in closed.in_avals]


def _broadcast_site(jaxprs, site) -> bool:
  """Whether the probed equation broadcasts its operand along the leading
  axis (a new axis, or one of size 1 repeated): repeated by construction."""
  eqn = jaxprs[site[0]].eqns[site[1]]
  out = eqn.outvars[0].aval.shape
  if eqn.primitive.name == "tile":
    return bool(out) and eqn.invars[0].aval.shape[0] == 1 and out[0] > 1
  if eqn.primitive.name != "broadcast_in_dim" or not out or out[0] < 2:
    return False
  dims = tuple(eqn.params["broadcast_dimensions"])
  return 0 not in dims or eqn.invars[0].aval.shape[dims.index(0)] == 1


def _check_sites(layers, jaxprs, deps) -> tuple:
  """The batch-free probe sites outside scans (for ``_repeated``)."""
  return tuple(sorted({site for layer in layers if not layer.steps
                       for site in layer.probes
                       if jaxprs[site[0]].eqns[site[1]].outvars[0]
                       not in deps.get(site[0], ())}))


def resolve(closed, layers, jaxprs, n_params):
  """``(layers, {leaf: reason})``: the layers with every batch-free one
  read per example (see the module docstring) or taken out with a
  reason."""
  # with one example the sum over the batch is that example's own
  one = {a.shape[0] for a in closed.in_avals[n_params:] if a.ndim} == {1}
  deps = dependent_vars(jaxprs, n_params)
  kept, reasons, values = [], {}, None
  for layer in layers:
    free = [site for site in layer.probes
            if jaxprs[site[0]].eqns[site[1]].outvars[0] not in deps.get(site[0], ())]
    if not free:
      kept.append(layer)
      continue
    found = ("the layer is inside a scan body" if layer.steps else
             "the layer is a tied or stacked kernel" if layer.uses else
             "only dense and embedding layers are read per example there"
             if layer.kind not in _REMAPPED else None)
    if found is None:
      found = (_frontiers(jaxprs, deps, layer.probes[0]) if len(layer.probes) == 1
               else "the layer is probed at several sites")
    if isinstance(found, str) and one:
      kept.append(layer)
      continue
    if isinstance(found, str) and all(_broadcast_site(jaxprs, s) for s in free):
      kept.append(layer)     # probed at a broadcast over the examples
      continue               # (``broadcast_inputs``: a cls token, latents)
    if isinstance(found, str) and not layer.steps:
      if values is None:
        values = _values_at(closed, _check_sites(layers, jaxprs, deps)) or {}
      if all(s not in values or _repeated(values[s]) for s in free):
        kept.append(layer)     # repeated over the examples already (or the
        continue               # check could not run: as before)
    if isinstance(found, str):
      why = (f"its layer's output does not depend on the batch and {found}: "
             "its per-example gradients cannot be read")
      reasons.update({leaf: why for leaf in layer.leaves})
      continue
    n = found[0][1][-1][1]["shape"][0]
    kept.append(dataclasses.replace(
        layer, probes=tuple(site for site, _ in found),
        example_map=(tuple(chain for _, chain in found), layer.inputs_shape,
                     layer.outputs_shape),
        inputs_shape=(n,) + layer.inputs_shape,
        outputs_shape=(n,) + layer.outputs_shape,
        x_axes=tuple(a + 1 for a in layer.x_axes),
        out_axes=tuple(a + 1 for a in layer.out_axes)))
  return tuple(kept), reasons


def example_gradients(layer, grads):
  """The layer's per-example output gradients ``[N, *outputs]`` from its
  probes' gradients ``grads`` (one per probe, at the frontiers, ``[N, ...]``;
  inside a scan that closes over the layer's output ``[steps, N, ...]``):
  summed over the uses and the steps. A layer read at its own output: its
  one probe's gradient, unchanged."""
  if not layer.example_map:
    return grads[0]
  chains, _, own = layer.example_map
  total = 0
  for g, chain in zip(grads, chains):
    idx = _replay(own, chain)   # repeated over its leading axis (_frontiers)
    n, size = idx.shape[0], int(np.prod(own))
    flat = g.reshape((-1, n, idx[0].size)).sum(0)   # the steps of a scan
    total = total + jnp.zeros((n, size), g.dtype).at[:, idx[0].reshape(-1)].add(flat)
  return total.reshape((n,) + tuple(own))


def per_example(layer, x, grads):
  """``(x, g)``: the layer's captured input repeated for every example and
  its output gradients per example (``example_gradients``); unchanged for
  a layer read at its own output (``g = grads[0]``)."""
  if not layer.example_map:
    return x, grads[0]
  return jnp.broadcast_to(x, layer.inputs_shape), example_gradients(layer, grads)
