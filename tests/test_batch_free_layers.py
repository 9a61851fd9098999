"""Layers whose output does not depend on the batch (``batch_free.py``).

A GPT position embedding ``nn.Embed(T, D)(jnp.arange(T))``, a T5 relative
position bias (``nn.Embed`` at constant buckets, added to the attention
logits), a Swin bias table gathered at a constant index, a position MLP on
a constant grid: each is the same function as the layer applied to its
constants broadcast over the batch first, and must get that layer's
statistics, for every method (float64, equal updates). Before, they were
read at their own output, where the gradient is the sum over the examples,
and got a wrong block without a word. A batch-free layer that meets the
batch other than through an addition gets no block and says why; one of a
batch of one with the positions summed is exact against ``u uᵀ``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_ext as kfe
from tests import test_conv_dims

N, T, D, V, H = 4, 5, 6, 7, 2
F64 = dict(param_dtype=jnp.float64)

_METHODS = test_conv_dims._METHODS   # the five methods, damping 0.1


def _buckets(n):
  rel = np.arange(n)[None, :] - np.arange(n)[:, None]
  return jnp.asarray(np.clip(rel, -2, 1) + 2)     # 4 buckets


class _Net(nn.Module):
  """``kind``'s batch-free layer, or (``per_example``) the same layer on its
  constants broadcast over the batch first."""
  kind: str
  per_example: bool

  def _each(self, c, n):
    return jnp.broadcast_to(c, (n,) + c.shape) if self.per_example else c

  @nn.compact
  def __call__(self, ids):
    n = ids.shape[0]
    h = nn.Embed(V, D, name="tokens", **F64)(ids)               # [N, T, D]
    if self.kind == "gpt":
      h = h + nn.Embed(T, D, name="positions", **F64)(self._each(jnp.arange(T), n))
    elif self.kind == "position_mlp":
      t = jnp.arange(T, dtype=jnp.float64)
      grid = jnp.stack([jnp.sin(0.7 * t), jnp.cos(0.3 * t)], -1)   # [T, 2]
      h = h + nn.Dense(D, name="positions", **F64)(self._each(grid, n))
    elif self.kind == "per_head":    # [T, D] added after splitting heads
      pos = nn.Embed(T, D, name="positions", **F64)(self._each(jnp.arange(T), n))
      h = (h.reshape(n, T, H, D // H) + pos.reshape(pos.shape[:-1] + (H, D // H))
           ).reshape(n, T, D)
    if self.kind == "per_head":    # per token, no attention: TENGraD's block
      return nn.Dense(V, name="head", **F64)(jnp.tanh(nn.Dense(D, **F64)(h)))
    q = nn.DenseGeneral((H, D // H), name="q", **F64)(h)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, q) / 2.0
    if self.kind == "t5":
      bias = nn.Embed(4, H, name="positions", **F64)(self._each(_buckets(T), n))
      logits = logits + (jnp.moveaxis(bias, -1, -3) if self.per_example
                         else jnp.transpose(bias, (2, 0, 1))[None])
    elif self.kind == "swin":
      table = self.param("positions", nn.initializers.normal(0.5),
                         (4, H), jnp.float64)
      bias = table[self._each(_buckets(T).reshape(-1), n)]    # [(N,) T·T, H]
      bias = bias.reshape(bias.shape[:-2] + (T, T, H))
      logits = logits + (jnp.moveaxis(bias, -1, -3) if self.per_example
                         else jnp.transpose(bias, (2, 0, 1))[None])
    h = h + jnp.einsum("bhqk,bkd->bqd", jax.nn.softmax(logits), h)
    h = jnp.tanh(nn.Dense(D, name="mlp", **F64)(h))
    return nn.Dense(3, name="head", **F64)(h.mean(1))


def _task(kind, per_example):
  ks = jax.random.split(jax.random.PRNGKey(0), 2)
  ids = jax.random.randint(ks[0], (N, T), 0, V)
  y = jax.random.randint(ks[1], (N, T) if kind == "per_head" else (N,), 0, 3)
  net = _Net(kind, per_example)
  params = net.init(jax.random.PRNGKey(1), ids)

  def loss(p, b):
    out = net.apply(p, b["ids"])
    return kfe.softmax_cross_entropy(out.reshape(-1, out.shape[-1]),
                                     b["y"].reshape(-1))
  return loss, params, {"ids": ids, "y": y}


def _equal_updates(method, variants):
  """Each ``(loss, params, batch)`` of ``variants`` has every parameter in a
  block, and ``method`` gives them equal updates."""
  updates = []
  for loss, params, batch in variants:
    text = kfe.describe_layers(loss, params, batch)
    assert "fallback 0.0%" in text, text
    opt = _METHODS[method](loss, batch)
    updates.append(opt.update(jax.grad(loss)(params, batch), opt.init(params),
                              params, batch=batch, key=jax.random.PRNGKey(2))[0])
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-8, atol=1e-11), *updates)
  return updates


# The per-example reading is in the statistics pass every method shares: K-FAC
# on every kind, each other method on one (TENGraD also under a per-token
# loss, where its position-mixing guard reads the mapped gradients).
_CASES = [("kfac", k) for k in ("gpt", "t5", "swin", "position_mlp")] + [
    ("tkfac", "position_mlp"), ("tengrad", "t5"), ("tengrad", "per_head"),
    ("two_level", "position_mlp"), ("natural_gradient", "gpt")]


@pytest.mark.parametrize("method,kind", _CASES)
def test_batch_free_layer_equals_the_layer_on_broadcast_constants(method, kind):
  updates = _equal_updates(method, [_task(kind, e) for e in (False, True)])
  moved = jax.tree_util.tree_leaves(updates[0]["params"]["positions"])[0]
  assert float(jnp.max(jnp.abs(moved))) > 1e-3


def test_layer_reads_as_per_example_in_describe_layers():
  loss, params, batch = _task("t5", False)
  row = next(line for line in kfe.describe_layers(loss, params, batch).splitlines()
             if line.startswith("params/positions"))
  assert f"({N}, {T}, {T}, 1)" in row and f"({N}, {T}, {T}, {H})" in row, row


def test_reduce_is_exact_for_one_example_with_the_positions_summed():
  """A linear position MLP on a constant ``[R, 2]`` grid added to the data's
  projection, summed over positions, square loss, one example: K-FAC-reduce
  is ``u uᵀ`` exactly (Eschenhagen et al.'s oracle), as for a layer fed per
  example. Before, the layer had no example axis and 'reduce' raised."""
  r, lam = 5, 0.03
  ks = jax.random.split(jax.random.PRNGKey(0), 5)
  params = {"w": jax.random.normal(ks[0], (2, 4), jnp.float64),
            "b": jax.random.normal(ks[1], (4,), jnp.float64),
            "wx": jax.random.normal(ks[2], (3, 4), jnp.float64),
            "out": jax.random.normal(ks[3], (4, 2), jnp.float64)}
  grid = jnp.stack([jnp.linspace(-1, 2, r), jnp.linspace(0, 2, r) ** 2], -1)

  def loss(p, b):
    s = b["x"] @ p["wx"] + (grid @ p["w"] + p["b"])       # [1, R, 4]
    return kfe.squared_error(s.sum(1) @ p["out"], b["y"])

  batch = {"x": jax.random.normal(ks[4], (1, r, 3), jnp.float64),
           "y": jnp.array([[0.3, -1.0]])}
  tx = kfe.scale_by_kfac(loss, damping=lam, damping_mode="tikhonov",
                         ema_decay=0.0, fisher="empirical", inverse_every=1,
                         weight_sharing="reduce", example_batch=batch)
  g = jax.grad(loss)(params, batch)
  got = tx.update(g, tx.init(params), params, batch=batch)[0]
  u = jnp.concatenate([g["w"].ravel(), g["b"]])
  want = jnp.linalg.solve(jnp.outer(u, u) + lam * jnp.eye(u.size), u)
  np.testing.assert_allclose(jnp.concatenate([got["w"].ravel(), got["b"]]),
                             want, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("meets", ["logistic", "mul"])
def test_batch_free_layer_meeting_the_batch_otherwise_gets_a_reason(meets):
  """Swin V2's position MLP ends in ``16·sigmoid`` before the addition, a
  learned gate multiplies: no per-example reading, so no block (before: a
  block from the gradient summed over the examples)."""
  grid = jnp.linspace(-1, 1, T)[:, None]

  def loss(p, b):
    pos = grid @ p["w"]                                    # [T, D]
    h = (b["x"] + 16 * jax.nn.sigmoid(pos) if meets == "logistic"
         else b["x"] * pos)
    return kfe.softmax_cross_entropy(h.mean(1) @ p["head"], b["y"])

  params = {"w": jnp.ones((1, D)), "head": jnp.ones((D, 3))}
  batch = {"x": jnp.ones((N, T, D)), "y": jnp.zeros((N,), jnp.int32)}
  text = kfe.describe_layers(loss, params, batch)
  assert "does not depend on the batch" in text and f"'{meets}'" in text, text
  layers = text.split("Parameters no layer owns")[0]
  assert not any(line.split()[:1] == ["w"] for line in layers.splitlines()), text


@pytest.mark.parametrize("method,stack", [("kfac", "scan"), ("tengrad", "scan"),
                                          ("kfac", "loop")])
def test_bias_computed_once_and_added_in_every_layer(method, stack):
  """T5's encoder computes the relative position bias once and every layer
  adds it to its logits, in a Python loop or a ``lax.scan`` over the layers
  (closed over by the scan); its per-example gradient sums the layers'
  (equal to the bias broadcast over the batch first)."""
  ks = jax.random.split(jax.random.PRNGKey(0), 5)
  params = {"rel": jax.random.normal(ks[0], (4, H), jnp.float64),
            "emb": jax.random.normal(ks[1], (V, D), jnp.float64),
            "wq": jax.random.normal(ks[2], (3, D, D), jnp.float64) / np.sqrt(D),
            "head": jax.random.normal(ks[3], (D, 3), jnp.float64)}
  batch = {"ids": jax.random.randint(ks[4], (N, T), 0, V),
           "y": jnp.arange(N) % 3}

  def make_loss(per_example):
    def loss(p, b):
      n = b["ids"].shape[0]
      buckets = _buckets(T)
      if per_example:
        buckets = jnp.broadcast_to(buckets, (n, T, T))
      bias = jnp.moveaxis(p["rel"][buckets], -1, -3)      # [(N,) H, T, T]

      def layer(h, wq):
        q = (h @ wq).reshape(n, T, H, D // H)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, q) + bias
        return h + jnp.einsum("bhqk,bkd->bqd", jax.nn.softmax(logits), h), None

      h = p["emb"][b["ids"]]
      if stack == "scan":
        h, _ = jax.lax.scan(layer, h, p["wq"])
      else:
        for wq in p["wq"]:
          h, _ = layer(h, wq)
      return kfe.softmax_cross_entropy(jnp.tanh(h).mean(1) @ p["head"], b["y"])
    return loss

  _equal_updates(method, [(make_loss(e), params, batch) for e in (False, True)])
