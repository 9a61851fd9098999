"""Helpers of kfac_jax_ext.linalg that the refreshes rely on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfac_jax_ext import linalg


def test_set_leading_writes_the_corner_and_keeps_the_rest():
  slot = jnp.arange(20.0).reshape(4, 5)
  out = jax.jit(linalg.set_leading)(slot, -jnp.ones((2, 3), jnp.float32))
  expected = np.arange(20.0).reshape(4, 5)
  expected[:2, :3] = -1.0
  np.testing.assert_array_equal(out, expected)
  assert out.dtype == slot.dtype
  full = jnp.full((4, 5), 7.0)
  np.testing.assert_array_equal(linalg.set_leading(slot, full), full)
  np.testing.assert_array_equal(linalg.set_leading(jnp.zeros(5), jnp.ones(2)),
                                [1, 1, 0, 0, 0])


@pytest.mark.parametrize("shape", [(5, 6), (4,), (2, 2, 2)])
def test_set_leading_refuses_what_does_not_fit(shape):
  with pytest.raises(ValueError, match="does not fit"):
    linalg.set_leading(jnp.zeros((4, 5)), jnp.ones(shape))


@pytest.mark.parametrize("n", [1, 2, 7, 300])
def test_trace_is_the_diagonal_sum(n):
  x = np.random.default_rng(n).normal(size=(n, n))
  np.testing.assert_allclose(float(jax.jit(linalg.trace)(jnp.asarray(x))),
                             np.trace(x), rtol=1e-12)


def _spd(n, seed, dtype=jnp.float64, spread=False):
  x = jax.random.normal(jax.random.PRNGKey(seed), (max(2 * n, 4), n), dtype)
  if spread:      # columns of unequal scale: a spectrum over several decades
    x = x * jnp.logspace(-2, 0.5, n, dtype=dtype)
  return x.T @ x / x.shape[0]


@pytest.mark.parametrize("n", [1, 2, 7, 33, 130])
@pytest.mark.parametrize("leaf", [0, 1, 4, 16])
def test_spd_inverse_by_blocks_equals_the_inverse(n, leaf):
  m = _spd(n, n) + 1e-2 * jnp.eye(n)
  np.testing.assert_allclose(linalg.spd_inverse(m, leaf), np.linalg.inv(np.asarray(m)),
                             rtol=1e-8, atol=1e-10)


def test_default_leaf_splits_factors_above_128_rows():
  m = _spd(300, 0) + 1e-3 * jnp.eye(300)
  text = jax.jit(linalg.spd_inverse).lower(m).as_text()
  lu = jax.jit(jnp.linalg.inv).lower(m).as_text()
  assert linalg.INVERSE_LEAF == 128
  assert text != lu and text.count("dot_general") >= 8    # 2 levels, 4 GEMMs each
  np.testing.assert_allclose(linalg.spd_inverse(m), np.linalg.inv(np.asarray(m)),
                             rtol=1e-7, atol=1e-9)


def test_blocks_are_as_accurate_as_lu_in_float32():
  """A damped factor of spread spectrum (condition ~1e4 at λ = 1e-3) in
  float32: the block inverse's residual is no worse than LU's."""
  m = (_spd(400, 1, jnp.float32, spread=True) + 1e-3 * jnp.eye(400)).astype(jnp.float32)
  residual = lambda x: float(jnp.max(jnp.abs(x @ m - jnp.eye(400))))
  assert residual(linalg.spd_inverse(m)) <= residual(jnp.linalg.inv(m))
  assert residual(linalg.spd_inverse(m)) < 1e-2


def test_damped_inverse_reports_a_non_finite_block_inverse():
  m = _spd(300, 2).at[5, 7].set(jnp.nan)
  inv, ok = linalg.damped_inverse(m, 1e-3)
  assert not bool(ok)
  inv, ok = linalg.damped_inverse(_spd(300, 2), 1e-3)
  assert bool(ok)
  np.testing.assert_allclose(inv, np.linalg.inv(np.asarray(_spd(300, 2)) + 1e-3 * np.eye(300)),
                             rtol=1e-7, atol=1e-8)
