"""The sweep rule: the task's grid, extended until the best setting is inside.

Every contender sweeps its grid (``tasks``: learning rates, × dampings for
the natural-gradient methods). A grid fixed per task can leave a method's
optimum outside it, and where the optimum lies depends on the method's
scale (K-FAC's λ damps ``A⊗G``, TENGraD's the exact block, kfac-jax's a
curvature scaled by its loss registration) and on the task. So the sweep
follows one rule for every contender and task:

  when the best setting so far is at an end of the swept values along an
  axis (learning rate or damping, other axes at the best's), the next value
  on the 1-3-10 ladder beyond that end is swept too; repeat until the best
  is inside along every axis or ``MAX_EXTENSIONS`` values were added beyond
  the grid on that side.

An axis with one value (Adam's damping) is not extended. Example::

  scores, chosen = sweep([{"lr": 0.1, "damping": 0.1},
                          {"lr": 0.1, "damping": 0.3}], score_fn)
"""

from __future__ import annotations

import math
from typing import Callable

MAX_EXTENSIONS = 2   # values added beyond the grid, per axis and side
AXES = ("lr", "damping")


def _leading_one(x: float) -> bool:
  return f"{x:.0e}"[0] == "1"


def ladder_up(x: float) -> float:
  """The next value up the 1-3-10 ladder (0.1 → 0.3 → 1)."""
  return float(f"{x * (3 if _leading_one(x) else 10 / 3):.1g}")


def ladder_down(x: float) -> float:
  """The next value down the 1-3-10 ladder (1 → 0.3 → 0.1)."""
  return float(f"{x / (10 / 3 if _leading_one(x) else 3):.1g}")


def _next_points(scores, grid_ends, added) -> list:
  """Settings one ladder step beyond the best's end along each axis."""
  best = min(scores, key=lambda s: s["score"])["hp"]
  swept = [s["hp"] for s in scores]
  out = []
  for axis in AXES:
    if axis not in grid_ends or not isinstance(best.get(axis), float):
      continue
    line = sorted({hp[axis] for hp in swept if all(
        hp.get(k) == best.get(k) for k in best if k != axis)})
    if len(line) < 2:
      continue
    for side, end, step in (("up", line[-1], ladder_up),
                            ("down", line[0], ladder_down)):
      if not math.isclose(best[axis], end) or added[(axis, side)] >= MAX_EXTENSIONS:
        continue
      if side == "down" and step(end) <= 0:
        continue
      lo, hi = grid_ends[axis]
      beyond = end >= hi if side == "up" else end <= lo
      candidate = dict(best, **{axis: step(end)})
      if beyond and candidate not in swept:
        added[(axis, side)] += 1
        out.append(candidate)
  return out


def sweep(points: list, score: Callable[[dict], float]):
  """Scores ``points`` then extends them by the rule of the module doc.

  Args:
    points: the grid's settings (dicts with ``"lr"`` and ``"damping"``).
    score: ``setting -> final sweep loss`` (``inf`` for a diverged run).

  Returns:
    ``(scores, chosen)``: every swept setting with its score, in sweep
    order (``{"hp", "score", ...}`` as ``score`` returns it when it returns
    a dict), and the best setting.
  """
  def record(hp):
    out = score(hp)
    return dict(out, hp=hp) if isinstance(out, dict) else {"hp": hp, "score": out}

  scores = [record(hp) for hp in points]
  grid_ends = {axis: (min(hp[axis] for hp in points), max(hp[axis] for hp in points))
               for axis in AXES if all(isinstance(hp.get(axis), float) for hp in points)}
  added = {(axis, side): 0 for axis in AXES for side in ("up", "down")}
  while True:
    new = _next_points(scores, grid_ends, added)
    if not new:
      break
    scores += [record(hp) for hp in new]
  return scores, min(scores, key=lambda s: s["score"])["hp"]
