"""K-FAC-expand and K-FAC-reduce (``spec/weight_sharing.md``), float64.

Exactness oracles: for one example (empirical Fisher) of a network whose
shared axis is summed or averaged right before the loss, K-FAC-reduce is the
exact block ``u uᵀ``; with sampled targets its G converges to the type-2
value that makes ``A ⊗ G`` the GGN block (linear network, square loss).
With a nonlinearity before the reduction it is not exact, and a test says so.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_ext as kfe
from kfac_jax_ext import tracing
from kfac_jax_ext import weight_sharing

LAM = 0.03




def _params(d=3, h=4, c=2, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return {"w1": jax.random.normal(ks[0], (d, h)) / np.sqrt(d),
          "b1": 0.1 * jax.random.normal(ks[1], (h,)),
          "w2": jax.random.normal(ks[2], (h, c)) / np.sqrt(h)}


def _model(pool, act=lambda s: s):
  def model(p, x):
    s = act(x @ p["w1"] + p["b1"])             # shared over the R positions
    s = pool(s, axis=1)                        # [N, R, H] -> [N, H]
    return s @ p["w2"]
  return model


def _update(loss, params, batch, sharing, fisher="empirical", key=None):
  tx = kfe.scale_by_kfac(loss, damping=LAM, damping_mode="tikhonov",
                         ema_decay=0.0, fisher=fisher, inverse_every=1,
                         weight_sharing=sharing, example_batch=batch)
  return tx.update(jax.grad(loss)(params, batch), tx.init(params), params,
                   batch=batch, key=key)


def _exact_update(loss, params, batch):
  """``solve(u uᵀ + λI, ∇)`` over (w1, b1) for a batch of one example."""
  g = jax.grad(loss)(params, batch)
  u = jnp.concatenate([g["w1"].ravel(), g["b1"]])
  big = jnp.outer(u, u) + LAM * jnp.eye(u.shape[0])
  return jnp.linalg.solve(big, u)


@pytest.mark.parametrize("pool", [jnp.sum, jnp.mean], ids=["sum", "mean"])
def test_reduce_is_exact_for_one_example_of_a_linear_network(pool):
  params = _params()
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 5, 3))
  batch = {"x": x, "y": jnp.array([[0.3, -1.0]])}
  loss = lambda p, b: kfe.squared_error(_model(pool)(p, b["x"]), b["y"])
  up, _ = _update(loss, params, batch, "reduce")
  got = jnp.concatenate([up["w1"].ravel(), up["b1"]])
  np.testing.assert_allclose(got, _exact_update(loss, params, batch), rtol=1e-9)
  # expand is not exact here: the test cannot pass for the wrong reason
  up, _ = _update(loss, params, batch, "expand")
  got = jnp.concatenate([up["w1"].ravel(), up["b1"]])
  exact = _exact_update(loss, params, batch)
  assert jnp.linalg.norm(got - exact) / jnp.linalg.norm(exact) > 0.05


def test_reduce_is_not_exact_with_a_nonlinearity_before_the_pooling():
  params = _params()
  x = jax.random.normal(jax.random.PRNGKey(1), (1, 5, 3))
  batch = {"x": x, "y": jnp.array([[0.3, -1.0]])}
  loss = lambda p, b: kfe.squared_error(_model(jnp.sum, jnp.tanh)(p, b["x"]),
                                        b["y"])
  up, _ = _update(loss, params, batch, "reduce")
  got = jnp.concatenate([up["w1"].ravel(), up["b1"]])
  exact = _exact_update(loss, params, batch)
  assert jnp.linalg.norm(got - exact) / jnp.linalg.norm(exact) > 0.01


@pytest.mark.parametrize("sharing", ["expand", "reduce"])
def test_sampled_factors_converge_to_the_type2_ggn_block(sharing):
  """Linear network, square loss, sampled targets (many draws).

  *reduce*, positions summed right before the loss: ``A = Σ_n â âᵀ / N``
  exactly and ``E[G] = R² W₂W₂ᵀ``, so ``A ⊗ E[G]`` is the GGN block
  ``(1/N) Σ_n (R â_n)(R â_n)ᵀ ⊗ W₂W₂ᵀ``. *expand*, one loss term per
  position (M = N·R): ``A = Σ ā āᵀ / (N R)`` and ``E[G] = W₂W₂ᵀ``, so
  ``A ⊗ E[G]`` is the GGN block ``(1/M) Σ_{n,r} ā āᵀ ⊗ W₂W₂ᵀ``.
  """
  params = _params(c=2)
  n, r = 4, 3
  x = jax.random.normal(jax.random.PRNGKey(2), (n, r, 3))
  if sharing == "reduce":
    model = _model(jnp.sum)
    batch = {"x": x, "y": jnp.zeros((n, 2))}
  else:
    model = lambda p, x: (x @ p["w1"] + p["b1"]) @ p["w2"]
    batch = {"x": x, "y": jnp.zeros((n, r, 2))}
  loss = lambda p, b: kfe.squared_error(model(p, b["x"]), b["y"])
  tx = kfe.scale_by_kfac(loss, ema_decay=0.0, weight_sharing=sharing,
                         example_batch=batch)
  grads = jax.grad(loss)(params, batch)
  state0 = tx.init(params)
  draws = 2000
  factors = jax.jit(jax.vmap(lambda k: tx.update(
      grads, state0, params, batch=batch, key=k)[1].factors[1]))(
          jax.random.split(jax.random.PRNGKey(3), draws))
  xbar = jnp.concatenate([x, jnp.ones((n, r, 1))], axis=-1)
  if sharing == "reduce":
    abar = xbar.mean(axis=1)
    a_exact, g_exact = abar.T @ abar / n, r ** 2 * params["w2"] @ params["w2"].T
  else:
    flat = xbar.reshape(n * r, -1)
    a_exact, g_exact = flat.T @ flat / (n * r), params["w2"] @ params["w2"].T
  np.testing.assert_allclose(factors.rows[0], a_exact, rtol=1e-12)
  g_mean = factors.cols.mean(axis=0)
  g_se = factors.cols.std(axis=0) / np.sqrt(draws)
  assert np.all(np.abs(g_mean - g_exact) < 5 * g_se + 1e-12)


def test_auto_chooses_per_layer():
  """Pooled before the loss → reduce; one position per loss example (a
  per-token loss) → expand; a forced reduce that cannot apply is an error."""
  params = _params()
  x = jnp.ones((2, 5, 3))
  pooled = lambda p, b: kfe.squared_error(_model(jnp.mean)(p, b["x"]), b["y"])
  per_token = lambda p, b: kfe.squared_error(
      (b["x"] @ p["w1"] + p["b1"]) @ p["w2"], b["y"])
  for loss, y, expected in ((pooled, jnp.ones((2, 2)), [5, 1]),
                            (per_token, jnp.ones((2, 5, 2)), [1, 1])):
    traced = tracing.trace_loss(loss, params, {"x": x, "y": y})
    got = [weight_sharing.positions(l, traced.num_examples, "auto")
           for l in traced.layers]
    assert got == expected
  time_major = lambda p, b: kfe.squared_error(
      jnp.sum(b["x"] @ p["w1"] + p["b1"], axis=0) @ p["w2"], b["y"])
  traced = tracing.trace_loss(time_major, params, {"x": jnp.ones((5, 2, 3)),
                                                   "y": jnp.ones((2, 2))})
  layer = traced.layers[0]
  assert weight_sharing.positions(layer, 2, "auto") == 1
  with pytest.raises(ValueError, match="weight_sharing='reduce'"):
    weight_sharing.positions(layer, 2, "reduce")
  with pytest.raises(ValueError, match="weight_sharing must be one of"):
    kfe.scale_by_kfac(pooled, weight_sharing="sometimes")


def test_reduce_applies_to_tkfac_and_conv():
  """A one-conv network ending in a spatial sum: reduce is exact for one
  example, for K-FAC and TKFAC alike (TKFAC = K-FAC for one example)."""
  k = jax.random.normal(jax.random.PRNGKey(4), (3, 3, 2, 3)) / 3.0
  params = {"k": k, "w": jax.random.normal(jax.random.PRNGKey(5), (3, 2))}

  def loss(p, b):
    s = jax.lax.conv_general_dilated(b["x"], p["k"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return kfe.squared_error(s.sum(axis=(1, 2)) @ p["w"], b["y"])

  batch = {"x": jax.random.normal(jax.random.PRNGKey(6), (1, 4, 4, 2)),
           "y": jnp.array([[1.0, -0.5]])}
  g = jax.grad(loss)(params, batch)
  u = g["k"].ravel()
  exact = jnp.linalg.solve(jnp.outer(u, u) + LAM * jnp.eye(u.shape[0]), u)
  for make in (kfe.scale_by_kfac, kfe.scale_by_tkfac):
    tx = make(loss, damping=LAM, damping_mode="tikhonov", ema_decay=0.0,
              fisher="empirical", weight_sharing="auto", example_batch=batch)
    up = tx.update(g, tx.init(params), params, batch=batch)[0]
    np.testing.assert_allclose(up["k"].ravel(), exact, rtol=1e-9, atol=1e-12)
