"""The block interface (``blocks/base.py``): every block kind, called through
``batch_statistics → refresh → apply``, equals its closed form in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kfac_jax_ext import patterns
from kfac_jax_ext.blocks import base
from kfac_jax_ext.blocks import table
from kfac_jax_ext.blocks import woodbury
from tests import oracles

LAM = 0.07
M = 6          # loss examples


def _normal(seed, shape):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float64)


def _through_the_interface(block, stats, v, damping=LAM):
  estimate = block.batch_statistics(stats, M, jnp.float64)
  inverse, ok = block.refresh(estimate, damping)
  assert bool(ok)
  return estimate, block.apply(inverse, v, damping)


def test_every_block_kind_implements_the_whole_interface():
  kinds = set(table.KRONECKER_BLOCKS.values()) | {woodbury.Woodbury}
  for kind in kinds:
    assert issubclass(kind, base.CurvatureBlock)
    assert not kind.__abstractmethods__, kind
  with pytest.raises(ValueError, match="scale_and_shift.*no Kronecker block"):
    table.kronecker_block(patterns.LayerMatch(kind="scale_and_shift", name="n"))


@pytest.mark.parametrize("mode", ["tikhonov", "factored"])
@pytest.mark.parametrize("groups", [1, 3])
def test_kronecker_block_is_the_damped_kronecker_inverse(mode, groups):
  d_in, d_out, k = 4, 3, 2 * M    # two tokens per example
  layer = patterns.LayerMatch(kind="dense", name="l", kernel=0, bias=1,
                              d_in=d_in, d_out=d_out, groups=groups)
  block = table.kronecker_block(layer, mode)
  lead = (groups,) if groups > 1 else ()
  a, g = _normal(0, lead + (k, d_in)), _normal(1, lead + (k, d_out))
  v = _normal(2, lead + (d_in + 1, d_out))
  (fa, fg), delta = _through_the_interface(block, (a, g), v)
  for i in range(groups):
    pick = (lambda x: x[i]) if groups > 1 else (lambda x: x)
    abar = oracles.homogeneous(pick(a))
    want_a, want_g = abar.T @ abar / k, pick(g).T @ pick(g) / M
    np.testing.assert_allclose(pick(fa), want_a, rtol=1e-12)
    np.testing.assert_allclose(pick(fg), want_g, rtol=1e-12)
    if mode == "tikhonov":
      want = oracles.kron_solve(want_a, want_g, pick(v), LAM)
    else:
      pi = np.sqrt((np.trace(want_a) / (d_in + 1)) / (np.trace(want_g) / d_out))
      want = np.linalg.solve(want_a + pi * np.sqrt(LAM) * np.eye(d_in + 1),
                             pick(v)) @ np.linalg.inv(
                                 want_g + np.sqrt(LAM) / pi * np.eye(d_out))
    np.testing.assert_allclose(pick(delta), want, rtol=1e-9, atol=1e-12)
  assert block.refresh_cost() == groups * ((d_in + 1) ** 3 + d_out ** 3)


def test_embedding_block_is_diag_counts_kron_g():
  vocab, d_out = 5, 3
  layer = patterns.LayerMatch(kind="embedding", name="e", kernel=0, d_in=vocab,
                              d_out=d_out)
  block = table.kronecker_block(layer)
  ids = jnp.array([0, 2, 2, 4, 4, 4, 1, 2, 0, 4, 9, 3])   # 9: dropped
  g = _normal(3, (ids.shape[0], d_out))
  v = _normal(4, (vocab, d_out))
  _, delta = _through_the_interface(block, (ids, g), v)
  counts = np.array([np.sum(ids == i) for i in range(vocab)], np.float64)
  want = oracles.kron_solve(np.diag(counts / ids.shape[0]), g.T @ g / M, v, LAM)
  np.testing.assert_allclose(delta, want, rtol=1e-9, atol=1e-12)
  assert block.label() == "kronecker diag(5)x3"


def test_tied_block_pools_its_uses_tokens():
  d_in, d_out = 3, 2
  use = patterns.LayerMatch(kind="dense", name="u", kernel=0, d_in=d_in,
                            d_out=d_out)
  layer = patterns.LayerMatch(kind="tied", name="t", kernel=0, d_in=d_in,
                              d_out=d_out, uses=(use, use),
                              transposed=(False, False))
  stats = ((_normal(5, (M, d_in)), _normal(6, (M, d_out))),
           (_normal(7, (2 * M, d_in)), _normal(8, (2 * M, d_out))))
  v = _normal(9, (d_in, d_out))
  _, delta = _through_the_interface(table.kronecker_block(layer), stats, v)
  a = jnp.concatenate([s[0] for s in stats])
  g = jnp.concatenate([s[1] for s in stats])
  want = oracles.kron_solve(a.T @ a / a.shape[0], g.T @ g / M, v, LAM)
  np.testing.assert_allclose(delta, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("positions,d_in,d_out", [
    (1, 3, 2),    # factored: stores Ā and G
    (2, 8, 8),    # explicit, Gram from the tokens (T²(d_a+d_g) < d_a·d_g)
    (3, 3, 2),    # explicit, Gram from the per-example gradients
])
def test_woodbury_block_is_the_exact_damped_inverse(positions, d_in, d_out):
  n, capacity = 4, 5   # the Gram batch: 4 of the 6 examples, padded to 5
  layer = patterns.LayerMatch(kind="dense", name="w", kernel=0, bias=1,
                              d_in=d_in, d_out=d_out,
                              outputs_shape=(M, positions, d_out))
  block = woodbury.Woodbury(layer, capacity=capacity, gram_size=n, examples=n,
                            positions=positions, factored=positions == 1)
  a = _normal(10, (M * positions, d_in))
  g = _normal(11, (M * positions, d_out))
  v = _normal(12, (d_in + 1, d_out))
  _, delta = _through_the_interface(block, (a, g), v)
  abar = oracles.homogeneous(a).reshape(M, positions, d_in + 1)[:n]
  u = jnp.einsum("ntd,nte->nde", abar, g.reshape(M, positions, d_out)[:n])
  u = u.reshape(n, -1)
  fisher = u.T @ u / n
  want = np.linalg.solve(fisher + LAM * np.eye(fisher.shape[0]), v.reshape(-1))
  np.testing.assert_allclose(delta.reshape(-1), want, rtol=1e-8, atol=1e-11)
  body = (d_in + 1 + d_out if positions == 1 else
          min(positions ** 2 * (d_in + 1 + d_out), (d_in + 1) * d_out))
  assert block.refresh_cost() == n * n * body + n ** 3
