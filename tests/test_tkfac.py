"""TKFAC against brute force (I2, I6): traces, unit-trace factors, updates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_ext as kfe
from tests import oracles

LAM = 0.05


def _mlp_problem(n=9, seed=0):
  params = oracles.mlp_init(jax.random.PRNGKey(seed), [5, 4, 3])
  batch = {"x": jax.random.normal(jax.random.PRNGKey(seed + 1), (n, 5), jnp.float64),
           "y": jax.random.randint(jax.random.PRNGKey(seed + 2), (n,), 0, 3)}
  loss = lambda p, b: kfe.softmax_cross_entropy(oracles.mlp_apply(p, b["x"]), b["y"])
  return params, batch, loss


def _per_example_grads(loss_single, params, batch):
  """U: per-example gradients of each example's (unnormalised) loss."""
  return jax.vmap(jax.grad(loss_single), (None, 0, 0))(params, batch["x"], batch["y"])


def _mlp_single(p, x, y):
  return -jax.nn.log_softmax(oracles.mlp_apply(p, x[None])[0])[y]


def _matrix(layer):
  return jnp.concatenate([layer["w"], layer["b"][None]], axis=0)


def _state_after(tx, loss, params, batches):
  step = jax.jit(lambda s, b: tx.update(jax.grad(loss)(params, b), s, params,
                                        batch=b)[1])
  state = tx.init(params)
  for b in batches:
    state = step(state, b)
  return state


def _block(state, leaf, d_a, d_g):
  """(δ, Φ, Ψ) of the layer whose kernel is ``leaf`` (flax orientation)."""
  f = state.factors[leaf]
  side_a, side_g = f.rows[:d_a, :d_a], f.cols[:d_g, :d_g]
  return state.traces[leaf], side_a / jnp.trace(side_a), side_g / jnp.trace(side_g)


@pytest.mark.parametrize("factors", ["weighted", "unweighted"])
def test_dense_trace_equals_exact_block_trace_with_and_without_ema(factors):
  params, batch, loss = _mlp_problem()
  batches = [batch] + [_mlp_problem(seed=s)[1] for s in (5, 9)]
  exact = []   # per batch, per layer: (1/N) Σ_n ‖u_n‖² (weight and bias)
  for b in batches:
    u = _per_example_grads(_mlp_single, params, b)
    exact.append([float(jnp.mean(jnp.sum(u[l]["w"] ** 2, (1, 2)) +
                                 jnp.sum(u[l]["b"] ** 2, 1))) for l in range(2)])
  for ema, used in ((0.0, batches[:1]), (0.95, batches)):
    tx = kfe.scale_by_tkfac(loss, factors=factors, ema_decay=ema, fisher="empirical")
    state = _state_after(tx, loss, params, used)
    for l, (leaf, d_a, d_g) in enumerate(((1, 6, 4), (3, 5, 3))):
      delta, phi, psi = _block(state, leaf, d_a, d_g)
      target = np.mean([e[l] for e in exact[:len(used)]])
      np.testing.assert_allclose(delta, target, rtol=1e-12)
      np.testing.assert_allclose(jnp.trace(jnp.kron(delta * phi, psi)), target,
                                 rtol=1e-12)
      np.testing.assert_allclose([jnp.trace(phi), jnp.trace(psi)], [1.0, 1.0],
                                 rtol=1e-13)


def test_weighted_factors_match_their_definition():
  params, batch, loss = _mlp_problem()
  state = _state_after(kfe.scale_by_tkfac(loss, ema_decay=0.0, fisher="empirical"),
                       loss, params, [batch])
  g_fn = oracles.mlp_output_grads(params, batch["x"],
                                  lambda s, y: -jax.nn.log_softmax(s)[y])
  gs = jax.vmap(lambda x, y: g_fn(x, (y,)))(batch["x"], batch["y"])
  inputs, _ = oracles.mlp_inputs_and_preacts(params, batch["x"])
  for l, leaf in enumerate((1, 3)):
    abar, g = oracles.homogeneous(inputs[l]), gs[l]
    alpha, beta = jnp.sum(abar ** 2, 1), jnp.sum(g ** 2, 1)
    p = (abar * beta[:, None]).T @ abar / 9
    q = (g * alpha[:, None]).T @ g / 9
    f = state.factors[leaf]
    np.testing.assert_allclose(f.rows[:abar.shape[1], :abar.shape[1]], p, rtol=1e-12)
    np.testing.assert_allclose(f.cols[:g.shape[1], :g.shape[1]], q, rtol=1e-12)


