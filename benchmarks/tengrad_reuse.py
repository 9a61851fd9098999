"""TENGraD's reused block on a conv autoencoder: how often the loss rises.

Trains ``models.ConvAutoencoder`` on a fixed batch of 64 MNIST images with
``kfe.tengrad`` (lr 0.3, KL-clip 1e-3, momentum 0.9, λ ``--damping``,
default 0.1) from initial weights scaled by ``1 + 1e-6·trial``, and prints
the loss every 10 steps, whether those checkpoints fall and how many of the
100 steps raised the loss. Compare ``--inverse-every 5`` (the default: a
batch's exact block reused for five steps) with ``--inverse-every 1`` (a
fresh block every step), and λ 0.1 with the guide's λ 1::

  python -m benchmarks.tengrad_reuse --inverse-every 5 --trials 6
  python -m benchmarks.tengrad_reuse --inverse-every 1 --trials 6
  python -m benchmarks.tengrad_reuse --inverse-every 5 --trials 6 --damping 1
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kfac_jax_ext as kfe
from benchmarks import models
from kfac_jax_ext import datasets as data


def losses(inverse_every: int, trial: int, steps: int = 101,
           damping: float = 0.1) -> np.ndarray:
  """The per-step training losses of one run."""
  images = data.load_mnist()[0][:64]
  batch = {"x": jnp.asarray(images.reshape(-1, 28, 28, 1), jnp.float32)}
  model = models.ConvAutoencoder()
  params = jax.tree_util.tree_map(
      lambda p: p * (1 + 1e-6 * trial),
      model.init(jax.random.PRNGKey(0), batch["x"][:1]))

  def loss_fn(p, b):
    n = b["x"].shape[0]
    return kfe.sigmoid_cross_entropy(model.apply(p, b["x"]).reshape(n, -1),
                                     b["x"].reshape(n, -1))

  opt = kfe.tengrad(loss_fn, learning_rate=0.3, damping=damping, kl_clip=1e-3,
                    example_batch=batch, inverse_every=inverse_every)

  @jax.jit
  def step(params, state, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, state = opt.update(grads, state, params, batch=batch, key=key)
    return optax.apply_updates(params, updates), state, loss

  state, out = opt.init(params), []
  for i in range(steps):
    params, state, loss = step(params, state, jax.random.PRNGKey(i))
    out.append(float(loss))
  return np.asarray(out)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--inverse-every", type=int, default=5)
  parser.add_argument("--trials", type=int, default=6)
  parser.add_argument("--damping", type=float, default=0.1)
  args = parser.parse_args(argv)
  falls = monotone = 0
  for trial in range(args.trials):
    run = losses(args.inverse_every, trial, damping=args.damping)
    ok = bool(np.all(np.diff(run[::10]) < 0))
    rises = int(np.sum(np.diff(run) >= 0))
    falls += ok
    monotone += rises == 0
    print(f"trial {trial}: checkpoints fall {ok}; steps that did not lower "
          f"the loss {rises}; every 10 steps "
          f"{np.round(run[::10]).astype(int).tolist()}; largest after step 20 "
          f"{run[20:].max():.0f}; last/first {run[-1] / run[0]:.3f}")
  print(f"inverse_every={args.inverse_every}, damping={args.damping}: the "
        f"checkpoints fall in {falls} of {args.trials} runs, every step in "
        f"{monotone}")


if __name__ == "__main__":
  main()
