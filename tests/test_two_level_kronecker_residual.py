"""``fisher_products="kronecker"`` on the residual spaces rebuilt on statistics
steps (``residual_refresh="statistics"``, ``coarse_model_bases``): the
multiplicative and balanced corrections with the Kronecker model's products
``B_kj = A_jl Z_k G_lj`` against closed forms in float64.

The basis is the statistics' (``res = ∇ − F_λM⁻¹∇`` with the statistics'
Fisher, as ``residual_refresh="statistics"`` builds it); ``Q`` and the
products come from the model ``F̃`` (dense oracle: ``_model_fisher``), the
model scale ``α`` from the statistics' Fisher."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_ext as kfe
from kfac_jax_ext import coarse
from kfac_jax_ext import coarse_level
from kfac_jax_ext import coarse_model
from kfac_jax_ext import coarse_model_bases
from kfac_jax_ext import train_step
from tests.test_two_level import EXACT, _brute, _direction, _flat, _mlp, _nicolaides_rows
from tests.test_two_level_kronecker_products import _expected, _fishers
from tests.test_two_level_spaces import _base_inverse, _space_rows

MODELLED = dict(fisher_products="kronecker", residual_refresh="statistics")


def _rows(space, params, grad, stats, minv):
  res = grad - stats @ minv(grad)
  return _space_rows(space, _nicolaides_rows(params), minv, res)


@pytest.mark.parametrize("space,combine", [
    ("residual", "multiplicative"), ("residual", "balanced"),
    ("krylov_residual", "multiplicative"), ("krylov_residual", "balanced")])
def test_residual_step_equals_the_closed_form_with_the_kronecker_model(space, combine):
  loss, params, batch = _mlp(squared=True)
  delta, state = _direction(loss, params, batch, combine=combine,
                            coarse_space=space, **MODELLED)
  grad, model, stats = _fishers(loss, params, batch)
  minv = _base_inverse(loss, params, batch)
  rows = _rows(space, params, grad, stats, minv)
  expected, alpha = _expected(combine, rows, model, stats, grad, minv)
  scale = float(jnp.max(jnp.abs(expected)))
  np.testing.assert_allclose(delta, expected, rtol=0, atol=1e-9 * scale)
  np.testing.assert_allclose(state.model.scale, alpha, rtol=1e-9)
  # Galerkin orthogonality for the model's F̃_λ
  np.testing.assert_allclose(rows @ (grad - model @ delta), 0.0,
                             atol=1e-9 * float(jnp.max(jnp.abs(rows @ grad))))
  # neither the fine step nor the statistics' correction: the test could fail
  with_stats, _ = _expected(combine, rows, stats, stats, grad, minv)
  assert float(jnp.max(jnp.abs(with_stats - expected))) > 1e-4 * scale
  assert float(jnp.max(jnp.abs(expected - alpha * minv(grad)))) > 1e-3 * scale


def test_coarse_batch_takes_the_model_from_the_first_examples():
  """``coarse_batch=4`` of 7 examples: the basis' residual, the model ``F̃``
  and α from the first 4 examples' statistics, the gradient and ``M⁻¹``
  from all 7."""
  loss, params, batch = _mlp(squared=True)
  delta, _ = _direction(loss, params, batch, combine="multiplicative",
                        coarse_space="residual", coarse_batch=4, **MODELLED)
  grad, _, _ = _fishers(loss, params, batch)
  first = jax.tree_util.tree_map(lambda x: x[:4], batch)
  _, model, stats = _fishers(loss, params, first)
  minv = _base_inverse(loss, params, batch)
  rows = _rows("residual", params, grad, stats, minv)
  expected, _ = _expected("multiplicative", rows, model, stats, grad, minv)
  scale = float(jnp.max(jnp.abs(expected)))
  np.testing.assert_allclose(delta, expected, rtol=0, atol=1e-9 * scale)
  _, whole, stats7 = _fishers(loss, params, batch)
  other, _ = _expected("multiplicative", _rows("residual", params, grad, stats7,
                                               minv), whole, stats7, grad, minv)
  assert float(jnp.max(jnp.abs(other - expected))) > 1e-4 * scale


def held_update(tx, loss, params, batch):
  """A statistics step on ``batch``, then (``stats_every=2``) an update
  without statistics on another gradient of the same inputs: ``(state after
  the first, the second gradient, the second update, its state)``."""
  _, state = tx.update(jax.grad(loss)(params, batch), tx.init(params), params,
                       batch=batch)
  other = dict(batch, y=batch["y"] + 1.0)    # another gradient, same inputs
  grad2, _ = _brute(loss, params, other)
  second, state2 = tx.update(jax.grad(loss)(params, other), state, params,
                             batch=other)
  return state, grad2, second, state2


def test_between_statistics_steps_the_basis_products_and_scale_are_held():
  """Statistics every second step: the second update runs no statistics
  pass and equals the closed form with the first step's basis, model and α
  on the second batch's gradient."""
  loss, params, batch = _mlp(squared=True)
  tx = kfe.scale_by_two_level_kfac(loss, combine="balanced", coarse_space="residual",
                                   **MODELLED, **dict(EXACT, stats_every=2))
  grad, model, stats = _fishers(loss, params, batch)
  minv = _base_inverse(loss, params, batch)
  rows = _rows("residual", params, grad, stats, minv)
  state, grad2, second, state2 = held_update(tx, loss, params, batch)
  expected, _ = _expected("balanced", rows, model, stats, grad2, minv,
                          alpha=state.model.scale)
  scale = float(jnp.max(jnp.abs(expected)))
  np.testing.assert_allclose(_flat(second), expected, rtol=0, atol=1e-10 * scale)
  for old, new in zip(state.bases + state.model.products,
                      state2.bases + state2.model.products):
    if old is not None:
      np.testing.assert_array_equal(old, new)
  opt = kfe.two_level_kfac(loss, 0.1, combine="multiplicative",
                           coarse_space="krylov_residual", **MODELLED)
  assert not train_step.schedule_of(opt).statistics_every_step


