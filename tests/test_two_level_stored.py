"""``coarse_statistics="stored"``: a per-step two-level correction between
statistics steps uses the Fisher of the last statistics batch's tokens kept
in the state (Koroko et al.'s code), against the closed form built by brute
force (float64): ``F`` from that batch's per-example gradients
(``vmap(grad)``), ``∇`` the current batch's gradient, ``M⁻¹`` the fine level
of the statistics batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_ext as kfe
from kfac_jax_ext import train_step
from tests.test_two_level import (EXACT, LAM, _brute, _cnn, _flat, _mlp,
                                  _nicolaides_rows)
from tests.test_two_level_spaces import _base_inverse, _closed_form, _space_rows

N = 4      # coarse_batch, of M = 7 (MLP) or 5 (CNN) examples


def _batches(task="mlp"):
  """Two batches of the same shapes (the CNN's conv tokens: 81 positions)."""
  loss, params, first = _mlp(squared=True) if task == "mlp" else _cnn()
  second = dict(first, x=first["x"] + 0.5 * jax.random.normal(
      jax.random.PRNGKey(9), first["x"].shape, first["x"].dtype))
  return loss, params, first, second


def two_updates(loss, params, first, second, **options):
  """Update 0 on ``first`` (statistics and inverses), update 1 on ``second``
  with neither (``options`` over ``EXACT``'s, both periods 2, unscaled fine
  step); returns both flat directions and the states after each."""
  tx = kfe.scale_by_two_level_kfac(
      loss, **{**EXACT, "inverse_every": 2, "stats_every": 2, "fine_scale": "none",
               **options})
  state = tx.init(params)
  g0 = jax.grad(loss)(params, first)
  out0, state = tx.update(g0, state, params, batch=first,
                          due=kfe.Due(statistics=True, inverses=True))
  g1 = jax.grad(loss)(params, second)
  out1, state1 = tx.update(g1, state, params, batch=second,
                           due=kfe.Due(statistics=False, inverses=False))
  return _flat(out0), _flat(out1), state, state1


def _two_updates(loss, params, first, second, mode, **options):
  """``two_updates`` with ``coarse_statistics=mode`` on N examples."""
  return two_updates(loss, params, first, second, coarse_batch=N,
                     coarse_statistics=mode, example_batch=first, **options)


def next_step_of(mode, loss, params, first, second, space, combine):
  """``_two_updates``' second direction (no statistics); the first (a
  statistics step) must equal the ``"batch"`` form's exactly."""
  out0, out1, _, _ = _two_updates(loss, params, first, second, mode,
                                  combine=combine, coarse_space=space)
  ref0, _, _, _ = _two_updates(loss, params, first, second, "batch",
                               combine=combine, coarse_space=space)
  np.testing.assert_array_equal(out0, ref0)
  return out1


def closed_form_step(loss, params, fisher_batch, grad, minv, space, combine, n=N):
  """The step on ``∇ = grad`` with ``F`` of ``fisher_batch``'s first ``n``
  per-example gradients (``vmap(grad)``) and the fine ``M⁻¹``."""
  _, u = _brute(loss, params, fisher_batch)
  f = u[:, :n] @ u[:, :n].T / n + LAM * jnp.eye(u.shape[0])
  masks = _nicolaides_rows(params)
  r = (masks if space == "nicolaides" else
       _space_rows(space, masks, minv, grad - f @ minv(grad)))
  if combine == "additive":
    return minv(grad) + r.T @ jnp.linalg.solve(r @ f @ r.T, r @ grad)
  return _closed_form(combine, r, f, grad, minv, alpha_scaled=False)


@pytest.mark.parametrize("task,space,combine", [
    ("mlp", "residual", "multiplicative"), ("mlp", "nicolaides", "balanced"),
    ("mlp", "krylov_residual", "multiplicative"), ("mlp", "residual", "additive"),
    ("mlp", "nicolaides", "multiplicative"), ("cnn", "residual", "multiplicative"),
    ("cnn", "nicolaides", "balanced")])
def test_stored_tokens_give_the_closed_form_with_the_last_statistics_batch(
    task, space, combine):
  loss, params, first, second = _batches(task)
  out1 = next_step_of("stored", loss, params, first, second, space, combine)
  # the next step: ∇ of the second batch, F of the first batch's first N
  grad, _ = _brute(loss, params, second)
  minv = _base_inverse(loss, params, first)
  expected = closed_form_step(loss, params, first, grad, minv, space, combine)
  scale = float(jnp.max(jnp.abs(expected)))
  np.testing.assert_allclose(out1, expected, rtol=0, atol=1e-9 * scale)
  # the second batch's own Fisher gives another step: the test could fail
  other = closed_form_step(loss, params, second, grad, minv, space, combine)
  assert float(jnp.max(jnp.abs(other - expected))) > 1e-3 * scale


def test_stored_tokens_need_no_statistics_between_statistics_steps():
  loss, params, first, _ = _batches()
  options = dict(combine="multiplicative", coarse_space="residual")
  stored = kfe.two_level_kfac(loss, 0.03, coarse_statistics="stored",
                              example_batch=first, stats_every=5,
                              inverse_every=5, **options)
  per_batch = kfe.two_level_kfac(loss, 0.03, **options)
  assert not train_step.schedule_of(stored).statistics_every_step
  assert train_step.schedule_of(per_batch).statistics_every_step
  # the fused step trains with the stored tokens (sampled Fisher, jitted)
  step = kfe.make_train_step(loss, stored, donate=False)
  state = stored.init(params)
  losses = []
  for i in range(6):
    params, state, value = step(params, state, first, jax.random.PRNGKey(0), i)
    losses.append(float(value))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  two_level = next(s for s in state if hasattr(s, "tokens"))
  assert int(two_level.health.failed_inverses) == 0
  assert all(float(jnp.max(jnp.abs(t))) > 0       # tokens were stored
             for t in jax.tree_util.tree_leaves(two_level.tokens))


def non_finite(curvature):
  """``curvature`` with every layer's activations made NaN."""
  return curvature._replace(layers=tuple(
      None if layer is None else (layer[0] * jnp.nan, layer[1])
      for layer in curvature.layers))


def test_non_finite_statistics_keep_the_stored_tokens_and_are_counted():
  loss, params, first, second = _batches()
  _, _, state, _ = _two_updates(loss, params, first, second, "stored",
                                combine="multiplicative", coarse_space="residual")
  tx = kfe.scale_by_two_level_kfac(
      loss, **{**EXACT, "combine": "multiplicative", "coarse_space": "residual",
               "coarse_batch": N, "coarse_statistics": "stored",
               "example_batch": first})
  vg = kfe.value_and_grad(loss, fisher="empirical")
  _, grads, curv = vg(params, second)
  bad = non_finite(curv)
  out, new = tx.update(grads, state, params, batch=second, curvature=bad)
  assert bool(jnp.all(jnp.isfinite(_flat(out))))
  for kept, old in zip(jax.tree_util.tree_leaves(new.tokens),
                       jax.tree_util.tree_leaves(state.tokens)):
    np.testing.assert_array_equal(kept, old)
  assert int(new.health.nonfinite_statistics) == 1


def test_bad_coarse_statistics_are_named():
  loss, params, first, _ = _batches()
  with pytest.raises(ValueError, match="coarse_statistics must be one of"):
    kfe.scale_by_two_level_kfac(loss, combine="multiplicative",
                                coarse_statistics="sometimes")
  with pytest.raises(ValueError, match="fisher_products='ggn'"):
    kfe.scale_by_two_level_kfac(loss, combine="multiplicative",
                                fisher_products="ggn", coarse_statistics="stored",
                                example_batch=first)
  with pytest.raises(ValueError, match="pass example_batch"):
    kfe.scale_by_two_level_kfac(loss, combine="multiplicative",
                                coarse_statistics="stored")
  tx = kfe.scale_by_two_level_kfac(loss, combine="multiplicative",
                                   coarse_statistics="stored", example_batch=first,
                                   **EXACT)
  state = tx.init(params)
  small = jax.tree_util.tree_map(lambda t: t[:5], first)
  with pytest.raises(ValueError, match="example_batch's shapes"):
    tx.update(jax.grad(loss)(params, small), state, params, batch=small,
              due=kfe.Due(statistics=True, inverses=True))
