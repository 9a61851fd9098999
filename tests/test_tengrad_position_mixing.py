"""TENGraD under a loss with one example per position (float64): a layer whose
output at one position reaches other positions' losses, and other
sequences' too, gets no Woodbury block (its per-example gradients are not
in the summed loss's statistics; within its sequence only, the sequences
are its examples: ``test_tengrad_sequences.py``), one that does not keeps
its exact block, checked against
``solve(UᵀU/n + λI, ∇)`` with ``U`` the per-position losses' gradients from
``jax.jacobian``."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_ext as kfe
from kfac_jax_ext import position_mixing
from kfac_jax_ext import tracing

B, T, D, C = 3, 4, 5, 3
LAM = 0.05


def _model(running_mean: bool, batch_mean: bool):
  """``(loss, params, batch, logits)``: ``h = tanh(x w)``, mixed along the
  positions by a causal running mean and/or across the batch by its mean,
  then a head; one loss example per position."""
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  params = {"w": jax.random.normal(ks[0], (D, D)) / 2,
            "v": jax.random.normal(ks[1], (D, C)) / 2}
  batch = {"x": jax.random.normal(ks[2], (B, T, D)),
           "y": jax.random.randint(ks[3], (B, T), 0, C)}

  def logits(p, x):   # [B, T, C]
    h = jnp.tanh(x @ p["w"])
    if running_mean:   # position t sees positions <= t
      h = jnp.cumsum(h, axis=1) / jnp.arange(1, T + 1)[None, :, None]
    if batch_mean:     # no sequence is on its own
      h = h + jnp.mean(h, axis=0, keepdims=True)
    return h @ p["v"]

  def loss(p, b):
    return kfe.softmax_cross_entropy(logits(p, b["x"]).reshape(-1, C),
                                     b["y"].reshape(-1))
  return loss, params, batch, logits


def _task(mix: bool):
  loss, params, batch, logits = _model(mix, mix)
  per_position = lambda p: optax.softmax_cross_entropy_with_integer_labels(
      logits(p, batch["x"]).reshape(-1, C), batch["y"].reshape(-1))
  return loss, params, batch, jax.jacobian(per_position)(params)


def _exact(jac, grads, name):
  u = jac[name].reshape(B * T, -1)
  return jnp.linalg.solve(u.T @ u / (B * T) + LAM * jnp.eye(u.shape[1]),
                          grads[name].reshape(-1)).reshape(grads[name].shape)


def _tengrad(loss, params, batch):
  tx = kfe.scale_by_tengrad(loss, damping=LAM, fisher="empirical", gram_batch=16,
                            example_batch=batch)
  grads = jax.grad(loss)(params, batch)
  return grads, tx.update(grads, tx.init(params), params, batch=batch)[0]


def test_positions_that_do_not_mix_keep_exact_blocks():
  loss, params, batch, jac = _task(mix=False)
  traced = tracing.trace_loss(loss, params, batch)
  assert not any(position_mixing.mixes_positions(traced, l) for l in traced.layers)
  grads, updates = _tengrad(loss, params, batch)
  for name in ("w", "v"):
    np.testing.assert_allclose(updates[name], _exact(jac, grads, name),
                               rtol=1e-9, atol=1e-12)


def test_a_layer_whose_positions_mix_falls_back_and_the_head_stays_exact():
  loss, params, batch, jac = _task(mix=True)
  traced = tracing.trace_loss(loss, params, batch)
  mixing = {l.name: position_mixing.mixes_positions(traced, l)
            for l in traced.layers}
  assert mixing == {"w": True, "v": False}, mixing
  with pytest.warns(UserWarning, match="w .*reaches the losses at other positions"):
    grads, updates = _tengrad(loss, params, batch)
  np.testing.assert_array_equal(updates["w"], grads["w"])   # fallback: identity
  np.testing.assert_allclose(updates["v"], _exact(jac, grads, "v"), rtol=1e-9,
                             atol=1e-12)
  # natural_gradient gives the mixing layer its Kronecker block instead
  chosen = kfe.natural_gradient_transform.choose_blocks(traced, "woodbury")
  assert chosen[traced.layers[0].kernel] == "kronecker"


class _CausalLM(nn.Module):
  @nn.compact
  def __call__(self, ids):
    h = nn.Embed(7, 8, name="embed")(ids)
    h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8,
                                        name="attn")(
        h, mask=nn.make_causal_mask(ids))
    return nn.Dense(7, name="head")(h)


def test_flax_causal_attention_keys_values_and_embedding_mix():
  """Under causal self-attention a position's key and value (and the
  embedding feeding them) reach later positions' losses; its query, the
  attention's output projection and the head reach only its own."""
  ids = jax.random.randint(jax.random.PRNGKey(1), (2, 5), 0, 7)
  model = _CausalLM()
  params = model.init(jax.random.PRNGKey(0), ids)
  batch = {"ids": ids, "y": jnp.roll(ids, -1, axis=1)}
  loss = lambda p, b: kfe.softmax_cross_entropy(
      model.apply(p, b["ids"]).reshape(-1, 7), b["y"].reshape(-1))
  traced = tracing.trace_loss(loss, params, batch)
  mixing = {l.name.split("/")[-1]: position_mixing.mixes_positions(traced, l)
            for l in traced.layers}
  assert {name for name, mixes in mixing.items() if mixes} == {
      "embed", "key", "value"}, mixing
  assert {"query", "out", "head"} <= set(mixing)
  # their sequences are their examples instead (tests/test_tengrad_sequences.py)
  assert all(position_mixing.sequence_examples(traced, l) == 2
             for l in traced.layers if mixing[l.name.split("/")[-1]])
