"""The benchmark runner: sweep, train, time-to-target, JSON and plots.

Run::

  python -m benchmarks.run --task autoencoder \\
      --optimizers adam,sgd,kfac,tkfac,tengrad,two_level_kfac,kfac_jax --seconds 120

For each optimizer: a sweep over its grid (``tasks`` documents the grids:
Adam/SGD/Muon learning rates; learning rate × damping for the
natural-gradient methods and kfac-jax), each setting trained for the sweep
budget on other batches (seed ``--seed`` + 1) and scored by its final
training loss, the grid extended while the best setting is at its edge
(``sweep``: the next 1-3-10 ladder value beyond it, up to two per axis and
side); then the best setting is trained for the full budget (seed
``--seed``, default 0). A second seed reuses the first run's choices::

  python -m benchmarks.run --task autoencoder --seconds 120 --seed 2 \\
      --settings-from benchmarks/results/autoencoder.json --name autoencoder_seed2

``--add-to RESULTS.json`` runs more optimizers and adds them to an earlier
run's file (its Adam run stays the target; ``--replace`` reruns ones it
has). Results go to
``OUT/TASK.json`` (every setting's score, the chosen one, losses, per-step
times and the evaluations) and ``OUT/TASK.png`` (train/test loss against
steps and against wall-clock); the summary table is printed (see
``summary``). ``--quick`` shrinks the task and the budgets to seconds.

A task whose data is absent (CIFAR-10 without ``--data-dir``) says so and
is skipped (exit status 0). An optimizer that cannot run (kfac-jax not
installed, or failing on the model) is reported in the JSON with its error;
the others still run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import sys
import traceback

import jax

from benchmarks import contenders, plots, step_time, summary, tasks, training
from benchmarks import sweep as sweep_lib
from kfac_jax_ext import datasets as data

QUICK_STEPS, QUICK_SWEEP_STEPS = 6, 2


def _env_prefix() -> str:
  """The thread settings that change step times (``step_time.THREAD_ENV``),
  as the command's prefix."""
  return "".join(f"{k}={v} " for k, v in step_time.thread_env().items())


def _machine():
  model = platform.processor() or platform.machine()
  try:
    for line in open("/proc/cpuinfo"):
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  device = jax.devices()[0]
  accel = "" if device.platform == "cpu" else f", {len(jax.devices())}× {device.device_kind}"
  return f"{model}, {os.cpu_count()} cores{accel}"


def _versions():
  import flax
  import optax
  versions = {"jax": jax.__version__, "optax": optax.__version__,
              "flax": flax.__version__}
  try:
    import kfac_jax
    versions["kfac_jax"] = kfac_jax.__version__
  except ImportError:
    versions["kfac_jax"] = None
  return versions


def _score(run):
  loss = run["evals"][-1]["train"]["loss"]
  return loss if run["finite"] and math.isfinite(loss) else math.inf


