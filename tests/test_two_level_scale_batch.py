"""``scale_batch``: the examples the Kronecker model's scales α (and γ) are
measured on, apart from the model's own ``coarse_batch``, against closed
forms in float64 (the model ``F̃`` and the basis from the first 4 of 7
examples, α from all 7 or from the first 5); ``model_refresh="period"``:
the model kept on a refresh warm-up's extra statistics steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_ext as kfe
from tests.test_two_level import EXACT, _direction, _flat, _mlp, _nicolaides_rows
from tests.test_two_level_kronecker_products import _expected, _fishers
from tests.test_two_level_kronecker_residual import MODELLED, _rows
from tests.test_two_level_spaces import _base_inverse


def _first(batch, n):
  return jax.tree_util.tree_map(lambda x: x[:n], batch)


@pytest.mark.parametrize("space,combine,scale_batch,scale_rows", [
    ("nicolaides", "multiplicative", None, 7), ("nicolaides", "balanced", 5, 5),
    ("residual", "multiplicative", 5, 5), ("residual", "balanced", None, 7)])
def test_the_scale_is_measured_on_its_own_examples(space, combine, scale_batch,
                                                   scale_rows):
  loss, params, batch = _mlp(squared=True)
  options = (dict(fisher_products="kronecker") if space == "nicolaides"
             else dict(MODELLED, coarse_space=space))
  delta, state = _direction(loss, params, batch, combine=combine, coarse_batch=4,
                            scale_batch=scale_batch, **options)
  grad, _, _ = _fishers(loss, params, batch)
  _, model, stats = _fishers(loss, params, _first(batch, 4))
  _, _, scale_stats = _fishers(loss, params, _first(batch, scale_rows))
  minv = _base_inverse(loss, params, batch)
  rows = (_nicolaides_rows(params) if space == "nicolaides"
          else _rows(space, params, grad, stats, minv))
  # α with the scale's Fisher: its ratio on the direction the model gives
  _, alpha = _expected(combine, rows, model, scale_stats, grad, minv)
  expected, _ = _expected(combine, rows, model, stats, grad, minv, alpha=alpha)
  scale = float(jnp.max(jnp.abs(expected)))
  np.testing.assert_allclose(delta, expected, rtol=0, atol=1e-9 * scale)
  np.testing.assert_allclose(state.model.scale, alpha, rtol=1e-9)
  # the default (α from the model's 4 examples) differs: the test could fail
  _, alpha4 = _expected(combine, rows, model, stats, grad, minv)
  assert abs(float(alpha4 - alpha)) > 1e-3 * abs(float(alpha))
  default, _ = _direction(loss, params, batch, combine=combine, coarse_batch=4,
                          **options)
  assert float(jnp.max(jnp.abs(default - expected))) > 1e-4 * scale


def test_scale_batch_with_fine_scale_both_measures_gamma_there_too():
  loss, params, batch = _mlp(squared=True)
  _, full = _direction(loss, params, batch, combine="balanced", coarse_batch=4,
                       fine_scale="both", scale_batch=None, **MODELLED,
                       coarse_space="residual")
  _, first = _direction(loss, params, batch, combine="balanced", coarse_batch=4,
                        fine_scale="both", scale_batch=4, **MODELLED,
                        coarse_space="residual")
  _, default = _direction(loss, params, batch, combine="balanced", coarse_batch=4,
                          fine_scale="both", **MODELLED, coarse_space="residual")
  # an explicit 4 is the default; all 7 examples give other α and γ
  np.testing.assert_array_equal(first.model.scale, default.model.scale)
  np.testing.assert_array_equal(first.model.coarse_scale, default.model.coarse_scale)
  assert abs(float(full.model.coarse_scale - default.model.coarse_scale)) > 1e-6
  assert abs(float(full.model.scale - default.model.scale)) > 1e-6


@pytest.mark.parametrize("options,match", [
    (dict(fisher_products="statistics", combine="balanced"), "fisher_products='statistics'"),
    (dict(fisher_products="kronecker", combine="balanced", fine_scale="none"),
     "fine_scale='none'"),
    (dict(fisher_products="kronecker", combine="balanced", scale_batch=0),
     "scale_batch must be a positive int"),
    (dict(fisher_products="kronecker", combine="balanced", scale_batch="all"),
     "scale_batch='all'"),
])
def test_scale_batch_where_no_scale_is_measured_is_refused(options, match):
  loss, _, _ = _mlp(squared=True)
  options = {"scale_batch": None, **options}
  with pytest.raises(ValueError, match=match):
    kfe.scale_by_two_level_kfac(loss, **options)
  with pytest.raises(ValueError, match=match):
    kfe.two_level_kfac(loss, 0.1, **options)


@pytest.mark.parametrize("space", ["nicolaides", "residual"])
def test_model_refresh_period_keeps_the_model_on_a_warm_up_statistics_step(space):
  """``stats_every=2`` and a warm-up's ``Due(True, True)`` on both updates:
  with ``model_refresh="period"`` the second (count 1) refreshes the fine
  level from its batch but keeps the first batch's basis, model and α —
  the closed form with those and the second ``M⁻¹``; the default rebuilds."""
  loss, params, batch = _mlp(squared=True)
  other = dict(batch, y=batch["y"] + 1.0)       # another gradient, same inputs
  options = (dict(fisher_products="kronecker") if space == "nicolaides"
             else dict(MODELLED, coarse_space=space))
  due = kfe.Due(statistics=True, inverses=True)
  states = {}
  for refresh in ("period", "statistics"):
    tx = kfe.scale_by_two_level_kfac(loss, combine="balanced", model_refresh=refresh,
                                     **{**EXACT, "stats_every": 2, "inverse_every": 2},
                                     **options)
    _, first = tx.update(jax.grad(loss)(params, batch), tx.init(params), params,
                         batch=batch, due=due)
    out, second = tx.update(jax.grad(loss)(params, other), first, params,
                            batch=other, due=due)
    states[refresh] = (first, second, _flat(out))
  first, second, delta = states["period"]
  grad, model, stats = _fishers(loss, params, batch)
  grad2, _, _ = _fishers(loss, params, other)
  rows = (_nicolaides_rows(params) if space == "nicolaides"
          else _rows(space, params, grad, stats, _base_inverse(loss, params, batch)))
  expected, _ = _expected("balanced", rows, model, stats, grad2,
                          _base_inverse(loss, params, other), alpha=first.model.scale)
  scale = float(jnp.max(jnp.abs(expected)))
  np.testing.assert_allclose(delta, expected, rtol=0, atol=1e-9 * scale)
  np.testing.assert_array_equal(second.model.scale, first.model.scale)
  # the default rebuilt the model from the second batch: the test could fail
  _, rebuilt, delta_default = states["statistics"]
  assert abs(float(rebuilt.model.scale - first.model.scale)) > 1e-6
  assert float(jnp.max(jnp.abs(delta_default - expected))) > 1e-4 * scale


@pytest.mark.parametrize("options,match", [
    (dict(fisher_products="statistics", model_refresh="period"), "model_refresh"),
    (dict(fisher_products="kronecker", model_refresh="warmup"), "'warmup'"),
])
def test_model_refresh_is_refused_where_it_does_not_apply(options, match):
  loss, _, _ = _mlp(squared=True)
  with pytest.raises(ValueError, match=match):
    kfe.scale_by_two_level_kfac(loss, combine="balanced", **options)
