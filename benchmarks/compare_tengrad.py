"""TENGraD against K-FAC (and Adam for reference): per-step cost and loss
against wall-clock on real data.

Run: ``python -m benchmarks.compare_tengrad [--task autoencoder|fashion_3c1f]
[--steps N] [--json FILE]``. Tasks:

* ``autoencoder``: the MNIST deep autoencoder of ``compare_kronecker``
  (batch 1000); TENGraD with the full Gram (``gram_batch=1000``) and a
  subsampled one (``gram_batch=250``).
* ``fashion_3c1f``: TENGraD's Fashion-MNIST "3C1F" ConvNet (§2.5: three
  conv3×3-128 SAME + ReLU, max-pool 3, dense 10368→500→10), batch 128.

All curvature methods share λ, KL-clip, momentum 0.9 and a refresh every 5
steps (K-FAC: statistics and inverses; TENGraD: stored batch and Gram
inverse); each method's learning rate is the best of a short sweep on the
training loss (recorded in the JSON). Per-step cost: the median step and the
mean over whole refresh periods, compiled, excluding the first step.
"""

from __future__ import annotations

import argparse
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import kfac_jax_ext as kfe
from benchmarks import compare_kronecker, data

PERIOD = 5


class ConvNet3C1F(nn.Module):
  """TENGraD's Fashion-MNIST ConvNet (``models/mnist/convnet.py``)."""
  @nn.compact
  def __call__(self, x):
    for _ in range(3):
      x = nn.relu(nn.Conv(128, (3, 3), padding="SAME")(x))
    x = nn.max_pool(x, (3, 3), (3, 3))
    x = nn.relu(nn.Dense(500)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(x)


def make_task(name):
  """``(loss_fn, params, batches, test, lrs, settings, methods)``."""
  if name == "autoencoder":
    loss_fn, params, batches, test, lrs, settings = compare_kronecker.make_task(
        "autoencoder")
    methods = {"adam": {}, "kfac": {}, "tengrad": {"gram_batch": 1000},
               "tengrad_sub250": {"gram_batch": 250}}
    return loss_fn, params, batches, test, lrs, settings, methods
  x_train, y_train, x_test, y_test = data.load_fashion_mnist()
  model = ConvNet3C1F()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))

  def loss_fn(p, b):
    return kfe.softmax_cross_entropy(model.apply(p, b["x"]), b["y"])

  def batches(rng):
    idx = rng.integers(0, len(x_train), 128)
    return {"x": x_train[idx], "y": y_train[idx]}
  test = {"x": x_test[:1000], "y": y_test[:1000]}
  lrs = {"adam": (1e-3, 3e-4), "kronecker": (0.03, 0.1)}
  methods = {"adam": {}, "kfac": {}, "tengrad": {"gram_batch": 128}}
  return (loss_fn, params, batches, test, lrs,
          dict(damping=0.1, kl_clip=1e-2), methods)


def make_optimizer(name, options, loss_fn, lr, settings):
  if name == "adam":
    return optax.adam(lr)
  common = dict(momentum=0.9, inverse_every=PERIOD, **settings)
  if name == "kfac":
    return kfe.kfac(loss_fn, lr, stats_every=PERIOD, **common)
  return kfe.tengrad(loss_fn, lr, **options, **common)


def step_costs(seconds):
  """Median step and mean over whole refresh periods (first step excluded)."""
  steps = np.diff(np.asarray(seconds))[:(len(seconds) - 1) // PERIOD * PERIOD]
  return float(np.median(steps)), float(np.mean(steps))


def run(task, steps, sweep_steps):
  """Sweeps each method's learning rate (``sweep_steps`` steps per value; 0:
  take the grid's first value), then trains it for ``steps``."""
  loss_fn, params, batches, test, lrs, settings, methods = make_task(task)
  results = {"task": task, "steps": steps, "settings": settings,
             "period": PERIOD, "runs": {}}
  for name, options in methods.items():
    grid = lrs["adam" if name == "adam" else "kronecker"]
    scores = {} if sweep_steps else {grid[0]: float("nan")}
    for lr in grid if sweep_steps else ():
      r = compare_kronecker.train(
          make_optimizer(name, options, loss_fn, lr, settings), loss_fn, params,
          batches, test, sweep_steps, seed=1, curvature=name != "adam")
      scores[lr] = compare_kronecker.smoothed_final(r["loss"], 10) if (
          r["finite"]) else np.inf
    lr = min(scores, key=scores.get)
    r = compare_kronecker.train(
        make_optimizer(name, options, loss_fn, lr, settings), loss_fn, params,
        batches, test, steps, curvature=name != "adam")
    median, amortized = step_costs(r["seconds"])
    r.update(learning_rate=lr, sweep={str(k): v for k, v in scores.items()},
             options=options, median_step_s=median, amortized_step_s=amortized)
    results["runs"][name] = r
  return results


def report(results):
  runs = results["runs"]
  kfac = runs["kfac"]
  print(f"\n{results['task']}: per-step cost (refresh every {results['period']})")
  print(f"{'method':<16}{'median ms':>10}{'amort. ms':>10}{'/kfac':>7}")
  for name, r in runs.items():
    print(f"{name:<16}{1e3 * r['median_step_s']:>10.1f}"
          f"{1e3 * r['amortized_step_s']:>10.1f}"
          f"{r['amortized_step_s'] / kfac['amortized_step_s']:>7.2f}")
  compare_kronecker.report(results, reference="kfac")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--task", default="autoencoder",
                      choices=("autoencoder", "fashion_3c1f"))
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--sweep-steps", type=int, default=30,
                      help="steps per learning rate of the sweep; 0: no sweep")
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  try:
    results = run(args.task, args.steps, args.sweep_steps)
  except data.DatasetUnavailable as e:
    print(f"{args.task}: skipped, {e}")
    return
  report(results)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f)


if __name__ == "__main__":
  main()
