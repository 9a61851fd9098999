"""Attention projections, Einsum kernels, embeddings and grouped convs get
exact Kronecker blocks (float64, against per-example brute force).

Each model is written as an explicit composition of flax modules with a zero
probe added to the tested layer's output, so that the per-example output
gradients ``g_m`` come from ``vmap(grad)`` and the inputs ``x_n`` from the
forward by hand; ``oracles.kfac_block_by_vjp`` then builds ``A ⊗ G`` over the
layer's flattened parameters with no knowledge of the library's layout. The
update with ``damping_mode="tikhonov"``, ``ema_decay=0`` and the empirical
Fisher must equal ``solve(A ⊗ G + λI, ∇)``.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_ext as kfe
from tests import oracles

LAM = 0.05




def _f64(tree):
  return jax.tree_util.tree_map(
      lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating)
      else x, tree)


def _check_update(model, params, batch, layer_key, layer_fn, layer_input,
                  probe_shape, groups=None, mode="tikhonov"):
  """The library's update of ``params[layer_key]`` against the oracle."""
  params = _f64(params)
  n = batch["y"].reshape(-1).shape[0]

  def per_example_loss(probe, p, x, y):
    logits = model(p, x[None], probe[None])
    return -jax.nn.log_softmax(logits.reshape(-1, logits.shape[-1]))[0, y]

  xs = batch["x"].reshape((n,) + batch["x"].shape[2:]) if batch["x"].ndim > 1 and (
      batch["y"].ndim > 1) else batch["x"]
  ys = batch["y"].reshape(-1)
  g = jax.vmap(jax.grad(per_example_loss), (None, None, 0, 0))(
      jnp.zeros(probe_shape), params, xs, ys)
  a = jax.vmap(lambda x: layer_input(params, x[None])[0])(xs)
  block, flat, unravel = oracles.kfac_block_by_vjp(
      layer_fn, params["params"][layer_key], a, g, groups)
  loss = lambda p, b: kfe.softmax_cross_entropy(model(p, b["x"]), b["y"])
  grads = jax.grad(loss)(params, batch)
  tx = kfe.scale_by_kfac(loss, damping=LAM, damping_mode=mode, ema_decay=0.0,
                         fisher="empirical", inverse_every=1,
                         example_batch=batch)
  updates, _ = jax.jit(lambda g_, p_: tx.update(g_, tx.init(p_), p_,
                                                 batch=batch))(grads, params)
  v = jax.flatten_util.ravel_pytree(grads["params"][layer_key])[0]
  expected = jnp.linalg.solve(block + LAM * jnp.eye(v.shape[0]), v)
  got = jax.flatten_util.ravel_pytree(updates["params"][layer_key])[0]
  np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
  return kfe.describe_layers(loss, params, batch)


def test_dense_general_attention_projections_both_orientations():
  """``[D, H, Dh]`` (input first) and ``[H, Dh, D]`` (output last) kernels."""
  d, heads, dh, c = 4, 2, 3, 3
  qkv = nn.DenseGeneral((heads, dh))
  out = nn.DenseGeneral(c, axis=(-2, -1))

  def model(p, x, probe_in=0.0, probe_out=0.0):
    h = qkv.apply({"params": p["params"]["in"]}, x) + probe_in
    return out.apply({"params": p["params"]["out"]}, jnp.tanh(h)) + probe_out

  x = jax.random.normal(jax.random.PRNGKey(0), (5, d))
  params = {"params": {
      "in": qkv.init(jax.random.PRNGKey(1), x)["params"],
      "out": out.init(jax.random.PRNGKey(2), jnp.ones((5, heads, dh)))["params"]}}
  batch = {"x": x, "y": jnp.array([0, 1, 2, 0, 1])}
  text = _check_update(
      lambda p, x, probe=0.0: model(p, x, probe_in=probe), params, batch, "in",
      lambda q, x: qkv.apply({"params": q}, x), lambda p, x: x, (heads, dh))
  assert "kronecker 5x6" in text and "kronecker 7x3" in text
  _check_update(
      lambda p, x, probe=0.0: model(p, x, probe_out=probe), params, batch, "out",
      lambda q, x: out.apply({"params": q}, x),
      lambda p, x: jnp.tanh(qkv.apply({"params": p["params"]["in"]}, x)), (c,))


