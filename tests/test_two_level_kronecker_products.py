"""``fisher_products="kronecker"``: the multiplicative and balanced
corrections with their products from Tselepidis' Kronecker model of the
whole Fisher, ``F̃_ij = A_ij ⊗ G_ij`` (``coarse_model``), against closed forms
in float64.

The oracle builds ``F̃`` densely from its definition: with one token per
example, ``vec(X)ᵀF̃vec(Y) = (1/M²) Σ_{n,n'} (Σ_i ā_inᵀX_i g_in')(Σ_j
ā_jnᵀY_j g_jn')``, so ``F̃ = W Wᵀ/M²`` with ``W``'s columns the gradients
formed from example n's inputs and example n''s output gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_ext as kfe
from kfac_jax_ext import train_step
from tests import oracles
from tests.test_two_level import (EXACT, LAM, _brute, _cnn, _direction, _flat,
                                  _mlp, _nicolaides_rows)
from tests.test_two_level_spaces import _base_inverse, _space_rows


def _model_fisher(loss, params, batch):
  """``F̃`` of the MLP task over ``_flat``'s order (per layer: bias, kernel)."""
  inputs, _ = oracles.mlp_inputs_and_preacts(params, batch["x"])
  one = lambda p, b: loss(p, jax.tree_util.tree_map(lambda t: t[None], b))
  per = jax.vmap(jax.grad(one), (None, 0))(params, batch)   # g_n = ∂ℓ_n/∂b
  n = batch["x"].shape[0]
  cols = [jnp.concatenate([part for l in range(len(params)) for part in (
      per[l]["b"][k], jnp.outer(inputs[l][i], per[l]["b"][k]).ravel())])
          for i in range(n) for k in range(n)]
  w = jnp.stack(cols, 1)
  return w @ w.T / n ** 2


def _expected(combine, rows, model, stats, grad, minv, alpha=None):
  """The closed form with ``Q`` and the products from ``model`` (``F̃_λ``)
  and the model scale from ``stats`` (the statistics' ``F_λ``), or the
  given ``alpha``."""
  q = rows.T @ jnp.linalg.solve(rows @ model @ rows.T, rows)
  if combine == "multiplicative":
    b = minv(grad)
    alpha = (b @ grad) / (b @ stats @ b) if alpha is None else alpha
    return alpha * b + q @ (grad - alpha * model @ b), alpha
  y = q @ grad
  z = grad - model @ y
  w = minv(z)
  alpha = (w @ z) / (w @ stats @ w) if alpha is None else alpha
  return alpha * (w - q @ model @ w) + y, alpha


def _fishers(loss, params, batch):
  grad, u = _brute(loss, params, batch)
  eye = jnp.eye(u.shape[0])
  return (grad, _model_fisher(loss, params, batch) + LAM * eye,
          u @ u.T / u.shape[1] + LAM * eye)


@pytest.mark.parametrize("combine", ["multiplicative", "balanced"])
def test_nicolaides_step_equals_the_closed_form_with_the_kronecker_model(combine):
  loss, params, batch = _mlp(squared=True)
  delta, state = _direction(loss, params, batch, combine=combine,
                            fisher_products="kronecker")
  grad, model, stats = _fishers(loss, params, batch)
  minv = _base_inverse(loss, params, batch)
  rows = _nicolaides_rows(params)
  expected, alpha = _expected(combine, rows, model, stats, grad, minv)
  scale = float(jnp.max(jnp.abs(expected)))
  np.testing.assert_allclose(delta, expected, rtol=0, atol=1e-10 * scale)
  np.testing.assert_allclose(state.model.scale, alpha, rtol=1e-10)
  # Galerkin orthogonality for the model's F̃_λ
  np.testing.assert_allclose(rows @ (grad - model @ delta), 0.0,
                             atol=1e-10 * float(jnp.max(jnp.abs(rows @ grad))))
  # the model is not the statistics' Fisher: the test could fail
  with_stats, _ = _expected(combine, rows, stats, stats, grad, minv)
  assert float(jnp.max(jnp.abs(with_stats - expected))) > 1e-4 * scale


@pytest.mark.parametrize("combine", ["multiplicative", "balanced"])
def test_krylov_nicolaides_atoms_equal_the_closed_form(combine):
  """Two rank-one atoms per layer, mixed into ``{1, M_l⁻¹1}`` (factored
  damping), both read through the model's projections."""
  loss, params, batch = _mlp(squared=True)
  options = dict(damping_mode="factored")
  delta, state = _direction(loss, params, batch, combine=combine,
                            coarse_space="krylov_nicolaides",
                            fisher_products="kronecker", **options)
  grad, model, stats = _fishers(loss, params, batch)
  minv = _base_inverse(loss, params, batch, **options)
  rows = _space_rows("krylov_nicolaides", _nicolaides_rows(params), minv, None)
  expected, _ = _expected(combine, rows, model, stats, grad, minv)
  scale = float(jnp.max(jnp.abs(expected)))
  np.testing.assert_allclose(delta, expected, rtol=0, atol=1e-9 * scale)
  assert float(jnp.max(jnp.abs(delta - minv(grad)))) > 1e-3 * scale


