"""One jitted training step: loss, gradient, statistics and update in one pass.

``make_train_step(loss_fn, optimizer)`` is the fast path written once, so that
the first thing a user writes is also the fastest:

* one forward and backward pass gives the loss, the gradient and the
  curvature statistics (``kfe.value_and_grad``), where ``jax.grad`` followed
  by ``update(..., batch=)`` runs a second pass for the statistics;
* the refresh schedule is static (``kfe.due_at`` of the step number, as
  kfac-jax's ``global_step_int``): one program with the statistics and
  inverse work and one without, neither with a ``lax.cond`` that would copy
  the curvature state through its untaken branch (``kfac_jax_ext.schedule``);
* parameters and optimizer state are donated, so no step copies the state
  into fresh buffers.

The aliases (``kfe.kfac``, ``kfe.tkfac``, ``kfe.tengrad``,
``kfe.two_level_kfac``) record their schedule (``stats_every``,
``inverse_every``, the adaptive λ interval, ``fisher``, ``has_aux``), so
``make_train_step`` needs nothing else. A transformation built otherwise (a
``scale_by_*`` in your own ``optax.chain``, ``optax.inject_hyperparams``)
gives its schedule explicitly.
"""

from __future__ import annotations

import functools
import weakref
from typing import Callable, NamedTuple

import jax
import numpy as np
import optax

from kfac_jax_ext import schedule as schedule_lib
from kfac_jax_ext import statistics


class StepSchedule(NamedTuple):
  """What ``make_train_step`` reads from an alias (all Python values).

  Attributes:
    stats_every: statistics every k updates.
    inverse_every: inverses every k updates.
    damping_every: the adaptive λ's interval, or None (no λ adaptation).
    fisher: ``"sampled"`` or ``"empirical"``.
    has_aux: ``loss_fn`` returns ``(loss, aux)``.
    statistics_every_step: the update reads the batch's statistics on every
      step (two-level's per-step coarse spaces), whatever ``stats_every``.
    axis_name: the preconditioner's data axis, or None.
    stats_batch: statistics from the batch's first n examples, or None.
  """
  stats_every: int
  inverse_every: int
  damping_every: int | None = None
  fisher: str = "sampled"
  has_aux: bool = False
  statistics_every_step: bool = False
  axis_name: object = None
  stats_batch: int | None = None


_SCHEDULES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def remember_schedule(transformation, step_schedule: StepSchedule):
  """Records ``step_schedule`` for ``transformation`` (keyed by its update
  function); returns ``transformation``."""
  _SCHEDULES[transformation.update] = step_schedule
  return transformation


def schedule_of(transformation) -> StepSchedule | None:
  """The schedule an alias recorded for ``transformation``, or None."""
  try:
    return _SCHEDULES.get(transformation.update)
  except TypeError:       # an update function that cannot be weakly referenced
    return None


def _explicit(stats_every, inverse_every, damping_every, fisher, has_aux,
              stats_batch):
  if stats_every is None or inverse_every is None:
    raise ValueError(
        "make_train_step: this optimizer's refresh schedule is not known (it was "
        "not built by kfe.kfac, kfe.tkfac, kfe.tengrad or kfe.two_level_kfac, or "
        "it was wrapped, e.g. by optax.chain or optax.inject_hyperparams): pass "
        "stats_every= and inverse_every= (and damping_every= with "
        "damping_adaptation=True), the values the preconditioner was given.")
  return StepSchedule(stats_every, inverse_every, damping_every,
                      fisher or "sampled", bool(has_aux),
                      stats_batch=stats_batch)


