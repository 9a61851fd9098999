"""Convolutions over one and three spatial axes get the conv blocks.

A 1-D conv (``nn.Conv(f, (k,))`` on ``[N, T, C]``, a temporal conv; causal
padding as Mamba's) is the 2-D conv of the same data with a height of 1,
and a 3-D conv of depth-1 data with a depth-1 kernel is that 2-D conv too:
every method's update equals the 2-D network's over many locations
(stride, dilation, padding, groups). A 3-D conv whose kernel spans its
input's depth is exact against the float64 oracle at one location. Before,
only 2-D kernels matched (a 1-D or 3-D kernel fell back: "no recognised
layer pattern").
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_ext as kfe
from tests import oracles

LAM = 0.05
N, T, C, O, K = 4, 9, 4, 6, 3

_METHODS = {
    "kfac": lambda f, b: kfe.kfac(f, 0.1, damping=0.1, example_batch=b),
    "tkfac": lambda f, b: kfe.tkfac(f, 0.1, damping=0.1, example_batch=b),
    "tengrad": lambda f, b: kfe.tengrad(f, 0.1, damping=0.1, example_batch=b),
    "two_level": lambda f, b: kfe.two_level_kfac(
        f, 0.1, damping=0.1, coarse_space="spectral", example_batch=b),
    "natural_gradient": lambda f, b: kfe.natural_gradient(
        f, 0.1, damping=0.1, example_batch=b),
}

_SETTINGS = {   # stride, dilation, padding (of the T axis), groups
    "same": (1, 1, "SAME", 1),
    "causal_dilated": (1, 2, ((4, 0),), 1),
    "strided_grouped": (2, 1, ((1, 1),), 2),
}


def _net(spatial, stride, dilation, padding, groups):
  """``(loss, shaped)``: a conv over ``spatial`` axes (1, 2 or 3; the extra
  ones of size 1) of ``[N, T, C]`` data, then a dense head; ``shaped``
  puts a 1-D kernel ``[K, C, O]`` into this network's kernel shape."""
  lead = (1,) * (spatial - 1)
  pad = padding if isinstance(padding, str) else ((0, 0),) * (spatial - 1) + padding
  spec = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC"),
          3: ("NDHWC", "DHWIO", "NDHWC")}[spatial]

  def conv(p, x):
    x = x.reshape((x.shape[0],) + lead + x.shape[1:])
    kernel = p["kernel"].reshape(lead + p["kernel"].shape[-3:])
    h = jax.lax.conv_general_dilated(
        x, kernel, lead + (stride,), pad, rhs_dilation=lead + (dilation,),
        dimension_numbers=spec, feature_group_count=groups) + p["bias"]
    return h.reshape(h.shape[0], -1, O)

  def loss(p, b):
    h = jnp.tanh(conv(p["conv"], b["x"])).reshape(b["x"].shape[0], -1)
    return kfe.softmax_cross_entropy(h @ p["head"], b["y"])

  def params(flat):   # the kernel in this network's own shape
    k = flat["conv"]["kernel"]
    return {**flat, "conv": {**flat["conv"], "kernel": k.reshape(
        lead + k.shape[-3:])}}

  return loss, params


# K-FAC (the statistics every method shares) and TENGraD (whose conv Gram
# reads the conv's geometry itself) on every case; the others on the
# hardest one (strided, grouped) in each dimension.
_CASES = [(m, d, s) for m in ("kfac", "tengrad") for d in (1, 3)
          for s in sorted(_SETTINGS)] + [
              (m, d, "strided_grouped") for m in ("natural_gradient", "tkfac",
                                                  "two_level") for d in (1, 3)]


@pytest.mark.parametrize("method,spatial,setting", _CASES)
def test_conv_over_one_or_three_axes_equals_the_2d_conv(method, spatial,
                                                        setting):
  stride, dilation, padding, groups = _SETTINGS[setting]
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(ks[0], (N, T, C), jnp.float64)
  batch = {"x": x, "y": jnp.arange(N) % 3}
  flat = {"conv": {"kernel": jax.random.normal(ks[1], (K, C // groups, O),
                                               jnp.float64),
                   "bias": 0.1 * jax.random.normal(ks[2], (O,), jnp.float64)}}
  t_out = (T + sum(padding[0]) - dilation * (K - 1) - 1) // stride + 1 if (
      not isinstance(padding, str)) else T
  flat["head"] = jax.random.normal(ks[3], (t_out * O, 3), jnp.float64)
  updates = []
  for dims in (spatial, 2):
    loss, shaped = _net(dims, stride, dilation, padding, groups)
    params = shaped(flat)
    text = kfe.describe_layers(loss, params, batch)
    assert f"conv{dims}d" in text and "fallback 0.0%" in text, text
    opt = _METHODS[method](loss, batch)
    grads = jax.grad(loss)(params, batch)
    u = opt.update(grads, opt.init(params), params, batch=batch,
                   key=jax.random.PRNGKey(1))[0]
    updates.append(jax.tree_util.tree_map(
        lambda a: a.reshape(a.shape[-3:]) if a.ndim >= 3 else a, u))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-8, atol=1e-11), *updates)


def test_3d_conv_at_one_location_is_exact():
  """``nn.Conv(f, (2, 2, 2))`` on ``[N, 2, 2, 2, C]`` data: one location,
  the K-FAC update is ``solve(A ⊗ G + λI, ∇)`` over kernel and bias."""
  conv, head = nn.Conv(O, (2, 2, 2), padding="VALID",
                       param_dtype=jnp.float64), nn.Dense(3, param_dtype=jnp.float64)
  x = jax.random.normal(jax.random.PRNGKey(0), (5, 2, 2, 2, 2), jnp.float64)
  y = jnp.array([0, 1, 2, 0, 1])
  params = {"conv": conv.init(jax.random.PRNGKey(1), x)["params"],
            "head": head.init(jax.random.PRNGKey(2), jnp.ones((1, O)))["params"]}

  def logits(p, x, probe=0.0):
    h = conv.apply({"params": p["conv"]}, x).reshape(x.shape[0], O) + probe
    return head.apply({"params": p["head"]}, jnp.tanh(h))

  loss = lambda p, b: kfe.softmax_cross_entropy(logits(p, b["x"]), b["y"])
  batch = {"x": x, "y": y}
  assert "conv3d" in kfe.describe_layers(loss, params, batch)
  g = jax.vmap(jax.grad(lambda pr, xi, yi: -jax.nn.log_softmax(
      logits(params, xi[None], pr[None])[0])[yi]), (None, 0, 0))(
          jnp.zeros(O), x, y)
  block, _, _ = oracles.kfac_block_by_vjp(
      lambda q, xi: conv.apply({"params": q}, xi[None]).reshape(O),
      params["conv"], x, g)
  grads = jax.grad(loss)(params, batch)
  tx = kfe.scale_by_kfac(loss, damping=LAM, damping_mode="tikhonov",
                         ema_decay=0.0, fisher="empirical", example_batch=batch)
  got = tx.update(grads, tx.init(params), params, batch=batch)[0]["conv"]
  v = jax.flatten_util.ravel_pytree(grads["conv"])[0]
  want = jnp.linalg.solve(block + LAM * jnp.eye(v.shape[0]), v)
  np.testing.assert_allclose(jax.flatten_util.ravel_pytree(got)[0], want,
                             rtol=1e-9, atol=1e-12)
