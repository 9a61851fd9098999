"""TENGraD on layers with several blocks or shared steps (float64): a kernel
scanned over (one block per slice), a grouped conv (one per group) and a
kernel closed over by a scan body (one block whose per-example gradient sums
the steps), each against ``solve(λI + UUᵀ/n, ∇)`` with ``U`` from
``vmap(grad)``."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_ext as kfe
from kfac_jax_ext import tracing

LAM = 0.05
N, L, D, T = 6, 3, 4, 5


def _per_example_grads(loss, params, batch):
  one = lambda p, b: loss(p, jax.tree_util.tree_map(lambda x: x[None], b))
  return jax.vmap(jax.grad(one), (None, 0))(params, batch)


def _solve(u_parts, v_parts):
  """``solve(λI + UUᵀ/n, v)`` with ``U``'s rows and ``v`` concatenated from
  the parts (``u_parts``: ``[n, ...]`` each)."""
  u = jnp.concatenate([x.reshape(N, -1) for x in u_parts], axis=1)
  v = jnp.concatenate([x.reshape(-1) for x in v_parts])
  delta = jnp.linalg.solve(u.T @ u / N + LAM * jnp.eye(u.shape[1]), v)
  out, start = [], 0
  for x in v_parts:
    out.append(delta[start:start + x.size].reshape(x.shape))
    start += x.size
  return out


def _tengrad(loss, params, batch, **options):
  tx = kfe.scale_by_tengrad(loss, damping=LAM, fisher="empirical", gram_batch=8,
                            example_batch=batch, **options)
  grads = jax.grad(loss)(params, batch)
  updates, state = jax.jit(lambda g: tx.update(g, tx.init(params), params,
                                               batch=batch))(grads)
  return grads, updates, state


def _assert_exact_blocks(loss, params, batch, names):
  """TENGraD's update of each leaf in ``names`` (a whole layer each) is
  ``solve(λI + UUᵀ/n, ∇)`` of that leaf, and no refresh failed."""
  grads, updates, state = _tengrad(loss, params, batch)
  assert int(state.health.failed_inverses) == 0
  u = _per_example_grads(loss, params, batch)
  for name in names:
    (want,) = _solve([u[name]], [grads[name]])
    np.testing.assert_allclose(updates[name], want, rtol=1e-9, atol=1e-12)


def _labels(seed=2, classes=2):
  return jax.random.randint(jax.random.PRNGKey(seed), (N,), 0, classes)


@pytest.mark.parametrize("tokens", [1, 3])
def test_scan_over_layers_has_an_exact_woodbury_block_per_slice(tokens):
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  params = {"k": jax.random.normal(ks[0], (L, D, D)) / 2,
            "b": 0.1 * jax.random.normal(ks[1], (L, D)),
            "out": jax.random.normal(ks[2], (D, 2))}
  shape = (N, D) if tokens == 1 else (N, tokens, D)
  batch = {"x": jax.random.normal(ks[3], shape), "y": _labels()}

  def loss(p, b):
    h, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w["k"] + w["b"]), None),
                        b["x"], {"k": p["k"], "b": p["b"]})
    h = h if tokens == 1 else h.mean(axis=1)
    return kfe.softmax_cross_entropy(h @ p["out"], b["y"])

  grads, updates, state = _tengrad(loss, params, batch)
  assert int(state.health.failed_inverses) == 0
  assert state.blocks[1].gram_inverse.shape == (L, 8, 8)   # k: one per slice
  u = _per_example_grads(loss, params, batch)
  for i in range(L):
    want_k, want_b = _solve([u["k"][:, i], u["b"][:, i]],
                            [grads["k"][i], grads["b"][i]])
    np.testing.assert_allclose(updates["k"][i], want_k, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(updates["b"][i], want_b, rtol=1e-9, atol=1e-12)
  (want_out,) = _solve([u["out"]], [grads["out"]])
  np.testing.assert_allclose(updates["out"], want_out, rtol=1e-9, atol=1e-12)


class _GroupedCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(6, (3, 3), feature_group_count=2, name="g")(x))
    return nn.Dense(3, name="out")(x.reshape(x.shape[0], -1))


def test_grouped_conv_has_an_exact_woodbury_block_per_group():
  model = _GroupedCNN()
  x = jax.random.normal(jax.random.PRNGKey(0), (N, 5, 5, 4), jnp.float64)
  params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64),
                                  model.init(jax.random.PRNGKey(1), x))
  batch = {"x": x, "y": _labels(classes=3)}
  loss = lambda p, b: kfe.softmax_cross_entropy(model.apply(p, b["x"]), b["y"])
  grads, updates, _ = _tengrad(loss, params, batch)
  u = _per_example_grads(loss, params, batch)["params"]["g"]
  g, up = grads["params"]["g"], updates["params"]["g"]
  for j in range(2):   # group j: output channels 3j..3j+2
    cols = slice(3 * j, 3 * j + 3)
    want_k, want_b = _solve([u["kernel"][..., cols], u["bias"][:, cols]],
                            [g["kernel"][..., cols], g["bias"][cols]])
    np.testing.assert_allclose(up["kernel"][..., cols], want_k, rtol=1e-9,
                               atol=1e-12)
    np.testing.assert_allclose(up["bias"][cols], want_b, rtol=1e-9, atol=1e-12)
  text = kfe.describe_layers(loss, params, batch, blocks="woodbury",
                             gram_batch=8)
  assert "2x woodbury n=6 19x3" in text       # n = min(gram_batch, M)
  assert "woodbury 100.0%" in text


@pytest.mark.parametrize("per_step_loss", [False, True])
def test_recurrent_kernel_is_one_woodbury_block_over_the_steps(per_step_loss):
  ks = jax.random.split(jax.random.PRNGKey(4), 3)
  params = {"wh": jax.random.normal(ks[0], (D, D)) / 2,
            "out": jax.random.normal(ks[1], (D, 2))}
  batch = {"x": jax.random.normal(ks[2], (N, T, D)), "y": _labels()}

  def loss(p, b):
    step = lambda h, x: (jnp.tanh(h @ p["wh"] + x),) * 2
    h0 = jnp.zeros((b["x"].shape[0], D))
    h, hs = jax.lax.scan(step, h0, jnp.swapaxes(b["x"], 0, 1))
    if per_step_loss:   # the mean over steps of each example's loss
      logits = jnp.swapaxes(hs, 0, 1) @ p["out"]
      return kfe.softmax_cross_entropy(logits.mean(axis=1), b["y"])
    return kfe.softmax_cross_entropy(h @ p["out"], b["y"])

  _assert_exact_blocks(loss, params, batch, ("wh", "out"))


def test_time_major_tokens_get_no_woodbury_block():
  """A dense layer over ``[T, N, D]``: its tokens are not grouped by
  example, so TENGraD cannot form per-example gradients and says so."""
  params = {"w": jnp.ones((D, 2)) / D}
  batch = {"x": jax.random.normal(jax.random.PRNGKey(0), (T, N, D)),
           "y": _labels()}
  loss = lambda p, b: kfe.softmax_cross_entropy((b["x"] @ p["w"]).mean(0),
                                                b["y"])
  with pytest.warns(UserWarning, match="not grouped by example"):
    _tengrad(loss, params, batch)


def test_kernel_axes_before_the_examples_get_a_woodbury_block():
  """A kernel that is ``dot_general``'s first operand puts its output axes
  first (``[F, N, T]``, as Gemma's ``"BTD,CKDH->CBTKH"`` does): the examples
  are the first axis after them, so the per-example gradients are known and
  the block is exact (it used to fall back: "not grouped by example")."""
  ks = jax.random.split(jax.random.PRNGKey(8), 3)
  params = {"w": jax.random.normal(ks[0], (3, D)) / 2,
            "out": jax.random.normal(ks[1], (3, 2))}
  batch = {"x": jax.random.normal(ks[2], (N, T, D)), "y": _labels()}

  def loss(p, b):
    h = jnp.tanh(jnp.einsum("fd,ntd->fnt", p["w"], b["x"]))   # [F, N, T]
    return kfe.softmax_cross_entropy(h.mean(axis=2).T @ p["out"], b["y"])

  _assert_exact_blocks(loss, params, batch, ("w", "out"))


class _LSTMClassifier(nn.Module):
  @nn.compact
  def __call__(self, x):
    cell = nn.LSTMCell(3, dtype=jnp.float64, param_dtype=jnp.float64)
    h = nn.RNN(cell, name="rnn")(x)
    return nn.Dense(2, name="out")(h[:, -1])


def test_flax_lstm_under_nn_rnn_has_exact_woodbury_blocks():
  model = _LSTMClassifier()
  x = jax.random.normal(jax.random.PRNGKey(0), (N, T, 2), jnp.float64)
  params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64),
                                  model.init(jax.random.PRNGKey(1), x))
  batch = {"x": x, "y": _labels()}
  loss = lambda p, b: kfe.softmax_cross_entropy(model.apply(p, b["x"]), b["y"])
  assert "woodbury 100.0%" in kfe.describe_layers(loss, params, batch,
                                                  blocks="woodbury")
  grads, updates, state = _tengrad(loss, params, batch)
  assert int(state.health.failed_inverses) == 0
  u = _per_example_grads(loss, params, batch)
  modules = {**params["params"]["LSTMCell_0"], "out": params["params"]["out"]}
  assert len(modules) == 9    # 4 input and 4 hidden gate kernels, the head
  for name in modules:
    where = (lambda t, name=name: t["params"]["out"] if name == "out"
             else t["params"]["LSTMCell_0"][name])
    keys = sorted(where(params))
    wants = _solve([where(u)[k] for k in keys], [where(grads)[k] for k in keys])
    for k, want in zip(keys, wants):
      np.testing.assert_allclose(where(updates)[k], want, rtol=1e-9,
                                 atol=1e-12)


V = 7   # vocabulary


def _lookup_task(t=T):
  ks = jax.random.split(jax.random.PRNGKey(5), 3)
  params = {"table": jax.random.normal(ks[0], (V, D)),
            "out": jax.random.normal(ks[1], (D, 2))}
  ids = jax.random.randint(ks[2], (N, t), 0, V)
  ids = ids.at[0, 0].set(V + 3).at[1, 1].set(-2)   # dropped; from the end

  def loss(p, b):
    h = jnp.take(p["table"], b["ids"], axis=0, mode="fill", fill_value=0)
    return kfe.softmax_cross_entropy(jnp.tanh(h).mean(axis=1) @ p["out"],
                                     b["y"])

  return loss, params, {"ids": ids, "y": _labels()}


def test_embedding_has_an_exact_woodbury_block():
  loss, params, batch = _lookup_task()
  _assert_exact_lookup_block(loss, params, batch)


def test_vmapped_row_lookup_has_an_exact_woodbury_block():
  """equinox's ``nn.Embedding`` (``table[i]`` of one id under ``jax.vmap``,
  a gather of (row, column) pairs) is the same embedding layer."""
  loss, params, batch = _lookup_task()
  batch = dict(batch, ids=batch["ids"] % V)   # table[i] clips, take drops

  def vmapped(p, b):
    h = jax.vmap(jax.vmap(lambda i: p["table"][i]))(b["ids"])
    return kfe.softmax_cross_entropy(jnp.tanh(h).mean(axis=1) @ p["out"],
                                     b["y"])

  _assert_exact_lookup_block(vmapped, params, batch)


def _assert_exact_lookup_block(loss, params, batch):
  grads, updates, state = _tengrad(loss, params, batch)
  assert state.blocks[1].ids.shape == (8, T)    # the table: ids and g stored
  u = _per_example_grads(loss, params, batch)
  for name in ("table", "out"):
    (want,) = _solve([u[name]], [grads[name]])
    np.testing.assert_allclose(updates[name], want, rtol=1e-9, atol=1e-12)
  text = kfe.describe_layers(loss, params, batch, blocks="woodbury")
  assert "woodbury n=6 embedding 7x4" in text and "woodbury 100.0%" in text


def test_embedding_under_a_per_token_loss_has_an_exact_woodbury_block():
  """A language model's per-token loss (every position an example, M = N·T)
  with nothing mixing the positions: the table's block is the exact damped
  Fisher block of the per-token gradients (it used to fall back: the state,
  laid out with one lookup per example, was checked against T)."""
  ks = jax.random.split(jax.random.PRNGKey(6), 3)
  params = {"table": jax.random.normal(ks[0], (V, D)),
            "out": jax.random.normal(ks[1], (D, 3))}
  ids = jax.random.randint(ks[2], (2, 3), 0, V)
  batch = {"ids": ids, "y": (ids + 1) % 3}

  def logits(p, i):
    return jnp.tanh(jnp.take(p["table"], i, axis=0)) @ p["out"]

  loss = lambda p, b: kfe.softmax_cross_entropy(logits(p, b["ids"]), b["y"])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    grads, updates, _ = _tengrad(loss, params, batch)
  per_token = lambda p: -jnp.take_along_axis(   # ℓ_k, one per position
      jax.nn.log_softmax(logits(p, ids)), batch["y"][..., None],
      axis=-1).reshape(-1)
  u = jax.jacobian(per_token)(params)
  m = ids.size
  for name in ("table", "out"):
    x = u[name].reshape(m, -1)
    want = jnp.linalg.solve(x.T @ x / m + LAM * jnp.eye(x.shape[1]),
                            grads[name].reshape(-1)).reshape(grads[name].shape)
    np.testing.assert_allclose(updates[name], want, rtol=1e-9, atol=1e-12)


def test_embedding_laid_out_for_other_lookups_falls_back_loudly():
  loss, params, batch = _lookup_task(t=T)
  tx = kfe.scale_by_tengrad(loss, damping=LAM, gram_batch=8,
                            example_batch=_lookup_task(t=T + 2)[2])
  state = tx.init(params)
  with pytest.warns(UserWarning, match="table.*cannot hold"):
    updates, new = tx.update(jax.grad(loss)(params, batch), state, params,
                             batch=batch, key=jax.random.PRNGKey(0))
  assert new.blocks[1].ids.shape == (8, T + 2)   # the state keeps its layout
  np.testing.assert_array_equal(updates["table"],
                                jax.grad(loss)(params, batch)["table"])


@pytest.mark.parametrize("projection_first", [False, True])
def test_tied_table_has_an_exact_woodbury_block(projection_first):
  """A table used as embedding and as output projection (``h Eᵀ``): one
  block over both uses' per-example gradients, in the orientation of the
  use that comes first."""
  ks = jax.random.split(jax.random.PRNGKey(6), 5)
  params = {"embed": jax.random.normal(ks[0], (V, D)),
            "mid": jax.random.normal(ks[1], (D, D)) / 2}
  batch = {"ids": jax.random.randint(ks[2], (N, T), 0, V), "y": _labels()}
  if projection_first:
    params["head"] = jax.random.normal(ks[3], (D, V)) / 2
    batch["x"] = jax.random.normal(ks[4], (N, D))

  def loss(p, b):
    first = b["x"] @ p["embed"].T if projection_first else 0.0
    h = jnp.tanh(jnp.take(p["embed"], b["ids"], axis=0) @ p["mid"])
    second = h.mean(axis=1) @ (p["head"] if projection_first
                               else p["embed"].T)      # one loss per sequence
    return kfe.softmax_cross_entropy(first + second, b["y"])

  (tied,) = [l for l in tracing.trace_loss(loss, params, batch).layers
             if l.name == "embed"]
  assert tied.kind == "tied" and tied.transposed == (False, True)
  _assert_exact_blocks(loss, params, batch, tuple(params))
  text = kfe.describe_layers(loss, params, batch, blocks="woodbury")
  shape = "4x7" if projection_first else "7x4"
  assert f"woodbury n=6 tied {shape}" in text and "woodbury 100.0%" in text
