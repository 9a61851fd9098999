"""Stacked and grouped blocks (a scanned stack, grouped or depthwise convs)
refresh one block at a time on CPU (``linalg.map_blocks``): jaxlib's
batched CPU LAPACK kernels wait on XLA's intra-op thread pool from one of
its threads, and several at once hung a small machine's step for good
(jax 0.10.2, 2 cores: a ConvNeXt's depthwise convs, K-FAC's first
refresh)."""

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_ext as kfe
from kfac_jax_ext import _jax_internals as jint
from kfac_jax_ext import linalg

DECOMPOSITIONS = ("lu", "triangular_solve", "eigh", "cholesky", "qr", "svd")


class _Depthwise(nn.Module):
  """Six depthwise 7×7 convs of 16 channels (ConvNeXt's): six batched [16, 50, 50]
  Kronecker refreshes in one step."""
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(16, (1, 1))(x)
    for _ in range(6):
      x = x + jnp.tanh(nn.Conv(16, (7, 7), feature_group_count=16)(x))
    return nn.Dense(10)(x.mean((1, 2)))


def _decompositions(jaxpr):
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in DECOMPOSITIONS:
      yield eqn
    for inner in jint.sub_jaxprs(eqn):
      yield from _decompositions(inner)


def test_map_blocks_equals_vmap():
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 6, 6))
  spd = x @ jnp.swapaxes(x, 1, 2) + jnp.eye(6)
  one = lambda m, lam: linalg.damped_inverse(m, lam)[0]
  lam = jnp.linspace(0.1, 0.5, 5)
  np.testing.assert_allclose(linalg.map_blocks(one, spd, lam),
                             jax.vmap(one)(spd, lam), rtol=1e-12)


@pytest.mark.parametrize("optimizer", ["kfac", "tkfac", "two_level_kfac", "tengrad"])
def test_grouped_blocks_refresh_without_batched_decompositions_on_cpu(optimizer):
  """Every LU / eigh in the step's program takes one matrix: none is a
  batched call (the vmapped refresh had them over a leading axis of 16
  blocks)."""
  model = _Depthwise()
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 6, 6, 3))
  params = model.init(jax.random.PRNGKey(0), x)
  batch = {"x": x, "y": jnp.arange(4) % 10}
  loss = lambda p, b: kfe.softmax_cross_entropy(model.apply(p, b["x"]), b["y"])
  opt = getattr(kfe, optimizer)(loss, 0.1, damping=0.1, example_batch=batch)
  state = opt.init(params)
  grads = jax.grad(loss)(params, batch)
  jaxpr = jax.make_jaxpr(lambda g, s: opt.update(
      g, s, params, batch=batch, key=jax.random.PRNGKey(2)))(grads, state)
  found = list(_decompositions(jaxpr.jaxpr))
  assert found, "no decomposition found: the walk over the program is broken"
  shapes = [tuple(e.invars[0].aval.shape) for e in found]
  assert all(len(s) == 2 for s in shapes), shapes


def test_a_depthwise_convnet_trains_on_the_test_machine():
  """K-FAC's first step (a refresh) on ``_Depthwise`` in a fresh process
  ends (with the vmapped refresh it hung on this 2-core machine, two runs
  of two)."""
  script = textwrap.dedent("""
      import jax, jax.numpy as jnp
      import kfac_jax_ext as kfe
      from tests.test_batched_refresh import _Depthwise
      model = _Depthwise()
      x = jax.random.normal(jax.random.PRNGKey(1), (8, 8, 8, 3))
      params = model.init(jax.random.PRNGKey(0), x)
      batch = {"x": x, "y": jnp.arange(8) % 10}
      loss = lambda p, b: kfe.softmax_cross_entropy(model.apply(p, b["x"]), b["y"])
      opt = kfe.kfac(loss, 0.1, damping=0.1, example_batch=batch)
      step = kfe.make_train_step(loss, opt)
      state = opt.init(params)
      params, state, value = step(params, state, batch, jax.random.PRNGKey(0), 0)
      print("done", float(value))
  """)
  # A user's process: XLA's default flags (the suite's compile-fast ones,
  # tests/conftest.py, schedule the program so that it did not hang).
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["JAX_ENABLE_X64"] = "0"
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=150, env=env,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode == 0 and "done" in out.stdout, out.stderr[-2000:]
