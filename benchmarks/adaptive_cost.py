"""What the adaptive mode (``learning_rate="adaptive"``) costs per step.

Run: ``python -m benchmarks.adaptive_cost`` (``--rounds``, ``--models``;
kfac-jax rows need the ``bench`` extra). On real MNIST batches, every
optimizer's whole jitted step with the static schedule (``kfe.due_at``:
statistics every step, inverses every 5, λ adapted every 5), timed after
compilation, interleaved. Rows:

* ``fixed``: ``kfe.kfac(lr 1e-3, momentum 0.9)``, the baseline;
* ``adaptive α``: ``learning_rate="adaptive"``, no momentum: one
  forward-mode pass (``J d``) after a linearised forward;
* ``adaptive α, μ``: with ``momentum="adaptive"``: two (``J d``, ``J δ₀``);
* ``adaptive α, μ, λ``: plus ``damping_adaptation=True``: one more forward
  (the loss at ``θ+δ``) on every 5th step;
* ``kfac-jax adaptive``: kfac-jax 0.0.8 with its three adaptive options.

Reported per row: the median of the steps without a refresh (``plain``), of
the refresh steps (inverses, and λ for the last two rows; ``refresh``), and
the amortized mean, in ms; and each plain median over the ``fixed`` one.
"""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kfac_jax_ext as kfe
from kfac_jax_ext import datasets as data
from benchmarks import step_time

PERIOD = 5


def kfe_step(opt, loss_fn, params, batches, adapts):
  vg = kfe.value_and_grad(loss_fn)
  key = jax.random.PRNGKey(0)

  @functools.partial(jax.jit, static_argnames="due", donate_argnums=0)
  def inner(carry, batch, k, due):
    params, state = carry
    _, grads, curv = vg(params, batch, k, due=due)
    updates, state = opt.update(grads, state, params, batch=batch, key=k,
                                curvature=curv, due=due)
    return optax.apply_updates(params, updates), state

  def step(carry, batch, i):
    due = kfe.due_at(i, stats_every=1, inverse_every=PERIOD,
                     damping_every=PERIOD if adapts else None)
    return inner(carry, batch, jax.random.fold_in(key, i), due=due)

  params = jax.tree_util.tree_map(jnp.copy, params)
  return step_time.Timed(step, (params, opt.init(params)), batches)


def kfac_jax_adaptive_step(loss_fn, params, batches):
  rules = dict(use_adaptive_learning_rate=True, use_adaptive_momentum=True,
               use_adaptive_damping=True, initial_damping=150.0,
               damping_adaptation_interval=PERIOD)
  return step_time.kfac_jax_step(loss_fn, params, batches, PERIOD, rules)[0]


def summarize(timed: step_time.Timed):
  times = np.array(timed.times)
  # steps 0..PERIOD ran untimed (compilation), so timed step k is update
  # PERIOD + 1 + k: refreshes where (k + 1) % PERIOD == 0
  index = np.arange(1, len(times) + 1)
  refresh = index % PERIOD == 0
  n = (len(times) // PERIOD) * PERIOD
  return dict(plain_ms=1e3 * float(np.median(times[~refresh])),
              refresh_ms=1e3 * float(np.median(times[refresh])),
              amortized_ms=1e3 * float(np.mean(times[:n])))


def run_model(name, rounds, x_train, y_train):
  spec = step_time.MODELS[name]
  kfe_loss, kfac_jax_loss = step_time.make_losses(spec)
  params = step_time.init_mlp(jax.random.PRNGKey(0), spec["sizes"])
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(10):
    idx = rng.integers(0, len(x_train), spec["batch"])
    batches.append({"x": jnp.asarray(x_train[idx]), "y": jnp.asarray(y_train[idx])})
  common = dict(damping_mode="factored", stats_every=1, inverse_every=PERIOD,
                example_batch=batches[0])
  timed = {
      "fixed": kfe_step(kfe.kfac(kfe_loss, 1e-3, damping=1e-3, **common),
                        kfe_loss, params, batches, False),
      "adaptive α": kfe_step(kfe.kfac(kfe_loss, "adaptive", momentum=None,
                                      damping=150.0, **common),
                             kfe_loss, params, batches, False),
      "adaptive α, μ": kfe_step(kfe.kfac(kfe_loss, "adaptive", momentum="adaptive",
                                         damping=150.0, **common),
                                kfe_loss, params, batches, False),
      "adaptive α, μ, λ": kfe_step(kfe.kfac(
          kfe_loss, "adaptive", momentum="adaptive", damping=150.0,
          damping_adaptation=True, damping_adaptation_interval=PERIOD, **common),
          kfe_loss, params, batches, True),
  }
  try:
    timed["kfac-jax adaptive"] = kfac_jax_adaptive_step(kfac_jax_loss, params,
                                                        batches)
  except ImportError:
    print("kfac-jax not installed (pip install -e '.[bench]'): skipped")
  for t in timed.values():     # compile every program (refresh or not) first
    t.run(PERIOD)
    t.times = []
  for _ in range(rounds):               # interleaved: all see the same noise
    for t in timed.values():
      t.run(2 * PERIOD)
  rows = {k: summarize(t) for k, t in timed.items()}
  base = rows["fixed"]["plain_ms"]
  for row in rows.values():
    row["plain_vs_fixed"] = row["plain_ms"] / base
  return rows


def main(argv=None):
  args = step_time.timing_args(__doc__, argv)
  x_train, y_train, _, _ = data.load_mnist()
  results = {"jax": jax.__version__, "models": {}}
  for name in args.models.split(","):
    rows = run_model(name, args.rounds, x_train, y_train)
    results["models"][name] = rows
    print(f"\n{name} (ms per step: plain, refresh, amortized; plain / fixed)")
    for k, r in rows.items():
      print(f"  {k:20s} {r['plain_ms']:8.1f} {r['refresh_ms']:8.1f} "
            f"{r['amortized_ms']:8.1f}   {r['plain_vs_fixed']:.2f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
  return results


if __name__ == "__main__":
  main()
