"""Shampoo for the benchmarks: Google's ``distributed_shampoo`` (PyPI
``precondition-opt==0.3.0``, the ``bench`` extra), with a documented shim.

precondition-opt 0.3.0 calls ``jax.tree_map``, ``jax.tree_flatten`` and
``jax.tree_unflatten``, which jax removed (0.6). ``apply()`` binds those three
names to their ``jax.tree_util`` equivalents, only when they are missing;
nothing of the optimizer itself is touched.

``shampoo(lr, period)`` follows the library's documented defaults: blocks of
128 ("use 128 as default"), β₁ 0.9 with Nesterov, β₂ 0.999, matrix ε 1e-6 for
float32 inverse p-th roots, the diagonal update for the first 5 steps, and
layer-wise grafting to normalized RMSProp, which fixes each layer's step to
an RMSProp-like norm. Its best learning rates still lay 1.5–2 decades
below the ones Adam chose (3e-5, 3e-5, 1e-4 on the autoencoder, transformer
and CNN; Adam's rates diverged on the autoencoder), so ``tasks`` sweeps it
from a decade below Adam's grid. Statistics every
step, preconditioners (inverse p-th roots) every ``period`` steps, as the
natural-gradient contenders refresh their inverses.
"""

from __future__ import annotations


def apply() -> bool:
  """Restores the removed ``jax.tree_*`` aliases if needed; returns whether
  it did."""
  import jax
  patched = False
  for name in ("tree_map", "tree_flatten", "tree_unflatten"):
    if not hasattr(jax, name):
      setattr(jax, name, getattr(jax.tree_util, name))
      patched = True
  return patched


def shampoo(learning_rate, period: int):
  """``distributed_shampoo`` at its documented defaults (module docstring)."""
  try:
    apply()
    from precondition import distributed_shampoo as ds
  except ImportError as e:
    raise ImportError("Shampoo needs precondition-opt: pip install -e '.[bench]'") from e
  return ds.distributed_shampoo(
      learning_rate, block_size=128, beta1=0.9, beta2=0.999,
      matrix_epsilon=1e-6, start_preconditioning_step=5,
      preconditioning_compute_steps=period, statistics_compute_steps=1,
      graft_type=ds.GraftingType.RMSPROP_NORMALIZED, nesterov=True)
