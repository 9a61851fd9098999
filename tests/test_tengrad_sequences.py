"""TENGraD with the sequences as a layer's examples (float64): under a loss
with one example per position, a layer whose positions reach other
positions' losses but no other sequence's gets the exact block of its
sequences' gradients, ``(UUᵀ/(nR) + λI)⁻¹`` with ``U`` the per-sequence
gradients of the summed loss (``jax.jacobian`` of each sequence's summed
per-position losses) and R the losses per sequence; a layer whose
positions reach another sequence's losses still falls back."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_ext as kfe
from kfac_jax_ext import position_mixing
from kfac_jax_ext import tengrad_plan
from kfac_jax_ext import tracing

from test_tengrad_position_mixing import B, C, D, LAM, T, _CausalLM, _model


def _exact(per_sequence, params, grads, name, n=B):
  """``solve(Σ_{s<n} u_s u_sᵀ/(nR) + λI, ∇)`` for the leaf ``name`` from
  ``per_sequence(params) [B, R]``, the per-position losses by sequence."""
  jac = jax.jacobian(lambda p: per_sequence(p).sum(axis=1))(params)
  r = jax.eval_shape(per_sequence, params).shape[1]
  u = jac[name].reshape(B, -1)[:n]
  f = u.T @ u / (n * r)
  return jnp.linalg.solve(f + LAM * jnp.eye(f.shape[0]),
                          grads[name].reshape(-1)).reshape(grads[name].shape)


def _f64(tree):
  return jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), tree)


def _flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): x
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _update(loss, params, batch, gram_batch=16, fisher="empirical"):
  tx = kfe.scale_by_tengrad(loss, damping=LAM, fisher=fisher,
                            gram_batch=gram_batch, example_batch=batch)
  grads = jax.grad(loss)(params, batch)
  return grads, tx.update(grads, tx.init(params), params, batch=batch,
                          key=jax.random.PRNGKey(3))[0]


def _running_mean_task(across_batch=False):
  """A causal running mean over the positions (and, with ``across_batch``,
  the batch mean too); ``per_sequence(p) [B, T]``: the losses by
  sequence."""
  loss, params, batch, logits = _model(True, across_batch)
  per_sequence = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      logits(p, batch["x"]), batch["y"])
  return loss, params, batch, per_sequence


def _lm_task(model, seed):
  """``(loss, params, batch, per_sequence)`` of a flax language model on
  ``[B, T]`` ids of 7 symbols, the next id as the target (float64)."""
  ids = jax.random.randint(jax.random.PRNGKey(seed), (B, T), 0, 7)
  params = _f64(model.init(jax.random.PRNGKey(0), ids))
  batch = {"ids": ids, "y": jnp.roll(ids, -1, axis=1)}
  loss = lambda p, b: kfe.softmax_cross_entropy(
      model.apply(p, b["ids"]).reshape(-1, 7), b["y"].reshape(-1))
  per_sequence = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply(p, batch["ids"]), batch["y"])
  return loss, params, batch, per_sequence


@pytest.mark.parametrize("gram_batch", [16, 2])
def test_a_layer_mixing_within_sequences_gets_the_sequences_exact_block(
    gram_batch):
  loss, params, batch, per_sequence = _running_mean_task()
  traced = tracing.trace_loss(loss, params, batch)
  w, v = traced.layers
  assert position_mixing.mixes_positions(traced, w)
  assert position_mixing.sequence_examples(traced, w) == B
  assert tengrad_plan.layer_examples(w, traced) == B
  assert tengrad_plan.layer_examples(v, traced) == B * T   # the head: per token
  grads, updates = _update(loss, params, batch, gram_batch)
  n = min(gram_batch, B)
  np.testing.assert_allclose(
      updates["w"], _exact(per_sequence, params, grads, "w", n), rtol=1e-9,
      atol=1e-12)
  # the scale: R = T losses per sequence (without it the update differs)
  jac = jax.jacobian(lambda p: per_sequence(p).sum(axis=1))(params)
  u = jac["w"].reshape(B, -1)[:n]
  unscaled = jnp.linalg.solve(u.T @ u / n + LAM * jnp.eye(D * D),
                              grads["w"].reshape(-1))
  assert np.max(np.abs(updates["w"].reshape(-1) - unscaled)) > 1e-3


def test_a_layer_mixing_across_sequences_still_falls_back():
  loss, params, batch, _ = _running_mean_task(across_batch=True)
  traced = tracing.trace_loss(loss, params, batch)
  assert position_mixing.sequence_examples(traced, traced.layers[0]) is None
  with pytest.warns(UserWarning, match="w .*nor can its sequences be the examples"):
    grads, updates = _update(loss, params, batch)
  np.testing.assert_array_equal(updates["w"], grads["w"])   # fallback: identity


def test_flax_causal_lm_embedding_keys_values_per_sequence():
  """The embedding (an ``EmbeddingWoodbury`` block) and the attention's keys
  and values reach later positions' losses of their own sequence: their
  blocks are the sequences' exact ones; queries, output and head stay per
  position (exact against the per-position gradients). With these shapes
  the keys' dependence was hidden before the check perturbed the layer
  outputs (equal ids: equal keys and values, zero derivatives)."""
  loss, params, batch, per_sequence = _lm_task(_CausalLM(), 1)
  text = kfe.describe_layers(loss, params, batch, blocks="woodbury",
                             gram_batch=16)
  rows = {line.split()[0].split("/")[-1]: " ".join(line.split()[2:5])
          for line in text.splitlines() if line.startswith("params/")}
  assert rows["embed"] == "woodbury n=3 per", rows
  assert rows["key"] == rows["value"] == "woodbury n=3 per", rows
  assert rows["query"].startswith("woodbury n=12 ") and (
      "per" not in rows["query"]), rows
  grads, updates = _update(loss, params, batch)
  g, up = _flat(grads), _flat(updates)
  seq = per_sequence
  pos = lambda p: per_sequence(p).reshape(B * T, 1)
  for name in g:
    layer = name.split("/")[-2]
    if layer not in ("embed", "key", "value", "query", "head"):
      continue
    oracle = seq if layer in ("embed", "key", "value") else pos
    rebuilt = _exact_leaf(oracle, params, g, name)
    np.testing.assert_allclose(up[name], rebuilt, rtol=1e-8, atol=1e-11,
                               err_msg=name)


_JACOBIANS = {}   # per oracle function (kept alive here: no id reuse)


def _exact_leaf(per_group, params, g, name, i=None):
  """``_exact`` for a leaf named by its path (slice i of a stacked one); a
  kernel and its bias form one block, so the solve is over both. The
  oracle's Jacobian is computed once (jitted) per ``per_group``."""
  if per_group not in _JACOBIANS:
    _JACOBIANS[per_group] = _flat(jax.jit(jax.jacobian(
        lambda p: per_group(p).sum(axis=1)))(params))
  jac = _JACOBIANS[per_group]
  r = jax.eval_shape(per_group, params).shape[1]
  pick = (lambda x: x) if i is None else (lambda x: x[i])
  prefix = name.rsplit("/", 1)[0]
  names = [k for k in jac if k.rsplit("/", 1)[0] == prefix]
  u = jnp.concatenate([(jac[k] if i is None else jac[k][:, i]).reshape(
      jac[k].shape[0], -1) for k in names], 1)
  grad = jnp.concatenate([pick(g[k]).reshape(-1) for k in names])
  f = u.T @ u / (u.shape[0] * r)
  x = jnp.linalg.solve(f + LAM * jnp.eye(f.shape[0]), grad)
  start = 0
  for k in names:
    size = pick(g[k]).size
    if k == name:
      return x[start:start + size].reshape(pick(g[k]).shape)
    start += size
  raise AssertionError(name)


