"""Static refresh schedules: which curvature work an update does, known in Python.

By default every preconditioner decides from its state counters, at run time,
whether an update refreshes statistics and inverses: the work sits in
``lax.cond`` branches. That costs on every step. XLA passes the whole
curvature state through the untaken branch as a copy, even when the state is
donated: 24.4 ms per step for the MNIST autoencoder's 16 damped factor
inverses on a 2-core CPU, against 0.0 ms without the conditional
(``python -m benchmarks.cpu_facts``, fact 4). On XLA:CPU the work inside a
taken branch also runs slower than outside one (fact 1).

A caller that counts its steps in Python can say instead what the update
does. It passes ``due=kfe.due_at(step, stats_every=..., inverse_every=...)``
to ``kfe.value_and_grad`` and to ``update``, and jits the step with ``due``
static. Two programs are compiled, one with the refresh work and one without,
and neither contains a conditional. This is how kfac-jax's ``Optimizer``
works: it takes ``global_step_int``.

``due_at(i, ...)`` reproduces the counters' schedule for the ``i``-th update
(counting from 0): statistics when ``i % stats_every == 0``, inverses when
``i % inverse_every == 0``. Given ``due``, an update follows it and ignores
the counters. The counters still advance, so a later update without ``due``
goes on with the default schedule.

``due_at(i, ..., refresh_warmup=W)`` also refreshes statistics and inverses
on each of the first ``W`` updates. The curvature changes fastest at the
start, while the running averages are still filling
(``ε_k = min(1 − 1/k, ε)`` reaches its cap at ``k = 1/(1 − ε)``
statistics), so a period-10 schedule would precondition steps 1–9 with the
initial network's curvature. It exists only in the static schedule
(``due_at``, ``make_train_step``); the counters have none.
"""

from __future__ import annotations

from typing import NamedTuple

import jax


class Due(NamedTuple):
  """What one ``update`` does, decided in Python (hashable: a static argument).

  Attributes:
    statistics: take this batch's curvature statistics (and fold them into
      the running averages).
    inverses: recompute the damped inverses (decompositions, Woodbury Grams)
      from the running statistics.
    damping: for ``damping_adaptation=True``, whether this update adapts λ
      (one extra forward pass); None (default): the counter decides at run
      time (``lax.cond``).
  """
  statistics: bool
  inverses: bool
  damping: bool | None = None


def due_at(step: int, *, stats_every: int = 1, inverse_every: int = 5,
           damping_every: int | None = None, refresh_warmup: int = 0) -> Due:
  """The default schedule's ``Due`` for update number ``step`` (from 0).

  Args:
    step: the number of updates made before this one (a Python int).
    stats_every: the preconditioner's ``stats_every``.
    inverse_every: the preconditioner's ``inverse_every``.
    damping_every: the optimizer's ``damping_adaptation_interval`` when it
      adapts λ (``damping_adaptation=True``), else None.
    refresh_warmup: W ≥ 0: updates ``0 … W−1`` refresh statistics and
      inverses whatever the periods (default 0: none). ``W = 1/(1 −
      ema_decay)`` is the number of statistics the running average takes to
      reach its cap (20 for the default 0.95). Measured on the Shakespeare
      transformer and the Fashion CNN at period 10 (``docs/performance.md``):
      a lower loss at equal steps, but no reliable gain in time to a target
      loss, so the benchmarks leave it off.

  Returns:
    ``Due(step % stats_every == 0, step % inverse_every == 0,
    step % damping_every == 0)`` (the last None without ``damping_every``),
    the first two True for ``step < refresh_warmup``.

  Example:
    >>> step = jax.jit(train_step, static_argnames="due", donate_argnums=0)
    >>> for i in range(num_steps):
    ...   carry = step(carry, batch, key,
    ...                due=kfe.due_at(i, stats_every=10, inverse_every=10))
  """
  periods = [("stats_every", stats_every), ("inverse_every", inverse_every)]
  if damping_every is not None:
    periods.append(("damping_every", damping_every))
  for name, value in [("step", step), ("refresh_warmup", refresh_warmup)] + periods:
    if isinstance(value, bool) or not isinstance(value, int):
      raise TypeError(f"due_at: {name} must be a Python int, got {value!r} "
                      "(a traced step cannot choose what is compiled).")
  for name, value in (("step", step), ("refresh_warmup", refresh_warmup)):
    if value < 0:
      raise ValueError(f"due_at: {name} must be >= 0, got {value}.")
  for name, value in periods:
    if value < 1:
      raise ValueError(f"due_at: {name} must be >= 1, got {value}.")
  warm = step < refresh_warmup
  return Due(warm or step % stats_every == 0, warm or step % inverse_every == 0,
             None if damping_every is None else step % damping_every == 0)


def check_due(due, name: str) -> None:
  """A clear error unless ``due`` is None or a ``Due`` of Python bools."""
  if due is None:
    return
  if (not isinstance(due, Due) or not all(isinstance(x, bool) for x in due[:2])
      or not (due.damping is None or isinstance(due.damping, bool))):
    raise TypeError(f"{name}: due must be kfe.Due(statistics: bool, inverses: "
                    f"bool, damping: bool | None = None) made in Python "
                    f"(kfe.due_at), got {due!r}; mark it static when you jit "
                    "(static_argnames).")


def value_at(option, count, override=None):
  """A float-or-schedule option's value at update ``count``, or ``override``
  (a value passed to ``update``, e.g. the adapted damping) when given."""
  if override is not None:
    return override
  return option(count) if callable(option) else option


def maybe(period, pred, true_fn, false_fn, operand, static=None):
  """``lax.cond(pred, ...)``; a direct call of one branch when ``static``
  (a Python bool, from ``due``) decides, or when the period is statically 1."""
  if static is not None:
    return (true_fn if static else false_fn)(operand)
  if isinstance(period, int) and period == 1:
    return true_fn(operand)
  return jax.lax.cond(pred, true_fn, false_fn, operand)
