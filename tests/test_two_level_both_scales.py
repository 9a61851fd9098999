"""``fine_scale="both"`` with ``fisher_products="kronecker"``: the
multiplicative and balanced steps ``αf + γy`` (``y = Q∇``, ``f = x − QF̃_λx``,
``x = M⁻¹∇`` multiplicative, ``M⁻¹(∇ − F̃_λy)`` balanced), each part scaled
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
  """``(αf + γy, α, γ)``; ``scales``: a given ``(α, γ)`` (held ones)."""
  q = rows.T @ jnp.linalg.solve(rows @ model @ rows.T, rows)
  y = q @ grad
  x = minv(grad) if combine == "multiplicative" else minv(grad - model @ y)
  f = x - q @ model @ x
  alpha, gamma = scales if scales is not None else (
      (f @ grad) / (f @ stats @ f), (y @ grad) / (y @ stats @ y))
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


@pytest.mark.parametrize("combine", ["multiplicative", "balanced"])
def test_both_is_the_combination_of_the_model_corrected_along_the_coarse_space(
    combine):
  """The step is the plain combination (``Q̂ + α(I − Q̂F̂)M⁻¹`` multiplicative,
  ``Q̂ + α(I − Q̂F̂)M⁻¹(I − F̂Q̂)`` balanced) of ``F̂ = F̃_λ + (1/γ −
  1)F̃_λQF̃_λ``, ``Q̂ = Rᵀ(RF̂Rᵀ)⁻¹R`` (= ``γQ``): the model scaled by ``1/γ``
  along the coarse space, where ``γ`` measured it wrong."""
  loss, params, batch = _mlp(squared=True)
  delta, state = _direction(loss, params, batch, combine=combine,
                            coarse_space="nicolaides", fine_scale="both",
                            fisher_products="kronecker")
  grad, model, stats = _fishers(loss, params, batch)
  minv = _base_inverse(loss, params, batch)
  rows = _nicolaides_rows(params)
  alpha, gamma = state.model.scale, state.model.coarse_scale
  q = rows.T @ jnp.linalg.solve(rows @ model @ rows.T, rows)
  corrected = model + (1.0 / gamma - 1.0) * model @ q @ model
  q_hat = rows.T @ jnp.linalg.solve(rows @ corrected @ rows.T, rows)
  np.testing.assert_allclose(q_hat, gamma * q, rtol=0,
                             atol=1e-9 * float(jnp.max(jnp.abs(q))))
  inner = grad if combine == "multiplicative" else grad - corrected @ q_hat @ grad
  x = minv(inner)
  expected = q_hat @ grad + alpha * (x - q_hat @ corrected @ x)
  scale = float(jnp.max(jnp.abs(expected)))
  np.testing.assert_allclose(delta, expected, rtol=0, atol=1e-9 * scale)
  assert abs(float(gamma) - 1.0) > 1e-2      # a real correction


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
