"""Quickstart: a flax linen MLP on real MNIST, kfe.kfac against optax.adam.

Run: ``python -m benchmarks.quickstart`` (add ``--steps N`` to change length).
Both optimizers get the same model, initial parameters, batches and step count.
It prints each one's final training loss, test accuracy and wall-clock, and
when K-FAC reached Adam's final training loss, in steps and in seconds.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import kfac_jax_ext as kfe
from kfac_jax_ext import datasets as data


class MLP(nn.Module):
  hidden: tuple = (256, 256)

  @nn.compact
  def __call__(self, x):
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(10)(x)


def loss_fn(params, batch):
  logits = MLP().apply(params, batch["x"])
  return kfe.softmax_cross_entropy(logits, batch["y"])


def optax_step(opt):
  """The usual jitted optax step (Adam)."""
  @jax.jit
  def step(params, state, batch, key, i):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss
  return step


WARMUP = 6   # steps not timed: every program is compiled (K-FAC's period: 5)
WINDOW = 50  # the training loss reported: the mean of the last WINDOW steps


def train(opt, step, params, x, y, steps, batch_size, seed=0):
  """Trains; returns ``(params, per-step losses, per-step clock)``.

  The clock is the wall-clock since the end of step ``WARMUP`` (every
  compilation done), 0 before it.
  """
  params = jax.tree_util.tree_map(jnp.copy, params)   # the K-FAC step donates
  state = opt.init(params)
  rng = np.random.default_rng(seed)
  key = jax.random.PRNGKey(seed)
  losses, clock, start = [], [], None
  for i in range(steps):
    idx = rng.integers(0, len(x), batch_size)
    batch = {"x": jnp.asarray(x[idx]), "y": jnp.asarray(y[idx])}
    params, state, loss = step(params, state, batch, key, i)
    losses.append(float(loss))           # waits for the step
    if i == WARMUP - 1:
      start = time.perf_counter()
    clock.append(0.0 if start is None else time.perf_counter() - start)
  return params, np.array(losses), np.array(clock)


def time_to(losses, clock, target):
  """(step, seconds) where the WINDOW-step mean loss first reaches target."""
  means = np.convolve(losses, np.ones(WINDOW) / WINDOW, mode="valid")
  hits = np.nonzero(means <= target)[0]
  if not len(hits):
    return None
  i = int(hits[0]) + WINDOW - 1
  return i + 1, float(clock[i])


def accuracy(params, x, y):
  logits = jax.jit(MLP().apply)(params, jnp.asarray(x))
  return float(np.mean(np.argmax(logits, -1) == y))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--steps", type=int, default=500)
  parser.add_argument("--batch-size", type=int, default=256)
  parser.add_argument("--keep-lapack-threads", action="store_true",
                      help="on CPU, leave OpenBLAS's threads as they are (by "
                           "default they are limited to one for the run)")
  args = parser.parse_args(argv)
  if jax.default_backend() == "cpu" and not args.keep_lapack_threads:
    # OpenBLAS's threads spin after each refresh and slow the next steps
    # (docs/performance.md); one thread avoids it. Restored at the end.
    with kfe.lapack_thread_limit(1) as before:
      if before:
        print("CPU: OpenBLAS limited to one thread for this run "
              "(kfe.limit_lapack_threads(1); --keep-lapack-threads to leave it)")
      return _run(args, parser)
  return _run(args, parser)


def _run(args, parser):
  x_train, y_train, x_test, y_test = data.load_mnist()
  params = MLP().init(jax.random.PRNGKey(0), jnp.zeros((1, 784)))
  print(kfe.describe_layers(loss_fn, params, {"x": jnp.zeros((2, 784)),
                                              "y": jnp.zeros((2,), jnp.int32)}))
  example = {"x": jnp.zeros((args.batch_size, 784)),
             "y": jnp.zeros((args.batch_size,), jnp.int32)}
  kfac = kfe.kfac(loss_fn, learning_rate=0.3, damping=0.1, momentum=0.9, nesterov=True,
                  kl_clip=1e-3, stats_every=5, inverse_every=5, example_batch=example)
  adam = optax.adam(1e-3)
  optimizers = {
      # one pass for loss, gradient and statistics; static refresh schedule
      "kfe.kfac": (kfac, kfe.make_train_step(loss_fn, kfac)),
      "optax.adam": (adam, optax_step(adam)),
  }
  if args.steps < WARMUP + WINDOW:
    parser.error(f"--steps must be at least {WARMUP + WINDOW} (warm-up steps and "
                 "the loss window)")
  print(f"\nMNIST, MLP 784-256-256-10, batch {args.batch_size}, {args.steps} steps, "
        f"same initial parameters and batches")
  print(f"{'optimizer':<12} {'train loss':>11} {'test acc':>9} {'seconds':>8}  "
        f"(train loss: mean of the last {WINDOW} steps; seconds: after step "
        f"{WARMUP}, every compilation done)")
  runs = {}
  for name, (opt, step) in optimizers.items():
    trained, losses, clock = train(opt, step, params, x_train, y_train, args.steps,
                                   args.batch_size)
    runs[name] = (losses, clock)
    print(f"{name:<12} {np.mean(losses[-WINDOW:]):>11.4f} "
          f"{accuracy(trained, x_test, y_test):>9.4f} {clock[-1]:>8.1f}")
  adam_losses, adam_clock = runs["optax.adam"]
  target = float(np.mean(adam_losses[-WINDOW:]))
  reached = time_to(*runs["kfe.kfac"], target)
  print(f"\nAdam's final training loss {target:.4f} took it {args.steps} steps, "
        f"{adam_clock[-1]:.1f} s.")
  if reached is None:
    print(f"kfe.kfac did not reach it in {args.steps} steps.")
  else:
    steps, seconds = reached
    print(f"kfe.kfac reached it after {steps} steps, {seconds:.1f} s: "
          f"{seconds / max(adam_clock[-1], 1e-9):.2f}x Adam's wall-clock.")

if __name__ == "__main__":
  main()
