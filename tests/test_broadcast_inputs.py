"""A learned input broadcast over the batch gets a diagonal block.

Perceiver latents and DETR-style queries (``broadcast_to(q, [N, L, D])``
read by a LayerNorm and a residual), and ViT's ``cls`` token (broadcast and
concatenated with the patches, or ``jnp.tile``-d as ``vit_jax`` does) are
a shift of zeros: the per-example gradient of the leaf is the gradient at
its broadcast, and the block is the diagonal ``Σ_n u_n² / M`` of those,
exact against ``vmap(grad)``. Before, they fell back to the identity
("transformed before use", or "used by 'tile'").
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_ext as kfe

LAM = 0.05


class _Latents(nn.Module):
  @nn.compact
  def __call__(self, x):
    lat = self.param("latents", nn.initializers.normal(0.5), (3, 4),
                     jnp.float64)
    q = jnp.broadcast_to(lat, (x.shape[0],) + lat.shape)
    kv = nn.Dense(4, param_dtype=jnp.float64)(x)
    h = q + nn.MultiHeadDotProductAttention(
        2, param_dtype=jnp.float64)(nn.LayerNorm(param_dtype=jnp.float64)(q), kv)
    return nn.Dense(3, param_dtype=jnp.float64)(h.mean(axis=1))


class _ClsToken(nn.Module):
  tile: bool = False   # vit_jax's jnp.tile(cls, [n, 1, 1])

  @nn.compact
  def __call__(self, x):
    cls = self.param("cls", nn.initializers.normal(0.5), (1, 1, 4), jnp.float64)
    h = nn.Dense(4, param_dtype=jnp.float64)(x)
    cls = (jnp.tile(cls, [x.shape[0], 1, 1]) if self.tile
           else jnp.broadcast_to(cls, (x.shape[0], 1, 4)))
    h = jnp.concatenate([cls, h], axis=1)
    h = nn.LayerNorm(param_dtype=jnp.float64)(h)
    h = nn.MultiHeadDotProductAttention(2, param_dtype=jnp.float64)(h)
    return nn.Dense(3, param_dtype=jnp.float64)(h[:, 0])


@pytest.mark.parametrize("model,leaf", [(_Latents(), "latents"),
                                        (_ClsToken(), "cls"),
                                        (_ClsToken(tile=True), "cls")])
def test_learned_input_has_the_exact_per_example_diagonal(model, leaf):
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 5, 3), jnp.float64)
  batch = {"x": x, "y": jnp.arange(6) % 3}
  params = model.init(jax.random.PRNGKey(1), x)
  loss = lambda p, b: kfe.softmax_cross_entropy(model.apply(p, b["x"]), b["y"])
  text = kfe.describe_layers(loss, params, batch)
  row = next(r for r in text.splitlines() if r.startswith(f"params/{leaf} "))
  assert "fallback 0.0%" in text and "scale_and_shift" in row, text
  tx = kfe.scale_by_kfac(loss, damping=LAM, ema_decay=0.0, fisher="empirical",
                         example_batch=batch)
  grads = jax.grad(loss)(params, batch)
  got = tx.update(grads, tx.init(params), params, batch=batch)[0]["params"][leaf]
  per_example = jax.vmap(jax.grad(lambda p, xi, yi: -jax.nn.log_softmax(
      model.apply(p, xi[None])[0])[yi]), (None, 0, 0))(params, x, batch["y"])
  diag = jnp.mean(per_example["params"][leaf] ** 2, axis=0)
  g = grads["params"][leaf]
  np.testing.assert_allclose(got, g / (diag + LAM), rtol=1e-10)


def test_dense_layer_fed_a_learned_input_is_a_dense_layer():
  """Latents fed straight to a projection (no LayerNorm first): the
  projection's input is the broadcast parameter, which cannot be a kernel
  (its elements repeat), so the projection is a dense layer whose update
  equals the same network's with the latents given as data; the latents
  keep their exact per-example diagonal."""
  proj, head = (nn.Dense(5, param_dtype=jnp.float64),
                nn.Dense(3, param_dtype=jnp.float64))
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 3, 4), jnp.float64)
  lat = jax.random.normal(jax.random.PRNGKey(1), (3, 4), jnp.float64)
  params = {"lat": lat,
            "proj": proj.init(jax.random.PRNGKey(2), lat)["params"],
            "head": head.init(jax.random.PRNGKey(3), jnp.ones((1, 5)))["params"]}
  batch = {"x": x, "y": jnp.arange(6) % 3}

  def logits(p, x, queries):
    h = proj.apply({"params": p["proj"]}, queries) * jnp.tanh(x[..., :1])
    return head.apply({"params": p["head"]}, jnp.tanh(h).mean(axis=1))

  learned = lambda p, b: kfe.softmax_cross_entropy(logits(
      p, b["x"], jnp.broadcast_to(p["lat"], b["x"].shape)), b["y"])
  as_data = lambda p, b: kfe.softmax_cross_entropy(logits(
      p, b["x"], b["queries"]), b["y"])
  data_batch = dict(batch, queries=jnp.broadcast_to(lat, x.shape))
  without_lat = {k: v for k, v in params.items() if k != "lat"}
  updates = []
  for loss, b, p in ((learned, batch, params),
                     (as_data, data_batch, without_lat)):
    text = kfe.describe_layers(loss, p, b)
    row = next(r for r in text.splitlines() if r.startswith("proj "))
    assert "kronecker 5x5" in row and "fallback 0.0%" in text, text
    tx = kfe.scale_by_kfac(loss, damping=LAM, ema_decay=0.0,
                           fisher="empirical", example_batch=b)
    grads = jax.grad(loss)(p, b)
    updates.append((tx.update(grads, tx.init(p), p, batch=b)[0], grads))
  (got, grads), (want, _) = updates
  for name in ("proj", "head"):
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-9, atol=1e-12), got[name], want[name])
  per_example = jax.vmap(jax.grad(lambda p, xi, yi: learned(
      p, {"x": xi[None], "y": yi[None]})), (None, 0, 0))(params, x, batch["y"])
  diag = jnp.mean(per_example["lat"] ** 2, axis=0)
  np.testing.assert_allclose(got["lat"], grads["lat"] / (diag + LAM),
                             rtol=1e-10)