def test_per_pixel_loss_convs_get_the_images_blocks():
  """A segmentation-style conv net with one loss example per pixel: the
  first conv reaches its neighbours' losses, so its examples are the
  images; the second (the logits) reaches its own pixel's loss only."""
  ks = jax.random.split(jax.random.PRNGKey(2), 4)
  x = jax.random.normal(ks[0], (B, 5, 5, 2))
  y = jax.random.randint(ks[1], (B, 5, 5), 0, C)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = jnp.tanh(nn.Conv(4, (3, 3), name="c1")(x))
      return nn.Conv(C, (3, 3), name="c2")(h)

  model = Net()
  params = _f64(model.init(ks[2], x))
  loss = lambda p, b: kfe.softmax_cross_entropy(
      model.apply(p, b["x"]).reshape(-1, C), b["y"].reshape(-1))
  per_image = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      model.apply(p, x), y).reshape(B, -1)
  batch = {"x": x, "y": y}
  traced = tracing.trace_loss(loss, params, batch)
  assert [tengrad_plan.layer_examples(l, traced) for l in traced.layers] == [
      B, B * 25]
  per_pixel = lambda p: per_image(p).reshape(-1, 1)
  grads, updates = _update(loss, params, batch, gram_batch=B * 25)
  g, up = _flat(grads), _flat(updates)
  for name in g:
    oracle = per_image if "/c1/" in name else per_pixel
    np.testing.assert_allclose(up[name], _exact_leaf(oracle, params, g, name),
                               rtol=1e-8, atol=1e-11, err_msg=name)


