"""Whole-step time of kfe.kfac against optax.adam and kfac-jax, in one run.

Run: ``python -m benchmarks.step_time`` (``--rounds``, ``--models``). Needs the
``bench`` extra (``pip install -e ".[bench]"``) for kfac-jax 0.0.8; without it
kfac-jax is reported as absent. Models:
* ``autoencoder``: the Martens & Grosse autoencoder
  784-1000-500-250-30-250-500-1000-784 on MNIST (pure JAX, sigmoid
  cross-entropy, batch 1000);
* ``mlp``: an MLP 784-256-256-10 on MNIST (pure JAX, softmax cross-entropy,
  batch 512);
* ``fashion_cnn``, ``shakespeare``: the ``benchmarks.tasks`` models (flax;
  the transformer's kfac-jax loss registered per its contract).

``kfe.kfac`` (damping 1e-3, ``damping_mode="factored"``, state laid out from
``example_batch``) runs two ways, each at (stats_every, inverse_every) =
(1, 5), kfac-jax's settings, and (10, 10):
* "plain": the optax usage, ``jax.grad`` then ``update(..., batch=, key=)``;
  the statistics take a second pass (inside one ``jax.jit`` XLA shares its
  forward with the gradient's) and the counters decide the schedule;
* ``kfe.make_train_step``: one pass for loss, gradient and statistics, the
  static schedule, the carry donated (the README's first example).
With ``--layouts``, also ``make_train_step`` with the state laid out from the
parameter shapes alone (no ``example_batch``: padded slots per leaf), so the
two layouts are compared in one run. With ``--stats-batch 500,250``, also
``make_train_step`` with ``kfe.kfac(..., stats_batch=500)`` (250): the
statistics from the batch's first 500 (250) examples, the gradient from the
whole batch (Martens & Grosse §8). With ``--product-dtype bfloat16``, also
``make_train_step`` with ``kfe.kfac(..., product_dtype="bfloat16")``.

Each step is timed after compilation, all optimizers interleaved in rounds
of 10 steps; reported: the median step and the amortized mean over whole
refresh periods, and their ratios to Adam's and to kfac-jax's.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kfac_jax_ext as kfe
from kfac_jax_ext import datasets as data

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
  """A jitted step and its carry; ``run(n)`` times n consecutive steps.

  The first ``warmup`` steps (every compilation) are not timed."""

  def __init__(self, step, carry, batches, warmup=1):
    self.step, self.carry, self.batches, self.i = step, carry, batches, 0
    self.times = []
    for _ in range(warmup):              # compile + first steps, not timed
      self._advance()
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


def optax_step(opt, loss_fn, params, batches):
  """A plain optax optimizer (Adam): ``jax.grad``, then ``update``."""
  def step(carry, batch, i):
    params, state = carry
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

  return Timed(step, (params, state), batches, warmup=inverse_every + 1), shimmed


def summarize(times, period):
  n = (len(times) // period) * period
  return dict(median_ms=1e3 * float(np.median(times)),
              amortized_ms=1e3 * float(np.mean(times[:n])))


KFAC_JAX = "kfac-jax 0.0.8 (stats 1, inv 5)"
# Thread settings that change CPU step times, recorded with the results:
# OpenBLAS (jax's LAPACK on CPU) busy-waits its threads after each call,
# taking a core from the steps that follow a refresh (docs/performance.md).
THREAD_ENV = ("OPENBLAS_NUM_THREADS", "OPENBLAS_THREAD_TIMEOUT", "OMP_NUM_THREADS",
              "MKL_NUM_THREADS")


def thread_env() -> dict:
  """The ``THREAD_ENV`` variables set in this process, by name."""
  return {k: os.environ[k] for k in THREAD_ENV if k in os.environ}
TASK_MODELS = ("fashion_cnn", "shakespeare")   # from benchmarks.tasks (flax)


def plain_step(opt, loss_fn, params, batches):
  """The plain optax usage: ``jax.grad``, then ``update(..., batch=, key=)``
  (the statistics in a second pass, the schedule from the counters)."""
  key = jax.random.PRNGKey(0)

  def step(carry, batch, i):
    params, state = carry
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = opt.update(grads, state, params, batch=batch,
                                key=jax.random.fold_in(key, i))
    return optax.apply_updates(params, updates), state

  params = jax.tree_util.tree_map(jnp.copy, params)   # the carry is donated
  return Timed(jax.jit(step, donate_argnums=0), (params, opt.init(params)), batches)


def train_step(opt, loss_fn, params, batches):
  """``kfe.make_train_step``: one pass, static schedule, donated carry."""
  step = kfe.make_train_step(loss_fn, opt)
  key = jax.random.PRNGKey(0)
  params = jax.tree_util.tree_map(jnp.copy, params)
  period = max(step.schedule.stats_every, step.schedule.inverse_every)
  # every (statistics, inverses) program compiled before timing
  return Timed(lambda carry, batch, i: step(*carry, batch, key, i)[:2],
               (params, opt.init(params)), batches, warmup=period + 1)


def _model(name, x_train, y_train):
  """(kfe loss, kfac-jax loss, params, 10 batches) of a step-time model."""
  if name in TASK_MODELS:
    from benchmarks import tasks
    task = tasks.make_task(name)
    rng = np.random.default_rng(0)
    batches = [jax.tree_util.tree_map(jnp.asarray, task.sample_batch(rng))
               for _ in range(10)]
    return task.loss_fn, task.kfac_jax_loss_fn, task.params, batches
  spec = MODELS[name]
  kfe_loss, kfac_jax_loss = make_losses(spec)
  params = init_mlp(jax.random.PRNGKey(0), spec["sizes"])
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(10):
    idx = rng.integers(0, len(x_train), spec["batch"])
    batches.append({"x": jnp.asarray(x_train[idx]), "y": jnp.asarray(y_train[idx])})
  return kfe_loss, kfac_jax_loss, params, batches


def run_model(name, rounds, x_train, y_train, layouts=False, stats_batch=(),
              product_dtype=None):
  kfe_loss, kfac_jax_loss, params, batches = _model(name, x_train, y_train)
  # the README's optimizer: the state laid out from example_batch
  equal = dict(damping=1e-3, damping_mode="factored", example_batch=batches[0])
  kfac = lambda every, inverse, **other: kfe.kfac(
      kfe_loss, 1e-3, stats_every=every, inverse_every=inverse,
      **dict(equal, **other))
  timed = {
      "optax.adam": optax_step(optax.adam(1e-3), kfe_loss, params, batches),
      "kfe plain: jax.grad+update (1, 5)": plain_step(kfac(1, 5), kfe_loss,
                                                       params, batches),
      "kfe.make_train_step (1, 5)": train_step(kfac(1, 5), kfe_loss, params, batches),
      "kfe plain: jax.grad+update (10, 10)": plain_step(kfac(10, 10), kfe_loss,
                                                         params, batches),
      "kfe.make_train_step (10, 10)": train_step(kfac(10, 10), kfe_loss, params,
                                                 batches),
  }
  for n in stats_batch:   # statistics from the first n examples
    for every, inverse in ((1, 5), (10, 10)):
      timed[f"make_train_step, stats_batch={n} ({every}, {inverse})"] = (
          train_step(kfac(every, inverse, stats_batch=n), kfe_loss, params,
                     batches))
  if product_dtype:   # the GEMMs' inputs rounded (blocks/kronecker.matmul)
    for every, inverse in ((1, 5), (10, 10)):
      timed[f"make_train_step, {product_dtype} products ({every}, {inverse})"] = (
          train_step(kfac(every, inverse, product_dtype=product_dtype),
                     kfe_loss, params, batches))
  if layouts:   # the same steps with the state laid out from parameter shapes
    for every, inverse in ((1, 5), (10, 10)):
      timed[f"shape layout: make_train_step ({every}, {inverse})"] = train_step(
          kfac(every, inverse, example_batch=None), kfe_loss, params, batches)
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
  parser.add_argument("--models", default="autoencoder,mlp,fashion_cnn,shakespeare")
  parser.add_argument("--json", default=None, help="write results here")
  parser.add_argument("--layouts", action="store_true",
                      help="also time make_train_step with the state laid out "
                           "from the parameter shapes (no example_batch)")
  parser.add_argument("--stats-batch", default="",
                      help="comma-separated sizes n: also time make_train_step "
                           "with kfe.kfac(..., stats_batch=n)")
  parser.add_argument("--product-dtype", default=None,
                      help="e.g. bfloat16: also time make_train_step with "
                           "kfe.kfac(..., product_dtype=...)")
  return parser.parse_args(argv)


def main(argv=None):
  args = timing_args(__doc__, argv)
  x_train, y_train, _, _ = data.load_mnist()
  results = {"jax": jax.__version__, "devices": str(jax.devices()),
             # thread settings that change CPU step times (docs/performance.md)
             "env": thread_env(),
             "models": {}}
  for name in args.models.split(","):
    rows = run_model(name, args.rounds, x_train, y_train, args.layouts,
                     [int(n) for n in args.stats_batch.split(",") if n],
                     args.product_dtype)
    results["models"][name] = rows
    adam = rows["optax.adam"]
    kj = rows.get(KFAC_JAX)
    print(f"\n{name}, {10 * args.rounds} timed steps each, interleaved in "
          "rounds of 10; (stats_every, inverse_every)")
    print(f"{'optimizer':<44}{'median ms':>10}{'amort. ms':>10}{'/adam':>7}"
          f"{'/kfac-jax':>10}")
    for opt, r in rows.items():
      vs_kj = f"{r['amortized_ms'] / kj['amortized_ms']:.2f}" if kj else "-"
      print(f"{opt:<44}{r['median_ms']:>10.1f}{r['amortized_ms']:>10.1f}"
            f"{r['amortized_ms'] / adam['amortized_ms']:>7.2f}{vs_kj:>10}")
    if kj and kj.get("shim_applied"):
      print("(kfac-jax ran with benchmarks/kfac_jax_compat.py's get_bind_params shim)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
