"""Orbax checkpoints of the optimizer state (restored in a fresh process), and
training flax nnx models."""

import os
import pathlib
import subprocess
import sys

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
    # λ, δ₀, α, μ and ρ are in the state and resume bit-exactly.
    "kfac_adaptive": lambda loss: kfe.kfac(
        loss, "adaptive", momentum="adaptive", damping=0.5, inverse_every=2,
        damping_adaptation=True, damping_adaptation_interval=2),
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


def test_orbax_restore_in_a_fresh_process_continues_bit_exactly(tmp_path):
  """Save after 3 steps here; a new Python process restores (into a state
  from ``init``), trains 3 more steps; equal to 6 uninterrupted steps."""
  loss, params, batches = _task()
  expected = {}
  for method in sorted(METHODS):
    opt = METHODS[method](loss)
    p_mid, s_mid = _train(opt, loss, params, opt.init(params), batches[:3], 0)
    # the uninterrupted run: the same 3 steps, then 3 more in this process
    expected[method] = _train(opt, loss, p_mid, s_mid, batches[3:], 3)
    leaves = jax.tree_util.tree_leaves(s_mid)
    assert all(isinstance(x, jax.Array) for x in leaves)   # arrays only
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save((tmp_path / method).absolute(),
                {"params": p_mid, "opt_state": s_mid})
  root = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, PYTHONPATH=str(root))
  done = subprocess.run([sys.executable, str(root / "tests/restore_and_continue.py"),
                         str(tmp_path)], cwd=root, env=env, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  for method, run in expected.items():
    saved = np.load(tmp_path / f"{method}.npz")
    got = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    want = jax.tree_util.tree_leaves(run)
    assert len(got) == len(want)
    for g, w in zip(got, want):
      np.testing.assert_array_equal(g, np.asarray(w), err_msg=method)


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
