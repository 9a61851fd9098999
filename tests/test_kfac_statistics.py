"""A and G against brute force (I9, I10, I17), EMA schedule (I16), I11."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_ext as kfe
from kfac_jax_ext import statistics, tracing
from tests import oracles


def _factors_after_one_step(loss_fn, params, batch, **options):
  tx = kfe.scale_by_kfac(loss_fn, ema_decay=0.0, fisher="empirical",
                         damping_mode="tikhonov", **options)

  @jax.jit
  def step(params, batch):
    grads = jax.grad(loss_fn)(params, batch)
    return tx.update(grads, tx.init(params), params, batch=batch)[1]
  return step(params, batch)


def _slots(state, params, leaf_path, d_a, d_g):
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  idx = [i for i, (p, _) in enumerate(leaves) if jax.tree_util.keystr(p) == leaf_path]
  f = state.factors[idx[0]]
  return f.rows[:d_a, :d_a], f.cols[:d_g, :d_g]


def test_dense_factors_match_per_example_brute_force():
  key = jax.random.PRNGKey(0)
  params = oracles.mlp_init(key, [5, 4, 3])
  x = jax.random.normal(jax.random.PRNGKey(1), (7, 5), jnp.float64)
  y = jnp.array([0, 1, 2, 0, 1, 2, 1])
  loss_fn = lambda p, b: kfe.softmax_cross_entropy(oracles.mlp_apply(p, b["x"]), b["y"])
  state = _factors_after_one_step(loss_fn, params, {"x": x, "y": y})

  def per_example(logits, label):
    return -jax.nn.log_softmax(logits)[label]
  g_fn = oracles.mlp_output_grads(params, x, per_example)
  gs = jax.vmap(lambda xn, yn: g_fn(xn, (yn,)))(x, y)
  inputs, _ = oracles.mlp_inputs_and_preacts(params, x)
  for l in range(2):
    abar = oracles.homogeneous(inputs[l])
    a_exact = abar.T @ abar / 7
    g_exact = gs[l].T @ gs[l] / 7
    a, g = _slots(state, params, f"[{l}]['w']", abar.shape[1], gs[l].shape[1])
    np.testing.assert_allclose(a, a_exact, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(g, g_exact, rtol=1e-12, atol=1e-14)
    # I17: g from the summed loss is N x the gradient of the mean loss, and the
    # bias column of the per-example weight gradient is g itself.
    mean_g = jax.vmap(lambda xn, yn: g_fn(xn, (yn,)))(x, y)[l] / 7
    np.testing.assert_allclose(g, 49 * mean_g.T @ mean_g / 7, rtol=1e-12)
    per_ex_w = jax.vmap(jax.grad(lambda p, xn, yn: per_example(
        oracles.mlp_apply(p, xn[None])[0], yn)), (None, 0, 0))(params, x, y)
    np.testing.assert_allclose(per_ex_w[l]["b"], gs[l], rtol=1e-12)


@pytest.mark.parametrize("stride,padding,dilation", [
    (2, "SAME", 1), (1, "VALID", 1), (2, ((2, 1), (0, 1)), 1), (1, "SAME", 2)])
def test_conv_patches_and_kfc_factors(stride, padding, dilation):
  kh = kw = 3
  kernel = jax.random.normal(jax.random.PRNGKey(0), (kh, kw, 2, 3), jnp.float64)
  bias = jax.random.normal(jax.random.PRNGKey(1), (3,), jnp.float64)
  x = jax.random.normal(jax.random.PRNGKey(2), (4, 7, 6, 2), jnp.float64)
  dn = ("NHWC", "HWIO", "NHWC")
  pad = padding
  if isinstance(padding, str):
    pad = jax.lax.padtype_to_pads((7, 6), ((kh - 1) * dilation + 1,) * 2,
                                  (stride, stride), padding)
  pad = tuple(tuple(p) for p in pad)

  def conv(k, b, xs):
    return jax.lax.conv_general_dilated(xs, k, (stride, stride), pad,
                                        rhs_dilation=(dilation, dilation),
                                        dimension_numbers=dn) + b

  params = {"k": kernel, "b": bias, "w": jax.random.normal(
      jax.random.PRNGKey(3), (int(np.prod(conv(kernel, bias, x).shape[1:])), 2),
      jnp.float64)}

  def model(p, xs):
    return jnp.tanh(conv(p["k"], p["b"], xs)).reshape(xs.shape[0], -1) @ p["w"]

  loss_fn = lambda p, b: kfe.squared_error(model(p, b["x"]), b["y"])
  y = jax.random.normal(jax.random.PRNGKey(4), (4, 2), jnp.float64)
  # I9: patches @ W_mat + b == conv output, W_mat from HWIO as (C, kh, kw) x O.
  patches = oracles.patches_by_loops(x, kh, kw, stride, pad, dilation)
  w_mat = kernel.transpose(2, 0, 1, 3).reshape(-1, 3)
  np.testing.assert_allclose(patches @ w_mat + bias, conv(kernel, bias, x),
                             rtol=1e-10, atol=1e-12)
  state = _factors_after_one_step(loss_fn, params, {"x": x, "y": y})

  def per_example_from_preact(s, xn, yn):
    out = jnp.tanh(s).reshape(-1) @ params["w"]
    return 0.5 * jnp.sum((out - yn) ** 2)
  s = conv(kernel, bias, x)
  gs = jax.vmap(jax.grad(per_example_from_preact))(s, x, y)   # [N, H', W', O]
  n, t = x.shape[0], s.shape[1] * s.shape[2]
  abar = oracles.homogeneous(patches).reshape(-1, w_mat.shape[0] + 1)
  gflat = gs.reshape(-1, 3)
  omega = abar.T @ abar / n            # KFC: Ω = (1/N) Σ_n Σ_t ā āᵀ
  gamma = gflat.T @ gflat / (n * t)    # KFC: Γ = (1/(N|T|)) Σ g gᵀ
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  k_idx = [i for i, (p, _) in enumerate(leaves) if jax.tree_util.keystr(p) == "['k']"][0]
  f = state.factors[k_idx]
  a, g = f.rows[:19, :19], f.cols[:3, :3]
  np.testing.assert_allclose(a, abar.T @ abar / (n * t), rtol=1e-11, atol=1e-13)
  # I10: our (A, G) and KFC's (Ω, Γ) give the same Kronecker product.
  np.testing.assert_allclose(jnp.kron(a, g), jnp.kron(omega, gamma),
                             rtol=1e-10, atol=1e-13)
  # kfac-jax: (Ω/|T|) ⊗ Γ x |T|; alecwangcq: (Ω/|T|²) ⊗ (|T|² Γ... ) all equal.
  np.testing.assert_allclose(jnp.kron(omega / t, gamma) * t, jnp.kron(a, g),
                             rtol=1e-10, atol=1e-13)


def test_sequence_dense_treats_positions_as_examples():
  w = jax.random.normal(jax.random.PRNGKey(0), (4, 3), jnp.float64)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 5, 4), jnp.float64)
  y = jax.random.randint(jax.random.PRNGKey(2), (2, 5), 0, 3)
  loss_fn = lambda p, b: kfe.softmax_cross_entropy(b["x"] @ p["w"], b["y"])
  state = _factors_after_one_step(loss_fn, {"w": w}, {"x": x, "y": y})
  g = jax.vmap(jax.vmap(jax.grad(lambda s, t: -jax.nn.log_softmax(s)[t])))(x @ w, y)
  a_exact = x.reshape(-1, 4).T @ x.reshape(-1, 4) / 10
  g_exact = g.reshape(-1, 3).T @ g.reshape(-1, 3) / 10
  np.testing.assert_allclose(state.factors[0].rows[:4, :4], a_exact, rtol=1e-12)
  np.testing.assert_allclose(state.factors[0].cols[:3, :3], g_exact, rtol=1e-12)


def test_ema_schedule_is_running_mean_for_first_twenty_batches():
  params = oracles.mlp_init(jax.random.PRNGKey(0), [3, 2])
  loss_fn = lambda p, b: kfe.squared_error(oracles.mlp_apply(p, b["x"]), b["y"])
  tx = kfe.scale_by_kfac(loss_fn, ema_decay=0.95, fisher="empirical")
  state = tx.init(params)
  step = jax.jit(lambda st, b: tx.update(jax.grad(loss_fn)(params, b), st, params,
                                         batch=b)[1])
  batch_factors = []
  for i in range(20):
    b = {"x": jax.random.normal(jax.random.PRNGKey(10 + i), (5, 3), jnp.float64),
         "y": jax.random.normal(jax.random.PRNGKey(50 + i), (5, 2), jnp.float64)}
    one = _factors_after_one_step(loss_fn, params, b)
    batch_factors.append((one.factors[1].rows, one.factors[1].cols))
    state = step(state, b)
    mean_a = np.mean([f[0] for f in batch_factors], axis=0)
    mean_g = np.mean([f[1] for f in batch_factors], axis=0)
    # atol: the recursion and np.mean round differently (~1e-16 of entries ~1)
    np.testing.assert_allclose(state.factors[1].rows, mean_a, rtol=1e-12,
                               atol=1e-14)
    np.testing.assert_allclose(state.factors[1].cols, mean_g, rtol=1e-12,
                               atol=1e-14)
  assert int(state.statistics_count) == 20


def test_sampled_fisher_converges_to_exact_fisher():
  """I11: the mean over S sampled-target G's → E_x[Jᵀ(diag p − ppᵀ)J]."""
  params = oracles.mlp_init(jax.random.PRNGKey(0), [4, 5, 3])
  x = jax.random.normal(jax.random.PRNGKey(1), (6, 4), jnp.float64)
  y = jnp.array([0, 1, 2, 2, 1, 0])
  loss_fn = lambda p, b: kfe.softmax_cross_entropy(oracles.mlp_apply(p, b["x"]), b["y"])
  batch = {"x": x, "y": y}
  traced = tracing.trace_loss(loss_fn, params, batch)

  def g_factors(key, fisher):
    cb = statistics.statistics_pass(traced, params, batch, key, fisher)[2]
    return [g.T @ g / cb.num_examples for _, g in cb.layers]

  samples = 4000
  keys = jax.random.split(jax.random.PRNGKey(7), samples)
  sampled = jax.jit(jax.vmap(lambda k: g_factors(k, "sampled")))(keys)
  empirical = g_factors(None, "empirical")
  # exact: G_l = mean_n J_nᵀ (diag p_n − p_n p_nᵀ) J_n, J_n = d logits / d s_l
  inputs, pre = oracles.mlp_inputs_and_preacts(params, x)
  logits = oracles.mlp_apply(params, x)
  p = jax.nn.softmax(logits)
  h = jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(p)
  j0 = jax.vmap(jax.jacobian(lambda s: jnp.tanh(s) @ params[1]["w"]))(pre[0])
  exact = [jnp.mean(jnp.einsum("nsi,nst,ntj->nij", j0, h, j0), 0), jnp.mean(h, 0)]
  for l in range(2):
    mc = sampled[l].mean(0)
    err = np.linalg.norm(mc - exact[l]) / np.linalg.norm(exact[l])
    # Standard error of the MC mean, from the samples themselves.
    se = np.linalg.norm(sampled[l].std(0)) / np.sqrt(samples) / np.linalg.norm(
        exact[l])
    emp_err = np.linalg.norm(empirical[l] - exact[l]) / np.linalg.norm(exact[l])
    assert err < 5 * se + 1e-12, (l, err, se)
    assert se < 0.02, se           # the tolerance is tight ...
    assert emp_err > 10 * se, emp_err   # ... and the empirical Fisher fails it