def make_train_step(loss_fn: Callable, optimizer, *, stats_every: int | None = None,
                    inverse_every: int | None = None,
                    damping_every: int | None = None, fisher: str | None = None,
                    has_aux: bool | None = None, stats_batch: int | None = None,
                    refresh_warmup: int = 0, donate: bool = True) -> Callable:
  """A jitted whole training step with the static refresh schedule.

  Step ``i`` computes ``value, ∇, statistics = kfe.value_and_grad(loss_fn)``
  in one pass (statistics only when ``kfe.due_at(i, ...)`` says so), then
  ``Δ, state = optimizer.update(∇, state, params, batch=, key=, curvature=,
  due=)`` and ``params + Δ``. It is the same update as
  ``optimizer.update(jax.grad(loss_fn)(params, batch), state, params,
  batch=batch, key=key)`` for the same sampled targets, with the refresh
  decided by ``i`` rather than by the state's counters.

  Args:
    loss_fn: the loss the optimizer was built with.
    optimizer: a ``kfe.kfac``/``tkfac``/``tengrad``/``two_level_kfac``
      optimizer (its schedule is read from it), or any transformation whose
      schedule you give below.
    stats_every, inverse_every, damping_every, fisher, has_aux, stats_batch:
      the schedule, only for an optimizer not built by an alias (given with
      an alias, they must equal the alias's; ``stats_batch``: the
      preconditioner's, statistics from the first n examples).
    refresh_warmup: updates ``0 … W−1`` refresh statistics and inverses
      whatever the periods (``kfe.due_at``'s; default 0). The step's own
      option: the optimizer's counters have no warm-up.
    donate: donate ``params`` and ``state`` (default): the arrays passed in
      are invalid after the call; keep the returned ones.

  Returns:
    ``step(params, state, batch, key, i) -> (params, state, value)`` with
    ``i`` the number of updates made so far (a Python int; 0 for the first
    step, the checkpointed count after a restore) and ``value`` what
    ``loss_fn`` returns. The key is folded with ``i``, so one key may serve
    every step. At most four programs are compiled (with and without
    statistics, with and without inverses).

  Raises:
    ValueError: the schedule is unknown, or contradicts the alias's; the
      optimizer has an ``axis_name`` (inside ``pmap``/``shard_map`` write the
      step with ``kfe.value_and_grad(..., axis_name=)``, see the user guide).

  Example:
    >>> opt = kfe.kfac(loss_fn, learning_rate=0.1, damping=0.1,
    ...                example_batch=batch)
    >>> step = kfe.make_train_step(loss_fn, opt)
    >>> state = opt.init(params)
    >>> for i in range(1000):
    ...   params, state, loss = step(params, state, next(batches), key, i)
  """
  schedule_lib.due_at(0, refresh_warmup=refresh_warmup)   # checks it now
  given = dict(stats_every=stats_every, inverse_every=inverse_every,
               damping_every=damping_every, fisher=fisher, has_aux=has_aux,
               stats_batch=stats_batch)
  known = schedule_of(optimizer)
  if known is None:
    plan = _explicit(**given)
  else:
    wrong = {k: (v, getattr(known, k)) for k, v in given.items()
             if v is not None and v != getattr(known, k)}
    if wrong:
      raise ValueError(
          "make_train_step: the schedule given contradicts the optimizer's "
          + ", ".join(f"{k}={v!r} (optimizer: {o!r})" for k, (v, o) in wrong.items())
          + "; leave these out, the optimizer's own are used.")
    plan = known
  if plan.axis_name is not None:
    raise ValueError(
        f"make_train_step: the optimizer has axis_name={plan.axis_name!r}; inside "
        "pmap/shard_map write the step with kfe.value_and_grad(loss_fn, "
        "axis_name=...) (docs/guide.md, 'Several devices'). Under jax.jit over a "
        "Mesh no axis_name is needed.")
  value_and_grad = statistics.value_and_grad(loss_fn, has_aux=plan.has_aux,
                                             fisher=plan.fisher,
                                             stats_batch=plan.stats_batch)

  @functools.partial(jax.jit, static_argnames="due",
                     donate_argnums=(0, 1) if donate else ())
  def jitted(params, state, batch, key, i, due):
    key = jax.random.fold_in(key, i)
    pass_due = due._replace(statistics=True) if plan.statistics_every_step else due
    value, grads, curvature = value_and_grad(params, batch, key, due=pass_due)
    updates, state = optimizer.update(grads, state, params, batch=batch, key=key,
                                      curvature=curvature, due=due)
    return optax.apply_updates(params, updates), state, value

  def step(params, state, batch, key, i):
    due = schedule_lib.due_at(i, stats_every=plan.stats_every,
                              inverse_every=plan.inverse_every,
                              damping_every=plan.damping_every,
                              refresh_warmup=refresh_warmup)
    return jitted(params, state, batch, key, np.uint32(i), due=due)

  step.schedule = plan
  step.refresh_warmup = refresh_warmup
  return step
