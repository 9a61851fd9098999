r"""Residual coarse spaces rebuilt on statistics steps: ``residual_refresh``.

Koroko et al.'s residual spaces follow the gradient: ``"residual"`` is
``M_l⁻¹res_l`` and ``"krylov_residual"`` ``{res_l, M_l⁻¹res_l}`` with
``res = ∇ − F_λM⁻¹∇`` (``coarse.py``). Two schedules for the basis:

* ``"step"`` (default): rebuilt every step from the step's gradient. Every
  step then pays a Fisher-vector product for ``res`` (so the statistics
  pass every step), a second ``M⁻¹`` application and a new ``F_c = R F_λ
  Rᵀ`` and its inverse: 2.4–3.5× K-FAC's step on the benchmark
  autoencoder (its steps in 120 s, ``autoencoder_two_level_resweep_amd``).
* ``"statistics"``: rebuilt on the fine level's statistics steps only,
  from that step's gradient, statistics and (refreshed) ``M⁻¹``, and kept
  in the state between them: a space fixed between refreshes, like
  ``"spectral"`` or ``"krylov_nicolaides"``. On the same step ``F_c`` is
  formed from the same batch's statistics with the new basis and inverted
  (not averaged with the previous ``F_c``: those belong to other bases), so
  ``Q = Rᵀ F_c⁻¹ R`` is the Galerkin projector of that batch's ``F_λ``
  until the next rebuild. The additive step between statistics steps is
  then ``ω₁M⁻¹∇ + ω₂Q∇`` with no statistics pass and no product: it costs
  what Nicolaides' does. Multiplicative and balanced steps treat it as
  any fixed space (their products and ``F_c`` from each step's tokens; with
  ``fisher_products="kronecker"`` from the Kronecker model's products with
  the basis, formed with it: ``coarse_model_bases``).

(Koroko et al.'s code rebuilds ``R`` every step but refreshes ``F_c`` only
every ``T_cov`` steps, so its ``F_c`` is that of an older basis; here the
basis and ``F_c`` change together.)

A rebuilt basis that is not finite (from non-finite statistics) keeps the
previous one, with its ``F_c`` and ``F_c⁻¹``; the caller counts it.

Example::

  >>> tx = kfe.two_level_kfac(loss_fn, 0.1, damping=0.3, coarse_space="residual",
  ...                         residual_refresh="statistics")
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kfac_jax_ext import coarse
from kfac_jax_ext import coarse_krylov
from kfac_jax_ext import coarse_level as level
from kfac_jax_ext import initial_arrays
from kfac_jax_ext import linalg
from kfac_jax_ext.blocks import kronecker

MODES = ("step", "statistics")


def check(mode, coarse_space, fisher_products: str) -> None:
  """Raises ``ValueError`` for a ``residual_refresh`` that cannot apply."""
  if mode not in MODES:
    raise ValueError(f"residual_refresh must be one of {MODES}, got {mode!r}.")
  if mode == "statistics" and coarse_space not in coarse.PER_STEP_SPACES:
    raise ValueError(f"residual_refresh='statistics' schedules the residual "
                     f"spaces {coarse.PER_STEP_SPACES}; coarse_space="
                     f"{coarse_space!r} has its own schedule: leave "
                     "residual_refresh unset.")
  if mode == "statistics" and fisher_products not in ("statistics", "kronecker"):
    raise ValueError(f"residual_refresh='statistics' builds the basis from the "
                     f"statistics batch's tokens; fisher_products="
                     f"{fisher_products!r} takes its products elsewhere: pass "
                     "fisher_products='statistics' or 'kronecker', or leave "
                     "residual_refresh unset.")


def active(mode: str, coarse_space) -> bool:
  """Whether the residual basis is kept between statistics steps."""
  return mode == "statistics" and coarse_space in coarse.PER_STEP_SPACES


def slots(shapes, space: str, dtype) -> tuple:
  """Per ≥2-D leaf, zeros ``[m, rows, cols]`` for its basis (``m`` vectors,
  the kernel's matrix shape, +1 for a folded bias); None for ≤1-D leaves.
  All zeros until the first statistics step: no correction before it."""
  m = coarse.vectors_per_layer(space)
  return tuple(initial_arrays.zeros((m,) + tuple(kronecker.slot_sizes(s)), dtype)
               if len(s) >= 2 else None for s in shapes)


def read_matrices(slot, kl, count: int):
  """``[count, d_a, d_g]``: the first ``count`` matrices of a leaf's
  ``[m, rows, cols]`` slot, in the layer's ``[d_a, d_g]`` orientation."""
  shape = (count,) + coarse_krylov.oriented_shape(kl)
  return jax.vmap(lambda x: coarse_krylov.oriented(kl, x))(linalg.leading(slot, shape))


def written_matrices(slot, kl, mats):
  """``slot`` with ``mats`` ``[n, d_a, d_g]`` written at its leading corner in
  the leaf's (rows, cols) orientation (``read_matrices``' inverse)."""
  return linalg.set_leading(slot, jax.vmap(lambda x: coarse_krylov.oriented(kl, x))(mats))


def stored_layers(layers, bases):
  """The coarse layers with their basis read from the state's slots."""
  return [l._replace(basis=read_matrices(bases[l.kl.layer.kernel], l.kl,
                                         l.idx.shape[0]), rank_one=None)
          for l in layers]


def rebuilt(space: str, layers, bases, residual, precondition):
  """``(bases, ok)``: the slots with each coarse layer's basis rebuilt from
  ``residual`` (per-layer ``res_l``; ``precondition``: ``M⁻¹`` on per-layer
  matrices, ``coarse_level.per_step_bases``), or the old slots where the new
  basis is not finite (``ok`` False)."""
  new = level.per_step_bases(space, layers, residual, precondition)
  # (normalized_basis maps a non-finite vector to zero: check its input too)
  ok = linalg.all_finite(*residual, *[l.basis for l in new])
  bases = list(bases)
  for l in new:
    slot = bases[l.kl.layer.kernel]
    bases[l.kl.layer.kernel] = jnp.where(ok, written_matrices(slot, l.kl, l.basis), slot)
  return tuple(bases), ok
