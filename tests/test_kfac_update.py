"""Each layer's K-FAC update against its closed form (I2, I7, tikhonov, π)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_ext as kfe
from kfac_jax_ext import linalg
from kfac_jax_ext.blocks import kronecker
from tests import oracles

DAMPING = 0.05


def _batch(n=9, din=5, dout=3, seed=0):
  x = jax.random.normal(jax.random.PRNGKey(seed), (n, din), jnp.float64)
  y = jax.random.randint(jax.random.PRNGKey(seed + 1), (n,), 0, dout)
  return {"x": x, "y": y}


def _loss(p, b):
  return kfe.softmax_cross_entropy(oracles.mlp_apply(p, b["x"]), b["y"])


def _exact_factors(params, batch):
  """A_l, G_l from the hand forward pass and vmap(grad) output gradients."""
  return oracles.mlp_empirical_factors(params, batch)


def _kfac_direction(params, batch, **options):
  tx = kfe.scale_by_kfac(_loss, damping=DAMPING, ema_decay=0.0,
                         fisher="empirical", **options)
  grads = jax.grad(_loss)(params, batch)
  updates, _ = jax.jit(lambda g: tx.update(g, tx.init(params), params,
                                           batch=batch))(grads)
  return grads, updates


def _matrix(layer):
  return jnp.concatenate([layer["w"], layer["b"][None]], axis=0)


def test_tikhonov_update_equals_damped_kronecker_solve():
  params = oracles.mlp_init(jax.random.PRNGKey(3), [5, 4, 3])
  batch = _batch()
  grads, updates = _kfac_direction(params, batch, damping_mode="tikhonov")
  for l, (a, g) in enumerate(_exact_factors(params, batch)):
    expected = oracles.kron_solve(a, g, _matrix(grads[l]), DAMPING)
    np.testing.assert_allclose(_matrix(updates[l]), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("leaf", [128, 2], ids=["lu", "block_inverse"])
def test_factored_update_equals_pi_damped_formula(leaf, monkeypatch):
  """Also with the damped inverses by block elimination down to 2 rows
  (``linalg.spd_inverse``; the default splits only factors above 128)."""
  monkeypatch.setattr(linalg, "INVERSE_LEAF", leaf)
  params = oracles.mlp_init(jax.random.PRNGKey(3), [5, 4, 3])
  batch = _batch()
  grads, updates = _kfac_direction(params, batch, damping_mode="factored")
  for l, (a, g) in enumerate(_exact_factors(params, batch)):
    pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
    root = np.sqrt(DAMPING)
    da = a + pi * root * np.eye(a.shape[0])
    dg = g + root / pi * np.eye(g.shape[0])
    expected = np.linalg.solve(np.kron(da, dg), np.asarray(_matrix(grads[l])).ravel())
    np.testing.assert_allclose(_matrix(updates[l]).ravel(), expected, rtol=1e-9,
                               atol=1e-12)


def test_pi_damping_invariance_and_dominance():
  """I7: π-damped Δ invariant under (A, G) → (cA, G/c); the un-π'd one is not;
  and (A+π√λI)⊗(G+√λ/πI) − (A⊗G + λI) is PSD."""
  rng = np.random.default_rng(0)
  xa, xg = rng.normal(size=(6, 4)), rng.normal(size=(6, 3))
  a, g = xa.T @ xa / 6, xg.T @ xg / 6
  v = rng.normal(size=(4, 3))

  def direction(a, g):
    ia, ig, *_ = kronecker.refresh(jnp.asarray(a), jnp.asarray(g), DAMPING, "factored")
    return kronecker.precondition(jnp.asarray(v), ia, ig, None, None, DAMPING,
                                  "factored")

  np.testing.assert_allclose(direction(7.0 * a, g / 7.0), direction(a, g), rtol=1e-10)
  plain = lambda a, g: np.linalg.solve(
      np.kron(a + np.sqrt(DAMPING) * np.eye(4), g + np.sqrt(DAMPING) * np.eye(3)),
      v.ravel())
  assert np.abs(plain(7.0 * a, g / 7.0) - plain(a, g)).max() > 1e-3
  pi = np.sqrt((np.trace(a) / 4) / (np.trace(g) / 3))
  r = np.sqrt(DAMPING)
  diff = np.kron(a + pi * r * np.eye(4), g + r / pi * np.eye(3)) - (
      np.kron(a, g) + DAMPING * np.eye(12))
  assert np.linalg.eigvalsh(diff).min() > -1e-12


@pytest.mark.parametrize("mode", ["tikhonov", "factored"])
def test_single_example_block_is_exact(mode):
  """I2: with N = 1 the exact Fisher block u uᵀ equals A⊗G."""
  params = oracles.mlp_init(jax.random.PRNGKey(5), [4, 3, 2])
  batch = _batch(n=1, din=4, dout=2, seed=4)
  grads, updates = _kfac_direction(params, batch, damping_mode="tikhonov")
  per_ex = jax.vmap(jax.grad(lambda p, x, y: -jax.nn.log_softmax(
      oracles.mlp_apply(p, x[None])[0])[y]), (None, 0, 0))(params, batch["x"],
                                                          batch["y"])
  factors = _exact_factors(params, batch)
  for l in range(2):
    u = _matrix(jax.tree_util.tree_map(lambda t: t[0], per_ex[l])).ravel()
    a, g = factors[l]
    np.testing.assert_allclose(np.kron(a, g), np.outer(u, u), rtol=1e-10, atol=1e-14)
    grad = _matrix(grads[l]).ravel()
    # Sherman–Morrison: (uuᵀ + λI)⁻¹∇ = (∇ − u(uᵀ∇)/(λ + ‖u‖²))/λ
    expected = (grad - u * (u @ grad) / (DAMPING + u @ u)) / DAMPING
    np.testing.assert_allclose(_matrix(updates[l]).ravel(), expected, rtol=1e-8,
                               atol=1e-10)


def test_transposed_weight_orientation():
  """Pure-JAX layers written ``x @ W.T + b`` (W stored [out, in]) are exact too."""
  w = jax.random.normal(jax.random.PRNGKey(0), (3, 5), jnp.float64)
  b = jax.random.normal(jax.random.PRNGKey(1), (3,), jnp.float64)
  params = {"w": w, "b": b}
  batch = _batch()
  loss = lambda p, bt: kfe.softmax_cross_entropy(bt["x"] @ p["w"].T + p["b"], bt["y"])
  assert kfe.find_layers(loss, params, batch)[0].has_bias
  tx = kfe.scale_by_kfac(loss, damping=DAMPING, ema_decay=0.0, fisher="empirical",
                         damping_mode="tikhonov")
  grads = jax.grad(loss)(params, batch)
  updates, _ = tx.update(grads, tx.init(params), params, batch=batch)
  as_flax = [{"w": w.T, "b": b}]
  (a, g), = _exact_factors(as_flax, batch)
  expected = oracles.kron_solve(a, g, _matrix({"w": grads["w"].T, "b": grads["b"]}),
                                DAMPING)
  np.testing.assert_allclose(updates["w"].T, expected[:-1], rtol=1e-9)
  np.testing.assert_allclose(updates["b"], expected[-1], rtol=1e-9)


def test_kl_clip_bounds_the_quadratic_model():
  """I15: lr²ν²Σ⟨Δ,∇⟩ ≤ κ, with equality iff clipped."""
  params = oracles.mlp_init(jax.random.PRNGKey(3), [5, 4, 3])
  batch = _batch()
  grads = jax.grad(_loss)(params, batch)
  inner = kfe.scale_by_kfac(_loss, damping=DAMPING, fisher="empirical")
  raw, _ = inner.update(grads, inner.init(params), params, batch=batch)
  quad = sum(jnp.vdot(d, g) for d, g in zip(jax.tree_util.tree_leaves(raw),
                                            jax.tree_util.tree_leaves(grads)))
  lr = 0.1
  for kappa, clipped in ((float(lr**2 * quad) / 4, True), (float(lr**2 * quad) * 4,
                                                           False)):
    tx = kfe.clip_by_kl(kfe.scale_by_kfac(_loss, damping=DAMPING, fisher="empirical"),
                        kappa, lr)
    out, _ = tx.update(grads, tx.init(params), params, batch=batch)
    nu = _inner(out, grads) / quad
    if clipped:
      np.testing.assert_allclose(lr**2 * nu**2 * quad, kappa, rtol=1e-9)
      assert nu < 1
    else:
      np.testing.assert_allclose(nu, 1.0, rtol=1e-12)
      assert lr**2 * quad < kappa
  kappa = 1e-3
  opt = kfe.kfac(_loss, lr, kl_clip=kappa, fisher="empirical", momentum=0.0,
                 damping=DAMPING)
  upd, _ = opt.update(grads, opt.init(params), params, batch=batch)
  nu = -_inner(upd, grads) / (lr * quad)   # upd = -lr·νΔ
  np.testing.assert_allclose(lr**2 * nu**2 * quad, kappa, rtol=1e-9)


def _inner(a, b):
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                            jax.tree_util.tree_leaves(b)))


def _relative(a, g):
  return DAMPING * (np.trace(a) / a.shape[0]) * (np.trace(g) / g.shape[0])


def test_relative_tikhonov_update_equals_solve_damped_by_the_mean_eigenvalue():
  params = oracles.mlp_init(jax.random.PRNGKey(3), [5, 4, 3])
  batch = _batch()
  grads, updates = _kfac_direction(params, batch, damping_mode="tikhonov",
                                   damping_scale="relative")
  for l, (a, g) in enumerate(_exact_factors(params, batch)):
    expected = oracles.kron_solve(a, g, _matrix(grads[l]), _relative(a, g))
    np.testing.assert_allclose(_matrix(updates[l]), expected, rtol=1e-9, atol=1e-12)


def test_relative_factored_update_damps_each_factor_by_its_mean_eigenvalue():
  params = oracles.mlp_init(jax.random.PRNGKey(3), [5, 4, 3])
  batch = _batch()
  grads, updates = _kfac_direction(params, batch, damping_mode="factored",
                                   damping_scale="relative")
  root = np.sqrt(DAMPING)
  for l, (a, g) in enumerate(_exact_factors(params, batch)):
    da = a + root * np.trace(a) / a.shape[0] * np.eye(a.shape[0])
    dg = g + root * np.trace(g) / g.shape[0] * np.eye(g.shape[0])
    expected = np.linalg.solve(np.kron(da, dg), np.asarray(_matrix(grads[l])).ravel())
    np.testing.assert_allclose(_matrix(updates[l]).ravel(), expected, rtol=1e-9,
                               atol=1e-12)


@pytest.mark.parametrize("mode", ["tikhonov", "factored"])
def test_relative_damping_makes_the_step_independent_of_the_loss_scale(mode):
  """Loss × c scales the gradient and the curvature (the registered loss's
  Fisher) by c: with relative damping Δ is unchanged, as the undamped
  natural gradient F⁻¹∇; with absolute damping it is not."""
  params = oracles.mlp_init(jax.random.PRNGKey(3), [5, 4, 3])
  batch, c = _batch(), 64.0
  scaled = lambda p, b: kfe.softmax_cross_entropy(
      oracles.mlp_apply(p, b["x"]), b["y"], weights=jnp.full(b["y"].shape, c))

  def direction(loss, scale):
    tx = kfe.scale_by_kfac(loss, damping=DAMPING, ema_decay=0.0, fisher="empirical",
                           damping_mode=mode, damping_scale=scale)
    grads = jax.grad(loss)(params, batch)
    return tx.update(grads, tx.init(params), params, batch=batch)[0]

  for scale, invariant in (("relative", True), ("absolute", False)):
    base, big = direction(_loss, scale), direction(scaled, scale)
    for l in range(2):
      close = np.allclose(np.asarray(_matrix(big[l])),
                          np.asarray(_matrix(base[l])), rtol=1e-9, atol=1e-12)
      assert close == invariant, (scale, l)


def test_damping_scale_is_checked_and_refused_where_lambda_is_shared():
  with pytest.raises(ValueError, match="damping_scale must be one of"):
    kfe.scale_by_kfac(_loss, damping_scale="per_layer")
  params = oracles.mlp_init(jax.random.PRNGKey(3), [5, 4, 3])
  with pytest.raises(ValueError, match="leave damping_scale='absolute'"):
    kfe.scale_by_kfac(_loss, structure="block_tridiagonal", damping_scale="relative",
                      example_batch=_batch())
  with pytest.raises(ValueError, match="leave damping_scale="):
    kfe.scale_by_two_level_kfac(_loss, coarse_space="nicolaides",
                                damping_scale="relative")
  # TKFAC and the adaptive mode take it
  kfe.tkfac(_loss, 0.1, damping_scale="relative").init(params)
  kfe.kfac(_loss, "adaptive", momentum="adaptive", damping=1.0,
           damping_adaptation=True, damping_scale="relative").init(params)
