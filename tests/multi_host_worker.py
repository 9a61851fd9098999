"""One process of the multi-host tests (``tests/test_multi_host.py``).

Started twice by the test, with XLA_FLAGS cleared: 4 CPU devices per
process, gloo collectives, ``jax.distributed.initialize`` on a loopback
coordinator. Each method in ``METHODS`` (of ``test_multi_device.METHODS``) trains
``STEPS`` steps on ``test_multi_device._cnn_task`` under ``jit`` over the
global 8-device mesh (each process feeds its half of the batch through
``jax.make_array_from_process_local_data``), and K-FAC also under
``shard_map`` with ``axis_name``. Each process saves its copy of the
updates and the final state. K-FAC's jit run also saves its state after
``STEPS`` steps with orbax (all processes write one checkpoint) and goes on
``STEPS`` more; ``--resume`` restores that checkpoint and continues.

Usage: ``python tests/multi_host_worker.py COORDINATOR PROCESS_ID OUT_DIR
[--train | --resume]``.
"""
import functools
import pathlib
import sys

import jax

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_cpu_collectives_implementation", "gloo")

import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

NUM_PROCESSES = 2
# every method; two-level as its multiplicative combination (exact coarse
# matrix and Fisher-vector products: the most collectives)
METHODS = ("kfac", "tkfac", "tengrad", "two_level_multiplicative")
SHARD_MAPPED = ("kfac",)


def global_array(mesh, spec, full):
  """The global array whose value is ``full``, from this process's rows."""
  sharding = NamedSharding(mesh, spec)
  if spec == P():
    return jax.make_array_from_process_local_data(sharding, np.asarray(full))
  rows = len(full) // jax.process_count()
  start = jax.process_index() * rows
  return jax.make_array_from_process_local_data(
      sharding, np.asarray(full[start:start + rows]))


def local_copy(tree):
  """This process's copy of replicated global arrays, as numpy."""
  return [np.asarray(x.addressable_data(0)) for x in jax.tree_util.tree_leaves(tree)]


def train(t, method, runner, mesh, params, batch, state=None, first=0, steps=None):
  """``steps`` updates from ``state`` (default: a fresh one); returns the
  updates (local copies) and the final state (global arrays)."""
  steps = steps or t.STEPS
  replicated = NamedSharding(mesh, P())
  loss, _, _ = t._cnn_task()
  if runner == "mesh_jit":
    tx = t.METHODS[method](loss)

    @functools.partial(jax.jit, out_shardings=(replicated, replicated))
    def jitted(params, batch, state, key):   # global arrays: arguments only
      grads = jax.grad(loss)(params, batch)
      return tx.update(grads, state, params, batch=batch, key=key)
    step = lambda state, key: jitted(params, batch, state, key)
  else:
    tx = t.METHODS[method](loss, axis_name=t.AXIS)
    mapped = jax.jit(jax.shard_map(
        functools.partial(t._local_step, tx, loss), mesh=mesh,
        in_specs=(P(), P(), P(t.AXIS), P()), out_specs=(P(), P())))
    step = lambda state, key: mapped(params, state, batch, key)
  if state is None:
    state = jax.jit(tx.init, out_shardings=replicated)(params)
  out = []
  for i in range(first, first + steps):
    key = global_array(mesh, P(), jax.random.PRNGKey(10 + i))
    updates, state = step(state, key)
    out.append(local_copy(updates))
  return out, state


def main(coordinator, process_id, out_dir, mode):
  jax.distributed.initialize(coordinator, num_processes=NUM_PROCESSES,
                             process_id=process_id)
  from tests import test_multi_device as t
  mesh = Mesh(np.array(jax.devices()), (t.AXIS,))
  _, params, batch = t._cnn_task()
  params = jax.tree_util.tree_map(lambda x: global_array(mesh, P(), x), params)
  batch = jax.tree_util.tree_map(lambda x: global_array(mesh, P(t.AXIS), x), batch)
  saved = {}
  import orbax.checkpoint as ocp
  path = (out_dir / "checkpoint").absolute()
  if mode == "train":
    for method in METHODS:
      for runner in ("mesh_jit",) + (("shard_map",) if method in SHARD_MAPPED
                                     else ()):
        updates, state = train(t, method, runner, mesh, params, batch)
        for s, leaves in enumerate(updates):
          for k, x in enumerate(leaves):
            saved[f"{method}/{runner}/update{s}/{k}"] = x
        for k, x in enumerate(local_copy(state)):
          saved[f"{method}/{runner}/state/{k}"] = x
        for k, x in enumerate(local_copy(t._comparable(state))):
          saved[f"{method}/{runner}/comparable/{k}"] = x
        if method == "kfac" and runner == "mesh_jit":   # save, then go on
          with ocp.StandardCheckpointer() as ckpt:
            ckpt.save(path, state)
          _, state = train(t, "kfac", "mesh_jit", mesh, params, batch, state,
                           first=t.STEPS)
          for k, x in enumerate(local_copy(state)):
            saved[f"checkpoint/state/{k}"] = x
  else:                                # resume: restore, then go on
    loss, _, _ = t._cnn_task()
    fresh = jax.jit(t.METHODS["kfac"](loss).init,
                    out_shardings=NamedSharding(mesh, P()))(params)
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, fresh)
    with ocp.StandardCheckpointer() as ckpt:
      state = ckpt.restore(path, abstract)
    _, state = train(t, "kfac", "mesh_jit", mesh, params, batch, state,
                     first=t.STEPS)
    for k, x in enumerate(local_copy(state)):
      saved[f"resume/state/{k}"] = x
  np.savez(out_dir / f"{mode}_{process_id}.npz", **saved)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), pathlib.Path(sys.argv[3]),
       sys.argv[4].lstrip("-") if len(sys.argv) > 4 else "train")
