"""Shared driver of the method comparisons: sweep, train, per-step cost, report.

``run_methods`` trains every method of a task with the best learning rate of
a short sweep and records the per-step cost; ``report`` prints the cost
table and the loss table of ``compare_kronecker.report``.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from benchmarks import compare_kronecker, data


def step_costs(seconds, period):
  """Median step and mean over whole refresh periods (first step excluded)."""
  steps = np.diff(np.asarray(seconds))[:(len(seconds) - 1) // period * period]
  return float(np.median(steps)), float(np.mean(steps))


def run_methods(task, setup, methods, make_optimizer, steps, sweep_steps,
                period):
  """Trains each method of ``methods`` (name -> options).

  Args:
    task: the task's name (recorded).
    setup: ``(loss_fn, params, batches, test, lrs, settings)``; ``lrs`` maps
      ``"adam"`` and ``"kronecker"`` (every other method) to a sweep grid.
    make_optimizer: ``(name, options, loss_fn, lr, settings) -> optimizer``.
    sweep_steps: steps per learning rate; 0 takes the grid's first value.
    period: the refresh period, for the amortized step cost.

  Returns:
    A JSON-able dict with every run's losses, clock, settings and costs.
  """
  loss_fn, params, batches, test, lrs, settings = setup
  results = {"task": task, "steps": steps, "settings": settings,
             "period": period, "runs": {}}
  for name, options in methods.items():
    grid = lrs["adam" if name == "adam" else "kronecker"]
    scores = {} if sweep_steps else {grid[0]: float("nan")}
    for lr in grid if sweep_steps else ():
      r = compare_kronecker.train(
          make_optimizer(name, options, loss_fn, lr, settings), loss_fn, params,
          batches, test, sweep_steps, seed=1, curvature=name != "adam")
      scores[lr] = compare_kronecker.smoothed_final(r["loss"], 10) if (
          r["finite"]) else np.inf
    lr = min(scores, key=scores.get)
    r = compare_kronecker.train(
        make_optimizer(name, options, loss_fn, lr, settings), loss_fn, params,
        batches, test, steps, curvature=name != "adam")
    median, amortized = step_costs(r["seconds"], period)
    r.update(learning_rate=lr, sweep={str(k): v for k, v in scores.items()},
             options={k: str(v) for k, v in options.items()},
             median_step_s=median, amortized_step_s=amortized)
    results["runs"][name] = r
  return results


def report(results, reference):
  runs = results["runs"]
  ref = runs[reference]
  print(f"\n{results['task']}: per-step cost (refresh every {results['period']})")
  print(f"{'method':<22}{'median ms':>10}{'amort. ms':>10}{f'/{reference}':>8}")
  for name, r in runs.items():
    print(f"{name:<22}{1e3 * r['median_step_s']:>10.1f}"
          f"{1e3 * r['amortized_step_s']:>10.1f}"
          f"{r['amortized_step_s'] / ref['amortized_step_s']:>8.2f}")
  compare_kronecker.report(results, reference=reference)


def main(argv, doc, tasks, make_setup, make_optimizer, period):
  """The command line of a comparison script.

  Args:
    argv: arguments (None: ``sys.argv``).
    doc: the script's docstring (``--help``).
    tasks: task names; the first is the default.
    make_setup: ``task -> (setup, methods)`` (see ``run_methods``); may raise
      ``data.DatasetUnavailable``, reported as a skip.
    make_optimizer, period: as for ``run_methods``.
  """
  parser = argparse.ArgumentParser(description=doc)
  parser.add_argument("--task", default=tasks[0], choices=tasks)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--sweep-steps", type=int, default=30,
                      help="steps per learning rate of the sweep; 0: no sweep")
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  try:
    setup, methods = make_setup(args.task)
  except data.DatasetUnavailable as e:
    print(f"{args.task}: skipped, {e}")
    return None
  results = run_methods(args.task, setup, methods, make_optimizer, args.steps,
                        args.sweep_steps, period)
  report(results, reference="kfac")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f)
  return results
