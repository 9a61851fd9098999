"""Time-to-target and per-step cost from a runner JSON; the README tables.

Definitions (all on the task's fixed training subset, evaluated during the
run; wall-clock is training time only, see ``training``):
* target: the reference optimizer's (Adam's) best evaluated training loss
  within its budget; its time-to-target is the clock at that evaluation.
* time-to-target of another optimizer: the clock at its first evaluation
  whose training loss is at or below the target (none if never).
* ``vs ref``: that time divided by the reference's time-to-target (≤ 0.5
  means reaching Adam's best in at most half of Adam's wall-clock).
* per-step cost: the median step, and the mean over whole refresh periods
  (amortized), each divided by the reference's.
* milestones: the same ratio for easier targets, the reference's best loss
  within the first 25% and 50% of its training time (and 100%, the
  target): where along training one method overtakes the other.

Run ``python -m benchmarks.summary RESULTS.json ... --readme
benchmarks/README.md`` to rewrite the README's results section (between
``<!-- results:begin -->`` and ``<!-- results:end -->``) from the JSON files,
``python -m benchmarks.summary RESULTS.json ... --overview --readme README.md``
to fill the front page's table over several runs (``<!-- overview:begin -->``
…; ``--section NAME``: ``<!-- overview:NAME:begin -->`` …), and
``--headline`` with one JSON for a short table of one run
(``<!-- headline:begin -->`` …).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re

import numpy as np

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
HEADLINE_BEGIN, HEADLINE_END = "<!-- headline:begin -->", "<!-- headline:end -->"
OVERVIEW_BEGIN, OVERVIEW_END = "<!-- overview:begin -->", "<!-- overview:end -->"
HEADLINE_ROWS = ("adam", "muon", "kfac", "kfac_jax", "kfac_adaptive",
                 "kfac_adaptive_relative")


def step_costs(step_seconds, period):
  """``(median, amortized)`` seconds; amortized over whole refresh periods."""
  t = np.asarray(step_seconds)
  if len(t) == 0:
    return float("nan"), float("nan")
  whole = max(period, (len(t) // period) * period) if len(t) >= period else len(t)
  return float(np.median(t)), float(np.mean(t[:whole]))


def _time_to(evals, target):
  for e in evals:
    if e["train"]["loss"] <= target:
      return e["seconds"], e["step"]
  return None, None


def summarize(results, reference="adam"):
  """Rows ``{optimizer: {...}}`` of the summary (see the module docstring)."""
  runs = {k: v for k, v in results["runs"].items() if "run" in v}
  period = results["period"]
  rows = {}
  ref = runs.get(reference)
  target = ref_time = None
  if ref is not None:
    best = min(ref["run"]["evals"], key=lambda e: e["train"]["loss"])
    target, ref_time = best["train"]["loss"], best["seconds"]
  ref_cost = step_costs(ref["run"]["step_seconds"], period) if ref else None
  for name, r in runs.items():
    run = r["run"]
    last = run["evals"][-1]
    median, amortized = step_costs(run["step_seconds"], period)
    t, s = _time_to(run["evals"], target) if target is not None else (None, None)
    rows[name] = {
        "hp": r["chosen"], "steps": len(run["loss"]), "finite": run["finite"],
        "seconds": float(sum(run["step_seconds"])),
        "final_train": last["train"]["loss"], "final_test": last["test"]["loss"],
        "final_test_accuracy": last["test"].get("accuracy"),
        "best_train": min(e["train"]["loss"] for e in run["evals"]),
        "time_to_target": t, "steps_to_target": s,
        "vs_ref_time": (t / ref_time) if (t is not None and ref_time) else None,
        "median_step_ms": 1e3 * median, "amortized_step_ms": 1e3 * amortized,
        "median_vs_ref": median / ref_cost[0] if ref_cost else None,
        "amortized_vs_ref": amortized / ref_cost[1] if ref_cost else None,
    }
  return {"target": target, "reference": reference, "reference_time": ref_time,
          "rows": rows}


MILESTONES = (0.25, 0.5, 1.0)


def milestones(results, reference="adam"):
  """``{"targets": [(fraction, loss, ref_seconds)], "ratios": {name:
  [time / ref time or None]}}``: time to the reference's best loss within
  each fraction of its training time, divided by the reference's."""
  runs = {k: v for k, v in results["runs"].items() if "run" in v}
  if reference not in runs:
    return None
  ref_evals = runs[reference]["run"]["evals"]
  total = ref_evals[-1]["seconds"]
  targets = []
  for frac in MILESTONES:
    within = [e for e in ref_evals if e["seconds"] <= frac * total + 1e-9
              and e["step"] > 0]
    if within:
      best = min(within, key=lambda e: e["train"]["loss"])
      targets.append((frac, best["train"]["loss"], best["seconds"]))
  ratios = {}
  for name, r in runs.items():
    ratios[name] = []
    for _, loss, ref_seconds in targets:
      t, _ = _time_to(r["run"]["evals"], loss)
      ratios[name].append(t / ref_seconds if t is not None and ref_seconds
                          else None)
  return {"targets": targets, "ratios": ratios}