@pytest.mark.parametrize("mode", ["tikhonov", "factored"])
def test_einsum_kernel(mode):
  """A flax ``nn.Einsum`` ``"bd,ndh->bnh"`` kernel is a ``d × (n·h)`` layer."""
  ein = nn.Einsum((2, 4, 3), "bd,ndh->bnh")
  head = nn.Dense(3)

  def model(p, x, probe=0.0):
    h = ein.apply({"params": p["params"]["ein"]}, x) + probe
    return head.apply({"params": p["params"]["head"]},
                      jnp.tanh(h).reshape(h.shape[0], -1))

  x = jax.random.normal(jax.random.PRNGKey(0), (6, 4))
  params = {"params": {"ein": ein.init(jax.random.PRNGKey(1), x)["params"],
                       "head": head.init(jax.random.PRNGKey(2),
                                         jnp.ones((6, 6)))["params"]}}
  params = _f64(params)
  batch = {"x": x, "y": jnp.array([0, 1, 2, 0, 1, 2])}
  if mode == "tikhonov":
    _check_update(model, params, batch, "ein",
                  lambda q, x: ein.apply({"params": q}, x[None])[0], lambda p, x: x,
                  (2, 3))
    return
  # factored: (A + π√λ)⁻¹ ∇ (G + √λ/π)⁻¹ on the canonical [d+1, n·h] matrix
  loss = lambda p, b: kfe.softmax_cross_entropy(model(p, b["x"]), b["y"])
  grads = jax.grad(loss)(params, batch)
  g = jax.vmap(jax.grad(lambda pr, x, y: -jax.nn.log_softmax(
      model(params, x[None], pr[None])[0])[y]), (None, 0, 0))(
          jnp.zeros((2, 3)), x, batch["y"]).reshape(6, -1)
  abar = oracles.homogeneous(x)
  a_f, g_f = abar.T @ abar / 6, g.T @ g / 6
  pi = jnp.sqrt((jnp.trace(a_f) / 5) / (jnp.trace(g_f) / 6))
  kernel = grads["params"]["ein"]["kernel"].transpose(1, 0, 2).reshape(4, 6)
  v = jnp.concatenate([kernel, grads["params"]["ein"]["bias"].reshape(1, 6)])
  expected = (jnp.linalg.inv(a_f + pi * jnp.sqrt(LAM) * jnp.eye(5)) @ v
              @ jnp.linalg.inv(g_f + jnp.sqrt(LAM) / pi * jnp.eye(6)))
  tx = kfe.scale_by_kfac(loss, damping=LAM, damping_mode="factored",
                         ema_decay=0.0, fisher="empirical", example_batch=batch)
  upd = tx.update(grads, tx.init(params), params, batch=batch)[0]["params"]["ein"]
  np.testing.assert_allclose(upd["kernel"].transpose(1, 0, 2).reshape(4, 6),
                             expected[:4], rtol=1e-9)
  np.testing.assert_allclose(upd["bias"].reshape(6), expected[4], rtol=1e-9)


@pytest.mark.parametrize("spec", ["BTD,CKDH->CBTKH", "BTD,SNDH->SBTNH"])
def test_einsum_kernel_whose_axes_come_before_the_batchs(spec):
  """Gemma's key/value and fused q/k/v projections (flax examples/gemma):
  the output puts the kernel's stacking axis before the batch and positions
  (``[C, B, T, K, H]``). Per token a ``D × (C·K·H)`` layer, exact against
  the oracle with every position an example (no mixing between them)."""
  d, c, k, h, classes = 4, 2, 2, 3, 3
  ein = nn.Einsum((c, k, d, h), spec, use_bias=False)
  head = nn.Dense(classes)

  def project(q, x):                 # [B, T, D] -> [B, T, C, K, H]
    return jnp.moveaxis(ein.apply({"params": q}, x), 0, 2)

  def model(p, x, probe=0.0):        # the oracle passes one token: [1, D]
    x = x[:, None] if x.ndim == 2 else x
    probe = probe if isinstance(probe, float) else probe[:, None]
    hid = project(p["params"]["ein"], x) + probe
    return head.apply({"params": p["params"]["head"]},
                      jnp.tanh(hid).reshape(hid.shape[:2] + (-1,)))

  x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, d))
  params = {"params": {
      "ein": ein.init(jax.random.PRNGKey(1), x)["params"],
      "head": head.init(jax.random.PRNGKey(2), jnp.ones((3, 4, c * k * h)))["params"]}}
  y = jax.random.randint(jax.random.PRNGKey(3), (3, 4), 0, classes)
  text = _check_update(model, params, {"x": x, "y": y}, "ein",
                       lambda q, xn: project(q, xn[None, None])[0, 0],
                       lambda p, xn: xn, (c, k, h))
  assert "kronecker 4x12" in text, text

def _vmapped_rows(q, ids):
  """equinox's ``nn.Embedding``: ``table[i]`` of one id, mapped over the
  ids with ``jax.vmap`` (a gather of a (row, column) index pair)."""
  row = lambda i: q["embedding"][i]
  for _ in range(ids.ndim):
    row = jax.vmap(row)
  return row(ids)


