"""BatchNorm in training mode inside ``nn.scan`` (float64): its scale, which
flax multiplies by the batch's ``rsqrt(var + ε)`` before the activations,
gets per step the exact diagonal block it gets outside a scan
(``matching._rescaled_scale``; the multiplier is captured per step), so the
scanned stack's update equals the unrolled network's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_ext as kfe

LAM, L, D = 0.1, 3, 4


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.BatchNorm(use_running_average=False)(nn.Dense(D)(x))
    return jnp.tanh(h), None


class _Stack(nn.Module):
  @nn.compact
  def __call__(self, x):
    x, _ = nn.scan(_Block, variable_axes={"params": 0, "batch_stats": 0},
                   split_rngs={"params": True}, length=L)()(x, None)
    return nn.Dense(2)(x)


def _update(loss, params, batch, fisher):
  tx = kfe.scale_by_kfac(loss, damping=LAM, damping_mode="tikhonov",
                         ema_decay=0.0, fisher=fisher, example_batch=batch)
  grads = jax.grad(loss)(params, batch)
  return jax.jit(lambda g: tx.update(g, tx.init(params), params, batch=batch,
                                     key=jax.random.PRNGKey(7))[0])(grads), grads


@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_batchnorm_scale_in_a_scanned_stack_equals_the_unrolled_network(fisher):
  model = _Stack()
  x = jax.random.normal(jax.random.PRNGKey(1), (6, D))
  variables = model.init(jax.random.PRNGKey(0), x)
  stats = variables["batch_stats"]
  scan_name = next(iter(variables["params"]))
  params = {"params": variables["params"]}
  params["params"][scan_name]["BatchNorm_0"]["scale"] = jnp.linspace(
      0.5, 1.5, L * D).reshape(L, D)     # not all ones: the multiplier matters
  batch = {"x": x, "y": jnp.array([0, 1, 0, 1, 1, 0])}

  def scanned(p, b):
    return kfe.softmax_cross_entropy(model.apply(
        {**p, "batch_stats": stats}, b["x"], mutable=["batch_stats"])[0], b["y"])

  def unrolled(p, b):
    h = b["x"]
    for i in range(L):
      (h, _), _ = _Block().apply(
          {"params": p[f"block{i}"], "batch_stats": jax.tree_util.tree_map(
              lambda a, i=i: a[i], stats[scan_name])}, h, None,
          mutable=["batch_stats"])
    return kfe.softmax_cross_entropy(
        nn.Dense(2).apply({"params": p["head"]}, h), b["y"])

  stacked = params["params"][scan_name]
  flat = {"head": params["params"]["Dense_0"]}
  for i in range(L):
    flat[f"block{i}"] = jax.tree_util.tree_map(lambda a, i=i: a[i], stacked)
  text = kfe.describe_layers(scanned, params, batch)
  assert "Every parameter belongs to a layer." in text, text
  up_s, grads = _update(scanned, params, batch, fisher)
  up_u, _ = _update(unrolled, flat, batch, fisher)
  bn = up_s["params"][scan_name]["BatchNorm_0"]["scale"]
  assert np.max(np.abs(bn - grads["params"][scan_name]["BatchNorm_0"]["scale"] / LAM)) > (
      1e-3 * np.max(np.abs(bn)))      # a block, not the identity fallback's ∇/λ
  for i in range(L):
    got = jax.tree_util.tree_map(lambda a, i=i: a[i], up_s["params"][scan_name])
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-9, atol=1e-12), got, up_u[f"block{i}"])
