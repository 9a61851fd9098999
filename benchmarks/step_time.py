"""Whole-step time of kfe.kfac against optax.adam and kfac-jax, in one run.

Run: ``python -m benchmarks.step_time`` (``--rounds``, ``--models``). Needs the
``bench`` extra (``pip install -e ".[bench]"``) for kfac-jax 0.0.8; without it
kfac-jax is reported as absent. Models on real MNIST:
* the Martens & Grosse autoencoder 784-1000-500-250-30-250-500-1000-784
  (sigmoid cross-entropy, batch 1000);
* an MLP 784-256-256-10 (softmax cross-entropy, batch 512).
``kfe.kfac`` runs with the state laid out from the parameter shapes (padded
slots) and, as "laid out", from ``example_batch`` (exact sizes).
Each optimizer's jitted step is timed after compilation; reported: the median
step and the amortized mean over a whole number of refresh periods, and
their ratios to Adam (and of kfe.kfac at kfac-jax's settings to kfac-jax).
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
from benchmarks import data

MODELS = {
    "autoencoder": dict(sizes=[784, 1000, 500, 250, 30, 250, 500, 1000, 784],
                        batch=1000, loss="sigmoid"),
    "mlp": dict(sizes=[784, 256, 256, 10], batch=512, loss="softmax"),
}


def init_mlp(key, sizes):
  params = []
  for k, (m, n) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes, sizes[1:])):
    params.append({"w": jax.random.normal(k, (m, n)) / np.sqrt(m), "b": jnp.zeros(n)})
  return params


def apply_mlp(params, x, dense=lambda x, p: x @ p["w"] + p["b"]):
  for i, p in enumerate(params):
    x = dense(x, p)
    if i < len(params) - 1:
      x = jnp.tanh(x) if len(params) > 4 else jax.nn.relu(x)
  return x


def make_losses(spec):
  def target(batch):
    return batch["x"] if spec["loss"] == "sigmoid" else batch["y"]

  def kfe_loss(params, batch):
    out = apply_mlp(params, batch["x"])
    if spec["loss"] == "sigmoid":
      return kfe.sigmoid_cross_entropy(out, target(batch))
    return kfe.softmax_cross_entropy(out, target(batch))

  def kfac_jax_loss(params, batch):
    import kfac_jax
    out = apply_mlp(params, batch["x"], dense=lambda x, p: kfac_jax.register_dense(
        x @ p["w"] + p["b"], x, p["w"], p["b"]))
    if spec["loss"] == "sigmoid":
      kfac_jax.register_sigmoid_cross_entropy_loss(out, target(batch))
      ce = optax.sigmoid_binary_cross_entropy(out, target(batch)).sum(-1)
    else:
      kfac_jax.register_softmax_cross_entropy_loss(out, target(batch))
      ce = optax.softmax_cross_entropy_with_integer_labels(out, target(batch))
    return jnp.mean(ce)

  return kfe_loss, kfac_jax_loss


class Timed:
  """A jitted step and its carry; ``run(n)`` times n consecutive steps."""

  def __init__(self, step, carry, batches):
    self.step, self.carry, self.batches, self.i = step, carry, batches, 0
    self.times = []
    self._advance()                      # compile + first step, not timed
    self.times = []

  def _advance(self):
    start = time.perf_counter()
    self.carry = self.step(self.carry, self.batches[self.i % len(self.batches)],
                           self.i)
    jax.block_until_ready(self.carry)
    self.times.append(time.perf_counter() - start)
    self.i += 1

  def run(self, n):
    for _ in range(n):
      self._advance()


def optax_step(opt, loss_fn, params, batches, fused, stats_every=1):
  """Fused: one forward for loss, gradient and statistics (``kfe.value_and_grad``);
  with ``stats_every > 1`` it gets ``opt_state`` so statistics run only when due."""
  vg = kfe.value_and_grad(loss_fn)
  key = jax.random.PRNGKey(0)

  def step(carry, batch, i):
    params, state = carry
    k = jax.random.fold_in(key, i)
    if fused:
      _, grads, curv = vg(params, batch, k,
                          opt_state=state if stats_every > 1 else None)
      updates, state = opt.update(grads, state, params, batch=batch, key=k,
                                  curvature=curv)
    else:
      grads = jax.grad(loss_fn)(params, batch)
      updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = jax.tree_util.tree_map(jnp.copy, params)   # the carry is donated
  return Timed(jax.jit(step, donate_argnums=0), (params, opt.init(params)), batches)


FIXED_RULES = dict(
    use_adaptive_learning_rate=False, use_adaptive_momentum=False,
    use_adaptive_damping=False, learning_rate_schedule=lambda s: 1e-3,
    momentum_schedule=lambda s: 0.9, damping_schedule=lambda s: 1e-3)


def kfac_jax_step(loss_fn, params, batches, inverse_every, rules=None):
  """kfac-jax's compiled step, timed; ``rules``: its learning-rate, momentum
  and damping options (default ``FIXED_RULES``)."""
  import kfac_jax
  from benchmarks import kfac_jax_compat
  shimmed = kfac_jax_compat.apply()
  opt = kfac_jax.Optimizer(
      value_and_grad_func=jax.value_and_grad(loss_fn), l2_reg=0.0,
      curvature_ema=0.95, inverse_update_period=inverse_every,
      estimation_mode="fisher_gradients", multi_device=False,
      num_burnin_steps=0, **(FIXED_RULES if rules is None else rules))
  key = jax.random.PRNGKey(0)
  params = jax.tree_util.tree_map(jnp.copy, params)
  state = opt.init(params, key, batches[0])

  def step(carry, batch, i):
    params, state = carry
    params, state, _ = opt.step(params, state, jax.random.fold_in(key, i),
                                batch=batch, global_step_int=i)
    return params, state

  return Timed(step, (params, state), batches), shimmed


def summarize(times, period):
  n = (len(times) // period) * period
  return dict(median_ms=1e3 * float(np.median(times)),
              amortized_ms=1e3 * float(np.mean(times[:n])))


KFAC_JAX = "kfac-jax 0.0.8 (stats 1, inv 5)"


def run_model(name, rounds, x_train, y_train):
  spec = MODELS[name]
  kfe_loss, kfac_jax_loss = make_losses(spec)
  params = init_mlp(jax.random.PRNGKey(0), spec["sizes"])
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(10):
    idx = rng.integers(0, len(x_train), spec["batch"])
    batches.append({"x": jnp.asarray(x_train[idx]), "y": jnp.asarray(y_train[idx])})
  equal = dict(damping=1e-3, damping_mode="factored", stats_every=1, inverse_every=5)
  timed = {
      "optax.adam": optax_step(optax.adam(1e-3), kfe_loss, params, batches, False),
      "kfe.kfac (stats 1, inv 5)": optax_step(
          kfe.kfac(kfe_loss, 1e-3, **equal), kfe_loss, params, batches, True),
      # the state laid out per traced layer (exact factor sizes, no padding)
      "kfe.kfac (stats 1, inv 5, laid out)": optax_step(
          kfe.kfac(kfe_loss, 1e-3, example_batch=batches[0], **equal), kfe_loss,
          params, batches, True),
      "kfe.kfac (stats 10, inv 10)": optax_step(
          kfe.kfac(kfe_loss, 1e-3, damping=1e-3, stats_every=10, inverse_every=10),
          kfe_loss, params, batches, True, stats_every=10),
  }
  shimmed = None
  try:
    timed[KFAC_JAX], shimmed = kfac_jax_step(kfac_jax_loss, params, batches, 5)
  except ImportError:
    print("kfac-jax not installed (pip install -e '.[bench]'): skipped")
  for _ in range(rounds):                # interleaved: all see the same noise
    for t in timed.values():
      t.run(10)
  rows = {name: summarize(np.array(t.times), 10) for name, t in timed.items()}
  if shimmed is not None:
    rows[KFAC_JAX]["shim_applied"] = shimmed
  return rows


def timing_args(doc, argv):
  """The options of the step-timing scripts: --rounds, --models, --json."""
  parser = argparse.ArgumentParser(description=doc)
  parser.add_argument("--rounds", type=int, default=4,
                      help="interleaved rounds of 10 timed steps per optimizer")
  parser.add_argument("--models", default="autoencoder,mlp")
  parser.add_argument("--json", default=None, help="write results here")
  return parser.parse_args(argv)


def main(argv=None):
  args = timing_args(__doc__, argv)
  x_train, y_train, _, _ = data.load_mnist()
  results = {"jax": jax.__version__, "devices": str(jax.devices()), "models": {}}
  for name in args.models.split(","):
    rows = run_model(name, args.rounds, x_train, y_train)
    results["models"][name] = rows
    adam = rows["optax.adam"]
    kj = rows.get(KFAC_JAX)
    print(f"\n{name} (batch {MODELS[name]['batch']}), {10 * args.rounds} timed "
          f"steps each, interleaved in rounds of 10")
    print(f"{'optimizer':<34}{'median ms':>10}{'amort. ms':>10}{'/adam':>7}"
          f"{'/kfac-jax':>10}")
    for opt, r in rows.items():
      vs_kj = f"{r['amortized_ms'] / kj['amortized_ms']:.2f}" if kj else "-"
      print(f"{opt:<34}{r['median_ms']:>10.1f}{r['amortized_ms']:>10.1f}"
            f"{r['amortized_ms'] / adam['amortized_ms']:>7.2f}{vs_kj:>10}")
    if kj and kj.get("shim_applied"):
      print("(kfac-jax ran with benchmarks/kfac_jax_compat.py's get_bind_params shim)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