@pytest.mark.parametrize("lookup", ["take", "vmapped"])
def test_embedding_block_is_diag_counts_kron_g(lookup):
  """``nn.Embed`` over ``[N, T]`` ids (a per-token loss), and the same
  lookup written as equinox does (``table[i]`` under ``jax.vmap``): the
  input factor is ``diag(f)``, the token frequencies, and the update is
  ``solve(diag(f)⊗G + λI, ∇)``."""
  vocab, d = 7, 3
  emb, head = nn.Embed(vocab, d), nn.Dense(4)
  look_up = ((lambda q, i: emb.apply({"params": q}, i)) if lookup == "take"
             else _vmapped_rows)

  def model(p, ids, probe=0.0):
    h = look_up(p["params"]["emb"], ids) + probe
    return head.apply({"params": p["params"]["head"]}, jnp.tanh(h))

  ids = jnp.array([[0, 1, 1, 5], [2, 1, 0, 0], [6, 6, 1, 3]])
  params = {"params": {"emb": emb.init(jax.random.PRNGKey(1), ids)["params"],
                       "head": head.init(jax.random.PRNGKey(2),
                                         jnp.ones((1, d)))["params"]}}
  params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float64), params)
  batch = {"x": ids, "y": jnp.array([[0, 1, 2, 3], [3, 2, 1, 0], [1, 1, 2, 2]])}
  text = _check_update(model, params, batch, "emb", look_up,
                       lambda p, i: i, (d,))
  assert "diag(7)x3" in text
  loss = lambda p, b: kfe.softmax_cross_entropy(model(p, b["x"]), b["y"])
  tx = kfe.scale_by_kfac(loss, ema_decay=0.0, fisher="empirical",
                         example_batch=batch)
  state = tx.init(params)
  leaf = 0   # params/emb/embedding comes first in the flattened tree
  assert state.factors[leaf].rows.shape == (vocab,)    # a vector, never V×V
  state = tx.update(jax.grad(loss)(params, batch), state, params, batch=batch)[1]
  counts = np.bincount(np.asarray(ids).ravel(), minlength=vocab) / ids.size
  np.testing.assert_allclose(state.factors[leaf].rows, counts, rtol=1e-12)


