"""XLA's FLOP count of one two-level K-FAC step against K-FAC's.

Run: ``python -m benchmarks.two_level_flops [--task autoencoder]
[--variants multiplicative_nicolaides,balanced_krylov_nicolaides]``.
For each variant (``COMBINE_SPACE``) the jitted step — ``kfe.value_and_grad``
with the statistics every step, as the two-level contenders run, then
``update`` — is compiled with a static ordinary ``due`` (no statistics, no
refresh) and a refresh ``due``, and ``cost_analysis()``'s FLOPs printed.
Options as the benchmark contenders (factored damping, the task's period
and EMA). The count includes both branches of a ``lax.cond`` (balanced's
non-finite fallback ``M⁻¹∇``, which does not run).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kfac_jax_ext as kfe
from benchmarks import tasks


def step_flops(task, variant):
  """``(ordinary, refresh)`` GFLOP of one jitted step of ``variant``
  (``"kfac"`` or ``COMBINE_SPACE``)."""
  batch = jax.tree_util.tree_map(jnp.asarray, task.sample_batch(np.random.default_rng(0)))
  options = dict(damping=0.03, momentum=0.9, stats_every=task.period,
                 inverse_every=task.period, example_batch=batch,
                 ema_decay=task.ema_decay)
  if variant == "kfac":
    opt, every = kfe.kfac(task.loss_fn, 0.3, damping_mode="factored", **options), False
  else:
    combine, space = variant.split("_", 1)
    opt = kfe.two_level_kfac(task.loss_fn, 0.3, combine=combine, coarse_space=space,
                             **options)
    every = combine != "additive" or space in ("residual", "krylov_residual")
  value_and_grad = kfe.value_and_grad(task.loss_fn)
  state = opt.init(task.params)
  out = []
  for refresh in (False, True):
    due = kfe.Due(statistics=refresh, inverses=refresh, damping=None)

    def step(params, state, batch, key, due=due):
      pass_due = due._replace(statistics=True) if every else due
      _, grads, curvature = value_and_grad(params, batch, key, due=pass_due)
      updates, state = opt.update(grads, state, params, batch=batch, key=key,
                                  curvature=curvature, due=due)
      return optax.apply_updates(params, updates), state

    compiled = jax.jit(step).lower(task.params, state, batch,
                                   jax.random.PRNGKey(0)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    out.append(cost["flops"] / 1e9)
  return tuple(out)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--task", default="autoencoder")
  parser.add_argument("--variants", default=(
      "multiplicative_nicolaides,multiplicative_krylov_nicolaides,"
      "balanced_nicolaides,balanced_krylov_nicolaides"))
  args = parser.parse_args(argv)
  task = tasks.make_task(args.task)
  for variant in ["kfac"] + args.variants.split(","):
    ordinary, refresh = step_flops(task, variant)
    print(f"{variant:40s} ordinary {ordinary:7.2f} GFLOP  refresh {refresh:7.2f} GFLOP",
          flush=True)


if __name__ == "__main__":
  main()
