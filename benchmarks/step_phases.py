"""Per-phase timings of a K-FAC step against their FLOP counts.

Run: ``python -m benchmarks.step_phases [--model autoencoder|mlp]``. Explains
what bounds ``benchmarks.step_time``'s ratios: each phase's median time, its
FLOPs, the achieved GFLOP/s, and the amortized step predicted from the phases,
``plain + (stats - plain)/stats_every + refresh/inverse_every``.
Phases (factored damping, fused statistics pass, batch from MNIST):
* ``gradient``: ``jax.grad`` (what Adam costs, less its elementwise update);
* ``gradient + statistics``: one forward, the true-loss backward and the
  sampled-target backward for g (``kfe.value_and_grad``);
* ``+ factor products``: ``āᵀā/K`` and ``gᵀg/M`` per layer;
* ``precondition``: ``(A+π√λI)⁻¹ V (G+√λ/πI)⁻¹`` per layer;
* ``refresh``: the damped inverses of every factor (``linalg.spd_inverse``,
  block elimination: ``(4/3)n³`` FLOPs for an ``n × n`` factor), the
  inverses donated as in the training step.

It then prints the **FLOP floor** of the amortized step, as a multiple of
the gradient's FLOPs (Adam's step, whose elementwise update adds no GEMM):
``grad + precondition + (backward_g + factor products)/stats_every +
refresh_min/inverse_every``, with ``refresh_min = n³/3`` per factor (its
Cholesky factor alone: two triangular solves with ``m`` right-hand sides
cost the same ``2n²m`` FLOPs as the GEMM with an explicit inverse, and any
dense ``n × n`` map applied to them costs that much). No implementation of
K-FAC's step at that schedule does fewer FLOPs; a step-time target below
it can only be met by running some phase faster than the GEMMs of Adam's
gradient. ``--stats-batch N`` scales the statistics' FLOPs by ``N / batch``
(``kfe.kfac(..., stats_batch=N)``).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kfac_jax_ext as kfe
from benchmarks import step_time
from kfac_jax_ext import datasets as data
from kfac_jax_ext import kronecker_family, plan as plan_lib, statistics, tracing
from kfac_jax_ext.kfac_transform import KFAC
from kfac_jax_ext.blocks import kronecker


REPEATS = 7


def _median_ms(fn, *args, repeats=None):
  repeats = repeats or REPEATS
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def _median_ms_donated(fn, carry, repeats=None):
  """``_median_ms`` of ``carry = fn(carry)`` with the carry donated, as the
  training step donates its state (an undonated refresh also copies every
  inverse it keeps or replaces)."""
  repeats = repeats or REPEATS
  step = jax.jit(fn, donate_argnums=0)
  carry = jax.block_until_ready(step(jax.tree_util.tree_map(jnp.copy, carry)))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    carry = jax.block_until_ready(step(carry))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def phase_flops(sizes, batch):
  dims = [(m + 1, n) for m, n in zip(sizes, sizes[1:])]    # (d_a, d_g) per layer
  grad = sum(6 * batch * (a - 1) * g for a, g in dims)
  backward_g = sum(2 * batch * (a - 1) * g for a, g in dims[1:])
  factors = sum(2 * batch * (a * a + g * g) for a, g in dims)
  precondition = sum(2 * (a * a * g + a * g * g) for a, g in dims)
  refresh = sum((4 / 3) * (a ** 3 + g ** 3) for a, g in dims)  # block elimination
  refresh_min = sum((a ** 3 + g ** 3) / 3 for a, g in dims)   # Cholesky alone
  return dict(grad=grad, backward_g=backward_g, factors=factors,
              precondition=precondition, refresh=refresh, refresh_min=refresh_min)


SCHEDULES = ((1, 5), (10, 10))


def flop_floor(f, stats_every, inverse_every, stats_fraction=1.0):
  """Fewest FLOPs of one amortized K-FAC step over the gradient's (Adam's)."""
  stats = stats_fraction * (f["backward_g"] + f["factors"])
  step = (f["grad"] + f["precondition"] + stats / stats_every
          + f["refresh_min"] / inverse_every)
  return step / f["grad"]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--model", default="autoencoder", choices=list(step_time.MODELS))
  parser.add_argument("--batch", type=int, default=None, help="override the batch")
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--stats-batch", type=int, default=None,
                      help="also print the FLOP floor with statistics from N examples")
  args = parser.parse_args(argv)
  spec = dict(step_time.MODELS[args.model])
  if args.batch:
    spec["batch"] = args.batch
  global REPEATS
  REPEATS = args.repeats
  loss_fn, _ = step_time.make_losses(spec)
  params = step_time.init_mlp(jax.random.PRNGKey(0), spec["sizes"])
  x_train, y_train, _, _ = data.load_mnist()
  batch = {"x": jnp.asarray(x_train[:spec["batch"]]),
           "y": jnp.asarray(y_train[:spec["batch"]])}
  key = jax.random.PRNGKey(0)
  tx = kfe.scale_by_kfac(loss_fn, stats_every=1, inverse_every=1)
  state = jax.jit(lambda p, s: tx.update(jax.grad(loss_fn)(p, batch), s, p,
                                         batch=batch, key=key)[1])(params,
                                                                   tx.init(params))
  traced = tracing.trace_loss(loss_fn, params, batch)
  plan = plan_lib.make_plan(traced, state.factors)
  lam = jnp.float32(1e-3)

  def with_factors(p):
    _, g, cb = statistics.statistics_pass(traced, p, batch, key, "sampled")
    return g, [kronecker.batch_factors(a, gg, True, cb.num_examples, jnp.float32)
               for a, gg in cb.layers]

  def precondition(g, s):
    leaves = jax.tree_util.tree_leaves(g)
    return kronecker_family._precondition(
        plan, traced, leaves, s.factors, s.traces, s.inverses, s.diagonals, lam,
        KFAC, "factored", "identity")

  adam = optax.adam(1e-3)
  grads = jax.grad(loss_fn)(params, batch)
  t = {
      "adam step": _median_ms(jax.jit(lambda p, s: adam.update(
          jax.grad(loss_fn)(p, batch), s, p)), params, adam.init(params)),
      "gradient": _median_ms(jax.jit(jax.grad(loss_fn)), params, batch),
      "gradient + statistics": _median_ms(jax.jit(lambda p: statistics.statistics_pass(
          traced, p, batch, key, "sampled")), params),
      "+ factor products": _median_ms(jax.jit(with_factors), params),
      "precondition": _median_ms(jax.jit(precondition), grads, state),
      "refresh": _median_ms_donated(lambda inverses: kronecker_family._refresh(
          plan, state.factors, state.traces, inverses, lam, KFAC, "factored")[0],
          state.inverses),
  }
  f = phase_flops(spec["sizes"], spec["batch"])
  flops = {"gradient": f["grad"], "gradient + statistics": f["grad"] + f["backward_g"],
           "+ factor products": f["grad"] + f["backward_g"] + f["factors"],
           "precondition": f["precondition"], "refresh": f["refresh"]}
  print(f"{args.model}, batch {spec['batch']}, jax {jax.__version__}, "
        f"{jax.devices()[0].device_kind}")
  print(f"{'phase':<24}{'ms':>9}{'GFLOP':>8}{'GFLOP/s':>9}{'/adam':>7}")
  for name, ms in t.items():
    gf = flops.get(name)
    rate = f"{gf / ms / 1e6:>9.0f}" if gf else f"{'-':>9}"
    gfs = f"{gf / 1e9:>8.1f}" if gf else f"{'-':>8}"
    print(f"{name:<24}{ms:>9.1f}{gfs}{rate}{ms / t['adam step']:>7.2f}")
  plain = t["gradient"] + t["precondition"]
  stats = t["+ factor products"] + t["precondition"]
  for s_every, i_every in SCHEDULES:
    amort = plain + (stats - plain) / s_every + t["refresh"] / i_every
    print(f"predicted amortized step, stats every {s_every}, inverses every "
          f"{i_every}: {amort:.1f} ms = {amort / t['adam step']:.2f}x adam")
  fractions = [(spec["batch"], 1.0)]
  if args.stats_batch:
    fractions.append((args.stats_batch, args.stats_batch / spec["batch"]))
  for s_every, i_every in SCHEDULES:
    for n, fraction in fractions:
      print(f"FLOP floor, stats every {s_every} (from {n} examples), inverses every "
            f"{i_every}: {flop_floor(f, s_every, i_every, fraction):.2f}x the gradient's")


if __name__ == "__main__":
  main()
