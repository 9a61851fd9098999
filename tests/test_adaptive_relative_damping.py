"""``quadratic_model_step(damping_units=kfe.damping_units_of(pre))``: the
model's damping term is ``½λ Σ_l u_l‖δ_l‖²`` with the relative
preconditioner's units ``u_l = m_A m_G`` (``kfac_jax_ext.model_damping``),
checked in float64 against the dense Fisher and the exact factors."""

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_ext as kfe
from tests import oracles

ravel = lambda tree: jax.flatten_util.ravel_pytree(tree)[0]
LAM = 0.3
OPTIONS = dict(damping_scale="relative", damping_mode="tikhonov",
               fisher="empirical", ema_decay=0.0)


def _task(weight=1.0):
  params = oracles.mlp_init(jax.random.PRNGKey(0), [4, 6, 3])
  batch = {"x": jax.random.normal(jax.random.PRNGKey(1), (10, 4)),
           "y": jax.random.randint(jax.random.PRNGKey(2), (10,), 0, 3)}
  predict = lambda p, b: oracles.mlp_apply(p, b["x"])
  loss = lambda p, b: kfe.softmax_cross_entropy(
      predict(p, b), b["y"], weights=jnp.full(b["y"].shape, weight))

  def loss_of_predictions(z):
    return -weight * jnp.mean(jnp.take_along_axis(
        jax.nn.log_softmax(z), batch["y"][:, None], axis=1))
  fisher = lambda p: oracles.exact_fisher(lambda q: predict(q, batch), p,
                                          loss_of_predictions)
  return params, batch, loss, fisher


def _units(params, batch):
  """Per parameter, its layer's ``m_A m_G`` from the exact factors."""
  factors = oracles.mlp_empirical_factors(params, batch)
  mean = lambda x: np.trace(x) / x.shape[0]
  units = [mean(a) * mean(g) for a, g in factors]
  return ravel([jax.tree_util.tree_map(lambda x, u=u: jnp.full_like(x, u), layer)
                for layer, u in zip(params, units)])


def _solve(f, grad, d, previous, first):
  if first:
    return np.array([-(grad @ d) / (d @ f @ d), 0.0])
  vs = np.stack([d, previous])
  return -np.linalg.solve(vs @ f @ vs.T, vs @ grad)


def _adaptive(pre, loss, units=True, **options):
  return kfe.quadratic_model_step(
      pre, loss, damping=LAM,
      damping_units=kfe.damping_units_of(pre) if units else None, **options)


def test_model_damping_is_lambda_times_each_blocks_mean_eigenvalue():
  """Three updates of α and μ: ``Q = VᵀF̃V``, ``F̃ = F + λ·diag(u)`` with F
  the dense Fisher and ``u`` each parameter's block's ``m_A m_G``; not
  ``F + λI`` (the default term, asserted to differ)."""
  params, batch, loss, fisher = _task()
  tx = _adaptive(kfe.scale_by_kfac(loss, damping=LAM, **OPTIONS), loss)
  ref = kfe.scale_by_kfac(loss, damping=LAM, **OPTIONS)
  state, ref_state = tx.init(params), ref.init(params)
  previous = np.zeros_like(ravel(params))
  for i in range(3):
    grads = jax.grad(loss)(params, batch)
    update, state = tx.update(grads, state, params, batch=batch)
    direction, ref_state = ref.update(grads, ref_state, params, batch=batch)
    d, g = -ravel(direction), ravel(grads)
    units = _units(params, batch)
    assert units.min() > 0
    c = _solve(fisher(params) + LAM * np.diag(units), g, d, previous, i == 0)
    absolute = _solve(fisher(params) + LAM * np.eye(d.size), g, d, previous,
                      i == 0)
    assert abs(absolute[0] - c[0]) > 0.05 * abs(c[0])
    np.testing.assert_allclose([state.learning_rate, state.momentum], c,
                               rtol=1e-8, atol=1e-12)
    want = c[0] * d + c[1] * previous
    np.testing.assert_allclose(ravel(update), want, rtol=1e-8,
                               atol=1e-10 * np.abs(want).max())
    previous = np.asarray(want)
    params = optax.apply_updates(params, update)


@pytest.mark.parametrize("scale_by", [kfe.scale_by_kfac, kfe.scale_by_tkfac])
@pytest.mark.parametrize("learning_rate", ["adaptive", 0.05])
def test_a_scaled_loss_takes_the_same_adaptive_steps(scale_by, learning_rate):
  """Loss × 64 scales the gradient, the Fisher and every ``u_l`` by 64: with
  the units α, μ, ρ and λ's path are unchanged; with ``D = I`` (the
  default) they are not. A numeric learning rate: the chain is
  ``pre → scale(−lr)`` and only λ adapts."""
  for units, invariant in ((True, True), (False, False)):
    runs = []
    for weight in (1.0, 64.0):
      params, batch, loss, _ = _task(weight)
      pre = scale_by(loss, damping=LAM, **OPTIONS)
      if learning_rate == "adaptive":
        tx = _adaptive(pre, loss, units, momentum="adaptive",
                       damping_adaptation=True, damping_adaptation_interval=1)
      else:
        tx = kfe.quadratic_model_step(
            optax.chain(pre, optax.scale(-learning_rate)), loss,
            learning_rate=learning_rate, momentum=None, damping=LAM,
            damping_adaptation=True,
            damping_adaptation_interval=1,
            damping_units=kfe.damping_units_of(pre) if units else None)
      state, path = tx.init(params), []
      for _ in range(5):
        update, state = tx.update(jax.grad(loss)(params, batch), state, params,
                                  batch=batch)
        path.append(np.concatenate([ravel(update), [state.damping, state.rho]]))
        params = optax.apply_updates(params, update)
      runs.append(np.stack(path))
      assert np.isfinite(runs[-1]).all() or not invariant   # every ρ measured
    same = np.allclose(runs[0], runs[1], rtol=1e-7, atol=1e-12)
    assert same == invariant, units


