"""Multi-host training on JAX's distributed runtime, with real processes.

Two processes × 4 CPU devices on localhost (gloo collectives, a loopback
coordinator on a free port; ``tests/multi_host_worker.py``) train K-FAC,
TKFAC, TENGraD and two-level K-FAC (multiplicative) on one global 8-device
mesh: under ``jit`` (each process feeds its half of the batch) and, for
K-FAC, under ``shard_map`` with ``axis_name``. Both processes must hold
bitwise the same updates and state, equal (float32, 1e-5 relative) to this
process's run on 8 devices. Orbax
checkpoints written by both processes restore into a fresh 2-process run
that continues bit-exactly, and into this single 8-device process.
"""

import functools
import os
import pathlib
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from tests import test_multi_device as t

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "multi_host_worker.py"
TIMEOUT = 300


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(out, mode):
  """Runs both worker processes to the end (or kills them); returns each
  process's saved arrays."""
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  # the workers make 4 devices each; the suite's other XLA flags stay
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "device_count" not in f)
  coordinator = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen(
      [sys.executable, str(WORKER), coordinator, str(i), str(out), f"--{mode}"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(2)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=TIMEOUT)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, log in zip(procs, logs):
    if p.returncode != 0:
      if "gloo" in log.lower() and "not" in log.lower() and "support" in log.lower():
        pytest.skip(f"this platform cannot run gloo CPU collectives: {log[-500:]}")
      raise AssertionError(f"worker failed ({p.returncode}):\n{log[-4000:]}")
  return [dict(np.load(out / f"{mode}_{i}.npz")) for i in range(2)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  out = tmp_path_factory.mktemp("multi_host")
  return _launch(out, "train"), out


def _single_process(method, runner):
  with jax.enable_x64(False):
    loss, params, batch = t._cnn_task()
    run = t._mesh_jitted if runner == "mesh_jit" else t._shard_mapped
    make = t.METHODS[method]
    tx = make(loss) if runner == "mesh_jit" else make(loss, axis_name=t.AXIS)
    return run(tx, loss, params, batch)


def _entries(saved, prefix):
  keys = sorted((k for k in saved if k.startswith(prefix)),
                key=lambda k: int(k.rsplit("/", 1)[1]))
  return [saved[k] for k in keys]


RUNS = [(m, "mesh_jit") for m in ("kfac", "tkfac", "tengrad",
                                   "two_level_multiplicative")] + [
    ("kfac", "shard_map")]


@pytest.mark.parametrize("method,runner", RUNS)
def test_two_processes_equal_one_process_on_eight_devices(trained, method, runner):
  (first, second), _ = trained
  prefix = f"{method}/{runner}/"
  mine = {k: v for k, v in first.items() if k.startswith(prefix)}
  assert mine, f"the workers did not run {method} under {runner}"
  for key, value in mine.items():          # both processes: bitwise the same
    np.testing.assert_array_equal(value, second[key], err_msg=key)
  want, want_state = _single_process(method, runner)
  for s, updates in enumerate(want):
    got = _entries(first, f"{prefix}update{s}/")
    t._assert_close(got, jax.tree_util.tree_leaves(updates))
  got_state = _entries(first, f"{prefix}comparable/")
  want_leaves = jax.tree_util.tree_leaves(t._comparable(want_state))
  assert len(got_state) == len(want_leaves)
  t._assert_close(got_state, want_leaves, rtol=1e-4)


def test_orbax_checkpoint_across_processes(trained):
  """Both processes saved K-FAC's state after 3 steps and went on 3 more; a
  fresh pair of processes restores and continues: bit-exact. This process
  (8 devices, one process) restores the same checkpoint and continues."""
  uninterrupted, tmp_path = trained
  resumed = _launch(tmp_path, "resume")
  for i in range(2):
    want = _entries(uninterrupted[i], "checkpoint/state/")
    got = _entries(resumed[i], "resume/state/")
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
      np.testing.assert_array_equal(g, w)

  import orbax.checkpoint as ocp
  with jax.enable_x64(False):
    loss, params, batch = t._cnn_task()
    mesh = t._mesh()
    replicated = NamedSharding(mesh, P())
    tx = t.METHODS["kfac"](loss)
    fresh = jax.jit(tx.init, out_shardings=replicated)(params)
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, fresh)
    with ocp.StandardCheckpointer() as ckpt:
      state = ckpt.restore((tmp_path / "checkpoint").absolute(), abstract)
    batch = jax.device_put(batch, NamedSharding(mesh, P(t.AXIS)))

    @functools.partial(jax.jit, out_shardings=(replicated, replicated))
    def step(state, key):
      return tx.update(jax.grad(loss)(params, batch), state, params, batch=batch,
                       key=key)

    for i in range(t.STEPS, 2 * t.STEPS):
      _, state = step(state, jax.random.PRNGKey(10 + i))
  t._assert_close(jax.tree_util.tree_leaves(state),
                  _entries(uninterrupted[0], "checkpoint/state/"))


def test_launcher_trains_mnist_on_two_processes():
  """``python -m benchmarks.multi_host``: two processes × 2 CPU devices, the
  MNIST MLP with ``kfe.kfac``; each process prints the same global loss."""
  done = subprocess.run(
      [sys.executable, "-m", "benchmarks.multi_host", "--processes", "2",
       "--devices-per-process", "2", "--steps", "3", "--batch", "64",
       "--timeout", str(TIMEOUT)], cwd=ROOT, capture_output=True,
      text=True, timeout=TIMEOUT + 30)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  losses = {}
  for line in done.stdout.splitlines():
    if line.startswith("process "):
      match = re.fullmatch(r"process (\d+/\d+) step (\d+) loss (\S+)", line)
      assert match, f"a malformed progress line {line!r} in:\n{done.stdout}"
      who, step, loss = match.groups()
      losses.setdefault(int(step), set()).add((who, float(loss)))
  assert sorted(losses) == [0, 1, 2], done.stdout
  for seen in losses.values():
    assert {w for w, _ in seen} == {"0/2", "1/2"}
    assert len({v for _, v in seen}) == 1, seen      # one global loss
  assert max(v for _, v in losses[2]) < max(v for _, v in losses[0])
