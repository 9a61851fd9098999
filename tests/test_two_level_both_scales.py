"""``fine_scale="both"`` with ``fisher_products="kronecker"``: the
multiplicative and balanced steps ``αf + γy`` (``y = Q∇``, ``f = x −
γQF̃_λx``, ``x = M⁻¹∇`` multiplicative, ``M⁻¹(∇ − γF̃_λy)`` balanced: each
combination with the coarse operator ``γQ`` for ``Q``), each part scaled
by its own quadratic-model ratio with the statistics' Fisher, ``α = fᵀ∇ /
fᵀF_λf`` and ``γ = yᵀ∇ / yᵀF_λy``, against closed forms in float64 (``Q``
and ``F̃`` from the Kronecker model's dense oracle), on a fixed space
(Nicolaides: ``coarse_model``) and on a residual one rebuilt on statistics
steps (``coarse_model_bases``)."""

import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_ext as kfe
from tests.test_two_level import EXACT, _direction, _flat, _mlp, _nicolaides_rows
from tests.test_two_level_kronecker_products import _expected, _fishers
from tests.test_two_level_kronecker_residual import MODELLED, _rows, held_update
from tests.test_two_level_spaces import _base_inverse


def _expected_both(combine, rows, model, stats, grad, minv, scales=None):
  """``(αf + γy, α, γ)``; ``scales``: a given ``(α, γ)`` (held ones).

  Each combination's preconditioner with ``γQ`` for ``Q``: ``f = x −
  γQF̃_λx``, ``x = M⁻¹∇`` multiplicative (``γQ + α(I − γQF̃_λ)M⁻¹``),
  ``x = M⁻¹(∇ − γF̃_λy)`` balanced (``γQ + α(I − γQF̃_λ)M⁻¹(I −
  γF̃_λQ)``)."""
  q = rows.T @ jnp.linalg.solve(rows @ model @ rows.T, rows)
  y = q @ grad
  gamma = scales[1] if scales is not None else (y @ grad) / (y @ stats @ y)
  x = minv(grad) if combine == "multiplicative" else minv(grad - gamma * model @ y)
  f = x - gamma * q @ model @ x
  alpha = scales[0] if scales is not None else (f @ grad) / (f @ stats @ f)
  return alpha * f + gamma * y, alpha, gamma


def _options(space):
  return (dict(MODELLED) if space == "krylov_residual"
          else dict(fisher_products="kronecker"))


def _space_rows(space, params, grad, stats, minv):
  return (_rows(space, params, grad, stats, minv) if space == "krylov_residual"
          else _nicolaides_rows(params))


@pytest.mark.parametrize("space,combine", [
    ("nicolaides", "multiplicative"), ("nicolaides", "balanced"),
    ("krylov_residual", "multiplicative"), ("krylov_residual", "balanced")])
def test_both_scales_each_part_by_its_own_model_ratio(space, combine):
  loss, params, batch = _mlp(squared=True)
  delta, state = _direction(loss, params, batch, combine=combine,
                            coarse_space=space, fine_scale="both",
                            **_options(space))
  grad, model, stats = _fishers(loss, params, batch)
  minv = _base_inverse(loss, params, batch)
  rows = _space_rows(space, params, grad, stats, minv)
  expected, alpha, gamma = _expected_both(combine, rows, model, stats, grad, minv)
  scale = float(jnp.max(jnp.abs(expected)))
  np.testing.assert_allclose(delta, expected, rtol=0, atol=1e-9 * scale)
  np.testing.assert_allclose(state.model.scale, alpha, rtol=1e-9)
  np.testing.assert_allclose(state.model.coarse_scale, gamma, rtol=1e-9)
  # each part is the model's best along itself: the test could fail
  assert abs(float(gamma) - 1.0) > 1e-2
  plain, _ = _expected(combine, rows, model, stats, grad, minv)
  assert float(jnp.max(jnp.abs(plain - expected))) > 1e-3 * scale
  # a descent direction for the statistics' quadratic model
  assert float(grad @ expected - 0.5 * expected @ stats @ expected) > 0


def test_both_scales_are_held_between_statistics_steps():
  """Statistics every second step: the second update equals ``αf + γy`` on
  the second gradient with the first step's basis, model, α and γ."""
  loss, params, batch = _mlp(squared=True)
  tx = kfe.scale_by_two_level_kfac(loss, combine="balanced",
                                   coarse_space="krylov_residual",
                                   fine_scale="both", **MODELLED,
                                   **dict(EXACT, stats_every=2))
  grad, model, stats = _fishers(loss, params, batch)
  minv = _base_inverse(loss, params, batch)
  rows = _space_rows("krylov_residual", params, grad, stats, minv)
  state, grad2, second, state2 = held_update(tx, loss, params, batch)
  held = (state.model.scale, state.model.coarse_scale)
  expected, _, _ = _expected_both("balanced", rows, model, stats, grad2, minv,
                                  scales=held)
  scale = float(jnp.max(jnp.abs(expected)))
  np.testing.assert_allclose(_flat(second), expected, rtol=0, atol=1e-10 * scale)
  assert (float(state2.model.scale), float(state2.model.coarse_scale)) == tuple(
      float(h) for h in held)
  remeasured, _, gamma2 = _expected_both("balanced", rows, model, stats, grad2, minv)
  assert abs(float(gamma2) - float(held[1])) > 1e-3    # held, not re-measured
  assert float(jnp.max(jnp.abs(remeasured - expected))) > 1e-4 * scale


def test_both_needs_the_kronecker_model():
  loss, _, _ = _mlp(squared=True)
  for products in ("statistics", "ggn", "mixed"):
    with pytest.raises(ValueError, match="fisher_products='kronecker'"):
      kfe.scale_by_two_level_kfac(loss, combine="balanced", fine_scale="both",
                                  fisher_products=products)
  with pytest.raises(ValueError, match="'model', 'both' or 'none'"):
    kfe.scale_by_two_level_kfac(loss, combine="balanced", fine_scale="joint")