class _Layer(NamedTuple):
  d_a: int
  d_g: int


def test_products_on_rank_one_bases_equal_the_atoms_projections():
  """With rank-one bases ``p qᵀ`` the full products are the atoms'
  ``a_kj c_kjᵀ`` of ``coarse_model`` (tested against Tselepidis' ``F_c`` on a
  CNN), for equal and for different token counts (pooled per example)."""
  keys = jax.random.split(jax.random.PRNGKey(7), 12)   # T: equal, pooled, one
  dims, tokens = [(3, 4, 4), (5, 2, 4), (4, 3, 1), (2, 3, 9)], []
  for k, (d_a, d_g, t) in enumerate(dims):
    tokens.append((jax.random.normal(keys[2 * k], (6, t, d_a), jnp.float64),
                   jax.random.normal(keys[2 * k + 1], (6, t, d_g), jnp.float64)))
  layers = []
  for k, (d_a, d_g, _) in enumerate(dims):
    basis, rank_one = coarse.layer_basis(
        "spectral", d_a, d_g, jax.random.normal(keys[8 + k], (d_a,), jnp.float64),
        jnp.linspace(-1.0, 2.0, d_g, dtype=jnp.float64))
    layers.append(coarse_level.CoarseLayer(_Layer(d_a, d_g), jnp.array([k]),
                                           basis, rank_one))
  full = coarse_model_bases.batch_products(layers, tokens, 4, jnp.float64)
  atoms = coarse_model.batch_projections(layers, tokens)
  for j in range(4):
    for i in range(4):
      a_ij, c_ij = atoms[j][i]
      np.testing.assert_allclose(full[j][i], jnp.outer(a_ij[0], c_ij[0]),
                                 rtol=1e-12, atol=1e-14)
  assert float(jnp.max(jnp.abs(full[2][0]))) > 1e-3     # pooled: not zero


def test_non_finite_statistics_keep_basis_and_products_together():
  loss, params, batch = _mlp(squared=True)
  tx = kfe.scale_by_two_level_kfac(loss, combine="multiplicative",
                                   coarse_space="krylov_residual", **MODELLED, **EXACT)
  grads = jax.grad(loss)(params, batch)
  _, state = tx.update(grads, tx.init(params), params, batch=batch)
  bad = dict(batch, x=batch["x"].at[0, 0].set(jnp.nan))
  out, state2 = tx.update(grads, state, params, batch=bad)
  assert int(state2.health.nonfinite_statistics) >= 1
  for old, new in zip(state.bases + state.model.products,
                      state2.bases + state2.model.products):
    if old is not None:
      np.testing.assert_array_equal(old, new)
  assert all(bool(jnp.all(jnp.isfinite(x)))
             for x in jax.tree_util.tree_leaves(out))


def test_residual_spaces_need_the_statistics_refresh():
  loss, _, _ = _mlp()
  with pytest.raises(ValueError, match="residual_refresh='statistics'"):
    kfe.scale_by_two_level_kfac(loss, combine="balanced", coarse_space="residual",
                                fisher_products="kronecker")
  with pytest.raises(ValueError, match="additive one uses none"):
    kfe.scale_by_two_level_kfac(loss, coarse_space="residual", **MODELLED)


@pytest.mark.parametrize("combine", ["multiplicative", "balanced"])
def test_a_kernel_used_transposed_gives_the_transposed_step(combine):
  """A 2-D kernel used as ``x @ Wᵀ`` (``W`` ``[out, in]``: A in the slot's
  columns) gives the transposed step of the same model written ``x @ V``:
  ``B`` and the basis live in the slot's orientation, ``x`` is brought to it."""
  loss, params, batch = _mlp(n=7, sizes=(3, 5, 2), squared=True)
  flipped = [dict(p, w=p["w"].T) for p in params]

  def flipped_loss(p, b):
    return loss([dict(q, w=q["w"].T) for q in p], b)

  options = dict(combine=combine, coarse_space="krylov_residual", **MODELLED)
  delta, _ = _direction(loss, params, batch, **options)
  tx = kfe.scale_by_two_level_kfac(flipped_loss, **{**EXACT, **options})
  out, _ = tx.update(jax.grad(flipped_loss)(flipped, batch), tx.init(flipped),
                     flipped, batch=batch)
  back = _flat([dict(q, w=q["w"].T) for q in out])
  np.testing.assert_allclose(back, delta, rtol=0,
                             atol=1e-10 * float(jnp.max(jnp.abs(delta))))