def test_conv_trace_tokens_and_exact():
  kernel = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 2, 3), jnp.float64)
  bias = 0.1 * jnp.ones(3, jnp.float64)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 6, 6, 2), jnp.float64)
  y = jax.random.normal(jax.random.PRNGKey(2), (4, 2), jnp.float64)
  dn = ("NHWC", "HWIO", "NHWC")
  conv = lambda k, b, xs: jax.lax.conv_general_dilated(
      xs, k, (2, 2), "SAME", dimension_numbers=dn) + b
  head = jax.random.normal(jax.random.PRNGKey(3), (27, 2), jnp.float64)
  params = {"k": kernel, "b": bias}
  model = lambda p, xs: jnp.tanh(conv(p["k"], p["b"], xs)).reshape(xs.shape[0], -1) @ head
  loss = lambda p, b: kfe.squared_error(model(p, b["x"]), b["y"])
  batch = {"x": x, "y": y}
  u = jax.vmap(jax.grad(lambda p, xs, ys: 0.5 * jnp.sum((model(p, xs[None])[0] - ys)
                                                        ** 2)), (None, 0, 0))(params, x, y)
  exact = float(jnp.mean(jnp.sum(u["k"] ** 2, (1, 2, 3, 4)) + jnp.sum(u["b"] ** 2, 1)))
  # tokens: (1/N) Σ_n Σ_t ‖ā_nt‖²‖g_nt‖² from explicit patches and vmap(grad)
  s = conv(kernel, bias, x)
  g = jax.vmap(jax.grad(lambda sn, yn: 0.5 * jnp.sum(
      (jnp.tanh(sn).reshape(-1) @ head - yn) ** 2)))(s, y)
  pad = jax.lax.padtype_to_pads((6, 6), (3, 3), (2, 2), "SAME")
  patches = oracles.homogeneous(oracles.patches_by_loops(x, 3, 3, 2, pad, 1))
  tokens = float(jnp.sum(jnp.sum(patches ** 2, -1) * jnp.sum(g ** 2, -1)) / 4)
  leaf = 1  # 'k' (dict keys sorted: b, k)
  for mode, target in (("exact", exact), ("tokens", tokens)):
    tx = kfe.scale_by_tkfac(loss, trace=mode, ema_decay=0.0, fisher="empirical")
    state = _state_after(tx, loss, params, [batch])
    delta, phi, psi = _block(state, leaf, 19, 3)
    np.testing.assert_allclose(delta, target, rtol=1e-11)
    np.testing.assert_allclose(jnp.trace(jnp.kron(delta * phi, psi)), target,
                               rtol=1e-11)
  assert abs(exact - tokens) > 1e-3 * exact   # cross-location terms matter here
  # with running averages over two batches: δ̄ = mean of the exact traces
  batch2 = {"x": 1.5 * jax.random.normal(jax.random.PRNGKey(7), x.shape, jnp.float64),
            "y": y}
  u2 = jax.vmap(jax.grad(lambda p, xs, ys: 0.5 * jnp.sum((model(p, xs[None])[0] - ys)
                                                         ** 2)), (None, 0, 0))(
      params, batch2["x"], y)
  exact2 = float(jnp.mean(jnp.sum(u2["k"] ** 2, (1, 2, 3, 4)) + jnp.sum(u2["b"] ** 2, 1)))
  tx = kfe.scale_by_tkfac(loss, trace="exact", ema_decay=0.95, fisher="empirical")
  delta, phi, psi = _block(_state_after(tx, loss, params, [batch, batch2]), leaf, 19, 3)
  np.testing.assert_allclose(delta, (exact + exact2) / 2, rtol=1e-11)
  np.testing.assert_allclose(jnp.trace(jnp.kron(delta * phi, psi)), (exact + exact2) / 2,
                             rtol=1e-11)


def test_tikhonov_update_equals_damped_trace_restricted_solve():
  params, batch, loss = _mlp_problem()
  tx = kfe.scale_by_tkfac(loss, damping=LAM, damping_mode="tikhonov", ema_decay=0.0,
                          fisher="empirical")
  grads = jax.grad(loss)(params, batch)
  updates, state = jax.jit(lambda g: tx.update(g, tx.init(params), params,
                                               batch=batch))(grads)
  for l, (leaf, d_a, d_g) in enumerate(((1, 6, 4), (3, 5, 3))):
    delta, phi, psi = _block(state, leaf, d_a, d_g)
    expected = oracles.kron_solve(delta * phi, psi, _matrix(grads[l]), LAM)
    np.testing.assert_allclose(_matrix(updates[l]), expected, rtol=1e-9, atol=1e-12)


def test_single_example_tkfac_equals_kfac_equals_exact():
  params, batch, loss = _mlp_problem(n=1, seed=3)
  grads = jax.grad(loss)(params, batch)
  out = {}
  for name, make in (("kfac", kfe.scale_by_kfac), ("tkfac", kfe.scale_by_tkfac)):
    tx = make(loss, damping=LAM, damping_mode="tikhonov", ema_decay=0.0,
              fisher="empirical")
    out[name] = tx.update(grads, tx.init(params), params, batch=batch)[0]
  u = _per_example_grads(_mlp_single, params, batch)
  for l in range(2):
    uv = _matrix(jax.tree_util.tree_map(lambda t: t[0], u[l])).ravel()
    grad = _matrix(grads[l]).ravel()
    exact = np.linalg.solve(np.outer(uv, uv) + LAM * np.eye(uv.size), grad)
    np.testing.assert_allclose(_matrix(out["tkfac"][l]).ravel(), exact, rtol=1e-8)
    np.testing.assert_allclose(_matrix(out["kfac"][l]).ravel(), exact, rtol=1e-8)


