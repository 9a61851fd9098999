"""Discovery on flax's own modules: attention, Embed, Einsum, grouped convs,
nnx attention; honest reasons for what gets no block; coverage shares."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import kfac_jax_ext as kfe
from kfac_jax_ext import layers as layers_lib
from kfac_jax_ext import tracing


def _loss(model):
  return lambda p, b: kfe.softmax_cross_entropy(model.apply(p, b["x"]), b["y"])


def _kinds(model, batch):
  params = model.init(jax.random.PRNGKey(0), batch["x"])
  return params, {l.name: (l.kind, l.has_bias) for l in kfe.find_layers(
      _loss(model), params, batch)}


class Attention(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(x, x)
    return nn.Dense(3)(x)


def test_multi_head_attention_projections_are_dense_layers():
  batch = {"x": jnp.ones((2, 5, 6)), "y": jnp.zeros((2, 5), jnp.int32)}
  params, kinds = _kinds(Attention(), batch)
  att = "params/MultiHeadDotProductAttention_0"
  for proj in ("query", "key", "value", "out"):
    assert kinds[f"{att}/{proj}"] == ("dense", True)
  text = kfe.describe_layers(_loss(Attention()), params, batch)
  assert "kronecker 7x8" in text and "kronecker 9x6" in text   # [6,2,4], [2,4,6]
  assert "fallback 0.0%" in text


class Tokens(nn.Module):
  @nn.compact
  def __call__(self, ids):
    x = nn.Embed(10, 6)(ids)
    x = nn.Einsum((2, 6, 3), "btd,ndh->btnh")(x)
    return nn.Dense(10)(jnp.tanh(x).reshape(x.shape[:2] + (-1,)))


def test_embed_and_einsum():
  ids = jnp.array([[1, 2, 3], [4, 5, 0]])
  batch = {"x": ids, "y": ids}
  params, kinds = _kinds(Tokens(), batch)
  assert kinds == {"params/Embed_0": ("embedding", False),
                   "params/Einsum_0": ("dense", True),
                   "params/Dense_0": ("dense", True)}
  text = kfe.describe_layers(_loss(Tokens()), params, batch)
  assert "kronecker diag(10)x6" in text and "kronecker 7x6" in text


class DepthwiseSeparable(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(8, (3, 3), feature_group_count=4)(x)       # depthwise, mult. 2
    x = nn.Conv(6, (1, 1), feature_group_count=2)(nn.relu(x))
    return nn.Dense(3)(x.mean(axis=(1, 2)))


def test_grouped_and_depthwise_convs_get_per_group_blocks():
  batch = {"x": jnp.ones((2, 5, 5, 4)), "y": jnp.zeros((2,), jnp.int32)}
  params, kinds = _kinds(DepthwiseSeparable(), batch)
  assert kinds["params/Conv_0"] == ("conv2d", True)
  text = kfe.describe_layers(_loss(DepthwiseSeparable()), params, batch)
  assert "4x kronecker 10x2" in text and "2x kronecker 5x3" in text


class WeightStandardisedConv(nn.Module):
  @nn.compact
  def __call__(self, x):
    w = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, 2, 4))
    w = (w - w.mean(axis=(0, 1, 2))) / (w.std(axis=(0, 1, 2)) + 1e-5)
    x = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_weight_standardised_conv_gets_a_clear_reason():
  model = WeightStandardisedConv()
  batch = {"x": jnp.ones((2, 4, 4, 2)), "y": jnp.zeros((2,), jnp.int32)}
  params = model.init(jax.random.PRNGKey(0), batch["x"])
  traced = tracing.trace_loss(_loss(model), params, batch)
  reasons = {traced.param_paths[i]: r for i, r in traced.leaf_reasons.items()}
  assert "transformed before use" in reasons[("params", "kernel")]


class UnusedOutput(nn.Module):
  @nn.compact
  def __call__(self, x):
    head = nn.Dense(3)
    logits = head(nn.relu(nn.Dense(5)(x)))
    _ = head(x[:, :5] * 2.0)      # a second output the loss never reads
    return logits


def test_a_use_that_never_reaches_the_loss_is_not_a_second_use():
  batch = {"x": jnp.ones((4, 6)), "y": jnp.zeros((4,), jnp.int32)}
  _, kinds = _kinds(UnusedOutput(), batch)
  assert kinds == {"params/Dense_0": ("dense", True),
                   "params/Dense_1": ("dense", True)}


def test_a_kernel_sliced_into_unequal_parts_says_so():
  """Slices of one shape along the leading axis are a stacked layer
  (``test_layer_kinds``); column slices of a 2-D kernel are not."""
  params = {"w": jnp.ones((4, 10))}

  def loss_fn(p, b):
    h = jax.nn.gelu(b["x"] @ p["w"][:, :5]) * (b["x"] @ p["w"][:, 5:])
    return kfe.squared_error(h, b["y"])

  traced = tracing.trace_loss(loss_fn, params, {"x": jnp.ones((3, 4)),
                                                "y": jnp.ones((3, 5))})
  assert "sliced into 2 parts" in traced.leaf_reasons[0]


def test_rmsnorm_one_plus_scale_is_exact():
  """Gemma's ``x * (1 + scale)``: the scale gets its exact diagonal Fisher."""
  d = 4
  params = {"scale": jnp.linspace(-0.3, 0.3, d), "w": jax.random.normal(
      jax.random.PRNGKey(0), (d, 3))}

  def model(p, x):
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6)
    return (x * (1 + p["scale"])) @ p["w"]

  x = jax.random.normal(jax.random.PRNGKey(1), (6, d))
  y = jnp.array([0, 1, 2, 0, 1, 2])
  batch = {"x": x, "y": y}
  loss = lambda p, b: kfe.softmax_cross_entropy(model(p, b["x"]), b["y"])
  kinds = [(l.kind, l.params) for l in kfe.find_layers(loss, params, batch)]
  assert ("scale_and_shift", (("scale",),)) in kinds
  lam = 0.1
  tx = kfe.scale_by_kfac(loss, damping=lam, ema_decay=0.0, fisher="empirical")
  grads = jax.grad(loss)(params, batch)
  upd = tx.update(grads, tx.init(params), params, batch=batch)[0]
  per_ex = jax.vmap(jax.grad(lambda p, x, y: -jax.nn.log_softmax(
      model(p, x[None])[0])[y]), (None, 0, 0))(params, x, y)
  diag = jnp.mean(per_ex["scale"] ** 2, axis=0)
  np.testing.assert_allclose(upd["scale"], grads["scale"] / (diag + lam),
                             rtol=1e-10)


