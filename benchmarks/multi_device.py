"""Step time against device count: data-parallel K-FAC / TENGraD under pmap.

Run: ``python -m benchmarks.multi_device`` (``--devices 1,2,4,8``,
``--methods kfac,tengrad``, ``--steps 30``, ``--json PATH``). On a CPU-only
machine it sets ``--xla_force_host_platform_device_count=8`` before jax
starts, so the devices are *fake*: they share the machine's cores, and the
wall-clock shows the cost of the collectives and of the split more than a
speed-up. On GPUs/TPUs it uses the real devices (as many as there are).

Task: the MNIST autoencoder (784-1000-500-250-30-250-500-1000-784, sigmoid
cross-entropy), global batch 1000 split D ways, ``axis_name="batch"``,
inverses refreshed every 5 steps. Reported per D: median time of refresh
steps and of the other steps, the amortized mean, and the largest share of
the refresh work (``Σ d_a³ + d_g³`` for K-FAC, ``n³ + n²(d_a+d_g)`` for
TENGraD) that one device owns (``kfac_jax_ext.distributed.assign_owners``).
"""

from __future__ import annotations

import os

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import kfac_jax_ext as kfe  # noqa: E402
from kfac_jax_ext import datasets as data  # noqa: E402
from benchmarks import step_time  # noqa: E402
from kfac_jax_ext import distributed  # noqa: E402

AXIS = "batch"
PERIOD = 5
SIZES = step_time.MODELS["autoencoder"]["sizes"]


def refresh_share(method: str, devices: int, gram_batch: int) -> float:
  """Largest fraction of the refresh work that one device owns."""
  dims = [(m + 1, n) for m, n in zip(SIZES, SIZES[1:])]
  if method == "kfac":
    costs = [a ** 3 + g ** 3 for a, g in dims]
  else:
    costs = [gram_batch ** 2 * (a + g) + gram_batch ** 3 for a, g in dims]
  owners = distributed.assign_owners(costs, devices)
  load = [sum(c for c, o in zip(costs, owners) if o == d) for d in range(devices)]
  return max(load) / sum(costs)


def make_optimizer(method, loss_fn, axis_name, gram_batch):
  common = dict(damping=1.0, inverse_every=PERIOD, axis_name=axis_name)
  if method == "kfac":
    return kfe.kfac(loss_fn, 0.1, kl_clip=1e-2, **common)
  return kfe.tengrad(loss_fn, 0.03, kl_clip=1e-2, gram_batch=gram_batch, **common)


def time_steps(method, devices, x_train, steps, batch_size, gram_batch):
  params = step_time.init_mlp(jax.random.PRNGKey(0), SIZES)

  def loss_fn(p, b):
    return kfe.sigmoid_cross_entropy(step_time.apply_mlp(p, b["x"]), b["x"])

  opt = make_optimizer(method, loss_fn, AXIS, gram_batch)
  vg = kfe.value_and_grad(loss_fn, axis_name=AXIS)

  def local_step(p, s, b, key):
    _, grads, curv = vg(p, b, key, opt_state=s)
    grads = jax.lax.pmean(grads, AXIS)
    updates, s = opt.update(grads, s, p, batch=b, key=key, curvature=curv)
    return optax.apply_updates(p, updates), s

  step = jax.pmap(local_step, axis_name=AXIS, in_axes=(0, 0, 0, None),
                  devices=jax.devices()[:devices])
  replicate = lambda tree: jax.tree_util.tree_map(
      lambda x: jnp.stack([x] * devices), tree)     # one copy per device
  p, s = replicate(params), replicate(opt.init(params))
  rng = np.random.default_rng(0)
  times = []
  for i in range(steps + PERIOD):      # the first period compiles and warms up
    x = x_train[rng.integers(0, len(x_train), batch_size)]
    b = {"x": x.reshape(devices, batch_size // devices, -1)}
    t0 = time.perf_counter()
    p, s = step(p, s, b, jax.random.PRNGKey(i))
    jax.block_until_ready(p)
    if i >= PERIOD:
      times.append(time.perf_counter() - t0)
  times = np.asarray(times) * 1e3
  refresh = times[::PERIOD]            # steps PERIOD, 2·PERIOD, ... refresh
  other = np.delete(times, np.s_[::PERIOD])
  return dict(refresh_ms=float(np.median(refresh)), other_ms=float(np.median(other)),
              amortized_ms=float(np.mean(times)))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", default="1,2,4,8")
  parser.add_argument("--methods", default="kfac,tengrad")
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--batch-size", type=int, default=1000)
  parser.add_argument("--gram-batch", type=int, default=256)
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  x_train = data.load_mnist()[0]
  available = len(jax.devices())
  counts = [d for d in map(int, args.devices.split(",")) if d <= available]
  device = jax.devices()[0]
  print(f"{available} {device.platform} device(s) ({device.device_kind}); "
        f"jax {jax.__version__}; batch {args.batch_size}, refresh every {PERIOD}")
  results = []
  print(f"{'method':8} {'D':>2} {'refresh ms':>11} {'other ms':>9} "
        f"{'amort. ms':>10} {'/D=1':>6} {'max owned':>10}")
  for method in args.methods.split(","):
    base = None
    for d in counts:
      r = time_steps(method, d, x_train, args.steps, args.batch_size,
                     args.gram_batch)
      r.update(method=method, devices=d,
               max_owned_refresh_share=refresh_share(method, d, args.gram_batch))
      base = base or r["amortized_ms"]
      results.append(r)
      print(f"{method:8} {d:>2} {r['refresh_ms']:>11.1f} {r['other_ms']:>9.1f} "
            f"{r['amortized_ms']:>10.1f} {r['amortized_ms'] / base:>6.2f} "
            f"{r['max_owned_refresh_share']:>10.2f}", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(platform=device.platform, device_kind=device.device_kind,
                     jax=jax.__version__, batch_size=args.batch_size,
                     period=PERIOD, results=results), f, indent=1)


if __name__ == "__main__":
  main()
