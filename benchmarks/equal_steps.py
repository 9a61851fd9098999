"""Training loss after a fixed number of steps, one optimizer, several schedules.

Run: ``python -m benchmarks.equal_steps --task shakespeare --optimizer kfac
--lr 0.1 --damping 5e-4 --steps 300 --refresh-warmup 0,20 [--ema-decay 0.8]
[--nesterov 0,1] [--evals 10]``.
Every schedule gets the same batches and sampling keys (``--seed``), so the
losses compare progress per step, not per second (``benchmarks.run`` measures
time). Prints, per schedule, the training loss on the task's fixed training
subset after the last step (with ``--evals N``: at N evenly spaced steps)
and the total step seconds; with ``--scales`` (a two-level contender on the
Kronecker model) also the held model scales α, γ from each step they change.

This is how docs/performance.md's refresh warm-up table was measured.
"""

from __future__ import annotations

import argparse

import jax

import numpy as np

from benchmarks import contender_names
from benchmarks import contenders
from benchmarks import tasks
from benchmarks import training
from kfac_jax_ext.two_level_state import TwoLevelState


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--task", required=True, choices=tasks.TASKS)
  parser.add_argument("--optimizer", default="kfac")
  parser.add_argument("--lr", type=float, required=True)
  parser.add_argument("--damping", type=float, required=True)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--refresh-warmup", default="0,20",
                      help="comma-separated warm-ups to compare")
  parser.add_argument("--ema-decay", type=float, default=None,
                      help="replace the task's running-average decay")
  parser.add_argument("--kl-clip", type=float, default=None,
                      help="replace the task's KL-clip κ")
  parser.add_argument("--nesterov", default="0",
                      help="comma-separated 0/1: heavy-ball (0) and/or Nesterov (1) "
                           "momentum, each compared with every warm-up")
  parser.add_argument("--evals", type=int, default=1,
                      help="training-loss evaluations spread over the steps")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--scales", action="store_true",
                      help="two-level with fisher_products='kronecker': print the "
                           "held model scales α, γ after each statistics step")
  parser.add_argument("--quick", action="store_true",
                      help="the task's small model (keeps the script tested)")
  args = parser.parse_args(argv)
  warmups = [int(w) for w in args.refresh_warmup.split(",")]
  forms = args.nesterov.split(",")
  if args.steps < 1 or any(w < 0 for w in warmups):
    parser.error("--steps must be positive and every --refresh-warmup >= 0")
  if any(f not in ("0", "1") for f in forms):
    parser.error(f"--nesterov takes 0 and/or 1, got {args.nesterov!r}")
  if not 1 <= args.evals <= args.steps:
    parser.error(f"--evals must be in [1, --steps], got {args.evals}")
  task = tasks.make_task(args.task, quick=args.quick)
  if args.ema_decay is not None:
    task = task._replace(ema_decay=args.ema_decay)
  if args.kl_clip is not None:
    task = task._replace(kl_clip=args.kl_clip)
  evaluate = training.make_evaluator(task.metrics_fn)
  # a ``…_klN`` contender runs with its own κ, whatever the task's
  kappa = (contender_names.two_level_kl_clip(args.optimizer) or (None, task.kl_clip))[1]
  hp = {"lr": args.lr, "damping": args.damping}
  rows = []
  for warmup in warmups:
    for form in forms:
      run_task = task._replace(refresh_warmup=warmup, nesterov=form == "1")
      contender = contenders.make_contender(args.optimizer, run_task)
      scales = []
      result = training.train(contender, run_task, hp, steps=args.steps,
                              seed=args.seed, progress=False, evaluate=evaluate,
                              evals=args.evals, on_step=(lambda i, carry: scales.append(
                                  (i, *_held_scales(carry)))) if args.scales else None)
      rows.append((warmup, form == "1", result["evals"][-1]["train"]["loss"],
                   float(np.sum(result["step_seconds"]))))
      curve = "" if args.evals == 1 else " (" + ", ".join(
          f"{e['step']}: {e['train']['loss']:.4f}" for e in result["evals"][1:]) + ")"
      print(f"{args.task} {args.optimizer} lr {args.lr} λ {args.damping} "
            f"κ {kappa} ema {task.ema_decay} warm-up {warmup}"
            f"{' nesterov' if form == '1' else ''}: train loss after "
            f"{args.steps} steps {rows[-1][2]:.4f} ({rows[-1][3]:.1f} s of steps)"
            + curve, flush=True)
      if args.scales:     # the steps after which α, γ changed: statistics steps
        changed = [s for k, s in enumerate(scales) if k == 0 or s[1:] != scales[k - 1][1:]]
        print("held α, γ from step: " + ", ".join(
            f"{i}: {a:.4g}, {g:.4g}" for i, a, g in changed), flush=True)
  return rows


def _held_scales(carry):
  """``(α, γ)`` of the two-level Kronecker model's state in ``carry``."""
  found = [x for x in jax.tree_util.tree_leaves(
      carry, is_leaf=lambda x: isinstance(x, TwoLevelState)) if isinstance(x, TwoLevelState)]
  if not found or not hasattr(found[0].model, "coarse_scale"):
    raise SystemExit("--scales reads the held α, γ of a two-level optimizer with "
                     "fisher_products='kronecker' (a two_level_…_kronecker… contender)")
  return float(found[0].model.scale), float(found[0].model.coarse_scale)


if __name__ == "__main__":
  main()