def test_tkfac_equals_kfac_when_token_norms_are_constant():
  """Inputs on a sphere and a linear squared-error model (g = pred - target with
  targets arranged so ‖g_n‖ is constant): δΦ⊗Ψ = A⊗G."""
  n, d = 6, 4
  angles = np.linspace(0, 2 * np.pi, n, endpoint=False)
  x = np.stack([np.cos(angles), np.sin(angles), np.zeros(n), np.zeros(n)], 1)
  w = jax.random.normal(jax.random.PRNGKey(0), (d, 3), jnp.float64)
  residual = np.stack([np.sin(3 * angles), np.cos(3 * angles), np.ones(n)], 1)
  params = {"w": w}
  batch = {"x": jnp.asarray(x), "y": jnp.asarray(x) @ w - residual}
  loss = lambda p, b: kfe.squared_error(b["x"] @ p["w"], b["y"])
  grads = jax.grad(loss)(params, batch)
  out = {}
  for name, make in (("kfac", kfe.scale_by_kfac), ("tkfac", kfe.scale_by_tkfac)):
    tx = make(loss, damping=LAM, damping_mode="tikhonov", ema_decay=0.0,
              fisher="empirical")
    out[name] = tx.update(grads, tx.init(params), params, batch=batch)[0]["w"]
  np.testing.assert_allclose(out["tkfac"], out["kfac"], rtol=1e-10)
  # and they differ once the norms vary
  batch2 = {"x": batch["x"] * jnp.arange(1, n + 1)[:, None], "y": batch["y"]}
  grads2 = jax.grad(loss)(params, batch2)
  res = [make(loss, damping=LAM, damping_mode="tikhonov", ema_decay=0.0,
              fisher="empirical") for make in (kfe.scale_by_kfac, kfe.scale_by_tkfac)]
  a, b = [tx.update(grads2, tx.init(params), params, batch=batch2)[0]["w"] for tx in res]
  assert np.abs(a - b).max() > 1e-3 * np.abs(a).max()


def test_conv_damping_is_trace_relative_and_conv_only():
  kernel = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 1, 2), jnp.float64)
  params = {"k": kernel, "w": jax.random.normal(jax.random.PRNGKey(1), (8, 2),
                                                jnp.float64)}
  model = lambda p, xs: jnp.tanh(jax.lax.conv_general_dilated(
      xs, p["k"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
      ).reshape(xs.shape[0], -1) @ p["w"]
  loss = lambda p, b: kfe.squared_error(model(p, b["x"]), b["y"])
  batch = {"x": jax.random.normal(jax.random.PRNGKey(2), (3, 4, 4, 1), jnp.float64),
           "y": jnp.zeros((3, 2), jnp.float64)}
  grads = jax.grad(loss)(params, batch)
  base = dict(damping=LAM, damping_mode="tikhonov", ema_decay=0.0, fisher="empirical")
  plain = kfe.scale_by_tkfac(loss, **base)
  rel = kfe.scale_by_tkfac(loss, conv_damping=0.5, **base)
  u0, st = plain.update(grads, plain.init(params), params, batch=batch)
  u1, _ = rel.update(grads, rel.init(params), params, batch=batch)
  np.testing.assert_allclose(u1["w"], u0["w"], rtol=1e-12)        # dense untouched
  delta, phi, psi = _block(st, 0, 9, 2)
  lam_conv = LAM + 0.5 * delta / (9 * 2)
  v = grads["k"].transpose(2, 0, 1, 3).reshape(9, 2)
  expected = oracles.kron_solve(delta * phi, psi, v, lam_conv)
  np.testing.assert_allclose(u1["k"].transpose(2, 0, 1, 3).reshape(9, 2), expected,
                             rtol=1e-9)


def test_tkfac_optimizer_trains_and_rejects_bad_options():
  params, batch, loss = _mlp_problem(n=32)
  opt = kfe.tkfac(loss, 0.1, damping=1e-2, kl_clip=1e-2)
  state = opt.init(params)
  step = jax.jit(lambda p, s, k: opt.update(jax.grad(loss)(p, batch), s, p,
                                            batch=batch, key=k))
  p = params
  for i in range(15):
    u, state = step(p, state, jax.random.PRNGKey(i))
    p = jax.tree_util.tree_map(lambda a, b: a + b, p, u)
  assert loss(p, batch) < 0.7 * loss(params, batch)
  with pytest.raises(ValueError, match="factors"):
    kfe.scale_by_tkfac(loss, factors="diagonal")
  with pytest.raises(ValueError, match="trace"):
    kfe.scale_by_tkfac(loss, trace="sud")
