"""Orbax checkpoints of the optimizer state, and training flax nnx models."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import kfac_jax_ext as kfe
from tests import oracles

METHODS = {
    "kfac": lambda loss: kfe.kfac(loss, 0.1, damping=0.05, inverse_every=2),
    "tkfac": lambda loss: kfe.tkfac(loss, 0.1, damping=0.05, inverse_every=2),
    "tengrad": lambda loss: kfe.tengrad(loss, 0.05, damping=0.1, gram_batch=16,
                                        inverse_every=2),
    "two_level_kfac": lambda loss: kfe.two_level_kfac(
        loss, 0.1, damping=0.05, inverse_every=2, combine="multiplicative",
        coarse_matrix="exact"),
}


def _task():
  params = oracles.mlp_init(jax.random.PRNGKey(0), [4, 8, 3])
  batches = [{"x": jax.random.normal(jax.random.PRNGKey(i), (16, 4), jnp.float64),
              "y": jax.random.randint(jax.random.PRNGKey(100 + i), (16,), 0, 3)}
             for i in range(6)]
  loss = lambda p, b: kfe.softmax_cross_entropy(oracles.mlp_apply(p, b["x"]),
                                                b["y"])
  return loss, params, batches


def _train(opt, loss, params, state, batches, start):
  @jax.jit
  def step(p, s, b, k):
    updates, s = opt.update(jax.grad(loss)(p, b), s, p, batch=b, key=k)
    return optax.apply_updates(p, updates), s

  for i, b in enumerate(batches):
    params, state = step(params, state, b, jax.random.PRNGKey(start + i))
  return params, state


@pytest.mark.parametrize("method", sorted(METHODS))
def test_orbax_restore_continues_bit_exactly(method, tmp_path):
  loss, params, batches = _task()
  opt = METHODS[method](loss)
  p_full, s_full = _train(opt, loss, params, opt.init(params), batches, 0)

  p_mid, s_mid = _train(opt, loss, params, opt.init(params), batches[:3], 0)
  leaves = jax.tree_util.tree_leaves(s_mid)
  assert all(isinstance(x, jax.Array) for x in leaves)   # arrays only
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "ckpt", {"params": p_mid, "opt_state": s_mid})
  target = {"params": p_mid, "opt_state": opt.init(params)}   # a fresh state
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(tmp_path / "ckpt", abstract)
  chex.assert_trees_all_equal_structs(restored["opt_state"], s_mid)
  p_res, s_res = _train(opt, loss, restored["params"], restored["opt_state"],
                        batches[3:], 3)
  chex.assert_trees_all_equal(p_res, p_full)
  chex.assert_trees_all_equal(s_res, s_full)


class NnxClassifier(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), strides=2, rngs=rngs)
    self.norm = nnx.LayerNorm(4, rngs=rngs)
    self.head = nnx.Linear(4 * 4 * 4, 3, rngs=rngs)

  def __call__(self, x):
    x = self.norm(jax.nn.relu(self.conv(x)))
    return self.head(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("method", ["kfac", "tengrad"])
def test_nnx_model_trains_with_split_and_merge(method):
  graphdef, params = nnx.split(NnxClassifier(nnx.Rngs(0)), nnx.Param)
  x = jax.random.normal(jax.random.PRNGKey(1), (32, 8, 8, 1))
  batch = {"x": x, "y": (jnp.sum(x[:, :4], axis=(1, 2, 3)) > 0).astype(jnp.int32)}

  def loss(p, b):
    return kfe.softmax_cross_entropy(nnx.merge(graphdef, p)(b["x"]), b["y"])

  opt = (kfe.kfac(loss, 0.1, damping=0.1, kl_clip=1e-2) if method == "kfac"
         else kfe.tengrad(loss, 0.05, damping=0.1, gram_batch=32, kl_clip=1e-2))
  state = opt.init(params)

  @jax.jit
  def step(p, s, k):
    updates, s = opt.update(jax.grad(loss)(p, batch), s, p, batch=batch, key=k)
    return optax.apply_updates(p, updates), s

  start = float(loss(params, batch))
  for i in range(15):
    params, state = step(params, state, jax.random.PRNGKey(i))
  assert float(loss(params, batch)) < 0.7 * start
  layers = kfe.find_layers(loss, params, batch)
  assert {l.kind for l in layers} >= {"conv2d", "dense", "scale_and_shift"}
  assert np.isfinite(float(loss(params, batch)))
