"""TENGraD against its closed form: ``Δ = solve(λI + UUᵀ/N, ∇)`` per layer, with
``U`` from ``vmap(grad)`` (I2, I4, I5, I14), the scale convention, reuse,
subsampling and failure handling."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_ext as kfe
from kfac_jax_ext import linalg
from kfac_jax_ext.blocks import woodbury
from tests import oracles

LAM = 0.05


class SmallCNN(nn.Module):
  """conv stride 2 SAME → conv VALID dilation 2 → dense (covers the conv cases)."""
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(4, (3, 3), strides=2, padding="SAME", name="c1")(x))
    x = jnp.tanh(nn.Conv(5, (2, 2), padding="VALID", kernel_dilation=2,
                         name="c2")(x))
    return nn.Dense(3, name="out")(x.reshape(x.shape[0], -1))


def _mlp_task(n=9):
  params = oracles.mlp_init(jax.random.PRNGKey(3), [5, 4, 3])
  batch = {"x": jax.random.normal(jax.random.PRNGKey(0), (n, 5), jnp.float64),
           "y": jax.random.randint(jax.random.PRNGKey(1), (n,), 0, 3)}
  loss = lambda p, b: kfe.softmax_cross_entropy(oracles.mlp_apply(p, b["x"]),
                                                b["y"])
  return loss, params, batch


def _cnn_task(n=6):
  model = SmallCNN()
  x = jax.random.normal(jax.random.PRNGKey(0), (n, 9, 9, 2), jnp.float64)
  params = model.init(jax.random.PRNGKey(1), x)
  params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64), params)
  batch = {"x": x, "y": jax.random.randint(jax.random.PRNGKey(2), (n,), 0, 3)}
  loss = lambda p, b: kfe.softmax_cross_entropy(model.apply(p, b["x"]), b["y"])
  return loss, params, batch


def _layer_groups(params):
  """(kernel path, bias path) of every layer, as leaf indices."""
  paths = [jax.tree_util.keystr(k) for k, _ in
           jax.tree_util.tree_flatten_with_path(params)[0]]
  groups = {}
  for i, p in enumerate(paths):
    owner = p.rsplit("[", 1)[0]
    groups.setdefault(owner, []).append(i)
  return list(groups.values())


def _oracle(loss, params, batch, lam=LAM, examples=None, grads=None):
  """Per layer ``solve(λI + UUᵀ/n, ∇)`` with ``U`` the per-example gradients of
  the first ``examples`` examples of ``batch`` and ∇ ``grads`` (default: the
  mean-loss gradient of the batch)."""
  grads = jax.grad(loss)(params, batch) if grads is None else grads
  n = examples or len(batch["y"])
  sub = jax.tree_util.tree_map(lambda x: x[:n], batch)
  one = lambda p, b: loss(p, jax.tree_util.tree_map(lambda x: x[None], b))
  per_example = jax.vmap(jax.grad(one), (None, 0))(params, sub)
  g_leaves = jax.tree_util.tree_leaves(grads)
  u_leaves = jax.tree_util.tree_leaves(per_example)
  out = [None] * len(g_leaves)
  for group in _layer_groups(params):
    v = jnp.concatenate([g_leaves[i].reshape(-1) for i in group])
    u = jnp.concatenate([u_leaves[i].reshape(n, -1) for i in group], axis=1).T
    delta = jnp.linalg.solve(u @ u.T / n + lam * jnp.eye(u.shape[0]), v)
    start = 0
    for i in group:
      size = g_leaves[i].size
      out[i] = delta[start:start + size].reshape(g_leaves[i].shape)
      start += size
  return grads, out


def _tengrad(loss, params, batch, grads=None, **options):
  options = {"damping": LAM, "fisher": "empirical", "gram_batch": 16, **options}
  tx = kfe.scale_by_tengrad(loss, **options)
  grads = jax.grad(loss)(params, batch) if grads is None else grads
  updates, state = jax.jit(lambda g: tx.update(g, tx.init(params), params,
                                               batch=batch))(grads)
  return jax.tree_util.tree_leaves(updates), state


def _assert_close(actual, expected, rtol=1e-9):
  for a, e in zip(actual, expected):
    scale = np.max(np.abs(e))
    np.testing.assert_allclose(a, e, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("leaf", [128, 2], ids=["lu", "block_inverse"])
def test_dense_update_equals_woodbury_solve(leaf, monkeypatch):
  """Also with the Gram's damped inverse by block elimination down to 2
  rows (``linalg.spd_inverse``)."""
  monkeypatch.setattr(linalg, "INVERSE_LEAF", leaf)
  loss, params, batch = _mlp_task()
  _, expected = _oracle(loss, params, batch)
  updates, state = _tengrad(loss, params, batch)
  _assert_close(updates, expected)
  assert int(state.health.failed_inverses) == 0


@pytest.mark.parametrize("factored", [True, False], ids=["factored", "explicit"])
def test_conv_update_equals_woodbury_solve_on_both_gram_paths(monkeypatch,
                                                               factored):
  calls = []

  def rule(t, d_a, d_g):
    calls.append(t)
    return factored

  monkeypatch.setattr(woodbury, "factored_conv_gram_is_cheaper", rule)
  loss, params, batch = _cnn_task()
  _, expected = _oracle(loss, params, batch)
  updates, _ = _tengrad(loss, params, batch)
  assert sorted(set(calls)) == [9, 25]        # 5x5 and 3x3 output locations
  _assert_close(updates, expected)


def test_conv_layers_store_per_example_gradients_dense_layers_factors():
  loss, params, batch = _cnn_task()
  state = kfe.scale_by_tengrad(loss, gram_batch=8).init(params)
  blocks = [b for b in state.blocks if b is not None]
  explicit = sorted(b.per_example.shape for b in blocks
                    if b.per_example is not None)
  factored = [(b.rows.shape, b.cols.shape) for b in blocks if b.rows is not None]
  assert explicit == [(8, 4 * 4 + 1, 5), (8, 9 * 2 + 1, 4)]
  assert factored == [((8, 3 * 3 * 5 + 1), (8, 3 + 1))]   # dense 45 -> 3


def _random_tokens(n, t, d_a, d_g, seed=0):
  ka, kg = jax.random.split(jax.random.PRNGKey(seed))
  return (jax.random.normal(ka, (n, t, d_a), jnp.float64),
          jax.random.normal(kg, (n, t, d_g), jnp.float64))


def test_gram_identities():
  a, g = _random_tokens(5, 6, 4, 3)
  u = jnp.einsum("ntd,nte->nde", a, g)            # per-example gradients
  brute = u.reshape(5, -1) @ u.reshape(5, -1).T
  np.testing.assert_allclose(woodbury.conv_gram(a, g, "exact"), brute, rtol=1e-12)
  np.testing.assert_allclose(woodbury.explicit_gram(
      woodbury.per_example_gradients(a, g)), brute, rtol=1e-12)
  a1, g1 = a[:, 0], g[:, 0]                      # dense: one location
  u1 = jnp.einsum("nd,ne->nde", a1, g1).reshape(5, -1)
  np.testing.assert_allclose(woodbury.dense_gram(a1, g1), u1 @ u1.T, rtol=1e-12)
  v = jax.random.normal(jax.random.PRNGKey(9), (4, 3), jnp.float64)
  w = jax.random.normal(jax.random.PRNGKey(8), (5,), jnp.float64)
  np.testing.assert_allclose(jnp.sum((a1 @ v) * g1, axis=1), u1 @ v.reshape(-1),
                             rtol=1e-12)         # Uᵀvec(V) = [g_nᵀVᵀā_n]
  np.testing.assert_allclose(a1.T @ (w[:, None] * g1), (w @ u1).reshape(4, 3),
                             rtol=1e-12)         # U w = Āᵀdiag(w)G


@pytest.mark.parametrize("kind", ["spatial_sum", "same_location"])
def test_approximate_conv_grams_are_wrong_with_several_locations(kind):
  a, g = _random_tokens(6, 9, 5, 4, seed=1)
  exact = woodbury.conv_gram(a, g, "exact")
  approx = woodbury.conv_gram(a, g, kind)
  assert np.linalg.norm(approx - exact) / np.linalg.norm(exact) > 0.2
  a1, g1 = a[:, :1], g[:, :1]                    # |T| = 1: they coincide
  np.testing.assert_allclose(woodbury.conv_gram(a1, g1, kind),
                             woodbury.conv_gram(a1, g1, "exact"), rtol=1e-12)


def test_single_example_is_sherman_morrison():
  loss, params, batch = _mlp_task(n=1)
  grads = jax.grad(loss)(params, batch)
  updates, _ = _tengrad(loss, params, batch, grads)
  one = jax.grad(loss)(params, batch)            # N = 1: u = ∇ of the one loss
  for group in _layer_groups(params):
    leaves = jax.tree_util.tree_leaves(grads)
    v = jnp.concatenate([leaves[i].reshape(-1) for i in group])
    u = jnp.concatenate([jax.tree_util.tree_leaves(one)[i].reshape(-1)
                         for i in group])
    sm = (v - u * (u @ v) / (LAM + u @ u)) / LAM
    got = jnp.concatenate([updates[i].reshape(-1) for i in group])
    np.testing.assert_allclose(got, sm, rtol=1e-10)


def test_limits_large_damping_and_zero_statistics():
  loss, params, batch = _mlp_task()
  grads = jax.grad(loss)(params, batch)
  g_leaves = jax.tree_util.tree_leaves(grads)
  for lam in (1e4, 1e8):
    updates, _ = _tengrad(loss, params, batch, grads, damping=lam)
    err = max(np.max(np.abs(lam * u - g)) / np.max(np.abs(g))
              for u, g in zip(updates, g_leaves))
    assert err < 10.0 / lam                      # λΔ → ∇, error O(1/λ)
  v = jax.random.normal(jax.random.PRNGKey(0), (4, 3), jnp.float64)
  zeros_a, zeros_g = jnp.zeros((6, 4)), jnp.zeros((6, 3))
  inv, _ = woodbury.invert_gram(woodbury.dense_gram(zeros_a, zeros_g), 6.0, LAM)
  np.testing.assert_allclose(woodbury.apply_factored(v, zeros_a, zeros_g, inv,
                                                     6.0, LAM), v / LAM)


def test_duplicated_batch_gives_the_same_update():
  loss, params, batch = _mlp_task()
  doubled = jax.tree_util.tree_map(lambda x: jnp.concatenate([x, x]), batch)
  once, _ = _tengrad(loss, params, batch, gram_batch=32)
  twice, _ = _tengrad(loss, params, doubled, gram_batch=32)
  _assert_close(twice, once, rtol=1e-10)


def test_gram_batch_subsamples_the_first_examples_and_pads_small_batches():
  loss, params, batch = _cnn_task(n=6)
  _, expected = _oracle(loss, params, batch, examples=4)
  updates, _ = _tengrad(loss, params, batch, gram_batch=4)
  _assert_close(updates, expected)
  _, full = _oracle(loss, params, batch)
  padded, _ = _tengrad(loss, params, batch, gram_batch=11)
  _assert_close(padded, full)


def test_stored_block_is_reused_for_fresh_gradients():
  loss, params, batch = _mlp_task()
  other = {"x": batch["x"] * 0.5 + 0.3, "y": (batch["y"] + 1) % 3}
  tx = kfe.scale_by_tengrad(loss, damping=LAM, fisher="empirical", gram_batch=16,
                            inverse_every=2)
  state = tx.init(params)
  step = jax.jit(lambda g, s, b: tx.update(g, s, params, batch=b))
  _, state = step(jax.grad(loss)(params, batch), state, batch)
  assert not bool(state.curvature_due)
  fresh = jax.grad(loss)(params, other)
  updates, state = step(fresh, state, other)     # applies the stored block
  _, expected = _oracle(loss, params, batch, grads=fresh)
  _assert_close(jax.tree_util.tree_leaves(updates), expected)
  assert bool(state.curvature_due)               # step 2 refreshes


def test_concatenated_gate_kernels_get_exact_woodbury_blocks():
  """``nn.OptimizedLSTMCell`` concatenates its gate kernels before one
  matmul: each kernel's TENGraD update is ``(UUᵀ/n + λI)⁻¹∇`` of its own
  per-example gradients (empirical Fisher), to float64 precision."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      cell = nn.OptimizedLSTMCell(5, param_dtype=jnp.float64)
      carry = cell.initialize_carry(jax.random.PRNGKey(0), x.shape)
      return nn.Dense(2, param_dtype=jnp.float64)(cell(carry, x)[1])

  n = 6
  batch = {"x": jax.random.normal(jax.random.PRNGKey(9), (n, 3)),
           "y": jnp.arange(n) % 2}
  params = Net().init(jax.random.PRNGKey(0), batch["x"])
  loss = lambda p, b: kfe.softmax_cross_entropy(Net().apply(p, b["x"]), b["y"])
  tx = kfe.scale_by_tengrad(loss, damping=LAM, gram_batch=n, fisher="empirical",
                            example_batch=batch)
  grads = jax.grad(loss)(params, batch)
  updates, _ = tx.update(grads, tx.init(params), params, batch=batch)
  cell = lambda tree, gate: tree["params"]["OptimizedLSTMCell_0"][gate]["kernel"]
  for gate in ("ii", "ig", "io"):   # h* and if: zero gradients (zero carry)
    per_example = jax.vmap(lambda x, y, gate=gate: cell(jax.grad(loss)(
        params, {"x": x[None], "y": y[None]}), gate).ravel())(batch["x"], batch["y"])
    fisher = per_example.T @ per_example / n
    exact = jnp.linalg.solve(fisher + LAM * jnp.eye(fisher.shape[0]),
                             cell(grads, gate).ravel())
    np.testing.assert_allclose(cell(updates, gate).ravel(), exact, rtol=1e-9,
                               atol=1e-12)
