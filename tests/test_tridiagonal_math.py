"""The block-tridiagonal inverse's algebra (``blocks/tridiagonal.py``) on
dense matrices, in float64: the sum of two Kronecker products inverted by
the generalized eigenbasis, and the chain inverse ``Ξᵀ Λ Ξ`` whose inverse
agrees with the given blocks on the tridiagonal."""

import jax
import jax.numpy as jnp
import numpy as np

from kfac_jax_ext.blocks import tridiagonal

DIMS = [(3, 4), (5, 2), (4, 3)]     # (d_i, o_i) of a 3-layer chain


def _spd(key, n, shift=0.5):
  x = jax.random.normal(key, (n, 2 * n))
  return x @ x.T / (2 * n) + shift * jnp.eye(n)


def _joint_factors(key, dims, cross_scale=0.3):
  """Diagonal and cross factors taken from one joint SPD matrix per side,
  so that the exact tridiagonal model exists (Σ_i positive definite)."""
  ka, kg = jax.random.split(key)
  da = [d for d, _ in dims]
  dg = [o for _, o in dims]
  joint_a, joint_g = _spd(ka, sum(da), 1.0), _spd(kg, sum(dg), 1.0)
  block = lambda m, sizes, i, j: m[sum(sizes[:i]):sum(sizes[:i + 1]),
                                   sum(sizes[:j]):sum(sizes[:j + 1])]
  diag = [(block(joint_a, da, i, i), block(joint_g, dg, i, i))
          for i in range(len(dims))]
  cross = [(cross_scale * block(joint_a, da, i, i + 1),
            cross_scale * block(joint_g, dg, i, i + 1))
           for i in range(len(dims) - 1)]
  return diag, cross


def _links(diag, cross):
  links = []
  for i, (a_c, g_c) in enumerate(cross):
    link, ok = tridiagonal.link_inverse(diag[i][0], diag[i][1], diag[i + 1][0],
                                        diag[i + 1][1], a_c, g_c)
    assert bool(ok)
    links.append(link)
  last = (jnp.linalg.inv(diag[-1][0]), jnp.linalg.inv(diag[-1][1]))
  return links, last


def _dense_inverse(links, last, dims):
  """``F̂⁻¹`` as a dense matrix, column by column (row-major vec)."""
  sizes = [d * o for d, o in dims]
  total = sum(sizes)
  cols = []
  for k in range(total):
    e = np.zeros(total)
    e[k] = 1.0
    vs, start = [], 0
    for (d, o), n in zip(dims, sizes):
      vs.append(jnp.asarray(e[start:start + n].reshape(d, o)))
      start += n
    out = tridiagonal.apply_chain_inverse(links, last, vs)
    cols.append(np.concatenate([np.asarray(x).ravel() for x in out]))
  return np.stack(cols, axis=1), np.cumsum([0] + sizes)


def test_sum_of_two_kronecker_products_inverse_equals_dense_solve():
  keys = jax.random.split(jax.random.PRNGKey(0), 5)
  a1, g1 = _spd(keys[0], 4, 1.0), _spd(keys[1], 3, 1.0)
  a2, g2 = 0.3 * _spd(keys[2], 4, 0.1), 0.3 * _spd(keys[3], 3, 0.1)
  basis_a, s_a = tridiagonal.generalized_basis(a1, a2)
  basis_g, s_g = tridiagonal.generalized_basis(g1, g2)
  np.testing.assert_allclose(basis_a.T @ a1 @ basis_a, np.eye(4), atol=1e-12)
  np.testing.assert_allclose(basis_a.T @ a2 @ basis_a, np.diag(s_a), atol=1e-12)
  link = tridiagonal.LinkInverse(None, None, basis_a, basis_g,
                                 1.0 / (1.0 - s_a[:, None] * s_g[None, :]))
  x = jax.random.normal(keys[4], (4, 3))
  sigma = np.kron(a1, g1) - np.kron(a2, g2)
  want = np.linalg.solve(sigma, np.asarray(x).ravel())
  got = tridiagonal.apply_sigma_inverse(link, x)
  np.testing.assert_allclose(np.asarray(got).ravel(), want, rtol=1e-10)


def test_chain_inverse_is_block_tridiagonal_and_matches_the_blocks():
  diag, cross = _joint_factors(jax.random.PRNGKey(1), DIMS)
  links, last = _links(diag, cross)
  inverse, edges = _dense_inverse(links, last, DIMS)
  np.testing.assert_allclose(inverse, inverse.T, atol=1e-12)
  block = lambda m, i, j: m[edges[i]:edges[i + 1], edges[j]:edges[j + 1]]
  # the inverse is block-tridiagonal: blocks (0, 2) and (2, 0) vanish
  assert np.abs(block(inverse, 0, 2)).max() < 1e-12
  approx = np.linalg.inv(inverse)
  for i, (a, g) in enumerate(diag):
    np.testing.assert_allclose(block(approx, i, i), np.kron(a, g), rtol=1e-9,
                               atol=1e-12)
  for i, (a_c, g_c) in enumerate(cross):
    np.testing.assert_allclose(block(approx, i, i + 1), np.kron(a_c, g_c),
                               rtol=1e-9, atol=1e-12)
  # ... and it is not block-diagonal K-FAC: the cross terms matter
  assert np.abs(block(approx, 0, 1)).max() > 1e-2


def test_zero_cross_factors_give_block_diagonal_kfac():
  diag, cross = _joint_factors(jax.random.PRNGKey(2), DIMS, cross_scale=0.0)
  links, last = _links(diag, cross)
  inverse, edges = _dense_inverse(links, last, DIMS)
  blockdiag = np.zeros_like(inverse)
  for i, (a, g) in enumerate(diag):
    blockdiag[edges[i]:edges[i + 1], edges[i]:edges[i + 1]] = np.linalg.inv(
        np.kron(a, g))
  np.testing.assert_allclose(inverse, blockdiag, rtol=1e-10, atol=1e-12)


def test_an_indefinite_conditional_covariance_is_reported():
  diag, cross = _joint_factors(jax.random.PRNGKey(3), DIMS[:2], cross_scale=8.0)
  _, ok = tridiagonal.link_inverse(diag[0][0], diag[0][1], diag[1][0],
                                   diag[1][1], *cross[0])
  assert not bool(ok)


def test_block_diagonal_link_is_the_kronecker_inverse():
  keys = jax.random.split(jax.random.PRNGKey(4), 3)
  a, g = _spd(keys[0], 4, 1.0), _spd(keys[1], 3, 1.0)
  link = tridiagonal.block_diagonal_link(a, g, 5, 2)
  x = jax.random.normal(keys[2], (4, 3))
  want = np.linalg.solve(np.kron(a, g), np.asarray(x).ravel())
  np.testing.assert_allclose(np.asarray(tridiagonal.apply_sigma_inverse(link, x)
                                        ).ravel(), want, rtol=1e-10)
  assert link.psi_a.shape == (4, 5) and not np.any(link.psi_a)
