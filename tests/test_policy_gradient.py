"""The curvature of one loss, the gradient of another: a natural policy
gradient (ACKTR, Wu et al. 2017) preconditions the policy-gradient
objective's gradient with the Fisher of the policy's action distribution.
The transform's ``loss_fn`` defines the curvature (a ``kfe`` helper on the
policy's logits and the taken actions); ``update`` preconditions whatever
gradient it is given (float64)."""

import jax
import jax.numpy as jnp
import numpy as np

import kfac_jax_ext as kfe
from tests import oracles

N, S, A, LAM = 64, 4, 3, 0.05


def _bandit(seed=0):
  """A contextual bandit: reward ``r(x, a) = (x @ R)[a]`` for states x."""
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(ks[0], (S, A)),
          {"w": 0.1 * jax.random.normal(ks[1], (S, A)), "b": jnp.zeros(A)})


def _logits(p, x):
  return x @ p["w"] + p["b"]


def fisher_loss(p, b):
  """The policy's log-likelihood of the taken actions: its Fisher (taken
  actions are samples of the policy, so ``fisher="empirical"`` is the
  sampled Fisher of on-policy data)."""
  return kfe.softmax_cross_entropy(_logits(p, b["x"]), b["a"])


def pg_loss(p, b):
  """``-mean_n A_n log π(a_n | x_n)``, advantages ``A_n`` with a baseline."""
  logp = jax.nn.log_softmax(_logits(p, b["x"]))
  taken = jnp.take_along_axis(logp, b["a"][:, None], axis=1)[:, 0]
  return -jnp.mean(b["adv"] * taken)


def _rollout(p, reward, key):
  kx, ka = jax.random.split(key)
  x = jax.random.normal(kx, (N, S))
  a = jax.random.categorical(ka, _logits(p, x))
  r = jnp.take_along_axis(x @ reward, a[:, None], axis=1)[:, 0]
  return {"x": x, "a": a, "adv": r - r.mean()}, r.mean()


def test_policy_gradient_preconditioned_by_the_policys_fisher():
  reward, params = _bandit()
  batch, _ = _rollout(params, reward, jax.random.PRNGKey(1))
  z = _logits(params, batch["x"])
  g = jax.nn.softmax(z) - jax.nn.one_hot(batch["a"], A)   # ∂(-log π)/∂z
  block, _, _ = oracles.kfac_block_by_vjp(
      lambda q, x: x @ q["w"] + q["b"], params, batch["x"], g)
  grads = jax.grad(pg_loss)(params, batch)
  v = jax.flatten_util.ravel_pytree(grads)[0]
  want = jnp.linalg.solve(block + LAM * jnp.eye(v.shape[0]), v)
  tx = kfe.scale_by_kfac(fisher_loss, damping=LAM, damping_mode="tikhonov",
                         ema_decay=0.0, fisher="empirical", example_batch=batch)
  got = tx.update(grads, tx.init(params), params, batch=batch)[0]
  np.testing.assert_allclose(jax.flatten_util.ravel_pytree(got)[0], want,
                             rtol=1e-9, atol=1e-12)
  # not the Fisher of the objective whose gradient it is
  assert float(jnp.max(jnp.abs(want - jnp.linalg.solve(
      block + LAM * jnp.eye(v.shape[0]), jax.flatten_util.ravel_pytree(
          jax.grad(fisher_loss)(params, batch))[0])))) > 1e-3


def test_natural_policy_gradient_raises_the_reward():
  """K-FAC's natural policy gradient with a KL-clipped step (ACKTR's trust
  region) raises the bandit's mean reward from chance toward the best arm's."""
  reward, params = _bandit()
  opt = kfe.kfac(fisher_loss, 1.0, damping=1e-2, kl_clip=1e-2,
                 fisher="empirical", example_batch=_rollout(
                     params, reward, jax.random.PRNGKey(0))[0])
  state = opt.init(params)

  @jax.jit
  def step(p, st, key):
    batch, mean_reward = _rollout(p, reward, key)
    grads = jax.grad(pg_loss)(p, batch)
    updates, st = opt.update(grads, st, p, batch=batch)
    return jax.tree_util.tree_map(jnp.add, p, updates), st, mean_reward

  rewards = []
  for i in range(40):
    params, state, r = step(params, state, jax.random.PRNGKey(100 + i))
    rewards.append(float(r))
  x = jax.random.normal(jax.random.PRNGKey(7), (4096, S))
  best = float(jnp.mean(jnp.max(x @ reward, axis=1)))
  final = float(jnp.mean(jnp.sum(jax.nn.softmax(_logits(params, x))
                                 * (x @ reward), axis=1)))
  assert abs(np.mean(rewards[:3])) < 0.3 * best, rewards[:3]
  assert final > 0.8 * best, (final, best)