def test_an_encoder_of_another_length_groups_by_sequence():
  """An encoder of ``T + 1`` positions feeding a decoder's ``T`` per-position
  losses: its tokens do not split over the loss examples, its sequences
  do."""
  ks = jax.random.split(jax.random.PRNGKey(4), 5)
  params = {"w": jax.random.normal(ks[0], (D, D)) / 2,
            "v": jax.random.normal(ks[1], (D, C)) / 2}
  batch = {"enc": jax.random.normal(ks[2], (B, T + 1, D)),
           "dec": jax.random.normal(ks[3], (B, T, D)),
           "y": jax.random.randint(ks[4], (B, T), 0, C)}

  def logits(p, b):
    context = jnp.mean(jnp.tanh(b["enc"] @ p["w"]), axis=1, keepdims=True)
    return (b["dec"] + context) @ p["v"]

  loss = lambda p, b: kfe.softmax_cross_entropy(logits(p, b).reshape(-1, C),
                                                b["y"].reshape(-1))
  per_sequence = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      logits(p, batch), batch["y"])
  traced = tracing.trace_loss(loss, params, batch)
  assert tengrad_plan.layer_examples(traced.layers[0], traced) == B
  grads, updates = _update(loss, params, batch)
  np.testing.assert_allclose(updates["w"], _exact(per_sequence, params, grads,
                                                  "w"), rtol=1e-9, atol=1e-12)


class _TiedLM(nn.Module):
  """GPT-style: the token table also computes the logits (``attend``);
  pre-norm residual block (scale-and-shift layers are never candidates)."""

  @nn.compact
  def __call__(self, ids):
    embed = nn.Embed(7, 8, name="embed")
    h = embed(ids)
    h = h + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8,
                                            name="attn")(
        nn.LayerNorm()(h), mask=nn.make_causal_mask(ids))
    return embed.attend(nn.LayerNorm()(h))


def test_a_tied_table_groups_all_its_uses_by_sequence():
  """The table's lookup reaches later positions' losses (through the
  attention), its ``attend`` its own: the tied block sums both uses'
  gradients per sequence."""
  loss, params, batch, per_sequence = _lm_task(_TiedLM(), 5)
  traced = tracing.trace_loss(loss, params, batch)
  (tied,) = [l for l in traced.layers if l.kind == "tied"]
  assert tengrad_plan.layer_examples(tied, traced) == B
  grads, updates = _update(loss, params, batch)
  g, up = _flat(grads), _flat(updates)
  name = "params/embed/embedding"
  np.testing.assert_allclose(up[name], _exact_leaf(per_sequence, params, g, name),
                             rtol=1e-8, atol=1e-11)


class _RecurrentLM(nn.Module):
  @nn.compact
  def __call__(self, ids):
    h = nn.Embed(7, 6, name="embed")(ids)
    h = nn.RNN(nn.LSTMCell(6, param_dtype=h.dtype), name="rnn")(h)
    return nn.Dense(7, name="head")(h)