def _fmt(x, spec):
  return "–" if x is None else format(x, spec)


def hp_label(name, hp):
  """``"lr 0.1, λ 0.3"``: a setting as the tables show it."""
  if hp["lr"] == "adaptive":
    return f"adaptive, λ₀ {hp['damping']:g}"
  return f"lr {hp['lr']:g}" + (f", λ {hp['damping']:g}" if hp.get("damping") else "")


def markdown(results, reference="adam", plot_path=None):
  """A results section for one task, as markdown (``plot_path``: the PNG's
  path as the document should link it; default the name in the results)."""
  s = summarize(results, reference)
  meta = results["meta"]
  batch = results.get("batch_size")
  heading = results.get("name") or results["task"]
  lines = [f"### {heading}" + (f" (batch {batch})" if batch else ""), "",
           results["description"], "",
           f"`{meta['command']}` — {meta['date']}, {meta['machine']}, jax "
           f"{meta['jax']}, budget {results['budget']}; sweep "
           f"{results['sweep_budget']} per setting; curvature refreshed every "
           f"{results['period']} steps" + (
               f", every step for the first {results['refresh_warmup']}"
               if results.get("refresh_warmup") else "") + (
               f"; curvature EMA {results['ema_decay']:g} per statistics update"
               if results.get("ema_decay") is not None else "") + (
               "; Nesterov momentum for kfac_jax_ext's fixed-lr contenders"
               if results.get("nesterov") else "") + ".", ""]
  for added in meta.get("added", []):     # runs joined with --add-to
    lines += [f"Joined by `{added['command']}` — {added['date']}.", ""]
  failed = {k: v["error"] for k, v in results["runs"].items() if "error" in v}
  if s["target"] is not None:
    lines += [f"Target: {reference}'s best training loss **{s['target']:.4g}**, "
              f"reached at {s['reference_time']:.3g} s.", ""]
  has_acc = any(r["final_test_accuracy"] is not None for r in s["rows"].values())
  head = ["optimizer", "chosen", "steps", "final train", "final test"]
  head += ["test acc"] if has_acc else []
  head += ["best train", "s → target", f"vs {reference}", "ms/step (median)",
           "ms/step (amort.)", f"step vs {reference}"]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, r in s["rows"].items():
    cells = [name + ("" if r["finite"] else " (diverged)"), hp_label(name, r["hp"]),
             str(r["steps"]), _fmt(r["final_train"], ".4g"), _fmt(r["final_test"], ".4g")]
    cells += [_fmt(r["final_test_accuracy"], ".3f")] if has_acc else []
    cells += [_fmt(r["best_train"], ".4g"), _fmt(r["time_to_target"], ".3g"),
              _fmt(r["vs_ref_time"], ".2f"), _fmt(r["median_step_ms"], ".1f"),
              _fmt(r["amortized_step_ms"], ".1f"), _fmt(r["amortized_vs_ref"], ".2f")]
    lines.append("| " + " | ".join(cells) + " |")
  ms = milestones(results, reference)
  if ms and len(ms["targets"]) > 1 and len(ms["ratios"]) > 1:
    lines += ["", f"Time to {reference}'s best loss within a fraction of its "
              f"training time, divided by {reference}'s:", ""]
    head = ["optimizer"] + [f"{100 * f:g}%: {loss:.4g} ({t:.3g} s)"
                            for f, loss, t in ms["targets"]]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, ratios in ms["ratios"].items():
      if name != reference:
        lines.append("| " + " | ".join([name] + [_fmt(x, ".2f") for x in ratios])
                     + " |")
  for name, error in failed.items():
    lines.append(f"\n`{name}` did not run: {error}")
  if plot_path or results.get("plot"):
    lines += ["", f"![{results['task']}]({plot_path or results['plot']})"]
  return "\n".join(lines) + "\n"


