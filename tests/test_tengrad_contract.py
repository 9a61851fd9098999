"""TENGraD's optax contract, fused path, failure handling and bad input."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_ext as kfe
from tests import oracles


def _setup(dtype=jnp.float64, n=8):
  params = jax.tree_util.tree_map(lambda t: t.astype(dtype),
                                  oracles.mlp_init(jax.random.PRNGKey(0), [4, 6, 3]))
  batch = {"x": jax.random.normal(jax.random.PRNGKey(1), (n, 4), dtype),
           "y": jnp.arange(n) % 3}
  loss_fn = lambda p, b: kfe.softmax_cross_entropy(oracles.mlp_apply(p, b["x"]),
                                                   b["y"])
  return params, batch, loss_fn


def test_optimizer_trains_without_retracing_and_with_inject_hyperparams():
  params, batch, loss_fn = _setup()
  opt = optax.inject_hyperparams(kfe.tengrad, static_args=("loss_fn", "gram_batch"))(
      loss_fn=loss_fn, learning_rate=0.05, damping=0.1, gram_batch=8,
      inverse_every=2)
  state = opt.init(params)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state, key):
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = opt.update(grads, state, params, batch=batch, key=key,
                                unknown_extra=1)
    return optax.apply_updates(params, updates), state

  start = loss_fn(params, batch)
  for i in range(6):
    params, state = step(params, state, jax.random.PRNGKey(i))
  assert loss_fn(params, batch) < 0.8 * start
  chex.assert_trees_all_equal_shapes_and_dtypes(state, opt.init(params))


def test_sampled_fisher_gives_a_descent_direction_and_bf16_updates():
  params, batch, loss_fn = _setup(jnp.bfloat16)
  tx = kfe.scale_by_tengrad(loss_fn, gram_batch=8)
  grads = jax.grad(loss_fn)(params, batch)
  updates, state = jax.jit(lambda g: tx.update(
      g, tx.init(params), params, batch=batch, key=jax.random.PRNGKey(0)))(grads)
  leaves = jax.tree_util.tree_leaves(updates)
  assert {l.dtype for l in leaves} == {jnp.dtype(jnp.bfloat16)}
  inner = sum(jnp.vdot(u.astype(jnp.float32), g.astype(jnp.float32))
              for u, g in zip(leaves, jax.tree_util.tree_leaves(grads)))
  assert inner > 0
  assert state.blocks[1].rows.dtype == jnp.float64   # x64 on: f64 blocks


def test_fused_value_and_grad_matches_separate_update():
  params, batch, loss_fn = _setup()
  tx = kfe.scale_by_tengrad(loss_fn, gram_batch=8, inverse_every=2)
  state = tx.init(params)
  vg = kfe.value_and_grad(loss_fn)
  for i in range(3):
    k = jax.random.PRNGKey(i)
    _, grads, curv = jax.jit(lambda p, s: vg(p, batch, k, opt_state=s))(params, state)
    fused, s_fused = tx.update(grads, state, params, batch=batch, key=k,
                               curvature=curv)
    plain, state = tx.update(grads, state, params, batch=batch, key=k)
    chex.assert_trees_all_close(fused, plain, rtol=1e-10)
    chex.assert_trees_all_close(s_fused, state, rtol=1e-10)


def test_nonfinite_batch_is_skipped_and_overflowing_block_kept():
  params, batch, loss_fn = _setup()
  tx = kfe.scale_by_tengrad(loss_fn, gram_batch=8, inverse_every=1,
                            fisher="empirical")
  grads = jax.grad(loss_fn)(params, batch)
  step = jax.jit(lambda s, b: tx.update(grads, s, params, batch=b))
  _, good = step(tx.init(params), batch)
  nan_batch = {"x": batch["x"].at[0, 0].set(jnp.nan), "y": batch["y"]}
  updates, after = step(good, nan_batch)
  assert int(after.health.nonfinite_statistics) == 1
  assert int(after.health.failed_inverses) == 0
  chex.assert_trees_all_equal(after.blocks, good.blocks)
  assert all(np.isfinite(l).all() for l in jax.tree_util.tree_leaves(updates))
  # Finite inputs whose Gram overflows: the first layer keeps its block, the
  # second (inputs bounded by tanh) is refreshed.
  huge = {"x": batch["x"] * 1e160, "y": batch["y"]}
  updates, after = step(good, huge)
  assert int(after.health.failed_inverses) == 1
  chex.assert_trees_all_equal(after.blocks[1], good.blocks[1])
  assert not np.array_equal(after.blocks[3].rows, good.blocks[3].rows)
  assert all(np.isfinite(l).all() for l in jax.tree_util.tree_leaves(updates))


def test_bad_options_and_memory_estimate_fail_clearly():
  params, batch, loss_fn = _setup()
  for options, match in (({"ema_decay": 0.9}, "ema_decay"),
                         ({"damping_mode": "factored"}, "damping_mode"),
                         ({"stats_every": 2, "inverse_every": 5}, "stats_every"),
                         ({"gram_batch": 0}, "gram_batch"),
                         ({"conv_gram": "diag"}, "conv_gram"),
                         ({"damping": -1.0}, "damping")):
    with pytest.raises(ValueError, match=match):
      kfe.scale_by_tengrad(loss_fn, **options)
  with pytest.raises(MemoryError, match="gram_batch"):
    kfe.scale_by_tengrad(loss_fn, gram_batch=10**7).init(params)
  tx = kfe.scale_by_tengrad(loss_fn)
  with pytest.raises(ValueError, match="key"):
    tx.update(jax.grad(loss_fn)(params, batch), tx.init(params), params,
              batch=batch)


class SequenceModel(nn.Module):
  @nn.compact
  def __call__(self, x):                          # x: [N, T, D]
    h = jnp.tanh(nn.Dense(5, name="mix")(x)).mean(axis=1)
    return nn.Dense(3, name="head")(h)


def test_dense_layer_over_sequences_falls_back_with_a_warning():
  model = SequenceModel()
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 2), jnp.float64)
  params = model.init(jax.random.PRNGKey(1), x)
  batch = {"x": x, "y": jnp.arange(4) % 3}
  loss_fn = lambda p, b: kfe.softmax_cross_entropy(model.apply(p, b["x"]), b["y"])
  tx = kfe.scale_by_tengrad(loss_fn, gram_batch=4, fisher="empirical")
  grads = jax.grad(loss_fn)(params, batch)
  with pytest.warns(UserWarning, match="mix.*3 locations per example"):
    updates, _ = tx.update(grads, tx.init(params), params, batch=batch)
  chex.assert_trees_all_equal(updates["params"]["mix"], grads["params"]["mix"])
  assert not np.allclose(updates["params"]["head"]["kernel"],
                         grads["params"]["head"]["kernel"])