@pytest.mark.parametrize("kind", ["sigmoid_cross_entropy", "squared_error"])
def test_sampled_targets_of_sigmoid_and_gaussian_losses(kind):
  """Output-layer G under sampled targets → mean_n H_n: diag(p(1-p)) for the
  Bernoulli loss, I for the unit Gaussian; the empirical G differs."""
  w = jax.random.normal(jax.random.PRNGKey(0), (3, 4), jnp.float64)
  x = jax.random.normal(jax.random.PRNGKey(1), (6, 3), jnp.float64)
  y = jax.random.uniform(jax.random.PRNGKey(2), (6, 4), jnp.float64)
  if kind == "sigmoid_cross_entropy":
    y = (y > 0.5).astype(jnp.float64)
  helper = getattr(kfe, kind)
  loss_fn = lambda p, b: helper(b["x"] @ p["w"], b["y"])
  batch = {"x": x, "y": y}
  traced = tracing.trace_loss(loss_fn, {"w": w}, batch)

  def g_factor(key, fisher):
    cb = statistics.statistics_pass(traced, {"w": w}, batch, key, fisher)[2]
    g = cb.layers[0][1]
    return g.T @ g / cb.num_examples

  samples = 4000
  sampled = jax.jit(jax.vmap(lambda k: g_factor(k, "sampled")))(
      jax.random.split(jax.random.PRNGKey(3), samples))
  if kind == "sigmoid_cross_entropy":
    p = jax.nn.sigmoid(x @ w)
    exact = jnp.diag(jnp.mean(p * (1 - p), axis=0))
  else:
    exact = jnp.eye(4)
  err = np.linalg.norm(sampled.mean(0) - exact) / np.linalg.norm(exact)
  se = np.linalg.norm(sampled.std(0)) / np.sqrt(samples) / np.linalg.norm(exact)
  emp_err = np.linalg.norm(g_factor(None, "empirical") - exact) / np.linalg.norm(exact)
  assert err < 5 * se and se < 0.02, (err, se)
  assert emp_err > 10 * se, emp_err
