"""A factor on a loss helper's value reaches the curvature
(``kfac_jax_ext/loss_scales.py``).

The Fisher (and GGN) of ``c·L`` is ``c`` times ``L``'s. ``loss_fn`` returning
``2 * kfe.softmax_cross_entropy(...)`` used to get the gradient of ``2L`` and
the curvature of ``L``. Float64, against the oracle's factors.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_ext as kfe
from kfac_jax_ext import tracing
from tests import oracles

LAM = 0.05


def _batch():
  k = jax.random.split(jax.random.PRNGKey(1), 2)
  return {"x": jax.random.normal(k[0], (12, 5)),
          "y": jax.random.randint(k[1], (12,), 0, 3)}


def _ce(params, batch):
  return kfe.softmax_cross_entropy(oracles.mlp_apply(params, batch["x"]), batch["y"])


def _matrix(layer):
  return jnp.concatenate([layer["w"], layer["b"][None]], axis=0)


def _update(loss, params, batch):
  tx = kfe.scale_by_kfac(loss, damping=LAM, damping_mode="tikhonov",
                         ema_decay=0.0, fisher="empirical", example_batch=batch)
  grads = jax.grad(loss)(params, batch)
  return grads, jax.jit(lambda g: tx.update(g, tx.init(params), params,
                                            batch=batch))(grads)[0]


@pytest.mark.parametrize("factor, loss", [
    (2.0, lambda p, b: 2.0 * _ce(p, b)),
    (0.25, lambda p, b: _ce(p, b) / 4 + 1e-3 * jnp.sum(p[0]["w"] ** 2)),
    (3.0, jax.jit(lambda p, b: 3.0 * _ce(p, b))),
], ids=["times_2", "divided_with_a_penalty", "inside_jit"])
def test_a_factor_on_the_helper_scales_the_curvature_exactly(factor, loss):
  params = oracles.mlp_init(jax.random.PRNGKey(3), [5, 4, 3])
  batch = _batch()
  assert tracing.trace_loss(loss, params, batch).loss_scales == (factor,)
  grads, updates = _update(loss, params, batch)
  for layer, (a, g) in enumerate(oracles.mlp_empirical_factors(params, batch)):
    expected = oracles.kron_solve(a, factor * g, _matrix(grads[layer]), LAM)
    np.testing.assert_allclose(_matrix(updates[layer]), expected, rtol=1e-9,
                               atol=1e-12)


def test_a_weighted_sum_of_two_helpers_scales_each():
  """Two models, one helper each: ``0.3·L_a + 0.7·L_b``."""
  params = {"a": oracles.mlp_init(jax.random.PRNGKey(3), [5, 4, 3]),
            "b": oracles.mlp_init(jax.random.PRNGKey(4), [5, 3])}
  batch = _batch()
  loss = lambda p, b: 0.3 * _ce(p["a"], b) + 0.7 * _ce(p["b"], b)
  assert tracing.trace_loss(loss, params, batch).loss_scales == (0.3, 0.7)
  grads, updates = _update(loss, params, batch)
  for name, factor in (("a", 0.3), ("b", 0.7)):
    factors = oracles.mlp_empirical_factors(params[name], batch)
    for layer, (a, g) in enumerate(factors):
      expected = oracles.kron_solve(a, factor * g, _matrix(grads[name][layer]), LAM)
      np.testing.assert_allclose(_matrix(updates[name][layer]), expected,
                                 rtol=1e-9, atol=1e-12)


def test_negative_and_unreadable_factors_are_named():
  params = oracles.mlp_init(jax.random.PRNGKey(3), [5, 4, 3])
  batch = _batch()
  with pytest.raises(ValueError, match=r"by -1 < 0: a negative multiple"):
    tracing.trace_loss(lambda p, b: -_ce(p, b), params, batch)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    traced = tracing.trace_loss(lambda p, b: _ce(p, b) * b["x"].mean(), params, batch)
  assert traced.loss_scales == (1.0,)
  assert any("cannot be read off" in str(w.message) and "weights=" in str(w.message)
             for w in caught), [str(w.message) for w in caught]
