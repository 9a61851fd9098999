"""Per-step trace of two-level K-FAC's update against its fine step.

Trains the MNIST autoencoder with ``kfe.two_level_kfac`` at the benchmark's
settings (KL-clip, momentum 0.9, the task's period and EMA) and prints, every
step, the loss, ``∇ᵀb`` and ``bᵀF_λb`` of the fine step ``b = M⁻¹∇``, the
same for the two-level update Δ (``F`` the exact Fisher of the batch), the
norms of ``b`` and of the correction ``Δ − b``, and the applied update's norm.
This is the measurement behind ``fine_scale``: with ``--fine-scale none`` the
multiplicative correction loses its descent (``∇ᵀΔ`` ≪ ``∇ᵀb``, then < 0)
and the loss jumps.

Run: ``python -m benchmarks.two_level_trace [--combine multiplicative]
[--coarse-space nicolaides|...|none] [--fine-scale model|none] [--steps 20]
[--lr 0.1] [--damping 0.3] [--fisher-products statistics|ggn|mixed] [--kl-clip 0.01] [--quiet]``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kfac_jax_ext as kfe
from benchmarks import tasks
from kfac_jax_ext import optimizers


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--combine", default="multiplicative")
  parser.add_argument("--coarse-space", default="nicolaides",
                      help="a coarse space, or none (K-FAC alone)")
  parser.add_argument("--fine-scale", default="model")
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--lr", type=float, default=0.1)
  parser.add_argument("--damping", type=float, default=0.3)
  parser.add_argument("--fisher-products", default="statistics",
                      help="statistics (the sampled Fisher of the statistics "
                           "pass), ggn (the batch's exact GGN) or mixed (the "
                           "GGN for the products fed to M⁻¹)")
  parser.add_argument("--kl-clip", type=float, default=None,
                      help="κ (default: the task's, 0.01)")
  parser.add_argument("--quiet", action="store_true",
                      help="print every 10th step and the last")
  args = parser.parse_args(argv)
  space = None if args.coarse_space == "none" else args.coarse_space
  task = tasks.make_task("autoencoder")
  lam = args.damping
  common = dict(damping=lam, stats_every=task.period, inverse_every=task.period,
                ema_decay=task.ema_decay,
                example_batch=task.sample_batch(np.random.default_rng(0)))
  pre = kfe.scale_by_two_level_kfac(
      task.loss_fn, combine=args.combine, coarse_space=space,
      coarse_matrix="exact", fine_scale=args.fine_scale,
      fisher_products=args.fisher_products, **common)
  fine = kfe.scale_by_two_level_kfac(task.loss_fn, coarse_space=None, **common)
  opt = optimizers.with_optimizer_steps(pre, args.lr, momentum=0.9,
                                        kl_clip=args.kl_clip or task.kl_clip)
  dot = lambda x, y: sum(jnp.vdot(a, b) for a, b in zip(
      jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)))

  @jax.jit
  def step(params, state, batch, key):
    loss, g = jax.value_and_grad(task.loss_fn)(params, batch)
    updates, new = opt.update(g, state, params, batch=batch, key=key)
    d, _ = pre.update(g, state[0].inner, params, batch=batch, key=key)
    fine_state = new[0].inner if space is None else new[0].inner.base
    b, _ = fine.update(g, fine_state, params, batch=batch, key=key,
                       due=kfe.Due(False, False))
    fvp = lambda v: jax.tree_util.tree_map(
        lambda f, x: f + lam * x,
        kfe.fisher_vector_product(task.loss_fn, params, batch, v), v)
    c = jax.tree_util.tree_map(lambda x, y: x - y, d, b)
    info = {"loss": loss, "∇ᵀb": dot(g, b), "bᵀFb": dot(b, fvp(b)),
            "∇ᵀΔ": dot(g, d), "ΔᵀFΔ": dot(d, fvp(d)),
            "|b|": jnp.sqrt(dot(b, b)), "|Δ-b|": jnp.sqrt(dot(c, c)),
            "|update|": jnp.sqrt(dot(updates, updates))}
    return optax.apply_updates(params, updates), new, info

  params, rng, losses = task.params, np.random.default_rng(0), []
  state, key = opt.init(params), jax.random.PRNGKey(0)
  for i in range(args.steps):
    key, sub = jax.random.split(key)
    batch = jax.tree_util.tree_map(jnp.asarray, task.sample_batch(rng))
    params, state, info = step(params, state, batch, sub)
    losses.append(float(info["loss"]))
    if not args.quiet or i % 10 == 0 or i == args.steps - 1:
      print(i, " ".join(f"{k} {float(v):.3g}" for k, v in info.items()))
  tail = losses[-min(20, len(losses)):]
  print(f"mean loss of the last {len(tail)} steps: {np.mean(tail):.4g}")
  return np.array(losses)


if __name__ == "__main__":
  main()
