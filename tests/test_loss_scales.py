"""A factor on a loss helper's value reaches the curvature
(``kfac_jax_ext/loss_scales.py``).

The Fisher (and GGN) of ``c·L`` is ``c`` times ``L``'s. ``loss_fn`` returning
``2 * kfe.softmax_cross_entropy(...)`` used to get the gradient of ``2L`` and
the curvature of ``L``. A factor computed in ``loss_fn`` (a masked mean's
``n / Σ mask``) is read at run time, on each batch. Float64, against the
oracle's factors.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_ext as kfe
from kfac_jax_ext import loss_scales
from kfac_jax_ext import statistics
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


def _masked_batch(seed):
  batch = _batch()
  return dict(batch, m=jax.random.bernoulli(jax.random.PRNGKey(seed), 0.6, (12,)))


def _masked_mean(p, b):       # flax's examples: Σ w l / Σ w
  return _masked_sum(p, b) / jnp.sum(b["m"])


_masked_sum = lambda p, b: 12 * kfe.softmax_cross_entropy(
    oracles.mlp_apply(p, b["x"]), b["y"], weights=b["m"])


@pytest.mark.parametrize("loss", [
    _masked_mean,
    jax.jit(_masked_mean),
    lambda p, b: 0.5 * jax.jit(_masked_sum)(p, b) * (2 / jnp.sum(b["m"])),
], ids=["masked_mean", "inside_jit", "count_outside_jit"])
def test_a_factor_computed_from_the_batch_is_read_on_each_batch(loss):
  """``Σ_n m_n l_n / Σ m``: the curvature of the loss with weights
  ``c·m``, ``c = 12 / Σ m`` of the batch the update sees (not of the
  traced example batch), and no warning."""
  params = oracles.mlp_init(jax.random.PRNGKey(3), [5, 4, 3])
  example, batch = _masked_batch(5), _masked_batch(6)
  assert jnp.sum(example["m"]) != jnp.sum(batch["m"])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    traced = tracing.trace_loss(loss, params, example)
  (scale,) = traced.loss_scales
  assert isinstance(scale, loss_scales.RuntimeScale)
  tx = kfe.scale_by_kfac(loss, damping=LAM, damping_mode="tikhonov", ema_decay=0.0,
                         fisher="empirical", example_batch=example)
  grads = jax.grad(loss)(params, batch)
  updates = jax.jit(lambda g, b: tx.update(g, tx.init(params), params, batch=b))(
      grads, batch)[0]
  weights = batch["m"] * 12 / jnp.sum(batch["m"])
  stale = example["m"] * 12 / jnp.sum(example["m"])   # the traced batch's factor
  factors = oracles.mlp_empirical_factors(params, batch, weights)
  wrong = oracles.mlp_empirical_factors(params, batch, stale)
  for layer, ((a, g), (_, g_stale)) in enumerate(zip(factors, wrong)):
    expected = oracles.kron_solve(a, g, _matrix(grads[layer]), LAM)
    np.testing.assert_allclose(_matrix(updates[layer]), expected, rtol=1e-9,
                               atol=1e-12)
    other = oracles.kron_solve(a, g_stale, _matrix(grads[layer]), LAM)
    assert np.max(np.abs(expected - other)) > 1e-3 * np.max(np.abs(expected))
  # The exact-GGN products' losses (evaluate_losses) carry it too.
  _, (registered,) = statistics.evaluate_losses(
      traced, jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(batch))
  np.testing.assert_allclose(registered.weights, weights, rtol=1e-14)


def test_a_factor_on_a_helper_with_a_boolean_mask_reaches_the_curvature():
  """``2 · L`` with ``weights=`` a bool mask: the factor used to be cast to
  the mask's dtype (``True``) and lost."""
  params = oracles.mlp_init(jax.random.PRNGKey(3), [5, 4, 3])
  batch = _masked_batch(5)
  loss = lambda p, b: 2.0 * kfe.softmax_cross_entropy(
      oracles.mlp_apply(p, b["x"]), b["y"], weights=b["m"])
  grads, updates = _update(loss, params, batch)
  factors = oracles.mlp_empirical_factors(params, batch, 2.0 * batch["m"])
  for layer, (a, g) in enumerate(factors):
    expected = oracles.kron_solve(a, g, _matrix(grads[layer]), LAM)
    np.testing.assert_allclose(_matrix(updates[layer]), expected, rtol=1e-9,
                               atol=1e-12)


def test_a_negative_factor_at_run_time_adds_no_curvature():
  """``L · s`` with ``s < 0`` in the batch: no Fisher, so the loss's
  curvature weight is 0 and the damped step is ``∇/λ`` (not NaN)."""
  params = oracles.mlp_init(jax.random.PRNGKey(3), [5, 4, 3])
  loss = lambda p, b: _ce(p, b) * b["s"]
  grads, updates = _update(loss, params, dict(_batch(), s=jnp.asarray(-0.5)))
  for layer in range(2):
    np.testing.assert_allclose(_matrix(updates[layer]), _matrix(grads[layer]) / LAM,
                               rtol=1e-12)
  grads, updates = _update(loss, params, dict(_batch(), s=jnp.asarray(0.5)))
  (a, g), _ = oracles.mlp_empirical_factors(params, _batch(), jnp.full((12,), 0.5))
  np.testing.assert_allclose(_matrix(updates[0]),
                             oracles.kron_solve(a, g, _matrix(grads[0]), LAM),
                             rtol=1e-9, atol=1e-12)


def test_negative_and_unreadable_factors_are_named():
  params = oracles.mlp_init(jax.random.PRNGKey(3), [5, 4, 3])
  batch = _batch()
  with pytest.raises(ValueError, match=r"by -1 < 0: a negative multiple"):
    tracing.trace_loss(lambda p, b: -_ce(p, b), params, batch)
  for unreadable in (lambda p, b: jnp.log(_ce(p, b)),
                     lambda p, b: _ce(p, b) ** 2):
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      traced = tracing.trace_loss(unreadable, params, batch)
    assert traced.loss_scales == (1.0,)
    assert any("cannot be read off" in str(w.message) and "weights=" in str(w.message)
               for w in caught), [str(w.message) for w in caught]
