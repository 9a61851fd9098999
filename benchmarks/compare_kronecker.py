"""TKFAC against K-FAC and Adam on real data: loss against steps and wall-clock.

Run: ``python -m benchmarks.compare_kronecker [--task autoencoder|fashion_cnn]
[--steps N] [--json FILE]``. Tasks:
* ``autoencoder``: MNIST, 784-1000-500-250-30-250-500-1000-784 (tanh, sigmoid
  cross-entropy), batch 1000;
* ``fashion_cnn``: Fashion-MNIST, conv3x3-16/pool/conv3x3-32/pool/dense-128/10
  (ReLU, softmax cross-entropy), batch 128.
K-FAC and TKFAC share every setting (lr, damping, KL-clip, momentum, periods);
each method's learning rate is the best of a short sweep on the training loss
(recorded in the JSON). Wall-clock excludes the first (compiling) step.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kfac_jax_ext as kfe
from benchmarks import data, step_time
from benchmarks.models import FashionCNN


def make_task(name):
  if name == "autoencoder":
    x_train, _, x_test, _ = data.load_mnist()
    sizes = step_time.MODELS["autoencoder"]["sizes"]
    params = step_time.init_mlp(jax.random.PRNGKey(0), sizes)

    def loss_fn(p, b):
      return kfe.sigmoid_cross_entropy(step_time.apply_mlp(p, b["x"]), b["x"])
    batches = lambda rng: {"x": x_train[rng.integers(0, len(x_train), 1000)]}
    test = {"x": x_test[:2000]}
    lrs = {"adam": (1e-3, 3e-4), "kronecker": (0.03, 0.1)}
    return loss_fn, params, batches, test, lrs, dict(damping=1.0, kl_clip=1e-2)
  return fashion_task(FashionCNN(), {"adam": (1e-3, 3e-3), "kronecker": (0.1, 0.3)},
                      dict(damping=0.1, kl_clip=1e-2))


def fashion_task(model, lrs, settings, batch_size=128, test_size=2000):
  """``(loss_fn, params, batches, test, lrs, settings)`` of a flax classifier
  on Fashion-MNIST (softmax cross-entropy)."""
  x_train, y_train, x_test, y_test = data.load_fashion_mnist()
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))

  def loss_fn(p, b):
    return kfe.softmax_cross_entropy(model.apply(p, b["x"]), b["y"])

  def batches(rng):
    idx = rng.integers(0, len(x_train), batch_size)
    return {"x": x_train[idx], "y": y_train[idx]}
  test = {"x": x_test[:test_size], "y": y_test[:test_size]}
  return loss_fn, params, batches, test, lrs, settings


def make_optimizer(name, loss_fn, lr, settings):
  if name == "adam":
    return optax.adam(lr)
  method = {"kfac": kfe.kfac, "tkfac": kfe.tkfac}[name]
  return method(loss_fn, lr, momentum=0.9, stats_every=5, inverse_every=5,
                **settings)


def train(opt, loss_fn, params, batches, test, steps, seed=0, curvature=True):
  """Trains; ``curvature``: the optimizer takes ``kfe.value_and_grad``'s
  statistics (the fused path), else a plain optax optimizer."""
  state = opt.init(params)
  vg = kfe.value_and_grad(loss_fn)

  @jax.jit
  def step(params, state, batch, key):
    if curvature:
      loss, grads, curv = vg(params, batch, key, opt_state=state)
      updates, state = opt.update(grads, state, params, batch=batch, key=key,
                                  curvature=curv)
    else:
      loss, grads = jax.value_and_grad(loss_fn)(params, batch)
      updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  rng = np.random.default_rng(seed)
  key = jax.random.PRNGKey(seed)
  losses, clock, elapsed = [], [], 0.0
  for i in range(steps):
    batch = jax.tree_util.tree_map(jnp.asarray, batches(rng))
    start = time.perf_counter()
    params, state, loss = step(params, state, batch, jax.random.fold_in(key, i))
    loss = float(loss)
    if i > 0:
      elapsed += time.perf_counter() - start
    losses.append(loss)
    clock.append(elapsed)
  test_loss = float(jax.jit(loss_fn)(params, jax.tree_util.tree_map(jnp.asarray, test)))
  return dict(loss=losses, seconds=clock, test_loss=test_loss,
              finite=bool(np.isfinite(losses).all()))


def smoothed_final(losses, window=20):
  return float(np.mean(losses[-window:]))


def window_mean(losses, center, half=5):
  """Mean loss over ``[center - half, center + half)``, clamped to the run."""
  lo = max(0, center - half)
  return float(np.mean(losses[lo:max(lo + 1, center + half)]))


def run(task, steps, sweep_steps):
  loss_fn, params, batches, test, lrs, settings = make_task(task)
  results = {"task": task, "steps": steps, "settings": settings, "runs": {}}
  for name in ("adam", "kfac", "tkfac"):
    grid = lrs["adam" if name == "adam" else "kronecker"]
    scores = {}
    for lr in grid:   # short sweep on the training loss
      r = train(make_optimizer(name, loss_fn, lr, settings), loss_fn, params,
                batches, test, sweep_steps, seed=1, curvature=name != "adam")
      scores[lr] = smoothed_final(r["loss"], 10) if r["finite"] else np.inf
    lr = min(scores, key=scores.get)
    r = train(make_optimizer(name, loss_fn, lr, settings), loss_fn, params, batches,
              test, steps, curvature=name != "adam")
    r.update(learning_rate=lr, sweep={str(k): v for k, v in scores.items()})
    results["runs"][name] = r
  return results


def report(results, reference="adam"):
  """Loss at 25%/50%/end, test loss, s/step and the steps and seconds each
  method needs to reach ``reference``'s final (smoothed) training loss."""
  runs = results["runs"]
  target = smoothed_final(runs[reference]["loss"])
  print(f"\n{results['task']}: {results['steps']} steps, settings "
        f"{results['settings']}; target = {reference}'s final train loss "
        f"{target:.4f}")
  print(f"{'method':<22}{'lr':>7}{'loss@25%':>10}{'loss@50%':>10}{'final':>9}"
        f"{'test':>9}{'s/step':>8}{'steps→tgt':>10}{'s→tgt':>8}")
  for name, r in runs.items():
    n = len(r["loss"])
    window = min(10, n)
    smooth = np.convolve(r["loss"], np.ones(window) / window, mode="valid")
    hit = np.nonzero(smooth <= target)[0]
    steps_to = int(hit[0]) + window if len(hit) else None
    secs_to = r["seconds"][steps_to - 1] if steps_to else None
    print(f"{name:<22}{r['learning_rate']:>7g}{window_mean(r['loss'], n // 4):>10.4f}"
          f"{window_mean(r['loss'], n // 2):>10.4f}{smoothed_final(r['loss']):>9.4f}"
          f"{r['test_loss']:>9.4f}{r['seconds'][-1] / (n - 1):>8.3f}"
          f"{steps_to if steps_to else '-':>10}"
          f"{f'{secs_to:.1f}' if secs_to else '-':>8}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--task", default="fashion_cnn",
                      choices=("autoencoder", "fashion_cnn"))
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--sweep-steps", type=int, default=40)
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
