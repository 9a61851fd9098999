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

import optax

import kfac_jax_ext as kfe
from benchmarks import compare_kronecker, comparison
from benchmarks.models import ConvNet3C1F

PERIOD = 5


def make_setup(name):
  """``(setup, methods)`` of a task (see ``comparison.run_methods``)."""
  if name == "autoencoder":
    methods = {"adam": {}, "kfac": {}, "tengrad": {"gram_batch": 1000},
               "tengrad_sub250": {"gram_batch": 250}}
    return compare_kronecker.make_task("autoencoder"), methods
  setup = compare_kronecker.fashion_task(
      ConvNet3C1F(), {"adam": (1e-3, 3e-4), "kronecker": (0.03, 0.1)},
      dict(damping=0.1, kl_clip=1e-2), test_size=1000)
  return setup, {"adam": {}, "kfac": {}, "tengrad": {"gram_batch": 128}}


def make_optimizer(name, options, loss_fn, lr, settings):
  if name == "adam":
    return optax.adam(lr)
  common = dict(momentum=0.9, inverse_every=PERIOD, **settings)
  if name == "kfac":
    return kfe.kfac(loss_fn, lr, stats_every=PERIOD, **common)
  return kfe.tengrad(loss_fn, lr, **options, **common)


def main(argv=None):
  return comparison.main(argv, __doc__, ("autoencoder", "fashion_3c1f"),
                         make_setup, make_optimizer, PERIOD)


if __name__ == "__main__":
  main()