@pytest.mark.parametrize("groups,features", [(4, 4), (4, 8), (2, 6)])
def test_grouped_and_depthwise_conv(groups, features):
  """``feature_group_count = G``: one Kronecker block per group."""
  c = 4
  conv = nn.Conv(features, (3, 3), padding="VALID", feature_group_count=groups)
  head = nn.Dense(3)

  def model(p, x, probe=0.0):
    h = conv.apply({"params": p["params"]["conv"]}, x) + probe
    return head.apply({"params": p["params"]["head"]},
                      jnp.tanh(h).reshape(h.shape[0], -1))

  x = jax.random.normal(jax.random.PRNGKey(0), (5, 3, 3, c))
  params = {"params": {"conv": conv.init(jax.random.PRNGKey(1), x)["params"],
                       "head": head.init(jax.random.PRNGKey(2),
                                         jnp.ones((5, features)))["params"]}}
  per_group = features // groups
  kernel_groups = np.broadcast_to(np.arange(features) // per_group,
                                  (3, 3, c // groups, features))
  bias_groups = np.arange(features) // per_group
  # ravel_pytree orders the leaves {bias, kernel}
  member = jnp.asarray(np.concatenate([bias_groups, kernel_groups.ravel()]))
  batch = {"x": x, "y": jnp.array([0, 1, 2, 0, 1])}
  text = _check_update(model, params, batch, "conv",
                       lambda q, x: conv.apply({"params": q}, x[None])[0, 0, 0],
                       lambda p, x: x, (1, 1, features), groups=member)
  assert f"{groups}x kronecker" in text


def test_grouped_conv_factors_equal_separate_convs_over_locations():
  """With many locations (SAME padding, stride 2) a grouped conv's factors
  are those of its groups run as separate convs on their channel slices."""
  groups, c, f = 2, 4, 6
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 6, 6, c))
  y = jnp.array([0, 1, 2])
  grouped = nn.Conv(f, (3, 3), strides=2, feature_group_count=groups)
  p = grouped.init(jax.random.PRNGKey(1), x)["params"]
  head = jax.random.normal(jax.random.PRNGKey(2), (3 * 3 * f, 3))

  def grouped_loss(params, b):
    h = grouped.apply({"params": params["conv"]}, b["x"])
    return kfe.softmax_cross_entropy(
        jnp.tanh(h).reshape(3, -1) @ params["head"], b["y"])

  def split_loss(params, b):
    outs = [jax.lax.conv_general_dilated(
        b["x"][..., j * 2:(j + 1) * 2], params[f"k{j}"], (2, 2), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC")) + params[f"b{j}"]
        for j in range(groups)]
    h = jnp.concatenate(outs, axis=-1)
    return kfe.softmax_cross_entropy(
        jnp.tanh(h).reshape(3, -1) @ params["head"], b["y"])

  p = _f64(p)
  gp = {"conv": p, "head": head}
  sp = {"head": head}
  for j in range(groups):
    sp[f"k{j}"] = p["kernel"][..., j * 3:(j + 1) * 3]
    sp[f"b{j}"] = p["bias"][j * 3:(j + 1) * 3]
  batch = {"x": x, "y": y}
  states = []
  for loss, params in ((grouped_loss, gp), (split_loss, sp)):
    tx = kfe.scale_by_kfac(loss, ema_decay=0.0, fisher="empirical",
                           example_batch=batch)
    states.append(tx.update(jax.grad(loss)(params, batch), tx.init(params),
                            params, batch=batch)[1])
  grouped_state, split_state = states
  leaves = jax.tree_util.tree_leaves(gp)
  kernel_leaf = [i for i, l in enumerate(leaves) if l.ndim == 4][0]
  fa = grouped_state.factors[kernel_leaf]
  split_leaves = jax.tree_util.tree_leaves(sp)
  for j in range(groups):
    k_leaf = [i for i, l in enumerate(split_leaves)
              if l is sp[f"k{j}"] or (l.ndim == 4 and np.array_equal(l, sp[f"k{j}"]))][0]
    np.testing.assert_allclose(fa.rows[j], split_state.factors[k_leaf].rows,
                               rtol=1e-10)
    np.testing.assert_allclose(fa.cols[j], split_state.factors[k_leaf].cols,
                               rtol=1e-10)


def test_tengrad_on_token_layers_uses_per_example_grams():
  """A dense layer over ``[N, T, D]`` with a per-sequence loss and a 3-D
  attention kernel: TENGraD's update equals ``solve(λI + UUᵀ/n, ∇)`` with U
  from ``vmap(grad)`` over the first ``gram_batch`` *examples*."""
  n, t, d, c = 5, 4, 3, 2
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  params = {"w": jax.random.normal(ks[0], (d, 2, 3)) / 2, "b": jnp.zeros((2, 3)),
            "head": jax.random.normal(ks[1], (6, c))}

  def model(p, x):
    h = jnp.tanh(jnp.einsum("btd,dnh->btnh", x, p["w"]) + p["b"])
    return h.mean(axis=1).reshape(x.shape[0], -1) @ p["head"]

  x = jax.random.normal(ks[2], (n, t, d))
  y = jnp.array([0, 1, 1, 0, 1])
  batch = {"x": x, "y": y}
  loss = lambda p, b: kfe.softmax_cross_entropy(model(p, b["x"]), b["y"])
  gram = 3
  tx = kfe.scale_by_tengrad(loss, damping=LAM, fisher="empirical",
                            gram_batch=gram, example_batch=batch)
  grads = jax.grad(loss)(params, batch)
  upd = tx.update(grads, tx.init(params), params, batch=batch)[0]
  per_ex = jax.vmap(jax.grad(lambda p, x, y: -jax.nn.log_softmax(
      model(p, x[None])[0])[y]), (None, 0, 0))(params, x, y)
  u = jnp.concatenate([per_ex["w"][:gram].reshape(gram, -1),
                       per_ex["b"][:gram].reshape(gram, -1)], axis=1)
  v = jnp.concatenate([grads["w"].ravel(), grads["b"].ravel()])
  expected = jnp.linalg.solve(LAM * jnp.eye(v.shape[0]) + u.T @ u / gram, v)
  got = jnp.concatenate([upd["w"].ravel(), upd["b"].ravel()])
  np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
  # the head (one position per example) keeps the factored layout
  state = tx.init(params)
  assert state.blocks[1].per_example is None and state.blocks[2].per_example is not None


def test_sampled_statistics_of_a_sequence_softmax_converge():
  """``[N, T, C]`` logits, one sampled target per position: the average of
  the output layer's G over draws is ``(1/M) Σ_tok (diag p − p pᵀ)``."""
  n, t, d, c = 2, 3, 4, 5
  params = {"w": jax.random.normal(jax.random.PRNGKey(0), (d, c)),
            "b": jnp.zeros(c)}
  x = jax.random.normal(jax.random.PRNGKey(1), (n, t, d))
  batch = {"x": x, "y": jnp.zeros((n, t), jnp.int32)}
  loss = lambda p, b: kfe.softmax_cross_entropy(b["x"] @ p["w"] + p["b"], b["y"])
  tx = kfe.scale_by_kfac(loss, ema_decay=0.0, example_batch=batch)
  grads = jax.grad(loss)(params, batch)
  state0 = tx.init(params)
  draws = 3000
  g_draws = jax.jit(jax.vmap(lambda k: tx.update(
      grads, state0, params, batch=batch, key=k)[1].factors[1].cols))(
          jax.random.split(jax.random.PRNGKey(2), draws))
  p = jax.nn.softmax(x @ params["w"] + params["b"]).reshape(n * t, c)
  exact = jnp.mean(jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(p), axis=0)
  se = g_draws.std(axis=0) / np.sqrt(draws)
  assert np.all(np.abs(g_draws.mean(axis=0) - exact) < 5 * se + 1e-12)


def test_gated_ffn_kernel_sliced_in_two_is_two_blocks():
  """A kernel ``[2, D, F]`` whose slices are the gate and up projections:
  one Kronecker block per slice (stored ``[2, ...]``), each exact against
  ``solve(A_j ⊗ G_j + λI, ∇W[j])`` built by brute force."""
  n, d, f, c = 6, 3, 4, 2
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  params = {"w": jax.random.normal(ks[0], (2, d, f)) / 2,
            "out": jax.random.normal(ks[1], (f, c))}

  def model(p, x, probes=(0.0, 0.0)):
    gate = x @ p["w"][0] + probes[0]
    up = x @ p["w"][1] + probes[1]
    return (jax.nn.gelu(gate) * up) @ p["out"]

  x = jax.random.normal(ks[2], (n, d))
  y = jnp.array([0, 1, 1, 0, 1, 0])
  batch = {"x": x, "y": y}
  loss = lambda p, b: kfe.softmax_cross_entropy(model(p, b["x"]), b["y"])
  layers = kfe.find_layers(loss, params, batch)
  assert [(l.name, l.kind) for l in layers] == [("w", "dense"), ("out", "dense")]
  assert "2x kronecker 3x4" in kfe.describe_layers(loss, params, batch)
  tx = kfe.scale_by_kfac(loss, damping=LAM, damping_mode="tikhonov",
                         ema_decay=0.0, fisher="empirical", example_batch=batch)
  grads = jax.grad(loss)(params, batch)
  upd = tx.update(grads, tx.init(params), params, batch=batch)[0]
  zeros = jnp.zeros(f)
  for j in range(2):
    def per_example(probe, xn, yn, j=j):
      probes = (probe, zeros) if j == 0 else (zeros, probe)
      return -jax.nn.log_softmax(model(params, xn[None], probes)[0])[yn]
    g = jax.vmap(jax.grad(per_example), (None, 0, 0))(zeros, x, y)
    block, _, _ = oracles.kfac_block_by_vjp(lambda q, xn: xn @ q,
                                            params["w"][j], x, g)
    v = grads["w"][j].ravel()
    expected = jnp.linalg.solve(block + LAM * jnp.eye(v.shape[0]), v)
    np.testing.assert_allclose(upd["w"][j].ravel(), expected, rtol=1e-9,
                               atol=1e-12)


_ALIASES = {
    "kfac": lambda f, b: kfe.kfac(f, 0.1, damping=0.1, example_batch=b),
    "kfac_adaptive": lambda f, b: kfe.kfac(f, "adaptive", momentum="adaptive",
                                           damping=0.1, example_batch=b),
    "tridiagonal": lambda f, b: kfe.kfac(f, 0.1, damping=0.1,
                                         structure="block_tridiagonal",
                                         example_batch=b),
    "tkfac": lambda f, b: kfe.tkfac(f, 0.1, damping=0.1, example_batch=b),
    "tengrad": lambda f, b: kfe.tengrad(f, 0.1, damping=0.1, example_batch=b),
    "two_level": lambda f, b: kfe.two_level_kfac(f, 0.1, damping=0.1,
                                                 coarse_space="spectral",
                                                 example_batch=b),
    "natural_gradient": lambda f, b: kfe.natural_gradient(f, 0.1, damping=0.1,
                                                          example_batch=b),
}


@pytest.mark.parametrize("name", sorted(_ALIASES))
def test_einsum_bias_update_keeps_the_bias_shape(name):
  """An ``nn.Einsum`` bias of shape ``[n, h]`` is folded into the kernel's
  block as a flat row; its update comes back in the leaf's own shape (it
  came back ``[n·h]``, and ``optax.apply_updates`` failed) and training
  steps run."""
  ein = nn.Einsum((2, 4, 3), "bd,ndh->bnh")
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 4))
  params = ein.init(jax.random.PRNGKey(1), x)["params"]
  assert params["bias"].shape == (2, 3)
  loss = lambda p, b: kfe.softmax_cross_entropy(
      ein.apply({"params": p}, b["x"]).reshape(6, -1), b["y"])
  batch = {"x": x, "y": jnp.array([0, 1, 2, 3, 4, 5])}
  assert "kronecker 5x6" in kfe.describe_layers(loss, params, batch)
  opt = _ALIASES[name](loss, batch)
  step = kfe.make_train_step(loss, opt)
  state, losses = opt.init(params), []
  for i in range(3):
    params, state, value = step(params, state, batch, jax.random.PRNGKey(i), i)
    losses.append(float(value))
  assert params["bias"].shape == (2, 3)
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses


