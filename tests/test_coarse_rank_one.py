"""The coarse level's rank-one form (``coarse.RankOne``): projections, lifts,
Gram matrices and the factored Krylov–Nicolaides basis worked out on the
atoms equal the same operations on the materialized ``[m, d_a, d_g]``
basis (float64)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfac_jax_ext import coarse
from kfac_jax_ext import coarse_krylov


def _random(shape, seed):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float64)


def _layer(d_a, d_g, a_side="rows"):
  return types.SimpleNamespace(d_a=d_a, d_g=d_g, a_side=a_side)


def _slot(p, q, a_side, pad=2):
  """The state's (rows, cols) slot: padded, in the leaf's orientation."""
  first, second = (p, q) if a_side == "rows" else (q, p)
  return (jnp.pad(first, (0, pad)), jnp.pad(second, (0, pad)))


@pytest.mark.parametrize("a_side", ["rows", "cols"])
def test_factored_krylov_basis_is_the_materialized_gram_schmidt(a_side):
  p, q = _random((5,), 0), _random((3,), 1)
  basis, atoms = coarse_krylov.layer_basis(_layer(5, 3, a_side),
                                           _slot(p, q, a_side), jnp.float64)
  expected = coarse.normalized_basis([jnp.ones((5, 3), jnp.float64),
                                      jnp.outer(p, q)])
  np.testing.assert_allclose(basis, expected, rtol=0, atol=1e-14)
  materialized = jnp.einsum("kj,jd,je->kde", atoms.mixing, atoms.rows, atoms.cols)
  np.testing.assert_allclose(materialized, expected, rtol=0, atol=1e-14)
  assert float(jnp.max(jnp.abs(expected[1]))) == pytest.approx(1.0)  # ∞-norm 1


@pytest.mark.parametrize("p", [jnp.zeros(4), 2.0 * jnp.ones(4)],
                         ids=["zero", "parallel"])
def test_factored_krylov_vector_in_the_span_of_the_ones_is_dropped(p):
  """``M⁻¹1 = 0`` (before the first refresh) or ``∝ 11ᵀ`` adds no vector:
  the second row is zero (an unused coarse index), as the materialized
  Gram–Schmidt gives."""
  q = 3.0 * jnp.ones(2)
  basis, atoms = coarse_krylov.layer_basis(_layer(4, 2), _slot(p, q, "rows"),
                                           jnp.float64)
  assert float(jnp.max(jnp.abs(atoms.mixing[1]))) == 0.0
  np.testing.assert_array_equal(basis[1], 0.0)
  np.testing.assert_array_equal(coarse.gram(basis, atoms)[1], 0.0)


def test_rank_one_projection_lift_and_gram_equal_the_materialized_ones():
  rows, cols = _random((3, 6), 2), _random((3, 4), 3)
  mixing = _random((2, 3), 4)
  atoms = coarse.RankOne(rows, cols, mixing)
  basis = jnp.einsum("kj,jd,je->kde", mixing, rows, cols)
  v, beta = _random((6, 4), 5), _random((2,), 6)
  np.testing.assert_allclose(coarse.project(None, v, atoms),
                             coarse.project(basis, v), rtol=1e-12)
  np.testing.assert_allclose(coarse.lift(None, beta, atoms),
                             coarse.lift(basis, beta), rtol=1e-12)
  np.testing.assert_allclose(coarse.gram(None, atoms), coarse.gram(basis),
                             rtol=1e-12)
  a, g = _random((7, 2, 6), 7), _random((7, 2, 4), 8)      # two tokens each
  np.testing.assert_allclose(coarse.example_projections(a, g, None, atoms),
                             coarse.example_projections(a, g, basis, None),
                             rtol=1e-12)