class _TwoLayerScales(nn.Module):
  """CaiT's block: two layer scales in one module (``gamma_1 * attn``,
  ``gamma_2 * mlp``)."""
  @nn.compact
  def __call__(self, x):
    g1 = self.param("gamma_1", nn.initializers.constant(0.5), (4,))
    g2 = self.param("gamma_2", nn.initializers.constant(0.7), (4,))
    x = x + g1 * nn.Dense(4)(x)
    x = x + g2 * nn.Dense(4)(jnp.tanh(x))
    return nn.Dense(3)(x)


def test_two_layer_scales_in_one_module_each_get_their_exact_diagonal():
  """The second scale of a module used to fall back ("no recognised layer
  pattern"); each now has its diagonal ``Σ_n u_n² / N`` (empirical)."""
  model = _TwoLayerScales()
  x = jax.random.normal(jax.random.PRNGKey(1), (6, 4))
  y = jnp.array([0, 1, 2, 0, 1, 2])
  params = model.init(jax.random.PRNGKey(0), x)
  batch = {"x": x, "y": y}
  loss = lambda p, b: kfe.softmax_cross_entropy(model.apply(p, b["x"]), b["y"])
  assert "Every parameter belongs to a layer." in kfe.describe_layers(loss, params, batch)
  lam = 0.1
  tx = kfe.scale_by_kfac(loss, damping=lam, ema_decay=0.0, fisher="empirical",
                         example_batch=batch)
  grads = jax.grad(loss)(params, batch)
  upd = tx.update(grads, tx.init(params), params, batch=batch)[0]["params"]
  per_ex = jax.vmap(jax.grad(lambda p, x, y: -jax.nn.log_softmax(
      model.apply(p, x[None])[0])[y]), (None, 0, 0))(params, x, y)["params"]
  for leaf in ("gamma_1", "gamma_2"):
    diag = jnp.mean(per_ex[leaf] ** 2, axis=0)
    np.testing.assert_allclose(upd[leaf], grads["params"][leaf] / (diag + lam),
                               rtol=1e-10)