def test_bias_after_einsums_transpose_is_folded_into_the_block():
  """Griffin's gated MLP: ``jnp.einsum("...td,cdD->c...tD", x, w) + b`` with
  ``b`` of shape ``[2, 1, 1, D]``; the einsum's ``dot_general`` gives
  ``[c, D, N, T]`` and a transpose puts it in order before the bias. The
  bias joins the kernel's block: the update equals that of the same layer
  written as ``x @ W + b`` with ``W = w`` laid out ``[d, 2·D]``."""
  d, f, n, t = 3, 4, 5, 2
  ks = jax.random.split(jax.random.PRNGKey(0), 5)
  w = jax.random.normal(ks[0], (2, d, f)) / 2
  b = 0.1 * jax.random.normal(ks[1], (2, 1, 1, f))
  out = jax.random.normal(ks[2], (f, 3))
  batch = {"x": jax.random.normal(ks[3], (n, t, d)),
           "y": jax.random.randint(ks[4], (n, t), 0, 3)}

  def gated(p, x):
    u = jnp.einsum("...td,cdD->c...tD", x, p["w"]) + p["b"]
    return (jax.nn.gelu(u[0]) * u[1]) @ p["out"]

  def flat(p, x):
    u = x @ p["w"] + p["b"]
    return (jax.nn.gelu(u[..., :f]) * u[..., f:]) @ p["out"]

  einsum_params = {"w": w, "b": b, "out": out}
  flat_params = {"w": w.transpose(1, 0, 2).reshape(d, 2 * f),
                 "b": b.reshape(2 * f), "out": out}
  updates = []
  for model, params in ((gated, einsum_params), (flat, flat_params)):
    loss = lambda p, bt, model=model: kfe.softmax_cross_entropy(
        model(p, bt["x"]), bt["y"])
    text = kfe.describe_layers(loss, params, batch)
    assert f"kronecker {d + 1}x{2 * f}" in text, text
    tx = kfe.scale_by_kfac(loss, damping=LAM, ema_decay=0.0, fisher="empirical",
                           damping_mode="tikhonov", example_batch=batch)
    updates.append(tx.update(jax.grad(loss)(params, batch), tx.init(params),
                             params, batch=batch)[0])
  got, want = updates
  assert got["b"].shape == (2, 1, 1, f)
  np.testing.assert_allclose(got["w"].transpose(1, 0, 2).reshape(d, 2 * f),
                             want["w"], rtol=1e-9, atol=1e-12)
  np.testing.assert_allclose(got["b"].reshape(-1), want["b"], rtol=1e-9,
                             atol=1e-12)


