"""``product_dtype``: the factor products' and the preconditioning GEMMs'
inputs rounded to bfloat16, accumulated in the factors' dtype. The rounding
error bound of each GEMM is asserted entry by entry; the whole update on a
flax CNN stays within a percent of the full-precision one."""

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import optax
import pytest

import kfac_jax_ext as kfe
from kfac_jax_ext import model_damping
from kfac_jax_ext.blocks import kronecker

U = 2.0 ** -8                      # bfloat16's unit roundoff
ONE_GEMM = 2 * U + U * U           # |fl(x)fl(y) − xy| ≤ (2u + u²)|x||y|
ravel = lambda tree: jax.flatten_util.ravel_pytree(tree)[0]


def _random(shape, seed):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float64)


def test_one_gemm_is_within_the_rounding_bound():
  x, y = _random((300, 70), 0), _random((70, 50), 1)
  exact, rounded = x @ y, kronecker.matmul(x, y, jnp.bfloat16)
  assert rounded.dtype == x.dtype
  scale = jnp.abs(x) @ jnp.abs(y)
  error = jnp.abs(rounded - exact)
  # float64 accumulation adds at most 70·2⁻⁵³ relative: far below the slack
  assert bool(jnp.all(error <= ONE_GEMM * scale * (1 + 1e-6)))
  assert float(jnp.max(error / scale)) > 0.1 * U      # it did round


@pytest.mark.parametrize("mode", ["factored", "tikhonov"])
def test_factors_and_preconditioning_are_within_their_bounds(mode):
  """A dense block's ``(A_b, G_b)`` within one GEMM's bound of the exact
  ones; the factored ``A⁻¹VG⁻¹`` (two chained GEMMs, the intermediate
  rounded again) within ``(2u+u²)(2+2u+u²)·(|A⁻¹||V||G⁻¹|)``; the Tikhonov
  form (four GEMMs through the eigenbases) within 1 % in norm."""
  a, g = _random((400, 30), 2), 0.1 * _random((400, 20), 3)
  exact = kronecker.batch_factors(a, g, True, 400, jnp.float64)
  low = kronecker.batch_factors(a, g, True, 400, jnp.float64, jnp.bfloat16)
  abar = jnp.concatenate([a, jnp.ones((400, 1))], axis=1)
  bounds = (jnp.abs(abar).T @ jnp.abs(abar) / 400,
            jnp.abs(g).T @ jnp.abs(g) / 400)
  for e, lo, b in zip(exact, low, bounds):
    assert bool(jnp.all(jnp.abs(lo - e) <= ONE_GEMM * b * (1 + 1e-6)))
  ia, ig, va, vg, ok = kronecker.refresh(*exact, 1e-2, mode)
  assert bool(ok)
  v = _random((31, 20), 4)
  full = kronecker.precondition(v, ia, ig, va, vg, 1e-2, mode)
  low = kronecker.precondition(v, ia, ig, va, vg, 1e-2, mode, jnp.bfloat16)
  if mode == "factored":
    scale = jnp.abs(ia) @ jnp.abs(v) @ jnp.abs(ig)
    bound = ONE_GEMM * (2 + ONE_GEMM) * scale * (1 + 1e-6)
    assert bool(jnp.all(jnp.abs(low - full) <= bound))
  rel = float(jnp.linalg.norm(low - full) / jnp.linalg.norm(full))
  assert 1e-5 < rel < 1e-2


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = nn.relu(nn.Conv(8, (3, 3), feature_group_count=2)(x))
    return nn.Dense(5)(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("alias", [kfe.kfac, kfe.tkfac])
def test_updates_on_a_flax_cnn_stay_within_two_percent(alias):
  """The alias (statistics and inverses every update, λ = 1e-2) with and
  without ``product_dtype="bfloat16"`` from the same state: the update and
  the running factors agree within 2 % in norm (the factors' rounding is
  amplified by the damped inverse, so more than one GEMM's error),
  and over five updates the loss falls as far (within 5 %)."""
  model = _Net()
  x = _random((16, 6, 6, 3), 5)
  batch = {"x": x, "y": jnp.arange(16) % 5}
  params = model.init(jax.random.PRNGKey(6), x)
  loss = lambda p, b: kfe.softmax_cross_entropy(model.apply(p, b["x"]), b["y"])
  factors = lambda st: jax.tree_util.tree_leaves(
      model_damping.find_state(st, kfe.KfacState).factors)
  runs = []
  for product_dtype in (None, "bfloat16"):
    tx = alias(loss, 0.1, damping=1e-2, fisher="empirical", inverse_every=1,
               example_batch=batch, product_dtype=product_dtype)
    state = tx.init(params)
    first, state = tx.update(jax.grad(loss)(params, batch), state, params,
                             batch=batch)
    p = optax.apply_updates(params, first)
    first_factors = factors(state)
    for _ in range(4):
      u, state = tx.update(jax.grad(loss)(p, batch), state, p, batch=batch)
      p = optax.apply_updates(p, u)
    runs.append((ravel(first), first_factors, float(loss(p, batch))))
  (full, full_factors, full_loss), (low, low_factors, low_loss) = runs
  rel = float(jnp.linalg.norm(low - full) / jnp.linalg.norm(full))
  assert 1e-4 < rel < 2e-2
  for f, lo in zip(full_factors, low_factors):
    assert float(jnp.linalg.norm(lo - f)) <= 1e-2 * float(jnp.linalg.norm(f))
  start = float(loss(params, batch))
  assert full_loss < start
  assert abs((start - low_loss) - (start - full_loss)) < 0.05 * (start - full_loss)


@pytest.mark.parametrize("bad", ["int8", "float32", 3])
def test_other_dtypes_are_refused_with_the_choices(bad):
  loss = lambda p, b: kfe.softmax_cross_entropy(p["w"] @ b, jnp.zeros(3, int))
  with pytest.raises(ValueError, match="bfloat16"):
    kfe.scale_by_kfac(loss, product_dtype=bad)