def headline(results, json_path, readme, reference="adam", names=HEADLINE_ROWS):
  """The front page's table: a few optimizers of one run (those added
  later with ``--add-to`` named with their command), time to the
  reference's best training loss and the step cost, plus the plot."""
  s = summarize(results, reference)
  meta = results["meta"]
  rel = lambda p: os.path.relpath(p, pathlib.Path(readme).parent)
  lines = [f"{results['description']}; each optimizer swept, then trained "
           f"{results['budget']} (`{meta['command']}`, {meta['date']}, "
           f"{meta['machine']}). Target: {reference}'s best training loss, "
           f"{s['target']:.4g}, which it reached at {s['reference_time']:.3g} s.",
           "", "| optimizer | final train loss | time to target | × "
           f"{reference}'s time | step (amortized) |", "|---|---|---|---|---|"]
  for name in names:
    r = s["rows"].get(name)
    if r is None:
      continue
    t = "not reached" if r["time_to_target"] is None else f"{r['time_to_target']:.3g} s"
    lines.append(f"| {name} | {r['final_train']:.4g} | {t} | "
                 f"{_fmt(r['vs_ref_time'], '.2f')} | {r['amortized_step_ms']:.0f} ms |")
  for added in meta.get("added", []):
    shown = [n for n in added["optimizers"] if n in names and n in s["rows"]]
    if shown:
      lines += ["", f"{', '.join(shown)} added later to the same file: "
                f"`{added['command']}`, {added['date']}."]
  plot = pathlib.Path(json_path).parent / results["plot"]
  lines += ["", f"![{results['task']}]({rel(plot)})"]
  return "\n".join(lines) + "\n"


def _run_label(results):
  return f"{results['task']}, seed {results.get('seed', 0)}"


def overview(results_list, reference="adam"):
  """One table over several runs (tasks, seeds): per optimizer and run, the
  time to the reference's best training loss divided by the reference's
  time (the fastest in bold; ``–`` not reached, with the final training
  loss), then the amortized step divided by the reference's, and the
  command of each run."""
  summaries = [summarize(r, reference) for r in results_list]
  names = []
  for s in summaries:
    names += [n for n in s["rows"] if n not in names]
  head = ("| optimizer | " + " | ".join(_run_label(r) for r in results_list)
          + " |\n|---|" + "---|" * len(results_list))
  times, steps = [head], [head]
  fastest = [min((round(r["vs_ref_time"], 2) for r in s["rows"].values()
                  if r["vs_ref_time"] is not None), default=None) for s in summaries]
  for name in names:
    cells_t, cells_s = [], []
    for s, best in zip(summaries, fastest):
      r = s["rows"].get(name)
      if r is None:
        cells_t.append(" ")
        cells_s.append(" ")
        continue
      v = r["vs_ref_time"]
      cells_t.append(f"– ({r['final_train']:.4g})" if v is None else
                     f"**{v:.2f}**" if round(v, 2) == best else f"{v:.2f}")
      cells_s.append(_fmt(r["amortized_vs_ref"], ".2f"))
    times.append(f"| {name} | " + " | ".join(cells_t) + " |")
    steps.append(f"| {name} | " + " | ".join(cells_s) + " |")
  targets = " ".join(
      f"{_run_label(r)}: {s['target']:.4g} at {s['reference_time']:.3g} s."
      for r, s in zip(results_list, summaries) if s["target"] is not None)
  commands = [f"* {_run_label(r)}: `{r['meta']['command']}` ({r['meta']['date']}, "
              f"{r['meta']['machine']})" + "".join(
                  f"; {', '.join(a['optimizers'])} joined by `{a['command']}` "
                  f"({a['date']})" for a in r["meta"].get("added", []))
              for r in results_list]
  return "\n".join(
      [f"Time to {reference}'s best training loss, divided by {reference}'s time "
       f"(fastest in bold; – = not reached, final training loss in brackets). "
       f"Targets: {targets}", ""] + times +
      ["", f"Amortized step, divided by {reference}'s:", ""] + steps +
      ["", "Runs:", ""] + commands) + "\n"


