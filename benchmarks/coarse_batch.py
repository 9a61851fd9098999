"""Two-level K-FAC's ``coarse_batch``: step time against progress per step.

Trains the MNIST autoencoder (batch 1000) with each two-level variant named,
at one setting, through the benchmark's fused step (``contenders._natural``:
momentum 0.9, the task's KL-clip, period and EMA, static schedule), once
with the coarse level on the whole batch and once per ``coarse_batch`` size,
and prints the median step (after compilation) and the mean training loss
of the last 10 steps. The same batches and initial parameters for all.

Run: ``python -m benchmarks.coarse_batch [--variants
two_level_multiplicative_residual,two_level_balanced_nicolaides]
[--sizes 250] [--steps 80] [--lr 0.3] [--damping 0.3]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

import kfac_jax_ext as kfe
from benchmarks import contenders
from benchmarks import tasks


def _run(task, name, options, batches, steps, hp):
  """(median step ms, mean loss of the last 10 steps)."""
  combine, space = name[len("two_level_"):].split("_", 1)
  contender = contenders._natural(name, task, kfe.two_level_kfac, {
      "combine": combine, "coarse_space": space, **options})
  carry = contender.init(task.params, hp)
  key = jax.random.PRNGKey(1)
  times, losses = [], []
  for i in range(steps):
    start = time.perf_counter()
    carry, loss = contender.step(carry, batches[i % len(batches)], key, hp, i)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - start)
    losses.append(float(loss))
  return (1000 * statistics.median(times[contender.warmup + 2:]),
          float(np.mean(losses[-10:])))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--variants", default="two_level_multiplicative_residual,"
                      "two_level_balanced_nicolaides")
  parser.add_argument("--sizes", default="250")
  parser.add_argument("--steps", type=int, default=80)
  parser.add_argument("--lr", type=float, default=0.3)
  parser.add_argument("--damping", type=float, default=0.3)
  args = parser.parse_args(argv)
  task = tasks.make_task("autoencoder")
  rng = np.random.default_rng(0)
  batches = [task.sample_batch(rng) for _ in range(8)]
  hp = {"lr": np.float32(args.lr), "damping": np.float32(args.damping)}
  print(f"{'variant':<44}{'coarse_batch':>13}{'step ms':>9}{'loss':>9}")
  for name in args.variants.split(","):
    for size in [None] + [int(s) for s in args.sizes.split(",") if s]:
      options = {} if size is None else {"coarse_batch": size}
      ms, loss = _run(task, name, options, batches, args.steps, hp)
      print(f"{name:<44}{'all' if size is None else size:>13}{ms:>9.0f}"
            f"{loss:>9.2f}", flush=True)


if __name__ == "__main__":
  main()
