"""One training run under a step or wall-clock budget, with evaluations.

Wall-clock counts only the optimizer's steps: compilation happens in a
warm-up on a throwaway copy of the state (``Contender.warmup`` steps), and
evaluations are excluded. Each step is synchronized (its loss is read back),
so every optimizer is timed the same way. The run's evaluations are spread
evenly over the budget (by step, or by training seconds for a time budget),
plus one before the first step and one at the end.
"""

from __future__ import annotations

import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

EVALS = 40
EVAL_CHUNK = 500


def make_evaluator(metrics_fn):
  """``(params, data) -> {metric: float}``, averaged over chunks of examples."""
  jitted = jax.jit(metrics_fn)

  def evaluate(params, data):
    n = len(jax.tree_util.tree_leaves(data)[0])
    totals = {}
    for lo in range(0, n, EVAL_CHUNK):
      chunk = jax.tree_util.tree_map(lambda a: jnp.asarray(a[lo:lo + EVAL_CHUNK]), data)
      size = len(jax.tree_util.tree_leaves(chunk)[0])
      for k, v in jitted(params, chunk).items():
        totals[k] = totals.get(k, 0.0) + float(v) * size
    return {k: v / n for k, v in totals.items()}
  return evaluate


class Progress:
  """A one-line progress bar on stderr (a line per 10% when not a terminal)."""

  def __init__(self, label, enabled=True, stream=sys.stderr):
    self.label, self.enabled, self.stream = label, enabled, stream
    self.tty = stream.isatty()
    self.last_draw, self.last_decile = 0.0, -1

  def update(self, fraction, text, final=False):
    if not self.enabled:
      return
    fraction = min(max(fraction, 0.0), 1.0)
    now = time.monotonic()
    if self.tty:
      if final or now - self.last_draw > 0.2:
        bar = "#" * int(24 * fraction) + "-" * (24 - int(24 * fraction))
        self.stream.write(f"\r{self.label:<34} [{bar}] {100 * fraction:5.1f}% {text}"
                          + ("\n" if final else ""))
        self.stream.flush()
        self.last_draw = now
    elif int(10 * fraction) > self.last_decile or (final and self.last_decile < 10):
      self.last_decile = int(10 * fraction)
      self.stream.write(f"{self.label:<34} {100 * fraction:5.1f}% {text}\n")
      self.stream.flush()


def train(contender, task, hp, *, steps=None, seconds=None, seed=0, label="",
          progress=True, evaluate=None, evals=EVALS, on_step=None):
  """Trains ``contender`` on ``task`` with hyper-parameters ``hp``.

  Args:
    contender: a ``contenders.Contender``.
    task: a ``tasks.Task``.
    hp: ``{"lr": float, "damping": float}`` (``"lr": "adaptive"`` for the
      adaptive contenders).
    steps, seconds: the budget; the run stops at whichever comes first (at
      least one is required).
    seed: picks the batches and the sampling keys.
    label: the progress bar's label.
    evaluate: a ``make_evaluator(task.metrics_fn)`` (made if None).
    evals: evaluations spread over the budget (besides the one at step 0);
      1 evaluates only at the end (the sweep's score).
    on_step: ``(step, carry) ↦ None``, called after each timed step, outside
      its timing (e.g. to read the optimizer state), or None.

  Returns:
    A dict: ``loss`` (minibatch loss per step), ``step_seconds`` (each
    step's wall-clock), ``evals`` (list of ``{"step", "seconds", "train":
    metrics, "test": metrics}``), ``finite`` (False if the loss became
    non-finite; the run then stops) and ``hp``.
  """
  if steps is None and seconds is None:
    raise ValueError("give a budget: steps, seconds or both")
  evaluate = evaluate or make_evaluator(task.metrics_fn)
  hp_arrays = {k: jnp.asarray(v, jnp.float32) for k, v in hp.items()
               if not isinstance(v, str)}     # "adaptive": nothing to pass
  key = jax.random.PRNGKey(seed)
  warm_rng = np.random.default_rng(seed + 1000)
  carry = contender.init(task.params, hp)
  for i in range(contender.warmup):       # compiles every variant of the step
    batch = jax.tree_util.tree_map(jnp.asarray, task.sample_batch(warm_rng))
    carry, loss = contender.step(carry, batch, jax.random.fold_in(key, 10 ** 6 + i),
                                 hp_arrays, i)
    jax.block_until_ready(loss)
  carry = contender.init(task.params, hp)
  rng = np.random.default_rng(seed)
  bar = Progress(label, progress)

  def record(i, elapsed):
    params = contender.params(carry)
    records.append({"step": i, "seconds": elapsed,
                  "train": evaluate(params, task.train_eval),
                  "test": evaluate(params, task.test_eval)})

  losses, step_seconds, records = [], [], []
  elapsed, i, finite = 0.0, 0, True
  interval = (seconds / evals) if seconds is not None else max(1, (steps or 1) // evals)
  next_eval = interval
  record(0, 0.0)
  while (steps is None or i < steps) and (seconds is None or elapsed < seconds):
    batch = jax.tree_util.tree_map(jnp.asarray, task.sample_batch(rng))
    start = time.perf_counter()
    carry, loss = contender.step(carry, batch, jax.random.fold_in(key, i), hp_arrays, i)
    loss = float(loss)
    took = time.perf_counter() - start
    if on_step is not None:
      on_step(i, carry)
    elapsed += took
    i += 1
    losses.append(loss)
    step_seconds.append(took)
    if not math.isfinite(loss):
      finite = False
      break
    if (elapsed if seconds is not None else i) >= next_eval:
      record(i, elapsed)
      next_eval += interval
    fraction = max(i / steps if steps else 0.0, elapsed / seconds if seconds else 0.0)
    bar.update(fraction, f"step {i} loss {loss:.4g} {elapsed:.1f}s")
  if finite and records[-1]["step"] != i:
    record(i, elapsed)
  bar.update(1.0, f"step {i} loss {losses[-1] if losses else float('nan'):.4g} "
             f"{elapsed:.1f}s" + ("" if finite else " DIVERGED"), final=True)
  return {"hp": hp, "loss": losses, "step_seconds": step_seconds, "evals": records,
          "finite": finite}
