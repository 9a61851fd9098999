"""Symmetric Gram products from the upper block triangle (``gram.py``): the
same factors and the same K-FAC / TKFAC updates as one GEMM, in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_ext as kfe
from kfac_jax_ext import gram
from kfac_jax_ext.blocks import kronecker
from tests import oracles


@pytest.mark.parametrize("n", [1, 7, 13])
@pytest.mark.parametrize("blocks", [1, 2, 3, 5])
def test_symmetric_gram_equals_the_full_product(n, blocks):
  x = jax.random.normal(jax.random.PRNGKey(n), (11, n), jnp.float64)
  w = jax.random.uniform(jax.random.PRNGKey(n + 1), (11,), jnp.float64)
  for y in (x, x * w[:, None]):
    got = gram.symmetric_gram(x, y, blocks=blocks)
    np.testing.assert_allclose(got, x.T @ y, rtol=1e-13, atol=1e-13)


def test_num_blocks_splits_only_large_factors_and_only_on_cpu():
  cpu = [gram.num_blocks(n, 330, "cpu") for n in (1001, 785, 500, 251, 30)]
  assert cpu == [3, 2, 2, 1, 1]
  assert gram.num_blocks(1001, 330, "gpu") == gram.num_blocks(1001, 330, "tpu") == 1
  assert gram.num_blocks(1001, 0, "cpu") == 1
  assert gram.num_blocks(100_000, 330, "cpu") == gram.MAX_BLOCKS


def test_split_factor_products_equal_the_batch_factors_of_one_gemm(monkeypatch):
  a = jax.random.normal(jax.random.PRNGKey(0), (20, 9), jnp.float64)
  g = jax.random.normal(jax.random.PRNGKey(1), (20, 7), jnp.float64)
  monkeypatch.setattr(gram, "BLOCK", 0)
  whole = kronecker.batch_factors(a, g, True, 20, jnp.float64)
  monkeypatch.setattr(gram, "BLOCK", 2)     # 9 → 4 blocks (+ bias row), 7 → 4
  split = kronecker.batch_factors(a, g, True, 20, jnp.float64)
  abar = np.concatenate([np.asarray(a), np.ones((20, 1))], axis=1)
  np.testing.assert_allclose(split[0], abar.T @ abar / 20, rtol=1e-13, atol=1e-14)
  np.testing.assert_allclose(split[1], np.asarray(g).T @ np.asarray(g) / 20,
                             rtol=1e-13, atol=1e-14)
  for s, w in zip(split, whole):
    np.testing.assert_allclose(s, w, rtol=1e-13, atol=1e-14)


def _loss(p, b):
  return kfe.softmax_cross_entropy(oracles.mlp_apply(p, b["x"]), b["y"])


def _update(alias, params, batch, **options):
  tx = alias(_loss, damping=0.05, ema_decay=0.0, fisher="empirical", **options)
  grads = jax.grad(_loss)(params, batch)
  return jax.jit(lambda g: tx.update(g, tx.init(params), params, batch=batch))(
      grads)[0]


@pytest.mark.parametrize("alias,options", [
    (kfe.scale_by_kfac, {"damping_mode": "factored"}), (kfe.scale_by_tkfac, {})],
    ids=["kfac", "tkfac"])
def test_updates_with_split_factor_products_are_unchanged(alias, options, monkeypatch):
  """Factors of 6, 5, 4 and 3 rows split into 2-3 blocks (``BLOCK = 2``):
  the K-FAC update still equals the π-damped closed form, and both K-FAC's
  and TKFAC's (weighted factors) equal the unsplit ones."""
  params = oracles.mlp_init(jax.random.PRNGKey(3), [5, 4, 3])
  x = jax.random.normal(jax.random.PRNGKey(0), (9, 5), jnp.float64)
  batch = {"x": x, "y": jax.random.randint(jax.random.PRNGKey(1), (9,), 0, 3)}
  monkeypatch.setattr(gram, "BLOCK", 0)
  whole = _update(alias, params, batch, **options)
  monkeypatch.setattr(gram, "BLOCK", 2)
  splits = []
  count = gram.num_blocks
  monkeypatch.setattr(gram, "num_blocks", lambda n: splits.append(count(n)) or splits[-1])
  split = _update(alias, params, batch, **options)
  assert max(splits) >= 2     # the split path was traced
  for s, w in zip(jax.tree_util.tree_leaves(split), jax.tree_util.tree_leaves(whole)):
    np.testing.assert_allclose(s, w, rtol=1e-10, atol=1e-13)
  if alias is not kfe.scale_by_kfac:
    return
  grads = jax.grad(_loss)(params, batch)
  root = np.sqrt(0.05)
  for l, (a, g) in enumerate(oracles.mlp_empirical_factors(params, batch)):
    pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
    damped = np.kron(a + pi * root * np.eye(a.shape[0]), g + root / pi * np.eye(g.shape[0]))
    matrix = lambda layer: np.concatenate([layer["w"], layer["b"][None]], axis=0)
    expected = np.linalg.solve(damped, matrix(grads[l]).ravel())
    np.testing.assert_allclose(matrix(split[l]).ravel(), expected, rtol=1e-9, atol=1e-12)