class _TrainingBatchNorm(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(3, (3, 3))(x)
    x = nn.BatchNorm(use_running_average=False)(x)    # the batch's statistics
    return nn.Dense(3)(jnp.tanh(x).reshape(x.shape[0], -1))


def test_batchnorm_scale_in_training_mode_is_exact():
  """flax's BatchNorm multiplies the scale by ``rsqrt(var + ε)`` of the batch
  before the activations (``v = s ⊙ r``, then ``y ⊙ v``): the scale still
  gets its exact diagonal block, ``Σ_tok u² / M`` over the examples'
  positions with ``u = x̂ ⊙ g`` (K-FAC-expand, as for LayerNorm). The oracle
  normalises the conv output by hand and takes ``g`` from ``vmap(grad)`` of
  each example's loss in the normalised output."""
  model = _TrainingBatchNorm()
  x = jax.random.normal(jax.random.PRNGKey(1), (6, 4, 4, 2))
  y = jnp.array([0, 1, 2, 0, 1, 2])
  variables = model.init(jax.random.PRNGKey(0), x)
  params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                  {"params": variables["params"]})
  params["params"]["BatchNorm_0"]["scale"] = jnp.linspace(0.5, 1.5, 3)
  p = params["params"]

  def logits(q, xs):
    return model.apply({**q, "batch_stats": variables["batch_stats"]}, xs,
                       mutable=["batch_stats"])[0]

  loss = lambda q, b: kfe.softmax_cross_entropy(logits(q, b["x"]), b["y"])
  batch = {"x": x, "y": y}
  text = kfe.describe_layers(loss, params, batch)
  assert "Every parameter belongs to a layer." in text, text
  lam = 0.1
  tx = kfe.scale_by_kfac(loss, damping=lam, ema_decay=0.0, fisher="empirical",
                         example_batch=batch)
  grads = jax.grad(loss)(params, batch)
  upd = tx.update(grads, tx.init(params), params, batch=batch)[0]
  h = nn.Conv(3, (3, 3)).apply({"params": p["Conv_0"]}, x)
  mean = h.mean((0, 1, 2))
  x_hat = (h - mean) / jnp.sqrt((h * h).mean((0, 1, 2)) - mean ** 2 + 1e-5)
  out = x_hat * p["BatchNorm_0"]["scale"] + p["BatchNorm_0"]["bias"]
  head = lambda o: nn.Dense(3).apply({"params": p["Dense_0"]}, jnp.tanh(o).reshape(-1))
  g = jax.vmap(jax.grad(lambda o, c: -jax.nn.log_softmax(head(o))[c]))(out, y)
  for leaf, u in (("scale", x_hat * g), ("bias", g)):
    diag = jnp.sum(u.reshape(-1, 3) ** 2, axis=0) / 6
    np.testing.assert_allclose(upd["params"]["BatchNorm_0"][leaf],
                               grads["params"]["BatchNorm_0"][leaf] / (diag + lam),
                               rtol=1e-10)

def test_forgetting_has_aux_says_what_to_do():
  params = {"w": jnp.ones((3, 2))}
  batch = {"x": jnp.ones((4, 3)), "y": jnp.zeros((4,), jnp.int32)}

  def loss_fn(p, b):
    logits = b["x"] @ p["w"]
    return kfe.softmax_cross_entropy(logits, b["y"]), {"logits": logits}

  with pytest.raises(ValueError, match="has_aux=True"):
    kfe.find_layers(loss_fn, params, batch)
  tx = kfe.scale_by_kfac(loss_fn)
  with pytest.raises(ValueError, match="has_aux=True"):
    tx.update(params, tx.init(params), params, batch=batch,
              key=jax.random.PRNGKey(0))
  assert kfe.find_layers(loss_fn, params, batch, has_aux=True)


class NnxBlock(nnx.Module):
  def __init__(self, rngs):
    self.emb = nnx.Embed(11, 8, rngs=rngs)
    self.att = nnx.MultiHeadAttention(num_heads=2, in_features=8, decode=False,
                                      rngs=rngs)
    self.out = nnx.Linear(8, 11, rngs=rngs)

  def __call__(self, ids):
    return self.out(self.att(self.emb(ids)))


def test_a_loss_fn_that_needs_concrete_values_gets_a_readable_error():
  """``float(x)`` on a traced value (a model that is not jit-traceable, as a
  third-party Swin's ``.item()``): the error says what failed, with JAX's
  message (JAX's error type does not take a message: on the Swin, the
  library's re-raise itself failed with an AttributeError)."""
  params = {"w": jnp.ones((3, 2))}
  batch = {"x": jnp.ones((4, 3)), "y": jnp.zeros((4,), jnp.int32)}

  def loss_fn(p, b):
    scale = float(p["w"].sum())        # concrete value needed
    return kfe.softmax_cross_entropy(scale * b["x"] @ p["w"], b["y"])

  with pytest.raises(ValueError, match=r"(?s)tracing loss_fn\(params, batch\) "
                     r"failed.*concrete value"):
    kfe.find_layers(loss_fn, params, batch)


