"""Two-level K-FAC against its base method (K-FAC) on real data: loss against
steps and wall-clock, and the overhead per step.

Run: ``python -m benchmarks.compare_two_level [--task autoencoder|fashion_cnn]
[--steps N] [--json FILE]``. Tasks and settings are ``compare_kronecker``'s
(MNIST autoencoder, batch 1000; Fashion-MNIST CNN, batch 128); every method
refreshes statistics and inverses every 5 steps with the same λ, KL-clip and
momentum, and gets the best learning rate of a short sweep. Methods:

* ``kfac``: the base;
* ``2L additive kron``: Tselepidis et al. (Nicolaides, Kronecker coarse
  matrix, ``ω₁ = ω₂ = 1``);
* ``2L multiplicative exact``: the Galerkin correction with Koroko et al.'s
  exact coarse matrix (a statistics pass and one Fisher-vector product per
  step);
* ``2L balanced exact``: the symmetric two-level preconditioner.
"""

from __future__ import annotations

import kfac_jax_ext as kfe
from benchmarks import compare_kronecker, comparison

PERIOD = 5
METHODS = {
    "kfac": {},
    "2L additive kron": dict(combine="additive", coarse_matrix="kronecker"),
    "2L multiplicative exact": dict(combine="multiplicative",
                                    coarse_matrix="exact"),
    "2L balanced exact": dict(combine="balanced", coarse_matrix="exact"),
}


def make_optimizer(name, options, loss_fn, lr, settings):
  common = dict(momentum=0.9, stats_every=PERIOD, inverse_every=PERIOD,
                **settings)
  if name == "kfac":
    return kfe.kfac(loss_fn, lr, **common)
  return kfe.two_level_kfac(loss_fn, lr, **options, **common)


def main(argv=None):
  return comparison.main(
      argv, __doc__, ("autoencoder", "fashion_cnn"),
      lambda task: (compare_kronecker.make_task(task), METHODS),
      make_optimizer, PERIOD)


if __name__ == "__main__":
  main()
