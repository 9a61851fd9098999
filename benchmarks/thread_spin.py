"""Do the refreshes' LAPACK threads slow the steps that follow them?

Times ``kfe.make_train_step`` on the MNIST MLP 784-256-256-10 (batch 512,
statistics every step, inverses every 5, as ``benchmarks.step_time``) twice:
stepping through counters that never refresh (1, 2, 3, 4, 6, ...), then
through every counter, so that a refresh (``jnp.linalg.inv`` of the factors,
LAPACK through scipy's OpenBLAS on CPU) runs every 5th step. It prints the
median of the non-refresh steps of each and the median refresh step. If
the non-refresh steps get slower once refreshes run, something the refresh
leaves behind (OpenBLAS's worker threads spin until their timeout) takes
CPU from them; compare with ``OPENBLAS_THREAD_TIMEOUT=4`` or
``OPENBLAS_NUM_THREADS=1`` set before Python starts
(``docs/performance.md``).

``--limit-lapack-threads N`` limits OpenBLAS from inside the process
(``kfe.limit_lapack_threads(N)``) before anything is timed.

Run: ``[OPENBLAS_NUM_THREADS=1] python -m benchmarks.thread_spin [--steps 60]
[--limit-lapack-threads 1]``.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import kfac_jax_ext as kfe
from benchmarks import step_time
from kfac_jax_ext import datasets as data


def _timed(step, params, state, batches, key, counters):
  """``(counter, ms)`` per step, carrying params and state through."""
  out = []
  for n, i in enumerate(counters):
    start = time.perf_counter()
    params, state, _ = jax.block_until_ready(
        step(params, state, batches[n % len(batches)], key, i))
    out.append((i, 1e3 * (time.perf_counter() - start)))
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--limit-lapack-threads", type=int, default=None,
                      help="kfe.limit_lapack_threads(N) before timing")
  args = parser.parse_args(argv)
  if args.steps < 10:
    parser.error("--steps must be at least 10 (the first 5 are not counted, "
                 "and a refresh comes every 5th)")
  setting = str(step_time.thread_env() or "OpenBLAS defaults")
  if args.limit_lapack_threads is None:
    return _measure(args.steps, setting)
  if args.limit_lapack_threads < 1:
    parser.error(f"--limit-lapack-threads must be positive, got {args.limit_lapack_threads}")
  with kfe.lapack_thread_limit(args.limit_lapack_threads) as before:
    if not before:
      parser.error("--limit-lapack-threads: no OpenBLAS found in this process")
    return _measure(args.steps, setting + ", kfe.limit_lapack_threads("
                    f"{args.limit_lapack_threads})")


def _measure(steps, setting):
  """Prints the three medians (ms) under ``setting``; returns them."""
  x_train, y_train, _, _ = data.load_mnist()
  loss_fn, _, params, batches = step_time._model("mlp", x_train, y_train)
  opt = kfe.kfac(loss_fn, 1e-3, stats_every=1, inverse_every=5, damping=1e-3,
                 damping_mode="factored", example_batch=batches[0])
  step = kfe.make_train_step(loss_fn, opt, donate=False)
  key = jax.random.PRNGKey(0)
  state = opt.init(params)
  _timed(step, params, state, batches, key, range(11))   # compile both programs
  never = [i for i in range(1, 10 * steps) if i % 5][:steps]
  quiet = _timed(step, params, state, batches, key, never)[5:]
  mixed = _timed(step, params, state, batches, key, range(1, steps + 1))[5:]
  medians = {"quiet": float(np.median([t for _, t in quiet])),
             "between": float(np.median([t for i, t in mixed if i % 5])),
             "refresh": float(np.median([t for i, t in mixed if i % 5 == 0]))}
  print(setting)
  print(f"steps between refreshes, no refresh run:  {medians['quiet']:6.1f} ms")
  print(f"steps between refreshes, refresh every 5: {medians['between']:6.1f} ms")
  print(f"refresh steps:                            {medians['refresh']:6.1f} ms")
  return medians


if __name__ == "__main__":
  main()
