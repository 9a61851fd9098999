"""Per-step progress against per-step cost: where a wall-clock gap comes from.

A contender can end behind another in a fixed wall-clock budget because each
of its steps costs more, or because each step gains less. This splits the two
from the runs a results JSON already holds (``benchmarks.run``): for each
contender against the reference (default K-FAC) in the same run,

* ``step cost``: its amortized step (``summary.step_costs``, whole refresh
  periods) over the reference's;
* ``loss at step k``: the training loss (mean of the ``window`` minibatch
  losses ending at step k) over the reference's at the same step, at 25 %,
  50 % and 100 % of the shorter run's steps. With the same ``--seed`` the
  two runs saw the same batches at the same steps, so the ratio is paired;
* ``ordinary / refresh step``: the median of its steps that refresh no
  inverse and of those that do (step ``i`` with ``i % period == 0``, after
  the run's refresh warm-up, when every step refreshes; ``period`` the
  contender's own for ``tengrad_everyN``), in ms, and the same over the
  reference's: which part of the step the extra cost is in (for a contender
  that refreshes every step no ordinary step: ``nan`` from ``compare``, ``–``
  in the table);
* ``steps to ref``: the first step where its smoothed loss reaches the
  reference's smoothed loss at the reference's last step (``–``: never),
  over the reference's step count.

A ratio of losses above 1 at every k means the contender is behind per step;
then it reaches the reference's loss first only if its step costs less than
the reference's by more than the extra steps it needs (``steps to ref``).
Run::

  python -m benchmarks.step_progress benchmarks/results/autoencoder_nesterov.json \
      --optimizers tengrad,two_level_kfac
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from benchmarks import contenders, summary

FRACTIONS = (0.25, 0.5, 1.0)


def smoothed(losses, window: int) -> np.ndarray:
  """Mean of each ``window`` consecutive losses; entry ``i`` ends at step
  ``i + window - 1``."""
  losses = np.asarray(losses, dtype=float)
  if len(losses) < window:
    raise ValueError(f"{len(losses)} steps, fewer than the window {window}; "
                     "pass a smaller --window")
  return np.convolve(losses, np.ones(window) / window, mode="valid")


def compare(results: dict, name: str, reference: str = "kfac",
            window: int = 25) -> dict:
  """One contender against the reference in one results dict.

  Returns:
    ``{"steps": (ref, it), "step_cost": ratio, "at": [(k, ratio), ...],
    "steps_to_ref": ratio or None, "final": (ref, it), "ordinary_ms": (ref,
    it), "refresh_ms": (ref, it)}`` with losses the smoothed training losses
    and the step medians described in the module docstring.

  Example::

    c = compare(json.load(open("benchmarks/results/autoencoder_nesterov.json")),
                "tengrad")
    c["at"][-1]    # (385, 1.207): 21 % above K-FAC's loss at its 385th step
  """
  runs = results["runs"]
  for n in (name, reference):
    if n not in runs or not isinstance(runs[n].get("run"), dict):
      raise KeyError(f"{n!r} has no run in this file (it has {', '.join(runs)})")
  period = results.get("period", 10)
  ref_run, run = runs[reference]["run"], runs[name]["run"]
  ref, it = smoothed(ref_run["loss"], window), smoothed(run["loss"], window)
  _, ref_cost = summary.step_costs(ref_run["step_seconds"], period)
  _, cost = summary.step_costs(run["step_seconds"], period)
  shorter = min(len(ref_run["loss"]), len(run["loss"]))
  at = []
  for f in FRACTIONS:     # k steps done; the window ends at the k-th step
    k = max(window, int(round(f * shorter)))
    at.append((k, float(it[k - window] / ref[k - window])))
  warmup = results.get("refresh_warmup") or 0
  ordinary, refresh = _split_ms(run["step_seconds"],
                                contenders.refresh_period(name, period), warmup)
  ref_ordinary, ref_refresh = _split_ms(
      ref_run["step_seconds"], contenders.refresh_period(reference, period), warmup)
  reached = np.nonzero(it <= ref[-1])[0]
  return {"steps": (len(ref_run["loss"]), len(run["loss"])),
          "step_cost": float(cost / ref_cost), "at": at,
          "steps_to_ref": (float((reached[0] + window) / len(ref_run["loss"]))
                           if len(reached) else None),
          "final": (float(ref[-1]), float(it[-1])),
          "ordinary_ms": (ref_ordinary, ordinary), "refresh_ms": (ref_refresh, refresh)}


def _split_ms(step_seconds, period, warmup):
  """Median ms of the steps that refresh no inverse and of those that do."""
  ms = 1e3 * np.asarray(step_seconds, dtype=float)
  i = np.arange(len(ms))
  refresh = (i < warmup) | (i % period == 0)
  return (float(np.median(ms[~refresh])) if (~refresh).any() else float("nan"),
          float(np.median(ms[refresh])))


def table(paths, names, reference="kfac", window=25) -> str:
  """A markdown table: one row per (file, contender)."""
  rows = [f"| run | contender | steps ({reference} / it) | step cost | ordinary step, ms "
          f"({reference} / it) | refresh step, ms | loss ÷ ref's at 25 % / 50 % / 100 % "
          "of the steps | steps to ref's final |",
          "|---|---|---|---|---|---|---|---|"]
  for path in paths:
    with open(path) as f:
      results = json.load(f)
    label = results.get("name") or results["task"]
    for name in names:
      if name not in results["runs"]:
        continue
      c = compare(results, name, reference, window)
      at = " / ".join(f"{r:.3f} (k={k})" for k, r in c["at"])
      to = "–" if c["steps_to_ref"] is None else f"{c['steps_to_ref']:.2f}"
      split = [" / ".join("–" if np.isnan(v) else f"{v:.0f}" for v in pair)
               for pair in (c["ordinary_ms"], c["refresh_ms"])]
      rows.append(f"| {label} | {name} | {c['steps'][0]} / {c['steps'][1]} | "
                  f"{c['step_cost']:.2f} | {split[0]} | {split[1]} | {at} | {to} |")
  return "\n".join(rows)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("results", nargs="+", help="results JSON files")
  parser.add_argument("--optimizers", required=True,
                      help="comma-separated contenders to compare")
  parser.add_argument("--reference", default="kfac")
  parser.add_argument("--window", type=int, default=25,
                      help="minibatch losses averaged per point")
  args = parser.parse_args(argv)
  text = table(args.results, [n.strip() for n in args.optimizers.split(",")],
               args.reference, args.window)
  print(text)
  return text


if __name__ == "__main__":
  main()