def test_nnx_attention_and_embed():
  graphdef, state = nnx.split(NnxBlock(nnx.Rngs(0)))
  loss = lambda s, b: kfe.softmax_cross_entropy(nnx.merge(graphdef, s)(b["x"]),
                                                b["y"])
  ids = jnp.array([[1, 2, 3], [4, 5, 6]])
  found = {l.name: l.kind for l in kfe.find_layers(loss, state, {"x": ids,
                                                                 "y": ids})}
  assert found == {"emb": "embedding", "att/query": "dense", "att/key": "dense",
                   "att/value": "dense", "att/out": "dense", "out": "dense"}


class LM(nn.Module):
  """A small transformer LM: embedding, 2 pre-norm attention blocks."""
  vocab: int = 13
  d: int = 8
  tied: bool = True

  @nn.compact
  def __call__(self, ids):
    emb = nn.Embed(self.vocab, self.d)
    x = emb(ids)
    for _ in range(2):
      h = nn.LayerNorm()(x)
      x = x + nn.MultiHeadDotProductAttention(num_heads=2)(
          h, h, mask=nn.make_causal_mask(ids))
      h = nn.LayerNorm()(x)
      x = x + nn.Dense(self.d)(nn.gelu(nn.Dense(4 * self.d)(h)))
    x = nn.LayerNorm()(x)
    return emb.attend(x) if self.tied else nn.Dense(self.vocab)(x)


@pytest.mark.parametrize("tied", [False, True])
def test_small_transformer_lm_is_covered(tied):
  model = LM(tied=tied)
  ids = jnp.zeros((2, 5), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), ids)
  traced = tracing.trace_loss(_loss(model), params, {"x": ids, "y": ids})
  share = layers_lib.coverage(traced)
  assert share["kronecker"] >= 0.95, share
  assert share["fallback"] == 0.0


def test_nnx_lora_adapters_are_two_named_dense_layers():
  """Fine-tuning only the adapters of ``nnx.LoRA`` (the frozen base in the
  batch): ``lora_a`` and ``lora_b`` are two dense layers named by their
  paths (one module holds both), and the update equals that of the same
  network written as ``x @ W + (x @ A) @ B`` with plain arrays."""

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.LoRA(4, 2, 5, base_module=nnx.Linear(4, 5, rngs=rngs),
                         rngs=rngs, param_dtype=jnp.float64)
      self.head = nnx.Linear(5, 3, rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, x):
      return self.head(jnp.tanh(self.l1(x)))

  graphdef, lora, rest = nnx.split(Model(nnx.Rngs(0)), nnx.LoRAParam, ...)
  lora = jax.tree_util.tree_map(lambda p: p + 0.3, lora)   # lora_b starts at 0
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 4), jnp.float64)
  batch = {"x": x, "y": jnp.arange(8) % 3, "rest": rest}

  def nnx_loss(p, b):
    return kfe.softmax_cross_entropy(nnx.merge(graphdef, p, b["rest"])(b["x"]),
                                     b["y"])

  base = nnx.to_pure_dict(rest)
  plain_params = {k: v for k, v in nnx.to_pure_dict(lora)["l1"].items()}

  def plain_loss(p, b):
    h = jnp.tanh(b["x"] @ base["l1"]["base_module"]["kernel"]
                 + base["l1"]["base_module"]["bias"]
                 + (b["x"] @ p["lora_a"]) @ p["lora_b"])
    out = h @ base["head"]["kernel"] + base["head"]["bias"]
    return kfe.softmax_cross_entropy(out, b["y"])

  text = kfe.describe_layers(nnx_loss, lora, batch)
  assert "l1/lora_a  dense" in text and "l1/lora_b  dense" in text, text
  updates = []
  for loss, params in ((nnx_loss, lora), (plain_loss, plain_params)):
    tx = kfe.scale_by_kfac(loss, damping=0.05, ema_decay=0.0, fisher="empirical",
                           damping_mode="tikhonov", example_batch=batch)
    updates.append(tx.update(jax.grad(loss)(params, batch), tx.init(params),
                             params, batch=batch)[0])
  got = nnx.to_pure_dict(updates[0])["l1"]
  for name in ("lora_a", "lora_b"):
    np.testing.assert_allclose(got[name], updates[1][name], rtol=1e-10)