def run_optimizer(name, task, budget, sweep_budget, sweep, progress, seed=0,
                  chosen=None, extend=True):
  """Sweeps then trains one optimizer; returns its JSON record.

  ``seed``: the full run's (batches and sampling keys; the sweep uses
  ``seed + 1``). ``chosen``: a setting to train with instead of sweeping.
  ``extend``: extend the grid while the best setting is at its edge
  (``sweep.sweep``; off for ``--quick``)."""
  contender = contenders.make_contender(name, task)
  evaluate = training.make_evaluator(task.metrics_fn)
  points = contenders.grid_points(contender, task.grids)
  scores = []
  if chosen is None and sweep and len(points) > 1:
    def score(hp):
      run = training.train(contender, task, hp, seed=seed + 1, evaluate=evaluate,
                           evals=1, label=f"{name} sweep {summary.hp_label(name, hp)}",
                           progress=progress, **sweep_budget)
      return {"score": _score(run), "steps": len(run["loss"])}

    if extend:
      scores, chosen = sweep_lib.sweep(points, score)
    else:
      scores = [dict(score(hp), hp=hp) for hp in points]
      chosen = min(scores, key=lambda s: s["score"])["hp"]
  elif chosen is None:
    chosen = points[len(points) // 2]
  run = training.train(contender, task, chosen, seed=seed, evaluate=evaluate,
                       label=f"{name} {summary.hp_label(name, chosen)}",
                       progress=progress, **budget)
  return {"sweep": scores, "chosen": chosen, "run": run, "family": contender.family,
          "grid": task.grids.get(contender.family)}


def _budget(steps, seconds):
  return {"steps": steps, "seconds": seconds}


def _describe(budget):
  parts = [f"{budget['steps']} steps"] if budget["steps"] else []
  parts += [f"{budget['seconds']:g} s"] if budget["seconds"] else []
  return " or ".join(parts)


def parse_args(argv):
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--task", required=True, choices=tasks.TASKS)
  parser.add_argument("--optimizers", default=",".join(contenders.OPTIMIZERS),
                      help="comma-separated, from " + ",".join(contenders.OPTIMIZERS)
                      + " and two_level_COMBINE_SPACE (COMBINE: additive, "
                      "multiplicative, balanced; SPACE: nicolaides, spectral, "
                      "residual, krylov_nicolaides, krylov_residual), "
                      "tengrad_gramN (TENGraD with gram_batch=N) and "
                      "kfac_statsN (K-FAC with stats_batch=N)")
  parser.add_argument("--steps", type=int, default=None, help="step budget per run")
  parser.add_argument("--seconds", type=float, default=None,
                      help="wall-clock budget per run (training time only)")
  parser.add_argument("--sweep-fraction", type=float, default=0.2,
                      help="each sweep setting's budget, as a fraction of the run's")
  parser.add_argument("--no-sweep", action="store_true",
                      help="skip the sweep: take each grid's middle setting")
  parser.add_argument("--quick", action="store_true",
                      help=f"tiny model, {QUICK_STEPS} steps, {QUICK_SWEEP_STEPS}-step "
                           "sweep: checks that everything runs, in seconds")
  parser.add_argument("--out", default="benchmarks/results",
                      help="folder for TASK.json and TASK.png (quick: quick_TASK.*)")
  parser.add_argument("--data-dir", default=None,
                      help="CIFAR-10's cifar-10-batches-py folder")
  parser.add_argument("--batch-size", type=int, default=None,
                      help="replace the task's batch size (results: TASK_bN.json)")
  parser.add_argument("--name", default=None,
                      help="results file stem and table heading (default TASK, "
                           "or TASK_bN with --batch-size)")
  parser.add_argument("--seed", type=int, default=0,
                      help="the full runs' seed: batch order and sampling keys "
                           "(the initial parameters are the task's); the sweep "
                           "uses seed + 1")
  parser.add_argument("--settings-from", default=None,
                      help="a results JSON, or several separated by commas: train "
                           "each optimizer with the setting chosen there (no sweep; "
                           "the first file that has the optimizer wins; a "
                           "two_level_*_stored[N] without its own takes its "
                           "variant's), e.g. a second seed")
  parser.add_argument("--add-to", default=None,
                      help="a results JSON of the same task: run the optimizers "
                           "and add them to it (the target stays its Adam run's)")
  parser.add_argument("--replace", action="store_true",
                      help="with --add-to: the named optimizers replace the runs "
                           "of the same name there (e.g. a run disturbed by other load)")
  parser.add_argument("--period", type=int, default=None,
                      help="replace the task's curvature refresh period (statistics "
                           "and inverses every N steps) for every natural-gradient "
                           "contender and Shampoo's preconditioner alike")
  parser.add_argument("--refresh-warmup", type=int, default=0,
                      help="kfac_jax_ext contenders refresh statistics and inverses on "
                           "each of the first N steps (kfe.due_at's refresh_warmup); "
                           "kfac-jax has no such option")
  parser.add_argument("--ema-decay", type=float, default=None,
                      help="replace the task's curvature running-average decay (per "
                           "statistics update) for every natural-gradient contender "
                           "and kfac-jax alike (its curvature_ema)")
  parser.add_argument("--nesterov", action="store_true",
                      help="kfac_jax_ext's fixed-learning-rate contenders take their "
                           "momentum in Nesterov's form (nesterov=True); kfac-jax has "
                           "no such option, Muon's is Nesterov's already")
  parser.add_argument("--no-progress", action="store_true")
  args = parser.parse_args(argv)
  names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
  unknown = [n for n in names if not contenders.known(n)]
  if unknown or not names:
    parser.error(f"unknown optimizers {unknown}; choose from "
                 f"{','.join(contenders.OPTIMIZERS)}")
  if len(set(names)) != len(names):
    parser.error(f"an optimizer is named twice in {names}")
  args.optimizers = names
  if args.quick:
    args.steps = args.steps or QUICK_STEPS
  if args.steps is None and args.seconds is None:
    parser.error("give a budget: --steps, --seconds or both (or --quick)")
  for flag in ("steps", "seconds"):
    value = getattr(args, flag)
    if value is not None and value <= 0:
      parser.error(f"--{flag} must be positive, got {value}")
  if args.batch_size is not None and args.batch_size < 1:
    parser.error(f"--batch-size must be positive, got {args.batch_size}")
  if args.period is not None and args.period < 1:
    parser.error(f"--period must be positive, got {args.period}")
  if args.refresh_warmup < 0:
    parser.error(f"--refresh-warmup must be >= 0, got {args.refresh_warmup}")
  if args.ema_decay is not None and not 0.0 <= args.ema_decay < 1.0:
    parser.error(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
  if args.name is not None and not args.name.replace("_", "").replace(
      "-", "").isalnum():
    parser.error(f"--name must be letters, digits, '_' or '-', got {args.name!r}")
  if not 0 < args.sweep_fraction <= 1:
    parser.error(f"--sweep-fraction must be in (0, 1], got {args.sweep_fraction}")
  if args.seed < 0:
    parser.error(f"--seed must be >= 0, got {args.seed}")
  args.chosen = {}
  if args.settings_from is not None:
    args.chosen = _chosen_settings(parser, args.settings_from, names)
  args.existing = None
  if args.add_to is not None:
    try:
      with open(args.add_to) as f:
        args.existing = json.load(f)
    except (OSError, ValueError) as e:
      parser.error(f"--add-to {args.add_to}: cannot read it ({e})")
    if args.existing.get("task") != args.task or args.existing.get("quick") != args.quick:
      parser.error(f"--add-to {args.add_to} holds task "
                   f"{args.existing.get('task')!r}, not {args.task!r}")
    if args.period is not None and args.existing.get("period") != args.period:
      parser.error(f"--add-to {args.add_to} ran with period "
                   f"{args.existing.get('period')}, not --period {args.period}")
    if args.existing.get("refresh_warmup", 0) != args.refresh_warmup:
      parser.error(f"--add-to {args.add_to} ran with refresh warm-up "
                   f"{args.existing.get('refresh_warmup', 0)}, not --refresh-warmup "
                   f"{args.refresh_warmup}")
    if args.existing.get("nesterov", False) != args.nesterov:
      parser.error(f"--add-to {args.add_to} ran "
                   + ("with" if args.existing.get("nesterov") else "without")
                   + " --nesterov: pass the same")
    if args.existing.get("seed", 0) != args.seed:
      parser.error(f"--add-to {args.add_to} ran with seed "
                   f"{args.existing.get('seed', 0)}, not --seed {args.seed}: "
                   "pass its seed")
    there = [n for n in names if n in args.existing.get("runs", {})]
    if there and not args.replace:
      parser.error(f"--add-to {args.add_to} already has {there} (--replace "
                   "replaces them)")
  elif args.replace:
    parser.error("--replace needs --add-to")
  return args


def _chosen_settings(parser, settings_from, names):
  """``{optimizer: chosen setting}`` from one or more comma-separated results
  files, the first file holding an optimizer's choice winning."""
  paths = [p.strip() for p in settings_from.split(",") if p.strip()]
  if not paths:
    parser.error("--settings-from needs a results JSON")
  files = []
  for path in paths:
    try:
      with open(path) as f:
        files.append(json.load(f)["runs"])
    except (OSError, ValueError, KeyError, TypeError) as e:
      parser.error(f"--settings-from {path}: cannot read its runs ({e})")
  chosen = {}
  # the name's own setting, else (two_level_*_storedN) its variant's
  for lookup in (lambda n: n, contenders.settings_name):
    for earlier in files:
      for n in names:
        if n not in chosen and "chosen" in earlier.get(lookup(n), {}):
          chosen[n] = earlier[lookup(n)]["chosen"]
  missing = [n for n in names if n not in chosen]
  if missing:
    parser.error(f"--settings-from {settings_from} has no chosen setting for "
                 f"{missing}; run them with a sweep")
  return chosen


def main(argv=None):
  """Runs the benchmark; returns the results dict (``skipped`` set if no data)."""
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  try:
    task = tasks.make_task(args.task, quick=args.quick, data_dir=args.data_dir,
                           batch_size=args.batch_size)
  except data.DatasetUnavailable as e:
    print(f"{args.task}: skipped, {e}")
    return {"task": args.task, "skipped": str(e)}
  if args.period is not None:
    task = task._replace(period=args.period)
  task = task._replace(refresh_warmup=args.refresh_warmup, nesterov=args.nesterov)
  if args.ema_decay is not None:
    task = task._replace(ema_decay=args.ema_decay)
  joined_ema = (args.existing or {}).get("ema_decay")
  if joined_ema is not None and joined_ema != task.ema_decay:
    raise SystemExit(f"--add-to {args.add_to} ran with curvature EMA {joined_ema:g}, "
                     f"this run's is {task.ema_decay:g}: pass --ema-decay {joined_ema:g}")
  budget = _budget(args.steps, args.seconds)
  if args.quick:
    sweep_budget = _budget(QUICK_SWEEP_STEPS, None)
  else:
    sweep_budget = _budget(
        max(1, int(args.steps * args.sweep_fraction)) if args.steps else None,
        args.seconds * args.sweep_fraction if args.seconds else None)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  stem = (("quick_" if args.quick else "") + (args.name or (
      args.task + (f"_b{args.batch_size}" if args.batch_size else ""))))
  results = {
      "task": task.name, "description": task.description,
      "meta": {"command": _env_prefix() + "python -m benchmarks.run " + " ".join(argv),
               "date": datetime.date.today().isoformat(), "machine": _machine(),
               **_versions()},
      "quick": args.quick, "budget": _describe(budget),
      "sweep_rule": ("grid" if args.quick or args.no_sweep else
                     f"grid, extended at its edges (up to "
                     f"{sweep_lib.MAX_EXTENSIONS} ladder steps per axis and side)"),
      "sweep_budget": ("no sweep" if args.no_sweep else
                       f"settings from {args.settings_from}" if args.chosen else
                       _describe(sweep_budget)),
      "grids": task.grids, "period": task.period, "kl_clip": task.kl_clip,
      "ema_decay": task.ema_decay, "refresh_warmup": task.refresh_warmup,
      "nesterov": task.nesterov,
      "batch_size": args.batch_size,
      "name": args.name, "seed": args.seed,
      "settings_from": args.settings_from,
      "plot": f"{stem}.png", "runs": {}}
  print(f"{task.name}: {task.description}\nbudget {results['budget']} per run, "
        f"sweep {results['sweep_budget']} per setting")
  for name in args.optimizers:
    try:
      results["runs"][name] = run_optimizer(
          name, task, budget, sweep_budget, not args.no_sweep, not args.no_progress,
          seed=args.seed, chosen=args.chosen.get(name), extend=not args.quick)
    except Exception as e:   # one failing optimizer must not sink the others
      detail = f"{type(e).__name__}: {e}".strip()
      print(f"{name}: failed, {detail[:500]}", file=sys.stderr)
      traceback.print_exc(limit=3)
      results["runs"][name] = {"error": detail[:2000]}
  path = out / f"{stem}.json"
  if args.existing is not None:      # the new runs join an earlier run's file
    added = {"command": results["meta"]["command"], "date": results["meta"]["date"],
             "optimizers": list(results["runs"]), "replaced": args.replace}
    # the grids of the families just run join the file's (each run also
    # records its own grid)
    ran = {r["family"] for r in results["runs"].values() if "family" in r}
    grids = {**args.existing.get("grids", {}),
             **{f: g for f, g in results["grids"].items() if f in ran}}
    results = {**args.existing, "grids": grids,
               "runs": {**args.existing["runs"], **results["runs"]}}
    results["meta"] = {**results["meta"],
                       "added": results["meta"].get("added", []) + [added]}
    path = pathlib.Path(args.add_to)
    out = path.parent
  with open(path, "w") as f:
    json.dump(results, f)
  if any("run" in r for r in results["runs"].values()):
    plots.plot_results(results, out / results["plot"])
  reference = "adam" if "run" in results["runs"].get("adam", {}) else None
  print(summary.markdown(results, reference or next(iter(results["runs"]))))
  return results


if __name__ == "__main__":
  main()
