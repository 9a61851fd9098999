"""Two-level K-FAC's state: its fields and their initial values.

``S`` coarse indices (``coarse_level.coarse_size``); the fixed spaces'
vectors (spectral, Krylov–Nicolaides), the stored tokens
(``coarse_tokens``) and the residual bases (``coarse_refresh``) have their
slots here, sized from the parameters, so the state's shapes never change.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from kfac_jax_ext import coarse_krylov
from kfac_jax_ext import coarse_level as level
from kfac_jax_ext import coarse_model
from kfac_jax_ext import coarse_model_bases
from kfac_jax_ext import coarse_refresh
from kfac_jax_ext import initial_arrays
from kfac_jax_ext import linalg
from kfac_jax_ext.state import Health, KfacState


class TwoLevelState(NamedTuple):
  """State of ``scale_by_two_level_kfac`` (arrays only).

  Attributes:
    base: the fine level's ``KfacState``.
    curvature_due: whether the next update needs statistics (always, for the
      multiplicative and balanced corrections).
    coarse_count: accepted coarse statistics batches (EMA schedule).
    coarse_a, coarse_g: running coarse statistics ``[S, S]``; ``F_c = coarse_a
      ∘ coarse_g`` (``"kronecker"``: ``S_A``, ``S_G``; ``"exact"``: ``F_c`` and
      ones). ``S`` = one index per ≥2-D leaf (two for the Krylov spaces, one
      per parameter for ``"parameters"``); unused indices stay zero.
    coarse_inverse: ``(F_c + coarse damping)⁻¹`` of the last refresh.
    spectral: per leaf, ``(rows vector, cols vector)`` of the spectral space.
    health: coarse-level ``Health`` counters.
    krylov: per leaf, ``M_l⁻¹1`` of the Krylov–Nicolaides space (None
      elsewhere; ``coarse_krylov.slots``), refreshed with the inverses.
    tokens: with ``coarse_statistics="stored"`` and a per-step correction,
      per coarse layer the last statistics batch's ``(ā, g)`` tokens
      (``coarse_tokens``); else ``()``.
    bases: with ``residual_refresh="statistics"``, per leaf the residual
      space's basis of the last statistics step (``coarse_refresh``); else
      ``()``.
    model: with ``fisher_products="kronecker"``, the Kronecker model's
      ``coarse_model.ModelState`` (on a refreshed residual space
      ``coarse_model_bases.BasesModelState``); else ``()``.
  """
  base: KfacState
  curvature_due: jax.Array
  coarse_count: jax.Array
  coarse_a: jax.Array
  coarse_g: jax.Array
  coarse_inverse: jax.Array
  spectral: tuple
  health: Health
  krylov: tuple = ()
  tokens: tuple = ()
  bases: tuple = ()
  model: tuple = ()


def initial(base_state, params, coarse_space, coarse_matrix, max_coarse: int, *,
            krylov_factored: bool, refreshed: bool, tokens=None,
            modelled: bool = False) -> TwoLevelState:
  """The state before the first update.

  Args:
    base_state: the fine level's initial ``KfacState``.
    params: the parameters (their shapes size the slots).
    coarse_space, coarse_matrix: as ``scale_by_two_level_kfac``'s (resolved).
    max_coarse: the largest ``S`` allowed (``ValueError`` above).
    krylov_factored: Krylov–Nicolaides' ``M_l⁻¹1`` kept as two vectors.
    refreshed: residual bases kept between statistics steps.
    tokens: ``spectral slots ↦ stored tokens`` (``coarse_statistics="stored"``)
      or None.
    modelled: the Kronecker model's products (``coarse_model``).

  Returns:
    A ``TwoLevelState`` of distinct buffers (no array twice: it is donatable).
  """
  shapes = [tuple(jnp.shape(x)) for x in jax.tree_util.tree_leaves(params)]
  size = level.coarse_size(shapes, coarse_space, max_coarse)
  dtype = linalg.factor_dtype()
  spectral = tuple(level.spectral_slots(shapes, dtype) if coarse_space ==
                   "spectral" else [None] * len(shapes))
  zeros = initial_arrays.zeros((size, size), dtype)
  g0 = (initial_arrays.zeros((size, size), dtype) if coarse_matrix == "kronecker"
        else initial_arrays.ones((size, size), dtype))
  zero = lambda: jnp.zeros([], jnp.int32)
  krylov = (coarse_krylov.slots(shapes, dtype, krylov_factored)
            if coarse_space == "krylov_nicolaides" else ())
  toks = tokens(spectral) if tokens is not None else ()
  bases = coarse_refresh.slots(shapes, coarse_space, dtype) if refreshed else ()
  return TwoLevelState(base_state, jnp.array(True), zero(), zeros, g0,
                       initial_arrays.identity((size, size), dtype), spectral,
                       Health(zero(), zero()), krylov, toks, bases,
                       (coarse_model_bases.initial if refreshed else coarse_model.initial)(
                           shapes, size, dtype) if modelled else ())
