"""The adaptive mode keeps the optax contract of the aliases: jit without
retracing, ``inject_hyperparams`` for its numeric options, arrays-only state
with λ and δ₀ in it (orbax resume: ``test_checkpoint_and_nnx``; static
``due``: ``test_static_schedule``; devices: ``test_multi_device``)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

import kfac_jax_ext as kfe
from tests import oracles


def _setup():
  params = oracles.mlp_init(jax.random.PRNGKey(0), [4, 6, 3])
  batch = {"x": jax.random.normal(jax.random.PRNGKey(1), (12, 4)),
           "y": jnp.arange(12) % 3}
  loss_fn = lambda p, b: kfe.softmax_cross_entropy(oracles.mlp_apply(p, b["x"]),
                                                   b["y"])
  return params, batch, loss_fn


OPTIONS = dict(momentum="adaptive", damping=0.5, damping_adaptation=True,
               damping_adaptation_interval=2, inverse_every=2)


def test_adaptive_alias_jits_once_and_trains_without_tuning():
  params, batch, loss_fn = _setup()
  tx = kfe.kfac(loss_fn, "adaptive", **OPTIONS)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state, key):
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch, key=key,
                               something_unknown=3)
    return optax.apply_updates(params, updates), state

  state, p = tx.init(params), params
  for i in range(8):
    p, state = step(p, state, jax.random.PRNGKey(i))
  assert int(state.count) == 8
  assert loss_fn(p, batch) < 0.5 * loss_fn(params, batch)
  leaves = jax.tree_util.tree_leaves(state)
  assert all(isinstance(x, jax.Array) for x in leaves)
  assert float(state.damping) != 0.5          # λ moved (4 adaptations)
  assert int(state.health.fallback_steps) == 0


def test_inject_hyperparams_binds_the_numeric_adaptive_options():
  params, batch, loss_fn = _setup()
  grads = jax.grad(loss_fn)(params, batch)
  key = jax.random.PRNGKey(0)
  opt = optax.inject_hyperparams(kfe.kfac, static_args=("loss_fn",))(
      loss_fn=loss_fn, learning_rate="adaptive", **OPTIONS)
  for name in ("damping", "damping_adaptation_decay", "min_damping",
               "max_damping", "damping_adaptation_interval"):
    assert name in opt.init(params).hyperparams
  ref = kfe.kfac(loss_fn, "adaptive", **OPTIONS)
  update = jax.jit(lambda s: opt.update(grads, s, params, batch=batch, key=key))
  u1, s1 = update(opt.init(params))
  r1, q1 = ref.update(grads, ref.init(params), params, batch=batch, key=key)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10),
                         u1, r1)
  np.testing.assert_allclose(s1.inner_state.damping, q1.damping, rtol=1e-12)
  state = opt.init(params)
  state.hyperparams["damping_adaptation_decay"] = jnp.asarray(0.5)
  _, s2 = update(state)          # a bigger move of λ, no retrace needed
  moved = np.log(float(q1.damping) / 0.5) / np.log(0.95 ** 2)   # ±1
  assert moved != 0
  np.testing.assert_allclose(float(s2.inner_state.damping),
                             0.5 * (0.5 ** 2) ** moved, rtol=1e-12)
