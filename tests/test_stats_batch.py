"""``stats_batch=n``: curvature statistics from the batch's first n examples.

Float64 oracles: the factors (and so the update) of K-FAC/TKFAC with
``stats_batch=n`` on a batch of M equal those of the same method given the
first n examples as its batch, while the gradient it preconditions is the
whole batch's; the fused step (``make_train_step``) equals the plain one.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_ext as kfe

M, N = 12, 5


class _Net(nn.Module):
  """A conv, a dense layer over tokens ``[M, T, D]`` and a dense head."""

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(3, (2, 2), padding="VALID")(x))     # [M, 3, 3, 3]
    x = x.reshape(x.shape[0], 3, 9)                          # 3 tokens of 9
    x = jnp.tanh(nn.Dense(4)(x)).reshape(x.shape[0], -1)     # [M, 12]
    return nn.Dense(3)(x)


def _problem():
  net = _Net()
  x = jax.random.normal(jax.random.PRNGKey(1), (M, 4, 4, 1), jnp.float64)
  params = jax.tree_util.tree_map(
      lambda t: t.astype(jnp.float64), net.init(jax.random.PRNGKey(0), x))
  loss_fn = lambda p, b: kfe.softmax_cross_entropy(net.apply(p, b["x"]), b["y"])
  batch = {"x": x, "y": jnp.arange(M) % 3}
  return params, loss_fn, batch


def _first(batch, n):
  return jax.tree_util.tree_map(lambda t: t[:n], batch)


@pytest.mark.parametrize("method,options", [
    (kfe.scale_by_kfac, dict(damping_mode="tikhonov")),
    (kfe.scale_by_kfac, dict(damping_mode="factored")),
    (kfe.scale_by_tkfac, {})])
def test_factors_and_update_are_those_of_the_first_examples(method, options):
  params, loss_fn, batch = _problem()
  grads = jax.grad(loss_fn)(params, batch)           # all M examples
  common = dict(damping=0.05, fisher="empirical", ema_decay=0.0,
                inverse_every=1, example_batch=batch, **options)
  sub = method(loss_fn, stats_batch=N, **common)
  ref = method(loss_fn, **common)
  out, state = jax.jit(lambda g: sub.update(g, sub.init(params), params,
                                            batch=batch))(grads)
  want, ref_state = jax.jit(lambda g: ref.update(g, ref.init(params), params,
                                                 batch=_first(batch, N)))(grads)
  for a, b in zip(jax.tree_util.tree_leaves(state),
                  jax.tree_util.tree_leaves(ref_state)):
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
  for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-14)
  # the whole batch's factors differ: the test could fail
  _, full_state = jax.jit(lambda g: ref.update(g, ref.init(params), params,
                                               batch=batch))(grads)
  gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree_util.tree_leaves(full_state.factors),
      jax.tree_util.tree_leaves(state.factors)))
  assert gap > 1e-3


def test_a_stats_batch_of_at_least_m_is_the_whole_batch():
  params, loss_fn, batch = _problem()
  grads = jax.grad(loss_fn)(params, batch)
  key = jax.random.PRNGKey(4)
  outs = []
  for extra in ({}, {"stats_batch": M}, {"stats_batch": 10 * M}):
    tx = kfe.scale_by_kfac(loss_fn, damping=0.05, example_batch=batch, **extra)
    outs.append(tx.update(grads, tx.init(params), params, batch=batch,
                          key=key)[0])
  for other in outs[1:]:
    for a, b in zip(jax.tree_util.tree_leaves(outs[0]),
                    jax.tree_util.tree_leaves(other)):
      np.testing.assert_array_equal(a, b)


def test_fused_step_equals_the_plain_step():
  """``make_train_step`` reads ``stats_batch`` from the alias; sampled
  targets are drawn for the same n examples with the same key."""
  params, loss_fn, batch = _problem()
  make = lambda: kfe.kfac(loss_fn, 0.1, damping=0.05, stats_every=1,
                          inverse_every=2, stats_batch=N, example_batch=batch)
  opt = make()
  step = kfe.make_train_step(loss_fn, opt, donate=False)
  key = jax.random.PRNGKey(7)
  p_fused, s_fused = params, opt.init(params)
  plain = make()
  p_plain, s_plain = params, plain.init(params)
  for i in range(3):
    b = jax.tree_util.tree_map(lambda t: t + 0.1 * i if t.dtype.kind == "f"
                               else t, batch)
    p_fused, s_fused, _ = step(p_fused, s_fused, b, key, i)
    g = jax.grad(loss_fn)(p_plain, b)
    u, s_plain = plain.update(g, s_plain, p_plain, batch=b,
                              key=jax.random.fold_in(key, np.uint32(i)))
    p_plain = optax.apply_updates(p_plain, u)
  for a, b in zip(jax.tree_util.tree_leaves(p_fused),
                  jax.tree_util.tree_leaves(p_plain)):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
  assert step.schedule.stats_batch == N


def test_curvature_of_the_whole_batch_is_refused():
  params, loss_fn, batch = _problem()
  tx = kfe.scale_by_kfac(loss_fn, damping=0.05, stats_batch=N,
                         example_batch=batch)
  key = jax.random.PRNGKey(0)
  _, grads, curv = kfe.value_and_grad(loss_fn)(params, batch, key)
  with pytest.raises(ValueError, match="stats_batch=<the same n>"):
    tx.update(grads, tx.init(params), params, batch=batch, key=key,
              curvature=curv)
  # the matching statistics are accepted
  _, grads, curv = kfe.value_and_grad(loss_fn, stats_batch=N)(params, batch, key)
  out, _ = tx.update(grads, tx.init(params), params, batch=batch, key=key,
                     curvature=curv)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(out))


def test_bad_stats_batch_and_batches_without_leading_examples_are_named():
  params, loss_fn, batch = _problem()
  for bad in (0, -1, 2.0, True, "5"):
    with pytest.raises(ValueError, match="stats_batch must be a positive int"):
      kfe.kfac(loss_fn, 0.1, stats_batch=bad)
    with pytest.raises(ValueError, match="stats_batch must be a positive int"):
      kfe.value_and_grad(loss_fn, stats_batch=bad)
  with pytest.raises(ValueError, match="leave stats_batch unset"):
    kfe.two_level_kfac(loss_fn, 0.1, stats_batch=4)
  with pytest.raises(ValueError, match="leave stats_batch unset"):
    kfe.kfac(loss_fn, 0.1, structure="block_tridiagonal", example_batch=batch,
             stats_batch=4)
  # leaves whose leading axes differ (a time-major mask): named
  loss2 = lambda p, b: loss_fn(p, {"x": b["x"] * b["mask"][0, :, None, None, None],
                                   "y": b["y"]})
  batch2 = {**batch, "mask": jnp.ones((2, M), jnp.float64)}
  tx = kfe.scale_by_kfac(loss2, stats_batch=N)
  grads = jax.grad(loss2)(params, batch2)
  with pytest.raises(ValueError, match=r"\['mask'\]: \(2, 12\)"):
    tx.update(grads, tx.init(params), params, batch=batch2,
              key=jax.random.PRNGKey(0))
  # a scalar leaf is shared by the examples and kept
  loss3 = lambda p, b: loss_fn(p, {"x": b["x"] * b["scale"], "y": b["y"]})
  batch3 = {**batch, "scale": jnp.ones((), jnp.float64)}
  tx = kfe.scale_by_kfac(loss3, stats_batch=N)
  out, _ = tx.update(jax.grad(loss3)(params, batch3), tx.init(params), params,
                     batch=batch3, key=jax.random.PRNGKey(0))
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(out))


class _TokenNet(nn.Module):
  """Embedding, dense and a head over ``[N, T]`` token ids."""

  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(7, 4)(ids)
    x = jnp.tanh(nn.Dense(5)(x))
    return nn.Dense(7)(x)


def test_a_per_token_loss_takes_its_first_sequences():
  """With a loss over ``N·T`` tokens, ``stats_batch=n`` takes the first n
  sequences (``n·T`` of the loss's examples)."""
  net = _TokenNet()
  ids = jax.random.randint(jax.random.PRNGKey(2), (6, 4), 0, 7)
  params = jax.tree_util.tree_map(
      lambda t: t.astype(jnp.float64), net.init(jax.random.PRNGKey(0), ids))
  loss_fn = lambda p, b: kfe.softmax_cross_entropy(net.apply(p, b["x"]), b["y"])
  batch = {"x": ids, "y": jnp.roll(ids, -1, axis=1)}
  grads = jax.grad(loss_fn)(params, batch)
  common = dict(damping=0.05, fisher="empirical", ema_decay=0.0,
                inverse_every=1, damping_mode="tikhonov", example_batch=batch)
  sub = kfe.scale_by_kfac(loss_fn, stats_batch=2, **common)
  ref = kfe.scale_by_kfac(loss_fn, **common)
  out, state = sub.update(grads, sub.init(params), params, batch=batch)
  want, ref_state = ref.update(grads, ref.init(params), params,
                               batch=_first(batch, 2))
  for a, b in zip(jax.tree_util.tree_leaves((out, state)),
                  jax.tree_util.tree_leaves((want, ref_state))):
    np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-14)
