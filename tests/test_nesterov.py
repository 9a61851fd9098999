"""``nesterov=True``: the aliases' momentum in Nesterov's form, in closed form."""

import jax
import numpy as np
import optax
import pytest

import kfac_jax_ext as kfe
from tests.test_optax_contract import _setup


@pytest.mark.parametrize("alias", [kfe.kfac, kfe.tkfac])
def test_nesterov_step_is_delta_plus_mu_times_the_updated_velocity(alias):
  params, batch, loss_fn = _setup()
  grads = jax.grad(loss_fn)(params, batch)
  lr, mu, options = 0.1, 0.9, dict(damping=1e-2, stats_every=1, inverse_every=2)
  scale_by = kfe.scale_by_kfac if alias is kfe.kfac else kfe.scale_by_tkfac
  tx = scale_by(loss_fn, **options)
  state, deltas = tx.init(params), []
  for t in range(3):
    delta, state = tx.update(grads, state, params, batch=batch, key=jax.random.PRNGKey(t))
    deltas.append(delta)
  opt = alias(loss_fn, lr, momentum=mu, nesterov=True, **options)
  heavy = alias(loss_fn, lr, momentum=mu, **options)
  s, h = opt.init(params), heavy.init(params)
  velocity = jax.tree_util.tree_map(np.zeros_like, params)
  for t, delta in enumerate(deltas):
    u, s = opt.update(grads, s, params, batch=batch, key=jax.random.PRNGKey(t))
    uh, h = heavy.update(grads, h, params, batch=batch, key=jax.random.PRNGKey(t))
    velocity = jax.tree_util.tree_map(lambda d, v: d + mu * v, delta, velocity)
    expected = jax.tree_util.tree_map(lambda d, v: -lr * (d + mu * v), delta, velocity)
    heavy_expected = jax.tree_util.tree_map(lambda v: -lr * v, velocity)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14),
                           u, expected)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14),
                           uh, heavy_expected)
    # the two forms differ on every step (at t = 1: (1 + μ)Δ_1 against Δ_1)
    gap = max(float(np.max(np.abs(a - b))) for a, b in zip(
        jax.tree_util.tree_leaves(u), jax.tree_util.tree_leaves(uh)))
    assert gap > 1e-3


def test_nesterov_runs_in_the_fused_step_and_under_inject_hyperparams():
  params, batch, loss_fn = _setup()
  opt = kfe.kfac(loss_fn, 0.1, damping=1e-2, nesterov=True)
  step = kfe.make_train_step(loss_fn, opt, donate=False)
  state, p = opt.init(params), params
  for i in range(4):
    p, state, _ = step(p, state, batch, jax.random.PRNGKey(0), i)
  assert float(loss_fn(p, batch)) < float(loss_fn(params, batch))
  injected = optax.inject_hyperparams(kfe.kfac, static_args=("loss_fn",))(
      loss_fn=loss_fn, learning_rate=0.1, damping=1e-2, nesterov=True)
  grads = jax.grad(loss_fn)(params, batch)
  u, _ = jax.jit(lambda s: injected.update(grads, s, params, batch=batch,
                                           key=jax.random.PRNGKey(0)))(injected.init(params))
  r, _ = opt.update(grads, opt.init(params), params, batch=batch, key=jax.random.PRNGKey(0))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), u, r)


@pytest.mark.parametrize("kwargs, message", [
    (dict(learning_rate="adaptive", nesterov=True), "drop nesterov"),
    (dict(learning_rate=0.1, momentum=0.0, nesterov=True), "needs a momentum"),
    (dict(learning_rate=0.1, momentum=None, nesterov=True), "needs a momentum"),
    (dict(learning_rate=0.1, nesterov="yes"), "True or False"),
])
def test_nesterov_bad_combinations_name_the_fix(kwargs, message):
  params, batch, loss_fn = _setup()
  with pytest.raises(ValueError, match=message):
    kfe.kfac(loss_fn, damping=1e-2, **kwargs)
