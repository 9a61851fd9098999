"""The README's step with one library setting changed, timed side by side.

Run: ``python -m benchmarks.paired_setting kfac_jax_ext.linalg.INVERSE_LEAF 0,128
[--models autoencoder,mlp] [--rounds 8] [--reverse]``. For each value of the
module attribute (read when a step is traced, e.g. ``linalg.INVERSE_LEAF``,
``gram.BLOCK``) it compiles ``kfe.make_train_step`` of ``kfe.kfac`` (damping
1e-3, ``damping_mode="factored"``, state laid out from ``example_batch``, as
``benchmarks.step_time``) at (stats_every, inverse_every) = (1, 5) and (10,
10), then times every step and kfac-jax's (1, 5) interleaved in rounds of 10
(median and amortized ms). ``--reverse`` builds and times the values in the
opposite order (run both: this 2-core machine drifts by ~10 % between rounds).
"""

from __future__ import annotations

import argparse
import importlib

import numpy as np

import kfac_jax_ext as kfe
from benchmarks import step_time
from kfac_jax_ext import datasets as data


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("attribute", help="module.ATTRIBUTE, e.g. kfac_jax_ext.gram.BLOCK")
  parser.add_argument("values", help="comma-separated integer values, e.g. 0,330")
  parser.add_argument("--models", default="autoencoder")
  parser.add_argument("--rounds", type=int, default=8)
  parser.add_argument("--reverse", action="store_true")
  args = parser.parse_args(argv)
  module_name, _, name = args.attribute.rpartition(".")
  module = importlib.import_module(module_name)
  if not hasattr(module, name):
    parser.error(f"{module_name} has no attribute {name!r}")
  values = [int(v) for v in args.values.split(",")]
  values = values[::-1] if args.reverse else values
  saved = getattr(module, name)
  x_train, y_train, _, _ = data.load_mnist()
  for model in args.models.split(","):
    loss, kfac_jax_loss, params, batches = step_time._model(model, x_train, y_train)
    timed = {}
    for every, inverse in ((1, 5), (10, 10)):
      for value in values:
        setattr(module, name, value)    # read while the step compiles (warmup)
        opt = kfe.kfac(loss, 1e-3, stats_every=every, inverse_every=inverse,
                       damping=1e-3, damping_mode="factored", example_batch=batches[0])
        timed[f"({every}, {inverse}) {name}={value}"] = step_time.train_step(
            opt, loss, params, batches)
      setattr(module, name, saved)
    try:
      timed[step_time.KFAC_JAX], _ = step_time.kfac_jax_step(kfac_jax_loss, params,
                                                             batches, 5)
    except ImportError:
      print("kfac-jax not installed (pip install -e '.[bench]'): skipped")
    for _ in range(args.rounds):
      for t in timed.values():
        t.run(10)
    print(f"{model}, {args.rounds * 10} timed steps each, interleaved")
    for label, t in timed.items():
      row = step_time.summarize(np.array(t.times), 10)
      print(f"  {label:<36} median {row['median_ms']:7.1f}  amortized "
            f"{row['amortized_ms']:7.1f} ms")


if __name__ == "__main__":
  main()