def test_spectral_space_equals_the_closed_form():
  loss, params, batch = _mlp(squared=True)
  delta, state = _direction(loss, params, batch, combine="balanced",
                            coarse_space="spectral", fisher_products="kronecker")
  grad, model, stats = _fishers(loss, params, batch)
  minv = _base_inverse(loss, params, batch)
  masks = _nicolaides_rows(params)
  rows = []
  for k, (mask, layer) in enumerate(zip(masks, params)):
    rows_v, cols_v = [s for s in state.spectral if s is not None][k]
    d_in, d_out = layer["w"].shape
    r = np.outer(rows_v[:d_in + 1], cols_v[:d_out])   # [w; b] as [d_a, d_g]
    row = np.zeros(mask.shape)
    start = int(np.argmax(np.asarray(mask)))
    row[start:start + d_out] = r[d_in]                # bias first (_flat)
    row[start + d_out:start + d_out * (d_in + 1)] = r[:d_in].ravel()
    rows.append(row)
  expected, _ = _expected("balanced", jnp.asarray(np.stack(rows)), model,
                          stats, grad, minv)
  scale = float(jnp.max(jnp.abs(expected)))
  np.testing.assert_allclose(delta, expected, rtol=0, atol=1e-9 * scale)


def test_between_statistics_steps_the_model_and_its_scale_are_held():
  """Statistics every second step: the second update runs no statistics
  pass (the schedule says so), and equals the closed form with the first
  batch's model and α on the second batch's gradient."""
  loss, params, batch = _mlp(squared=True)
  options = dict(EXACT, stats_every=2)
  tx = kfe.scale_by_two_level_kfac(loss, combine="multiplicative",
                                   fisher_products="kronecker", **options)
  _, model, stats = _fishers(loss, params, batch)
  minv = _base_inverse(loss, params, batch)
  grads = jax.grad(loss)(params, batch)
  first, state = tx.update(grads, tx.init(params), params, batch=batch)
  other = dict(batch, y=batch["y"] + 1.0)    # another gradient, same inputs
  grad2, _ = _brute(loss, params, other)
  second, state2 = tx.update(jax.grad(loss)(params, other), state, params,
                             batch=other)
  expected, _ = _expected("multiplicative", _nicolaides_rows(params), model,
                          stats, grad2, minv, alpha=state.model.scale)
  scale = float(jnp.max(jnp.abs(expected)))
  np.testing.assert_allclose(_flat(second), expected, rtol=0, atol=1e-10 * scale)
  assert float(state2.model.scale) == float(state.model.scale)
  opt = kfe.two_level_kfac(loss, 0.1, combine="balanced",
                           fisher_products="kronecker")
  assert not train_step.schedule_of(opt).statistics_every_step


def test_conv_net_matches_tselepidis_coarse_matrix_and_descends():
  """On a CNN (layers with different token counts, pooled per example) the
  model's ``F_c`` is Tselepidis' Kronecker ``F_c`` and the balanced step
  descends on the statistics' quadratic model."""
  loss, params, batch = _cnn()
  delta, state = _direction(loss, params, batch, combine="balanced",
                            fisher_products="kronecker")
  _, additive = _direction(loss, params, batch, coarse_matrix="kronecker")
  fc = np.linalg.inv(np.asarray(state.coarse_inverse))
  used = np.diag(additive.coarse_a * additive.coarse_g) != 0
  ns = np.asarray([float(np.sum(m)) for m in _nicolaides_rows(params)])
  damp = np.zeros_like(fc)
  damp[np.ix_(used, used)] = np.diag(LAM * ns)      # λRRᵀ: λ·n_i
  tselepidis = (additive.coarse_a * additive.coarse_g)[np.ix_(used, used)]
  np.testing.assert_allclose(   # (softmax: the last layer's 1ᵀg = 0 entries)
      fc[np.ix_(used, used)] - damp[np.ix_(used, used)], tselepidis, rtol=1e-9,
      atol=1e-12 * float(np.max(np.abs(tselepidis))))
  grad, u = _brute(loss, params, batch)
  f = u @ u.T / u.shape[1] + LAM * jnp.eye(u.shape[0])
  assert 0 < float(delta @ f @ delta) < 2 * float(grad @ delta)


def test_kronecker_products_refuse_what_they_cannot_model():
  loss, _, _ = _mlp()
  for kwargs, match in (
      (dict(combine="additive"), "additive one uses none"),
      (dict(combine="multiplicative", coarse_space="residual"),
       "built from each step's residual"),
      (dict(combine="balanced", coarse_space="krylov_nicolaides",
            damping_mode="tikhonov"), "factored damping"),
      (dict(combine="balanced", coarse_matrix="exact"),
       "would break Galerkin orthogonality")):
    with pytest.raises(ValueError, match=match):
      kfe.scale_by_two_level_kfac(loss, fisher_products="kronecker", **kwargs)


def test_non_finite_statistics_keep_the_model_and_are_counted():
  loss, params, batch = _mlp(squared=True)
  tx = kfe.scale_by_two_level_kfac(loss, combine="balanced",
                                   fisher_products="kronecker", **EXACT)
  grads = jax.grad(loss)(params, batch)
  _, state = tx.update(grads, tx.init(params), params, batch=batch)
  bad = dict(batch, x=batch["x"].at[0, 0].set(jnp.nan))
  out, state2 = tx.update(grads, state, params, batch=bad)
  assert int(state2.health.nonfinite_statistics) >= 1
  for old, new in zip(state.model.a, state2.model.a):
    if old is not None:
      np.testing.assert_array_equal(old, new)
  assert all(bool(jnp.all(jnp.isfinite(x)))
             for x in jax.tree_util.tree_leaves(out))
