"""Layer discovery on flax linen, flax nnx and pure-JAX models."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kfac_jax_ext as kfe
from kfac_jax_ext import statistics, tracing
from tests import oracles


class LinenCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), strides=2, padding="SAME")(x))
    x = nn.Conv(5, (2, 2), padding="VALID", kernel_dilation=2, use_bias=False)(x)
    x = nn.LayerNorm()(x)
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_linen_cnn():
  model = LinenCNN()
  x = jnp.ones((2, 9, 9, 1))
  params = model.init(jax.random.PRNGKey(0), x)
  loss_fn = lambda p, b: kfe.softmax_cross_entropy(model.apply(p, b["x"]), b["y"])
  batch = {"x": x, "y": jnp.array([0, 2])}
  layers = kfe.find_layers(loss_fn, params, batch)
  assert [l.kind for l in layers] == ["conv2d", "conv2d", "scale_and_shift", "dense"]
  assert [l.name for l in layers] == ["params/Conv_0", "params/Conv_1",
                                      "params/LayerNorm_0", "params/Dense_0"]
  assert layers[0].params == (("params", "Conv_0", "kernel"),
                              ("params", "Conv_0", "bias"))
  assert layers[1].params == (("params", "Conv_1", "kernel"),) and not layers[1].has_bias
  assert layers[0].inputs_shape == (2, 9, 9, 1)
  assert layers[0].outputs_shape == (2, 5, 5, 4)
  assert layers[3].inputs_shape == (2, 3 * 3 * 5)
  text = kfe.describe_layers(loss_fn, params, batch)
  assert "Every parameter belongs to a layer." in text and "kronecker 10x4" in text


class NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(4, 8, rngs=rngs)
    self.l2 = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.l2(jax.nn.relu(self.l1(x)))


def test_nnx_mlp_split_merge():
  graphdef, state = nnx.split(NnxMLP(nnx.Rngs(0)))
  loss_fn = lambda s, b: kfe.softmax_cross_entropy(
      nnx.merge(graphdef, s)(b["x"]), b["y"])
  batch = {"x": jnp.ones((5, 4)), "y": jnp.zeros((5,), jnp.int32)}
  layers = kfe.find_layers(loss_fn, state, batch)
  assert [(l.name, l.kind, l.has_bias) for l in layers] == [
      ("l1", "dense", True), ("l2", "dense", True)]
  assert layers[0].params == (("l1", "kernel"), ("l1", "bias"))


@jax.custom_vjp
def _custom_layer(x, w, b):
  return x @ w + b


_custom_layer.defvjp(lambda x, w, b: (x @ w + b, (x, w)),
                     lambda res, g: (g @ res[1].T, res[0].T @ g, g.sum(0)))


def _pure_model(p, x):
  h = jax.jit(lambda p, x: jnp.tanh(x @ p[0]["w"] + p[0]["b"]))(p, x)
  h = jax.checkpoint(lambda p, h: jnp.tanh(h @ p[1]["w"] + p[1]["b"]))(p, h)
  return _custom_layer(h, p[2]["w"], p[2]["b"])


def test_pure_jax_layers_inside_jit_checkpoint_and_custom_vjp():
  params = oracles.mlp_init(jax.random.PRNGKey(0), [4, 5, 6, 3])
  x = jax.random.normal(jax.random.PRNGKey(1), (7, 4), jnp.float64)
  batch = {"x": x, "y": jnp.arange(7) % 3}
  loss_fn = lambda p, b: kfe.softmax_cross_entropy(_pure_model(p, b["x"]), b["y"])
  layers = kfe.find_layers(loss_fn, params, batch)
  assert [(l.kind, l.has_bias) for l in layers] == [("dense", True)] * 3
  # The statistics pass through jit/remat/custom_vjp equals the flat model's.
  flat_loss = lambda p, b: kfe.softmax_cross_entropy(oracles.mlp_apply(p, b["x"]),
                                                     b["y"])
  stats = {}
  for name, fn in (("nested", loss_fn), ("flat", flat_loss)):
    traced = tracing.trace_loss(fn, params, batch)
    stats[name] = jax.jit(lambda p, b: statistics.statistics_pass(
        traced, p, b, None, "empirical"))(params, batch)
  (loss_n, grads_n, cb_n), (loss_f, grads_f, cb_f) = stats["nested"], stats["flat"]
  np.testing.assert_allclose(loss_n, loss_f, rtol=1e-12)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10),
                         (grads_n, cb_n.layers), (grads_f, cb_f.layers))
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10),
                         grads_n, jax.grad(loss_fn)(params, batch))


def test_dense_over_sequences():
  model = nn.Dense(6)
  x = jnp.ones((2, 5, 4))
  params = model.init(jax.random.PRNGKey(0), x)
  loss_fn = lambda p, b: kfe.softmax_cross_entropy(model.apply(p, b["x"]), b["y"])
  layers = kfe.find_layers(loss_fn, params, {"x": x, "y": jnp.zeros((2, 5), jnp.int32)})
  assert [(l.kind, l.inputs_shape, l.outputs_shape) for l in layers] == [
      ("dense", (2, 5, 4), (2, 5, 6))]


def test_tied_weights_are_listed_with_their_fallback():
  vocab, d = 11, 4
  params = {"embed": jax.random.normal(jax.random.PRNGKey(0), (vocab, d)),
            "mid": {"w": jnp.ones((d, d)), "b": jnp.zeros(d)}}

  def loss_fn(p, b):
    h = jnp.take(p["embed"], b["tokens"], axis=0)
    h = jnp.tanh(h @ p["mid"]["w"] + p["mid"]["b"])
    return kfe.softmax_cross_entropy(h @ p["embed"].T, b["targets"])

  batch = {"tokens": jnp.array([[1, 2, 3]]), "targets": jnp.array([[2, 3, 4]])}
  layers = kfe.find_layers(loss_fn, params, batch)
  # The table used as embedding and as output projection is one tied layer
  # (it fell back with "used 2 times: tied or shared" before tied blocks).
  assert [(l.name, l.kind) for l in layers] == [("embed", "tied"), ("mid", "dense")]
  text = kfe.describe_layers(loss_fn, params, batch, fallback="diagonal")
  row = [line for line in text.splitlines() if line.startswith("embed")]
  assert row and "tied" in row[0] and "kronecker 11x4" in row[0]


def test_unrecognised_and_control_flow_uses_are_reported():
  params = {"w": jnp.ones((3, 3)), "loop_w": jnp.ones((3, 3)),
            "scan_w": jnp.ones((3, 3)), "unused": jnp.ones(2)}

  def loss_fn(p, b):
    h = jnp.sin(p["w"]) @ b["x"].T
    h = jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (
        c[0] + 1, jnp.tanh(c[1] @ p["loop_w"])), (0, h.T))[1]
    h, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ p["scan_w"]), None), h, None,
                        length=2)
    return kfe.squared_error(h, b["y"])

  batch = {"x": jnp.ones((2, 3)), "y": jnp.ones((2, 3))}
  traced = tracing.trace_loss(loss_fn, params, batch)
  reasons = {traced.param_paths[i]: r for i, r in traced.leaf_reasons.items()}
  # a kernel closed over by a scan body is a layer shared by the steps
  assert [(l.name, l.kind, l.steps) for l in traced.layers] == [("scan_w", "dense", 2)]
  assert "'sin'" in reasons[("w",)]
  assert "control flow 'while'" in reasons[("loop_w",)]
  assert reasons[("unused",)] == "not used by loss_fn"


def test_missing_loss_registration_is_a_clear_error():
  params = {"w": jnp.ones((3, 2))}
  batch = {"x": jnp.ones((4, 3))}
  with pytest.raises(ValueError, match="kfe.softmax_cross_entropy"):
    kfe.find_layers(lambda p, b: jnp.sum(b["x"] @ p["w"]), params, batch)
