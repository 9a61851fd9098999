"""Multi-device curvature: global-batch statistics and split inverse work.

Under ``jax.pmap`` or ``jax.shard_map`` over a data-parallel axis (the
``axis_name`` option), each device holds ``M_d = M / D`` examples of the
global batch. The curvature must be that of the *global* batch:

* statistics that are means over examples (K-FAC's ``A``, ``G``; TKFAC's
  ``P``, ``Q``, ``δ``; diagonal blocks; the coarse matrices and Fisher-vector
  products of two-level K-FAC) are averaged: with equal shards,
  ``mean_d (Σ_{n∈d} x_n / M_d) = Σ_n x_n / M``;
* the squared summed gradient of the diagonal fallback is not linear: its
  gradient is summed over devices before squaring;
* TENGraD's per-example factors are gathered (``all_gather``), so every device
  builds the Gram of the same global examples;
* sampled targets are drawn with one key per example derived from its
  *global* index (``example_offset``), so they do not depend on the sharding:
  pass the same ``key`` on every device.

Inverse work is split: ``assign_owners`` gives every block one owner device
(greedy longest-processing-time on the block's cost, deterministic), and
``on_owners`` runs each block's refresh only on its owner (``lax.cond`` on
``axis_index``; the other devices produce zeros) and shares the results with
one ``psum``. The per-device refresh cost falls roughly as ``1/D`` when the
blocks balance.

With ``jax.jit`` over a ``Mesh`` (``NamedSharding``; no ``axis_name``), the
arrays are global and none of this is needed: XLA inserts the reductions.

Example:
  >>> tx = kfe.kfac(loss_fn, 0.1, axis_name="batch")
  >>> def step(params, state, batch, key):          # pmapped over "batch"
  ...   grads = jax.lax.pmean(jax.grad(loss_fn)(params, batch), "batch")
  ...   updates, state = tx.update(grads, state, params, batch=batch, key=key)
  ...   return optax.apply_updates(params, updates), state
  >>> # params and state: one copy per device (jnp.stack([x] * n) per leaf)
  >>> step = jax.pmap(step, axis_name="batch", in_axes=(0, 0, 0, None))
"""

from __future__ import annotations

import heapq
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from kfac_jax_ext import _jax_internals as jint


def check_axis_name(axis_name, name: str):
  if axis_name is not None and not isinstance(axis_name, (str, tuple)):
    raise ValueError(f"{name}: axis_name must be a str (the pmap/shard_map axis) "
                     f"or None, got {axis_name!r}.")


def num_devices(axis_name) -> int:
  """Size of the axis (1 without one); static."""
  if axis_name is None:
    return 1
  try:
    return int(jax.lax.axis_size(axis_name))
  except NameError as e:
    raise ValueError(
        f"axis_name={axis_name!r} is not bound: call update inside jax.pmap or "
        f"jax.shard_map with axis_name={axis_name!r} (or pass axis_name=None "
        "under jax.jit with a Mesh).") from e


def per_device(tree, axis_name):
  """Marks ``tree`` as varying over the axis (``lax.pcast``) where it is not.

  Inside ``shard_map`` the gradient with respect to a replicated (invariant)
  input is summed over the axis automatically; per-device statistics need
  per-device gradients, so the statistics pass differentiates with respect
  to varying copies. Identity without an axis.
  """
  if axis_name is None:
    return tree
  num_devices(axis_name)     # a clear error for an unbound axis
  names = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)

  def cast(x):
    varying = jint.varying_axes(x)
    missing = tuple(n for n in names if n not in varying)
    return jax.lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree_util.tree_map(cast, tree)


def mean(tree, axis_name):
  """Mean over the devices of the axis (identity without one)."""
  if axis_name is None:
    return tree
  return jax.lax.pmean(tree, axis_name)


def total(tree, axis_name):
  """Sum over the devices of the axis (identity without one)."""
  if axis_name is None:
    return tree
  return jax.lax.psum(tree, axis_name)


def gather_examples(x, axis_name):
  """Concatenates the leading (example) axis over devices, in device order."""
  if axis_name is None:
    return x
  return jint.all_gather_replicated(x, axis_name)


def example_offset(num_local: int, axis_name):
  """Global index of this device's first example (0 without an axis)."""
  if axis_name is None:
    return 0
  num_devices(axis_name)     # a clear error for an unbound axis
  return jax.lax.axis_index(axis_name) * num_local


def assign_owners(costs: Sequence[float], num: int) -> tuple[int, ...]:
  """Owner device of each block: the most expensive block first, each to the
  least loaded device (ties: the lowest index). Deterministic and static.

  Example:
    >>> assign_owners([8, 1, 1, 6], 2)
    (0, 1, 1, 1)
  """
  loads = [(0.0, d) for d in range(num)]
  owners = [0] * len(costs)
  for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
    load, d = heapq.heappop(loads)
    owners[i] = d
    heapq.heappush(loads, (load + float(costs[i]), d))
  return tuple(owners)


def on_owners(fns: Sequence[Callable[[], object]], costs: Sequence[float],
              axis_name):
  """Runs ``fns[i]()`` on block i's owner only and shares the results.

  Without an axis every function runs here. With one, device ``d`` runs the
  functions it owns (``assign_owners``) and zeros stand in for the others;
  one ``psum`` over the axis gives every device every result. Boolean
  results are shared as integers. The functions must be pure and their
  results finite-or-flagged (a NaN on the owner reaches every device, where
  the caller's ``ok`` flag rejects it).

  Returns:
    The list of the functions' results.
  """
  if axis_name is None:
    return [fn() for fn in fns]
  owners = assign_owners(costs, num_devices(axis_name))
  me = jax.lax.axis_index(axis_name)
  shapes = [jax.eval_shape(fn) for fn in fns]
  results = []
  for fn, owner, shape in zip(fns, owners, shapes):
    zeros = lambda shape=shape: jax.tree_util.tree_map(jint.zeros_like_struct,
                                                       shape)
    out = jax.lax.cond(me == owner, fn, zeros)
    results.append(jax.tree_util.tree_map(
        lambda x: x.astype(jnp.int32) if x.dtype == jnp.bool_ else x, out))
  shared = jax.lax.psum(results, axis_name)
  return [jax.tree_util.tree_map(
      lambda x, s: x.astype(jnp.bool_) if s.dtype == jnp.bool_ else x, out,
      shape) for out, shape in zip(shared, shapes)]