class _Block(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    mask = nn.make_causal_mask(jnp.ones(h.shape[:2]))
    h = h + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=6,
                                            name="attn")(h, mask=mask)
    return h + nn.Dense(6, name="mlp")(jnp.tanh(h)), None


class _ScannedLM(nn.Module):
  """Two causal attention blocks scanned over (``nn.scan``, stacked
  kernels)."""

  @nn.compact
  def __call__(self, ids):
    h = nn.Embed(7, 6, name="embed")(ids)
    stack = nn.scan(_Block, variable_axes={"params": 0},
                    split_rngs={"params": True}, length=2)
    h, _ = stack(name="blocks")(h, None)
    return nn.Dense(7, name="head")(h)


@pytest.mark.parametrize("model", [_RecurrentLM(), _ScannedLM()],
                         ids=["lstm", "scanned_stack"])
def test_layers_in_scans_under_a_per_step_loss_group_by_sequence(model):
  """An LSTM cell's kernels (shared by the steps) and a scanned stack's
  kernels reach later positions' losses: before, they got per-position
  blocks (the check skipped layers in scans); now their sequences are
  their examples, exact per leaf; the head stays per position."""
  loss, params, batch, per_sequence = _lm_task(model, 7)
  per_position = lambda p: per_sequence(p).reshape(B * T, 1)
  traced = tracing.trace_loss(loss, params, batch)
  examples = {l.name: tengrad_plan.layer_examples(l, traced)
              for l in traced.layers if l.kind != "scale_and_shift"}
  assert examples.pop("params/head") == B * T
  assert set(examples.values()) == {B}, examples
  grads, updates = _update(loss, params, batch)
  g, up = _flat(grads), _flat(updates)
  for name in g:
    if "/blocks/" in name:   # a stacked kernel: one block per slice
      for i in range(2):
        np.testing.assert_allclose(
            up[name][i], _exact_leaf(per_sequence, params, g, name, i),
            rtol=1e-8, atol=1e-11, err_msg=f"{name}[{i}]")
      continue
    oracle = per_position if "/head/" in name else per_sequence
    np.testing.assert_allclose(up[name], _exact_leaf(oracle, params, g, name),
                               rtol=1e-8, atol=1e-11, err_msg=name)


def test_sampled_per_sequence_gram_averages_to_the_per_position_fisher():
  """With ``fisher="sampled"`` the stored per-sequence gradients (over
  ``√R``) give ``UUᵀ/n`` whose mean over the drawn targets is the
  per-position Fisher ``(1/M) Σ_k J_kᵀ (diag p_k − p_k p_kᵀ) J_k``: the
  cross terms between a sequence's positions vanish in expectation.
  Monte Carlo over 3000 keys (deterministic keys); without the ``1/R``
  the mean would be R = 4 times too large."""
  loss, params, batch, _ = _running_mean_task()
  _, _, _, logits = _model(True, False)
  tx = kfe.scale_by_tengrad(loss, damping=LAM, gram_batch=16, example_batch=batch)
  grads = jax.grad(loss)(params, batch)
  state = tx.init(params)

  @jax.jit
  def gram(key):
    blocks = tx.update(grads, state, params, batch=batch, key=key)[1].blocks
    u = blocks[1].per_example[:B].reshape(B, -1)   # leaf 1: "w" (v, w order)
    return u.T @ u / B

  keys = jax.random.split(jax.random.PRNGKey(11), 3000)
  mean = jnp.mean(jax.lax.map(gram, keys), axis=0)
  jac = jax.jacobian(lambda w: logits(dict(params, w=w), batch["x"]))(
      params["w"]).reshape(B * T, C, -1)
  p = jax.nn.softmax(logits(params, batch["x"]).reshape(B * T, C))
  h = jax.vmap(jnp.diag)(p) - p[:, :, None] * p[:, None, :]
  fisher = jnp.einsum("kcp,kcd,kdq->pq", jac, h, jac) / (B * T)
  err = jnp.linalg.norm(mean - fisher) / jnp.linalg.norm(fisher)
  assert err < 0.08, err