def test_units_are_opt_in_and_found_in_a_chain():
  """The alias keeps ``D = I``; ``damping_units`` finds the preconditioner's
  state inside a chain."""
  params, batch, loss, _ = _task()
  grads = jax.grad(loss)(params, batch)

  def first_step(tx):
    return ravel(tx.update(grads, tx.init(params), params, batch=batch)[0])

  pre = kfe.scale_by_kfac(loss, damping=LAM, **OPTIONS)
  assert kfe.damping_units_of(pre) is not None
  assert kfe.damping_units_of(kfe.scale_by_kfac(loss, damping=LAM)) is None
  alias = first_step(kfe.kfac(loss, "adaptive", momentum=None, damping=LAM,
                              **OPTIONS))
  np.testing.assert_allclose(
      first_step(_adaptive(pre, loss, units=False, momentum=None)), alias,
      rtol=1e-10)
  consistent = first_step(_adaptive(pre, loss, momentum=None))
  assert not np.allclose(consistent, alias, rtol=1e-3)
  chained = kfe.quadratic_model_step(
      optax.chain(pre, optax.identity()), loss, momentum=None, damping=LAM,
      damping_units=kfe.damping_units_of(pre))
  np.testing.assert_allclose(first_step(chained), consistent, rtol=1e-10)


def test_two_preconditioners_in_the_inner_state_are_refused():
  params, batch, loss, _ = _task()
  pre = kfe.scale_by_kfac(loss, damping=LAM, **OPTIONS)
  tx = kfe.quadratic_model_step(optax.chain(pre, pre), loss, momentum=None,
                                damping=LAM, damping_units=kfe.damping_units_of(pre))
  with pytest.raises(ValueError, match="holds 2 KfacStates, not one"):
    tx.update(jax.grad(loss)(params, batch), tx.init(params), params, batch=batch)


class _GroupedNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(4, (3, 3), padding="SAME")(x))
    x = jnp.tanh(nn.Conv(4, (3, 3), feature_group_count=2, padding="SAME")(x))
    x = nn.LayerNorm()(x)
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_units_per_group_and_per_diagonal_leaf_and_the_scale_invariance():
  """A grouped conv gets one unit per group (its output channels), a
  LayerNorm (diagonal) ``mean(diag F)``; a loss × 64 still takes the same
  adaptive steps."""
  net = _GroupedNet()
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 5, 5, 2))
  batch = {"x": x, "y": jax.random.randint(jax.random.PRNGKey(1), (6,), 0, 3)}
  params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                  net.init(jax.random.PRNGKey(2), x))
  options = dict(OPTIONS, example_batch=batch)

  def loss_of(weight):
    return lambda p, b: kfe.softmax_cross_entropy(
        net.apply(p, b["x"]), b["y"], weights=jnp.full(b["y"].shape, weight))

  loss = loss_of(1.0)
  pre = kfe.scale_by_kfac(loss, damping=LAM, **options)
  _, state = pre.update(jax.grad(loss)(params, batch), pre.init(params), params,
                        batch=batch)
  ones = jax.tree_util.tree_map(jnp.ones_like, params)
  units = kfe.damping_units_of(pre)(state, params, batch)(ones)["params"]
  grouped = np.asarray(units["Conv_1"]["kernel"])       # [3, 3, 2, 4], 2 groups
  first, second = np.unique(grouped[..., :2]), np.unique(grouped[..., 2:])
  assert first.size == second.size == 1 and abs(first[0] - second[0]) > 1e-3
  np.testing.assert_allclose(units["Conv_1"]["bias"],
                             [first[0]] * 2 + [second[0]] * 2, rtol=1e-12)
  paths = [jax.tree_util.keystr(k)
           for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  diag = state.diagonals[paths.index("['params']['LayerNorm_0']['scale']")]
  np.testing.assert_allclose(units["LayerNorm_0"]["scale"],
                             np.full(4, np.mean(diag)), rtol=1e-12)
  runs = []
  for weight in (1.0, 64.0):
    loss = loss_of(weight)
    pre = kfe.scale_by_kfac(loss, damping=LAM, **options)
    tx = _adaptive(pre, loss, damping_adaptation=True,
                   damping_adaptation_interval=1)
    state, p, path = tx.init(params), params, []
    for _ in range(3):
      update, state = tx.update(jax.grad(loss)(p, batch), state, p, batch=batch)
      path.append(np.concatenate([ravel(update), [state.damping, state.rho]]))
      p = optax.apply_updates(p, update)
    runs.append(np.stack(path))
  assert np.isfinite(runs[0]).all()
  np.testing.assert_allclose(runs[1], runs[0], rtol=1e-9, atol=1e-14)
