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