class _SmallConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3), param_dtype=jnp.float64)(x))
    return nn.Dense(3, param_dtype=jnp.float64)(x.reshape(x.shape[0], -1))


@pytest.mark.parametrize("method", ["kfac", "tengrad"])
def test_per_example_model_under_vmap_equals_the_batched_model(method):
  """A per-example model mapped over the batch with ``jax.vmap`` (the conv
  runs on ``[N, H, W, C]`` and its output is reshaped to ``[N, 1, H, W, C]``
  before the bias): the bias joins the conv's block, and the update is the
  batched model's."""
  model = _SmallConvNet()
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 5, 5, 2), jnp.float64)
  params = model.init(jax.random.PRNGKey(1), x)
  batch = {"x": x, "y": jnp.array([0, 1, 2, 0, 1, 2])}
  batched = lambda p, b: kfe.softmax_cross_entropy(model.apply(p, b["x"]),
                                                   b["y"])
  mapped = lambda p, b: kfe.softmax_cross_entropy(jax.vmap(
      lambda xi: model.apply(p, xi[None])[0])(b["x"]), b["y"])
  assert "kronecker 19x4" in kfe.describe_layers(mapped, params, batch)
  updates = []
  for loss in (mapped, batched):
    if method == "kfac":
      tx = kfe.scale_by_kfac(loss, damping=LAM, ema_decay=0.0, fisher="empirical",
                             damping_mode="tikhonov", example_batch=batch)
    else:
      tx = kfe.scale_by_tengrad(loss, damping=LAM, fisher="empirical",
                                example_batch=batch)
    updates.append(tx.update(jax.grad(loss)(params, batch), tx.init(params),
                             params, batch=batch)[0])
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-9, atol=1e-12), *updates)