def overview_markers(section=None):
  """The README's markers of the overview section ``section`` (None: the
  first, ``<!-- overview:begin -->``; a name: ``<!-- overview:NAME:begin -->``)."""
  if section is None:
    return OVERVIEW_BEGIN, OVERVIEW_END
  if not section.replace("_", "").replace("-", "").isalnum():
    raise ValueError(f"a section name is letters, digits, '_' or '-', got {section!r}")
  return f"<!-- overview:{section}:begin -->", f"<!-- overview:{section}:end -->"


def update_overview(readme, json_paths, reference="adam", section=None):
  """Fills the README's overview section (``overview_markers(section)``)
  from several results JSONs."""
  results_list = []
  for path in json_paths:
    with open(path) as f:
      results_list.append(json.load(f))
  _replace_between(readme, *overview_markers(section),
                   overview(results_list, reference))


def _replace_between(readme, begin, end, body):
  text = pathlib.Path(readme).read_text()
  if begin not in text or end not in text:
    raise ValueError(f"{readme} has no {begin} … {end} section to fill")
  text = re.sub(re.escape(begin) + ".*?" + re.escape(end),
                lambda _: f"{begin}\n<!-- generated by python -m benchmarks.summary; "
                          f"do not edit -->\n\n{body}\n{end}", text, flags=re.S)
  pathlib.Path(readme).write_text(text)


def update_headline(readme, json_path, reference="adam"):
  """Fills the README's headline section from one results JSON."""
  with open(json_path) as f:
    results = json.load(f)
  _replace_between(readme, HEADLINE_BEGIN, HEADLINE_END,
                   headline(results, json_path, readme, reference))


def update_readme(readme, json_paths, reference="adam"):
  """Replaces the README's results section with the tables of the JSON files."""
  sections = []
  for path in json_paths:
    with open(path) as f:
      results = json.load(f)
    if results.get("skipped"):
      sections.append(f"### {results['task']}\n\nSkipped: {results['skipped']}\n")
    else:
      plot = results.get("plot") and os.path.relpath(
          pathlib.Path(path).parent / results["plot"], pathlib.Path(readme).parent)
      sections.append(markdown(results, reference, plot))
  _replace_between(readme, BEGIN, END, "\n".join(sections))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("json", nargs="+")
  parser.add_argument("--readme", default=None)
  parser.add_argument("--reference", default="adam")
  parser.add_argument("--headline", action="store_true",
                      help="fill --readme's headline section from the one JSON")
  parser.add_argument("--overview", action="store_true",
                      help="fill --readme's overview section (one table over "
                           "the JSONs' runs)")
  parser.add_argument("--section", default=None,
                      help="with --overview: fill <!-- overview:SECTION:begin --> … "
                           "instead of the first overview")
  args = parser.parse_args(argv)
  if args.section is not None and not args.overview:
    parser.error("--section needs --overview")
  if args.overview:
    if not args.readme:
      parser.error("--overview needs --readme")
    try:
      update_overview(args.readme, args.json, args.reference, args.section)
    except ValueError as e:
      parser.error(str(e))
  elif args.headline:
    if not args.readme or len(args.json) != 1:
      parser.error("--headline needs --readme and exactly one JSON")
    update_headline(args.readme, args.json[0], args.reference)
  elif args.readme:
    update_readme(args.readme, args.json, args.reference)
  else:
    for path in args.json:
      with open(path) as f:
        print(markdown(json.load(f), args.reference))


if __name__ == "__main__":
  main()
