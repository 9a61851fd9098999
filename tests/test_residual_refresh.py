"""``residual_refresh="statistics"``: the residual coarse spaces are rebuilt on
statistics steps and kept between, with the ``F_c`` of that step's batch;
against the closed form built by brute force (float64): ``F`` from per-example
gradients (``vmap(grad)``), the basis from the statistics step's gradient,
Fisher and ``M⁻¹``, ``∇`` the current batch's gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_ext as kfe
from kfac_jax_ext import train_step
from tests.test_two_level import EXACT, LAM, _brute, _flat, _nicolaides_rows
from tests.test_two_level_spaces import _base_inverse, _closed_form, _space_rows
from tests.test_two_level_stored import _batches, non_finite, two_updates


def _two_updates(loss, params, first, second, refresh, **options):
  """``two_updates`` (statistics and inverses, then neither) with
  ``residual_refresh=refresh``."""
  return two_updates(loss, params, first, second, residual_refresh=refresh,
                     **options)


def _fisher(loss, params, batch):
  _, u = _brute(loss, params, batch)
  return u @ u.T / u.shape[1] + LAM * jnp.eye(u.shape[0])


@pytest.mark.parametrize("task,space,combine", [
    ("mlp", "residual", "additive"), ("mlp", "krylov_residual", "additive"),
    ("mlp", "residual", "multiplicative"), ("mlp", "krylov_residual", "balanced"),
    ("cnn", "residual", "additive"), ("cnn", "residual", "multiplicative")])
def test_the_basis_of_the_last_statistics_step_gives_the_closed_form(
    task, space, combine):
  loss, params, first, second = _batches(task)
  out0, out1, _, _ = _two_updates(loss, params, first, second, "statistics",
                                  combine=combine, coarse_space=space)
  step0, step1, _, _ = _two_updates(loss, params, first, second, "step",
                                    combine=combine, coarse_space=space)
  # a statistics step: the basis of its own residual, as with "step"
  scale0 = float(jnp.max(jnp.abs(step0)))
  np.testing.assert_allclose(out0, step0, rtol=0, atol=1e-9 * scale0)
  # the next step: the first step's basis; ∇ of the second batch, M⁻¹ of the first
  grad0, _ = _brute(loss, params, first)
  grad1, _ = _brute(loss, params, second)
  minv = _base_inverse(loss, params, first)
  f0, f1 = _fisher(loss, params, first), _fisher(loss, params, second)
  r = _space_rows(space, _nicolaides_rows(params), minv, grad0 - f0 @ minv(grad0))
  if combine == "additive":    # F_c of the statistics batch, kept with its basis
    expected = minv(grad1) + r.T @ jnp.linalg.solve(r @ f0 @ r.T, r @ grad1)
  else:                        # products and F_c of each step's batch
    expected = _closed_form(combine, r, f1, grad1, minv, alpha_scaled=False)
  scale = float(jnp.max(jnp.abs(expected)))
  np.testing.assert_allclose(out1, expected, rtol=0, atol=1e-9 * scale)
  # the basis rebuilt from the second step's residual is another step
  assert float(jnp.max(jnp.abs(step1 - expected))) > 1e-3 * scale


def test_additive_refreshed_residual_needs_no_statistics_between_statistics_steps():
  loss, params, first, _ = _batches()
  refreshed = kfe.two_level_kfac(loss, 0.03, coarse_space="residual",
                                 residual_refresh="statistics", stats_every=3,
                                 inverse_every=3)
  assert not train_step.schedule_of(refreshed).statistics_every_step
  assert train_step.schedule_of(kfe.two_level_kfac(
      loss, 0.03, coarse_space="residual")).statistics_every_step
  # multiplicative: a fixed space, products from every step's batch
  assert train_step.schedule_of(kfe.two_level_kfac(
      loss, 0.03, coarse_space="residual", combine="multiplicative",
      residual_refresh="statistics")).statistics_every_step
  step = kfe.make_train_step(loss, refreshed, donate=False)   # sampled Fisher
  state, losses = refreshed.init(params), []
  for i in range(7):
    params, state, value = step(params, state, first, jax.random.PRNGKey(i), i)
    losses.append(float(value))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  two_level = next(s for s in state if hasattr(s, "bases"))
  assert int(two_level.health.failed_inverses) == 0
  assert int(two_level.health.nonfinite_statistics) == 0
  kept = [b for b in two_level.bases if b is not None]
  assert kept and all(float(jnp.max(jnp.abs(b))) == pytest.approx(1.0) for b in kept)


def test_a_non_finite_statistics_step_keeps_the_basis_and_is_counted():
  loss, params, first, second = _batches()
  options = dict(EXACT, coarse_space="residual", residual_refresh="statistics")
  _, _, state, _ = _two_updates(loss, params, first, second, "statistics",
                                coarse_space="residual")
  tx = kfe.scale_by_two_level_kfac(loss, **options)
  _, grads, curv = kfe.value_and_grad(loss, fisher="empirical")(params, second)
  out, new = tx.update(grads, state, params, batch=second, curvature=non_finite(curv),
                       due=kfe.Due(statistics=True, inverses=True))
  assert bool(jnp.all(jnp.isfinite(_flat(out))))
  for kept, old in zip(jax.tree_util.tree_leaves(new.bases),
                       jax.tree_util.tree_leaves(state.bases)):
    np.testing.assert_array_equal(kept, old)
  assert int(new.health.nonfinite_statistics) == 1
  # the kept basis keeps its F_c and F_c⁻¹: the correction is not dropped
  assert int(new.health.failed_inverses) == 0
  np.testing.assert_allclose(new.coarse_inverse, state.coarse_inverse, rtol=1e-12)
  assert float(jnp.max(jnp.abs(new.coarse_inverse - jnp.eye(
      new.coarse_inverse.shape[0])))) > 1e-3


def test_bad_residual_refresh_is_named():
  loss, _, _, _ = _batches()
  with pytest.raises(ValueError, match="residual_refresh must be one of"):
    kfe.scale_by_two_level_kfac(loss, coarse_space="residual",
                                residual_refresh="sometimes")
  with pytest.raises(ValueError, match="coarse_space='nicolaides' has its own"):
    kfe.scale_by_two_level_kfac(loss, residual_refresh="statistics")
  with pytest.raises(ValueError, match="fisher_products='ggn'"):
    kfe.scale_by_two_level_kfac(loss, coarse_space="residual",
                                fisher_products="ggn", residual_refresh="statistics")
