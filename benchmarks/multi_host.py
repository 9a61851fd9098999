"""Multi-host K-FAC on JAX's distributed runtime, launched on this machine.

Run::

  python -m benchmarks.multi_host --processes 2 --devices-per-process 4 --steps 5

starts ``--processes`` copies of this script on localhost (a coordinator on a
free loopback port, gloo CPU collectives, ``--devices-per-process`` CPU
devices each). Every process calls ``jax.distributed.initialize``, builds the
global mesh over all devices, feeds its own slice of each MNIST batch
(``jax.make_array_from_process_local_data``) and trains the MLP
784-256-256-10 with ``kfe.kfac`` under ``jax.jit`` over the mesh; each prints
its loss per step (equal on every process: the loss is global).

On real hosts run the worker once per host yourself, with the same code:
``python -m benchmarks.multi_host --worker --coordinator HOST0:PORT
--processes N --process-id I`` (on GPU/TPU clusters, drop the CPU settings;
``jax.distributed.initialize()`` without arguments reads the cluster's
environment on Cloud TPU, SLURM and Open MPI).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def worker(args):
  import jax
  if args.devices_per_process:          # CPU: before the backend starts
    jax.config.update("jax_num_cpu_devices", args.devices_per_process)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(args.coordinator, num_processes=args.processes,
                             process_id=args.process_id)
  import functools

  import numpy as np
  import optax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  import kfac_jax_ext as kfe
  from benchmarks import step_time
  from kfac_jax_ext import datasets as data

  mesh = Mesh(np.array(jax.devices()), ("batch",))
  replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))
  spec = step_time.MODELS["mlp"]
  loss_fn, _ = step_time.make_losses(spec)
  x_train, y_train, _, _ = data.load_mnist()
  host = np.random.default_rng(0)          # the same global batches everywhere

  def global_batch():
    idx = host.integers(0, len(x_train), args.batch)
    mine = slice(jax.process_index() * args.batch // jax.process_count(),
                 (jax.process_index() + 1) * args.batch // jax.process_count())
    return {k: jax.make_array_from_process_local_data(rows, v[idx][mine])
            for k, v in (("x", x_train), ("y", y_train))}

  example = global_batch()
  params = jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(replicated, np.asarray(x)),
      step_time.init_mlp(jax.random.PRNGKey(0), spec["sizes"]))
  opt = kfe.kfac(loss_fn, 0.1, damping=0.1, inverse_every=5,
                 example_batch=example)
  state = jax.jit(opt.init, out_shardings=replicated)(params)

  @functools.partial(jax.jit, out_shardings=(replicated, replicated, replicated))
  def step(params, state, batch, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, state = opt.update(grads, state, params, batch=batch, key=key)
    return optax.apply_updates(params, updates), state, loss

  for i in range(args.steps):
    key = jax.make_array_from_process_local_data(
        replicated, np.asarray(jax.random.PRNGKey(i)))
    params, state, loss = step(params, state, global_batch(), key)
    line = (f"process {jax.process_index()}/{jax.process_count()} step {i} "
            f"loss {float(loss.addressable_data(0)):.4f}\n")
    # the processes share the launcher's stdout: one write(2) per line, so
    # two processes' lines cannot interleave (a pipe write of < 4 KiB is atomic)
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), line.encode())
  jax.distributed.shutdown()


def launch(args) -> int:
  """Starts the processes on localhost; returns the worst exit status."""
  coordinator = f"127.0.0.1:{_free_port()}"
  env = dict(os.environ)
  # each worker sets its own device count; the other XLA flags pass on
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "device_count" not in f)
  procs = [subprocess.Popen(
      [sys.executable, "-m", "benchmarks.multi_host", "--worker",
       "--coordinator", coordinator, "--processes", str(args.processes),
       "--process-id", str(i), "--devices-per-process",
       str(args.devices_per_process), "--steps", str(args.steps),
       "--batch", str(args.batch)], env=env) for i in range(args.processes)]
  try:
    codes = [p.wait(timeout=args.timeout) for p in procs]
  except subprocess.TimeoutExpired:
    print(f"multi_host: timed out after {args.timeout} s", file=sys.stderr)
    codes = [1]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return max(codes)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--devices-per-process", type=int, default=4,
                      help="CPU devices per process (0: use the accelerators)")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--batch", type=int, default=512,
                      help="global batch size (divisible by all devices)")
  parser.add_argument("--timeout", type=float, default=600)
  parser.add_argument("--worker", action="store_true",
                      help="run one process (what the launcher starts)")
  parser.add_argument("--coordinator", default=None, help="HOST:PORT of process 0")
  parser.add_argument("--process-id", type=int, default=0)
  args = parser.parse_args(argv)
  if args.processes < 1 or args.steps < 1:
    parser.error("--processes and --steps must be positive")
  devices = args.processes * max(args.devices_per_process, 1)
  if args.devices_per_process and args.batch % devices:
    parser.error(f"--batch {args.batch} must be divisible by the {devices} devices")
  if args.worker:
    if args.coordinator is None:
      parser.error("--worker needs --coordinator HOST:PORT")
    worker(args)
    return 0
  return launch(args)


if __name__ == "__main__":
  sys.exit(main())
