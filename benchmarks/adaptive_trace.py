"""Per-step trace of the adaptive mode from a relative λ₀ (``kfac_adaptive_relative``).

Trains a benchmark task with the fused step of ``benchmarks.contenders``
(static schedule, the task's EMA, statistics and inverses every ``--period``
steps, λ adapted every 5 as ``contenders.ADAPTIVE``) and prints, per step,
the minibatch loss and the state's λ, α, μ and ρ. ``--model-units``: the
quadratic model's damping term in the preconditioner's units
(``quadratic_model_step(damping_units=kfe.damping_units_of(pre))``);
without it ``½(λ+η)‖δ‖²``, the aliases' form. This is the measurement
behind keeping the units opt-in (``docs/methods.md``). ``--gamma``: with
M&G §6.6's separate preconditioner damping (``kfac_adaptive_relative_gamma``;
the column γ² is what the preconditioner got, λ without ``--gamma``).

Run: ``python -m benchmarks.adaptive_trace [--task fashion_cnn] [--period 10]
[--steps 8] [--model-units] [--gamma] [--quick]`` (``--quick``: the task's small
version, for the smoke test).
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

import kfac_jax_ext as kfe
from benchmarks import contenders
from benchmarks import tasks


def make(task, model_units: bool, gamma: bool = False):
  """The ``kfac_adaptive_relative`` optimizer, composed by hand."""
  a = contenders.ADAPTIVE
  pre = kfe.scale_by_kfac(
      task.loss_fn, damping=contenders.ADAPTIVE_RELATIVE_DAMPING,
      damping_scale="relative", damping_mode="factored",
      ema_decay=task.ema_decay, stats_every=task.period,
      inverse_every=task.period,
      example_batch=task.sample_batch(np.random.default_rng(0)))
  return kfe.quadratic_model_step(
      pre, task.loss_fn, momentum="adaptive",
      damping=contenders.ADAPTIVE_RELATIVE_DAMPING, damping_adaptation=True,
      damping_adaptation_interval=a["interval"],
      damping_adaptation_decay=a["decay"], min_damping=a["min_damping"],
      max_damping=a["max_damping"],
      damping_units=kfe.damping_units_of(pre) if model_units else None,
      preconditioner_damping_adaptation=gamma,
      preconditioner_damping_interval=task.period)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--task", default="fashion_cnn")
  parser.add_argument("--period", type=int, default=10)
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--model-units", action="store_true")
  parser.add_argument("--gamma", action="store_true")
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args(argv)
  task = tasks.make_task(args.task, quick=args.quick)._replace(period=args.period)
  opt = make(task, args.model_units, args.gamma)
  contender = contenders._fused("trace", "adaptive_relative", task,
                                lambda hp: opt, warmup=0,
                                damping_every=contenders.ADAPTIVE["interval"])
  carry = contender.init(task.params, {})
  rng, key = np.random.default_rng(0), jax.random.PRNGKey(0)
  print(f"{'step':>4} {'loss':>12} {'λ':>10} {'α':>11} {'μ':>11} {'ρ':>9} "
        f"{'γ²':>10}")
  rows = []
  for i in range(args.steps):
    key, sub = jax.random.split(key)
    carry, loss = contender.step(carry, task.sample_batch(rng), sub, {}, i)
    st = carry[1]
    rows.append([float(loss), float(st.damping), float(st.learning_rate),
                 float(st.momentum), float(st.rho),
                 float(st.preconditioner_damping)])
    print(f"{i:>4} {float(loss):>12.4g} {float(st.damping):>10.3g} "
          f"{float(st.learning_rate):>11.3g} {float(st.momentum):>11.3g} "
          f"{float(st.rho):>9.3g} {float(st.preconditioner_damping):>10.3g}")
  return np.array(rows)


if __name__ == "__main__":
  main()
