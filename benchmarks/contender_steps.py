"""Median and mean step of named contenders at one setting, with the loss.

A quick before/after check of a change that must keep the update and
shorten the step: run it at two commits (``git worktree add /tmp/before
<commit>`` and ``PYTHONPATH=/tmp/before python -m benchmarks.contender_steps
...`` from that tree), alternately, twice — this 2-core machine's step
times drift by ~10 % between rounds. Equal losses say the update is the
same.

Run: ``python -m benchmarks.contender_steps --task autoencoder
--optimizers two_level_balanced_residual,two_level_balanced_krylov_residual_mixed
[--steps 40] [--lr 0.1] [--damping 0.3]``.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks import contenders
from benchmarks import tasks
from benchmarks import training


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--task", default="autoencoder")
  parser.add_argument("--optimizers", required=True,
                      help="comma-separated contender names (benchmarks.run's)")
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--lr", type=float, default=0.1)
  parser.add_argument("--damping", type=float, default=0.3)
  args = parser.parse_args(argv)
  task = tasks.make_task(args.task)
  for name in args.optimizers.split(","):
    contender = contenders.make_contender(name, task)
    run = training.train(contender, task, {"lr": args.lr, "damping": args.damping},
                         steps=args.steps, progress=False, evals=1)
    ms = 1e3 * np.asarray(run["step_seconds"])
    print(f"{name:45s} median {np.median(ms):7.1f} ms  mean {ms.mean():7.1f} ms"
          f"  loss (last 10) {np.mean(run['loss'][-10:]):.2f}", flush=True)


if __name__ == "__main__":
  main()
