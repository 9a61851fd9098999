"""Channels-first scales and shifts (``[N, C, H, W]``, equinox's and
PyTorch-style code): their diagonal blocks read the features along the
channel axis, exact against the per-token oracle ``Σ_tok u² / M``.

The leaves were matched before as if their features were the trailing axes
(a ``[C, 1, 1]`` leaf) or not at all (a ``[C]`` leaf viewed as ``[C, 1,
1]``: "no recognised layer pattern").
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_ext as kfe

LAM = 0.05
N, C, H, W = 5, 3, 2, 4


def _kfac_update(loss, params, batch):
  tx = kfe.scale_by_kfac(loss, damping=LAM, damping_mode="tikhonov",
                         ema_decay=0.0, fisher="empirical", example_batch=batch)
  grads = jax.grad(loss)(params, batch)
  return tx.update(grads, tx.init(params), params, batch=batch)[0], grads


@pytest.mark.parametrize("leaf", ["[C, 1, 1]", "[C] as [:, None, None]"])
def test_channels_first_scale_and_shift_diagonal_is_exact(leaf):
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  shape = (C, 1, 1) if leaf == "[C, 1, 1]" else (C,)
  params = {"s": 1 + 0.3 * jax.random.normal(ks[0], shape, jnp.float64),
            "b": 0.3 * jax.random.normal(ks[1], shape, jnp.float64),
            "w": jax.random.normal(ks[2], (C * H * W, 3), jnp.float64)}
  x = jax.random.normal(ks[3], (N, C, H, W), jnp.float64)
  batch = {"x": x, "y": jnp.arange(N) % 3}
  view = lambda v: v.reshape(C, 1, 1)

  def logits(p, x, probe=0.0):
    h = jnp.tanh(x) * view(p["s"]) + view(p["b"]) + probe
    return jnp.tanh(h).reshape(x.shape[0], -1) @ p["w"]

  loss = lambda p, b: kfe.softmax_cross_entropy(logits(p, b["x"]), b["y"])
  assert "fallback 0.0%" in kfe.describe_layers(loss, params, batch)
  updates, grads = _kfac_update(loss, params, batch)
  g = jax.vmap(jax.grad(lambda pr, xi, yi: -jax.nn.log_softmax(
      logits(params, xi[None], pr[None]))[0, yi]), (None, 0, 0))(
          jnp.zeros((C, H, W)), x, batch["y"])
  for name, u in (("s", jnp.tanh(x) * g), ("b", g)):
    diag = (jnp.sum(u ** 2, axis=(0, 2, 3)) / N).reshape(shape)
    np.testing.assert_allclose(updates[name], grads[name] / (diag + LAM),
                               rtol=1e-10)


def test_vmapped_channels_first_batchnorm_equals_the_batched_one():
  """equinox's ``BatchNorm`` (``jax.vmap`` with an ``axis_name``, the
  batch statistics by a collective over it, the affine per channel of one
  ``[C, H, W]`` example) is the batched channels-first normalisation."""
  ks = jax.random.split(jax.random.PRNGKey(1), 4)
  params = {"weight": 1 + 0.3 * jax.random.normal(ks[0], (C,), jnp.float64),
            "bias": 0.3 * jax.random.normal(ks[1], (C,), jnp.float64),
            "w": jax.random.normal(ks[2], (C * H * W, 3), jnp.float64)}
  batch = {"x": jax.random.normal(ks[3], (N, C, H, W), jnp.float64),
           "y": jnp.arange(N) % 3}

  def per_example(p, x):
    mean = jax.lax.pmean(x.mean(axis=(1, 2)), "batch")
    var = jax.lax.pmean(((x - mean[:, None, None]) ** 2).mean(axis=(1, 2)),
                        "batch")
    out = jax.vmap(lambda y, m, v, w, b: (y - m) / jnp.sqrt(v + 1e-5) * w + b)(
        x, mean, var, p["weight"], p["bias"])
    return jnp.tanh(out).reshape(-1) @ p["w"]

  def batched(p, x):
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = ((x - mean) ** 2).mean(axis=(0, 2, 3), keepdims=True)
    out = ((x - mean) / jnp.sqrt(var + 1e-5) * p["weight"][:, None, None]
           + p["bias"][:, None, None])
    return jnp.tanh(out).reshape(x.shape[0], -1) @ p["w"]

  mapped = lambda p, b: kfe.softmax_cross_entropy(jax.vmap(
      lambda x: per_example(p, x), axis_name="batch")(b["x"]), b["y"])
  plain = lambda p, b: kfe.softmax_cross_entropy(batched(p, b["x"]), b["y"])
  updates = []
  for loss in (mapped, plain):
    assert "diagonal 7.7%, fallback 0.0%" in kfe.describe_layers(
        loss, params, batch)
    updates.append(_kfac_update(loss, params, batch)[0])
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-9, atol=1e-12), *updates)


class _Norm(nn.Module):
  axis: int

  @nn.compact
  def __call__(self, x):
    x = nn.BatchNorm(use_running_average=False, axis=self.axis,
                     param_dtype=jnp.float64)(x)
    if self.axis == 1:
      x = x.transpose(0, 2, 3, 1)   # back to NHWC for the same head
    return nn.Dense(3, param_dtype=jnp.float64)(
        jnp.tanh(x).reshape(x.shape[0], -1))


def test_flax_batchnorm_on_channels_first_equals_channels_last():
  """``nn.BatchNorm(axis=1)`` in training mode (its scale multiplied by the
  per-channel ``rsqrt(var + ε)`` first) on ``[N, C, H, W]`` gets the update
  of ``nn.BatchNorm()`` on the same data laid out ``[N, H, W, C]``."""
  x = jax.random.normal(jax.random.PRNGKey(2), (N, H, W, C), jnp.float64)
  y = jnp.arange(N) % 3
  updates = []
  for axis, xs in ((-1, x), (1, x.transpose(0, 3, 1, 2))):
    model = _Norm(axis)
    variables = model.init(jax.random.PRNGKey(3), xs)
    stats = variables["batch_stats"]
    loss = lambda p, b, model=model, stats=stats: kfe.softmax_cross_entropy(
        model.apply({"params": p, "batch_stats": stats}, b["x"],
                    mutable=["batch_stats"])[0], b["y"])
    params = jax.tree_util.tree_map(lambda v: v + 0.1 * jnp.arange(v.size).reshape(
        v.shape) / v.size, variables["params"])
    updates.append(_kfac_update(loss, params, {"x": xs, "y": y})[0])
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-9, atol=1e-12), *updates)