def _channels_first_conv(q, x, groups=1):
  """equinox's ``nn.Conv2d`` on one ``[C, H, W]`` example: a batch of one,
  squeezed, plus a ``[O, 1, 1]`` bias."""
  y = jax.lax.conv_general_dilated(x[None], q["weight"], (1, 1), "VALID",
                                   feature_group_count=groups)
  return jnp.squeeze(y, 0) + q["bias"]


@pytest.mark.parametrize("groups", [1, 2])
def test_equinox_style_channels_first_conv_under_vmap(groups):
  """A per-example channels-first conv (equinox's layout: ``[O, C, kh, kw]``
  kernel, ``[O, 1, 1]`` bias, ``squeeze`` after the conv; grouped too) and
  a ``[out, in]`` linear, mapped over the batch with ``jax.vmap``: the bias
  is looked for through the reshape and squeeze vmap leaves behind and
  joins the conv's block (per group), exact against the oracle."""
  c, o = 2, 4
  conv = functools.partial(_channels_first_conv, groups=groups)

  def model(p, x, probe=0.0):
    probe = jnp.broadcast_to(probe, (x.shape[0], o, 1, 1))

    def one(xi, pi):
      h = conv(p["params"]["conv"], xi) + pi
      head = p["params"]["head"]
      return head["weight"] @ jnp.tanh(h).reshape(-1) + head["bias"]
    return jax.vmap(one)(x, probe)

  k = jax.random.split(jax.random.PRNGKey(0), 5)
  params = {"params": {
      "conv": {"weight": jax.random.normal(k[0], (o, c // groups, 3, 3)),
               "bias": jax.random.normal(k[1], (o, 1, 1))},
      "head": {"weight": jax.random.normal(k[2], (3, o)),
               "bias": jax.random.normal(k[3], (3,))}}}
  batch = {"x": jax.random.normal(k[4], (6, c, 3, 3)),
           "y": jnp.array([0, 1, 2, 0, 1, 2])}
  # ravel_pytree orders the leaves {bias, weight}; a group per output slice
  per_group = o // groups
  member = jnp.asarray(np.concatenate([
      np.arange(o) // per_group,
      np.repeat(np.arange(o) // per_group, c // groups * 9)]))
  text = _check_update(model, params, batch, "conv", conv, lambda p, x: x,
                       (o, 1, 1), groups=member)
  block = f"kronecker {c // groups * 9 + 1}x{per_group}"
  assert (block if groups == 1 else f"{groups}x {block}") in text, text
  assert "kronecker 5x3" in text, text


def test_bias_after_a_transpose_that_reorders_the_tokens():
  """An equinox ``Linear`` mapped over a scan's outputs (``jax.vmap`` lays
  them out ``[T, B, D]``; the logits come back ``[B, T, C]``): the bias
  after the token-reordering transpose joins the kernel's block. K-FAC's
  update equals the plainly written layer's, and TENGraD's joint block of
  kernel and bias is exact under the per-token loss (statistics read where
  the tokens are in the input's order)."""
  b_, t, d, c = 2, 3, 4, 3
  ks = jax.random.split(jax.random.PRNGKey(6), 4)
  params = {"w": jax.random.normal(ks[0], (c, d), jnp.float64),
            "b": jax.random.normal(ks[1], (c,), jnp.float64)}
  x = jax.random.normal(ks[2], (b_, t, d), jnp.float64)
  batch = {"x": x, "y": jax.random.randint(ks[3], (b_, t), 0, c)}

  def reordered(p, x):
    ht = jnp.tanh(x).transpose(1, 0, 2)                        # [T, B, D]
    z = jnp.einsum("cd,tbd->ctb", p["w"], ht).transpose(2, 1, 0)
    return z + p["b"]                                          # [B, T, C]

  plain = lambda p, x: jnp.tanh(x) @ p["w"].T + p["b"]
  losses = [lambda p, b, f=f: kfe.softmax_cross_entropy(f(p, b["x"]), b["y"])
            for f in (reordered, plain)]
  updates = []
  for loss in losses:
    assert "kronecker 5x3  w, b" in kfe.describe_layers(loss, params, batch)
    tx = kfe.scale_by_kfac(loss, damping=LAM, damping_mode="tikhonov",
                           ema_decay=0.0, fisher="empirical",
                           example_batch=batch)
    updates.append(tx.update(jax.grad(loss)(params, batch), tx.init(params),
                             params, batch=batch)[0])
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-9, atol=1e-12), *updates)

  loss = losses[0]
  tx = kfe.scale_by_tengrad(loss, damping=LAM, fisher="empirical",
                            example_batch=batch)
  grads = jax.grad(loss)(params, batch)
  got = tx.update(grads, tx.init(params), params, batch=batch)[0]
  per_token = lambda p: -jnp.take_along_axis(jax.nn.log_softmax(
      reordered(p, x)), batch["y"][..., None], axis=-1).reshape(-1)
  u = jax.jacobian(per_token)(params)
  m = b_ * t
  jac = jnp.concatenate([u["w"].reshape(m, -1), u["b"].reshape(m, -1)], 1)
  v = jnp.concatenate([grads["w"].reshape(-1), grads["b"]])
  want = jnp.linalg.solve(jac.T @ jac / m + LAM * jnp.eye(jac.shape[1]), v)
  np.testing.assert_allclose(
      jnp.concatenate([got["w"].reshape(-1), got["b"]]), want, rtol=1e-9,
      atol=1e-12)


def test_bias_added_to_a_sum_of_two_layers_joins_the_first():
  """equinox's ``LSTMCell`` writes ``W_ih x + W_hh h + b``: the sum's
  gradient is each product's, so ``b`` is exactly the first layer's bias
  (its block ``A ⊗ G`` with ``ā = [x, 1]``, exact against the oracle, and
  TENGraD's joint block of ``W_ih`` and ``b`` exact); the second layer
  keeps its kernel-only block, and no chain links the first layer to the
  next (its recorded output is not the sum)."""
  dx, dh, f = 3, 2, 4

  def model(p, xh, probe=0.0):
    x, h = xh[:, :dx], xh[:, dx:]
    q = p["params"]
    s = x @ q["ih"]["kernel"] + h @ q["hh"]["kernel"] + q["ih"]["bias"] + probe
    return jnp.tanh(s) @ q["head"]["kernel"]

  k = jax.random.split(jax.random.PRNGKey(0), 5)
  params = {"params": {"ih": {"kernel": jax.random.normal(k[0], (dx, f)),
                              "bias": jax.random.normal(k[1], (f,))},
                       "hh": {"kernel": jax.random.normal(k[2], (dh, f))},
                       "head": {"kernel": jax.random.normal(k[3], (f, 3))}}}
  batch = {"x": jax.random.normal(k[4], (7, dx + dh)),
           "y": jnp.array([0, 1, 2, 0, 1, 2, 0])}
  text = _check_update(model, params, batch, "ih",
                       lambda q, x: x @ q["kernel"] + q["bias"],
                       lambda p, xh: xh[:, :dx], (f,))
  rows = {r.split()[0]: r for r in text.splitlines() if "  dense  " in r}
  assert "kronecker 4x4" in rows["params/ih"], text
  assert "kronecker 2x4" in rows["params/hh"], text
  assert "Chains of dense layers" not in text, text   # s is not ih's alone
  # TENGraD: the joint block of W_ih and b is the exact damped one
  params = _f64(params)
  loss = lambda p, b: kfe.softmax_cross_entropy(model(p, b["x"]), b["y"])
  tx = kfe.scale_by_tengrad(loss, damping=LAM, fisher="empirical",
                            example_batch=batch)
  grads = jax.grad(loss)(params, batch)
  got = tx.update(grads, tx.init(params), params, batch=batch)[0]["params"]["ih"]
  per_example = jax.vmap(jax.grad(lambda p, xh, y: -jax.nn.log_softmax(
      model(p, xh[None])[0])[y]), (None, 0, 0))(params, batch["x"], batch["y"])
  u = per_example["params"]["ih"]
  jac = jnp.concatenate([u["kernel"].reshape(7, -1), u["bias"]], axis=1)
  v = jnp.concatenate([grads["params"]["ih"]["kernel"].reshape(-1),
                       grads["params"]["ih"]["bias"]])
  want = jnp.linalg.solve(jac.T @ jac / 7 + LAM * jnp.eye(jac.shape[1]), v)
  np.testing.assert_allclose(
      jnp.concatenate([got["kernel"].reshape(-1), got["bias"]]), want,
      rtol=1e-9, atol=1e-12)
