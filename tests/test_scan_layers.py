"""Layers inside ``scan`` (float64): stacked layers (a kernel scanned over)
equal the unrolled network per slice; recurrent cells (a kernel closed over)
share one block over the time steps, expand or reduce."""

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_ext as kfe

LAM = 0.1
L, D = 3, 4


def _update(loss, params, batch, **options):
  tx = kfe.scale_by_kfac(loss, damping=LAM, damping_mode="tikhonov",
                         ema_decay=0.0, fisher="empirical", example_batch=batch,
                         **options)
  return jax.jit(lambda g, p: tx.update(g, tx.init(p), p, batch=batch))(
      jax.grad(loss)(params, batch), params)


def _stack_params():
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  return {"k": jax.random.normal(ks[0], (L, D, D)) / 2,
          "b": 0.1 * jax.random.normal(ks[1], (L, D)),
          "out": jax.random.normal(ks[2], (D, 2))}


def _layer(h, w):
  return jnp.tanh(h @ w["k"] + w["b"])


_BODIES = {
    "plain": lambda h, w: (_layer(h, w), None),
    "remat": jax.checkpoint(lambda h, w: (_layer(h, w), None)),
}


@pytest.mark.parametrize("body,unroll", [("plain", 1), ("remat", 1),
                                         ("plain", 2)])
def test_scan_over_layers_equals_the_unrolled_network(body, unroll):
  params = _stack_params()
  batch = {"x": jax.random.normal(jax.random.PRNGKey(1), (5, D)),
           "y": jnp.array([0, 1, 0, 1, 1])}

  def scanned(p, b):
    h, _ = jax.lax.scan(_BODIES[body], b["x"], {"k": p["k"], "b": p["b"]},
                        unroll=unroll)
    return kfe.softmax_cross_entropy(h @ p["out"], b["y"])

  def unrolled(p, b):
    h = b["x"]
    for i in range(L):
      h = _layer(h, {"k": p[f"k{i}"], "b": p[f"b{i}"]})
    return kfe.softmax_cross_entropy(h @ p["out"], b["y"])

  flat = {"out": params["out"]}
  for i in range(L):
    flat[f"k{i}"], flat[f"b{i}"] = params["k"][i], params["b"][i]
  layers = kfe.find_layers(scanned, params, batch)
  assert [(l.name, l.kind) for l in layers] == [("k", "dense"), ("out", "dense")]
  up_s, st_s = _update(scanned, params, batch)
  up_u, st_u = _update(unrolled, flat, batch)
  leaves_u = jax.tree_util.tree_leaves(flat)
  for i in range(L):
    np.testing.assert_allclose(up_s["k"][i], up_u[f"k{i}"], rtol=1e-10)
    np.testing.assert_allclose(up_s["b"][i], up_u[f"b{i}"], rtol=1e-10)
    k_leaf = next(j for j, x in enumerate(leaves_u) if x is flat[f"k{i}"])
    np.testing.assert_allclose(st_s.factors[1].rows[i],
                               st_u.factors[k_leaf].rows, rtol=1e-10)
    np.testing.assert_allclose(st_s.factors[1].cols[i],
                               st_u.factors[k_leaf].cols, rtol=1e-10)


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.LayerNorm()(x)
    return x + nn.Dense(D)(jnp.tanh(nn.Dense(6)(h))), None


class _Stack(nn.Module):
  remat: bool = True

  @nn.compact
  def __call__(self, x):
    block = nn.remat(_Block) if self.remat else _Block
    x, _ = nn.scan(block, variable_axes={"params": 0},
                   split_rngs={"params": True}, length=L)()(x, None)
    return nn.Dense(2)(x)


@pytest.mark.parametrize("remat", [True, False])
def test_flax_nn_scan_blocks_equal_their_unrolled_blocks(remat):
  model = _Stack(remat=remat)
  x = jax.random.normal(jax.random.PRNGKey(1), (5, D))
  params = model.init(jax.random.PRNGKey(0), x)
  batch = {"x": x, "y": jnp.array([0, 1, 0, 1, 1])}
  loss = lambda p, b: kfe.softmax_cross_entropy(model.apply(p, b["x"]), b["y"])
  scan_name = next(k for k in params["params"] if k.startswith("Scan"))
  stacked = params["params"][scan_name]

  def unrolled(p, b):
    h = b["x"]
    for i in range(L):
      h, _ = _Block().apply({"params": p[f"block{i}"]}, h, None)
    return kfe.softmax_cross_entropy(
        nn.Dense(2).apply({"params": p["head"]}, h), b["y"])

  flat = {"head": params["params"]["Dense_0"]}
  for i in range(L):
    flat[f"block{i}"] = jax.tree_util.tree_map(lambda a, i=i: a[i], stacked)
  share = kfe.describe_layers(loss, params, batch).splitlines()[-1]
  assert "fallback 0.0%" in share and "diagonal" in share   # LayerNorm: diagonal
  up_s, _ = _update(loss, params, batch)
  up_u, _ = _update(unrolled, flat, batch)
  for i in range(L):
    got = jax.tree_util.tree_map(lambda a, i=i: a[i], up_s["params"][scan_name])
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-9, atol=1e-12), got, up_u[f"block{i}"])


def _rnn_params():
  ks = jax.random.split(jax.random.PRNGKey(2), 2)
  return {"u": jax.random.normal(ks[0], (3, D)) / 2,
          "out": jax.random.normal(ks[1], (D, 2))}


def _rnn(p, xs, probes=None, decay=0.5):
  """``h_{t+1} = decay·h_t + x_t U`` over time-major ``xs [T, N, 3]``."""
  def step(h, inp):
    x, probe = inp
    h = decay * h + (x @ p["u"] + probe)
    return h, h
  probes = jnp.zeros(xs.shape[:2] + (D,)) if probes is None else probes
  return jax.lax.scan(step, jnp.zeros((xs.shape[1], D)), (xs, probes))


def test_recurrent_cell_statistics_expand_and_reduce():
  """``U`` is closed over by the scan body: one block, the time steps as
  extra tokens. Per-step loss → expand: ``A = Σ x xᵀ/(N T)``, ``G = Σ g gᵀ/M``
  with ``g_{n,t}`` the per-step output gradients; final-state loss under
  ``auto`` → reduce: ``â_n = mean_t x``, ``ĝ_n = Σ_t g``."""
  params = _rnn_params()
  t, n = 4, 3
  xs = jax.random.normal(jax.random.PRNGKey(3), (t, n, 3))
  per_step = {"x": xs, "y": jnp.zeros((t, n, 2))}
  final = {"x": xs, "y": jnp.zeros((n, 2))}
  loss_steps = lambda p, b: kfe.squared_error(_rnn(p, b["x"])[1] @ p["out"],
                                              b["y"])
  loss_final = lambda p, b: kfe.squared_error(_rnn(p, b["x"])[0] @ p["out"],
                                              b["y"])
  for loss, batch, sharing, m in ((loss_steps, per_step, "expand", t * n),
                                  (loss_final, final, "auto", n)):
    _, st = _update(loss, params, batch, weight_sharing=sharing)
    g = jax.grad(lambda pr: loss_from_probes(pr, loss, batch))(
        jnp.zeros((t, n, D))) * m          # per-example output gradients
    if sharing == "expand":
      a = xs.reshape(t * n, 3)
      a_exact, g_exact = a.T @ a / (t * n), g.reshape(-1, D).T @ g.reshape(
          -1, D) / m
    else:
      a, gs = xs.mean(axis=0), g.sum(axis=0)
      a_exact, g_exact = a.T @ a / n, gs.T @ gs / n
    np.testing.assert_allclose(st.factors[1].rows, a_exact, rtol=1e-10)
    np.testing.assert_allclose(st.factors[1].cols, g_exact, rtol=1e-10)


def loss_from_probes(probes, loss, batch):
  """``loss`` with zero probes added to the per-step pre-activations."""
  p = _rnn_params()
  if batch["y"].ndim == 3:
    return kfe.squared_error(_rnn(p, batch["x"], probes)[1] @ p["out"],
                             batch["y"])
  return kfe.squared_error(_rnn(p, batch["x"], probes)[0] @ p["out"],
                           batch["y"])


def test_reduce_is_exact_for_an_accumulating_linear_cell():
  """``h_{t+1} = h_t + x_t U`` and a square loss on ``h_T``: the time axis is
  summed before the loss, so K-FAC-reduce is the exact block for one
  example (and expand is not)."""
  params = _rnn_params()
  xs = jax.random.normal(jax.random.PRNGKey(4), (4, 1, 3))
  batch = {"x": xs, "y": jnp.array([[0.5, -1.0]])}
  loss = lambda p, b: kfe.squared_error(
      _rnn(p, b["x"], decay=1.0)[0] @ p["out"], b["y"])
  u = jax.grad(loss)(params, batch)["u"].ravel()
  exact = jnp.linalg.solve(jnp.outer(u, u) + LAM * jnp.eye(u.shape[0]), u)
  up, _ = _update(loss, params, batch, weight_sharing="auto")
  np.testing.assert_allclose(up["u"].ravel(), exact, rtol=1e-9, atol=1e-12)
  up, _ = _update(loss, params, batch, weight_sharing="expand")
  assert jnp.linalg.norm(up["u"].ravel() - exact) / jnp.linalg.norm(exact) > 0.05


class _LSTM(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Bidirectional(nn.RNN(nn.LSTMCell(6)), nn.RNN(nn.LSTMCell(6)))(x)
    return nn.Dense(3)(h)


def test_flax_rnn_and_bidirectional_lstm_are_covered():
  model = _LSTM()
  x = jnp.ones((2, 5, 4), jnp.float32)   # flax's LSTM carry is float32
  params = model.init(jax.random.PRNGKey(0), x)
  batch = {"x": x, "y": jnp.zeros((2, 5), jnp.int32)}
  loss = lambda p, b: kfe.softmax_cross_entropy(model.apply(p, b["x"]), b["y"])
  text = kfe.describe_layers(loss, params, batch)
  assert text.splitlines()[-1].startswith("Share of parameters: kronecker 100.0%")
  tx = kfe.kfac(loss, 0.1, example_batch=batch)
  up, _ = tx.update(jax.grad(loss)(params, batch), tx.init(params), params,
                    batch=batch, key=jax.random.PRNGKey(0))
  assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree_util.tree_leaves(up))


def test_nnx_scan_over_vmapped_linear_layers():
  from flax import nnx

  class Stack(nnx.Module):
    def __init__(self, rngs):
      @nnx.split_rngs(splits=L)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make(rngs):
        return nnx.Linear(D, D, rngs=rngs)
      self.layers = make(rngs)
      self.head = nnx.Linear(D, 2, rngs=rngs)

    def __call__(self, x):
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def body(x, layer):
        return jnp.tanh(layer(x))
      return self.head(body(x, self.layers))

  graphdef, state = nnx.split(Stack(nnx.Rngs(0)))
  loss = lambda s, b: kfe.softmax_cross_entropy(nnx.merge(graphdef, s)(b["x"]),
                                                b["y"])
  batch = {"x": jnp.ones((5, D), jnp.float32), "y": jnp.zeros(5, jnp.int32)}
  found = {(l.name, l.kind) for l in kfe.find_layers(loss, state, batch)}
  assert found == {("layers", "dense"), ("head", "dense")}
  assert "3x kronecker 5x4" in kfe.describe_layers(loss, state, batch)


class _AccumulatingCell(nn.RNNCellBase):
  """``h ← h + Dense(x)`` (no bias): a linear cell for ``nn.RNN``."""
  features: int = D

  @nn.compact
  def __call__(self, carry, x):
    h = carry + nn.Dense(self.features, use_bias=False, name="u")(x)
    return h, h

  def initialize_carry(self, rng, input_shape):
    return jnp.zeros(input_shape[:-1] + (self.features,), jnp.float64)

  @property
  def num_feature_axes(self):
    return 1


def test_nn_rnn_linear_cell_reduce_is_exact_and_expand_is_not():
  """The same oracle through flax's ``nn.RNN``: a final-state square loss
  of an accumulating linear cell is a sum over time before the loss, so
  ``auto`` picks reduce, which is the exact block for one example."""
  rnn = nn.RNN(_AccumulatingCell(), return_carry=True)
  x = jax.random.normal(jax.random.PRNGKey(5), (1, 4, 3))
  params = rnn.init(jax.random.PRNGKey(6), x)
  params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), params)
  batch = {"x": x, "y": jnp.array([[0.5, -1.0, 0.2, 0.3]])}
  loss = lambda p, b: kfe.squared_error(rnn.apply(p, b["x"])[0], b["y"])
  (layer,) = kfe.find_layers(loss, params, batch)
  assert layer.kind == "dense"
  u = jax.flatten_util.ravel_pytree(jax.grad(loss)(params, batch))[0]
  exact = jnp.linalg.solve(jnp.outer(u, u) + LAM * jnp.eye(u.shape[0]), u)
  for sharing, is_exact in (("auto", True), ("expand", False)):
    up, _ = _update(loss, params, batch, weight_sharing=sharing)
    got = jax.flatten_util.ravel_pytree(up)[0]
    err = jnp.linalg.norm(got - exact) / jnp.linalg.norm(exact)
    assert (err < 1e-9) if is_exact else (err > 0.05), (sharing, err)


class _ReadoutRNN(nn.Module):
  """``nn.RNN`` of a linear cell (no bias), then a dense readout per step.
  ``carry=0``: ``h_t = x_t U`` (the carry is unused: positions independent);
  ``carry=1``: ``h_t = h_{t-1} + x_t U``."""
  carry: float

  @nn.compact
  def __call__(self, x):
    cell = _AccumulatingCell() if self.carry else _MemorylessCell()
    return nn.Dense(2, use_bias=False, name="readout")(nn.RNN(cell, name="rnn")(x))


class _MemorylessCell(_AccumulatingCell):
  @nn.compact
  def __call__(self, carry, x):
    h = nn.Dense(self.features, use_bias=False, name="u")(x)
    return h, h


@pytest.mark.parametrize("carry,exact", [(0.0, True), (1.0, False)])
def test_nn_rnn_expand_is_the_type2_ggn_block_without_recurrence(carry, exact):
  """Spec oracle 3 through ``nn.RNN``: a per-step square loss on a linear
  readout of a linear cell whose steps do not interact is a deep linear
  network with a shared time axis, so K-FAC-expand's ``A ⊗ E[G]`` (sampled
  targets, 2000 draws) is the GGN block of the cell's kernel,
  ``(1/(N T)) Σ_n J_nᵀ J_n`` by ``jax.jacobian``. With the carry added
  (``h_t = h_{t-1} + x_t U``) a step's output depends on every earlier
  input, and expand is not the GGN block (the mismatch test)."""
  n, t = 3, 4
  model = _ReadoutRNN(carry)
  x = jax.random.normal(jax.random.PRNGKey(7), (n, t, 3))
  params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                  model.init(jax.random.PRNGKey(8), x))
  batch = {"x": x, "y": jnp.zeros((n, t, 2))}
  loss = lambda p, b: kfe.squared_error(model.apply(p, b["x"]), b["y"])
  layer, readout = kfe.find_layers(loss, params, batch)
  assert layer.params[0][-2:] == ("u", "kernel") and readout.name.endswith("readout")
  cell = layer.params[0][1]
  tx = kfe.scale_by_kfac(loss, ema_decay=0.0, weight_sharing="expand",
                         example_batch=batch)
  grads, state0 = jax.grad(loss)(params, batch), tx.init(params)
  kernel = [i for i, f in enumerate(state0.factors) if f is not None]
  draws = 2000
  factors = jax.jit(jax.vmap(lambda k: tx.update(
      grads, state0, params, batch=batch, key=k)[1].factors[kernel[0]]))(
          jax.random.split(jax.random.PRNGKey(9), draws))
  a, g = factors.rows[0][:3, :3], factors.cols.mean(axis=0)[:D, :D]
  np.testing.assert_allclose(a, x.reshape(-1, 3).T @ x.reshape(-1, 3) / (n * t),
                             rtol=1e-12)
  u = params["params"][cell]["u"]["kernel"]

  def outputs(kernel, xn):
    p = jax.tree_util.tree_map(lambda v: v, params)
    p["params"][cell]["u"]["kernel"] = kernel
    return model.apply(p, xn[None]).reshape(-1)

  jac = jax.vmap(jax.jacobian(outputs), in_axes=(None, 0))(u, x)
  jac = jac.reshape(n, t * 2, -1)
  ggn = jnp.einsum("nki,nkj->ij", jac, jac) / (n * t)
  err = jnp.linalg.norm(jnp.kron(a, g) - ggn) / jnp.linalg.norm(ggn)
  assert (err < 0.05) if exact else (err > 0.2), err   # measured 0.006, 0.36


def _conv(h, w):
  groups = h.shape[-1] // w["k"].shape[-2]     # depthwise when k is [.., 1, C]
  y = jax.lax.conv_general_dilated(h, w["k"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   feature_group_count=groups)
  return jnp.tanh(y + w["b"])


def _conv_params(c=3, leading=(), groups=1):
  ks = jax.random.split(jax.random.PRNGKey(5), 3)
  return {"k": jax.random.normal(ks[0], leading + (3, 3, c // groups, c)) / 3,
          "b": 0.1 * jax.random.normal(ks[1], leading + (c,)),
          "out": jax.random.normal(ks[2], (5 * 5 * c, 2)) / 4}


def _conv_head(h, p, labels):
  return kfe.softmax_cross_entropy(h.reshape(h.shape[0], -1) @ p["out"], labels)


def _assert_slices_equal_unrolled(stacked, unrolled, params, flat, batch,
                                  kernel, groups=1, **options):
  """The update and factors of ``stacked`` (kernel ``params[kernel]`` and
  bias ``params["b"]``, ``[L, ...]``) equal, per slice (and per group),
  those of ``unrolled`` (slice i as ``flat[f"{kernel}{i}"]``, ``flat[f"b{i}"]``)."""
  up_s, st_s = _update(stacked, params, batch, **options)
  up_u, st_u = _update(unrolled, flat, batch, **options)
  leaves_u = jax.tree_util.tree_leaves(flat)
  k_s = next(j for j, x in enumerate(jax.tree_util.tree_leaves(params))
             if x is params[kernel])
  for i in range(L):
    for name in (kernel, "b"):
      np.testing.assert_allclose(up_s[name][i], up_u[f"{name}{i}"], rtol=1e-9,
                                 atol=1e-12)
    k_u = next(j for j, x in enumerate(leaves_u) if x is flat[f"{kernel}{i}"])
    for side in ("rows", "cols"):
      got = getattr(st_s.factors[k_s], side)
      got = got[i] if groups == 1 else got[i * groups:(i + 1) * groups]
      np.testing.assert_allclose(got, getattr(st_u.factors[k_u], side),
                                 rtol=1e-10)


def _assert_same_update_and_factors(loss_a, params_a, loss_b, params_b, batch):
  """The tikhonov update and every factor of the two losses are equal."""
  up_a, st_a = _update(loss_a, params_a, batch)
  up_b, st_b = _update(loss_b, params_b, batch)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-9, atol=1e-12), up_a, up_b)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-10, atol=1e-14), st_a.factors, st_b.factors)


@pytest.mark.parametrize("sharing,groups", [("expand", 1), ("auto", 1),
                                            ("expand", 3), ("auto", 3)])
def test_scan_over_conv_layers_equals_the_unrolled_network(sharing, groups):
  """A stacked conv kernel ``[L, 3, 3, C/G, C]`` scanned over: one block per
  slice (and per group: a depthwise conv for G = C), each equal to the
  unrolled network's (under ``auto`` each conv's positions are pooled
  before the loss, so both sides use *reduce*)."""
  params = _conv_params(leading=(L,), groups=groups)
  batch = {"x": jax.random.normal(jax.random.PRNGKey(6), (4, 5, 5, 3)),
           "y": jnp.array([0, 1, 0, 1])}

  def scanned(p, b):
    h, _ = jax.lax.scan(lambda h, w: (_conv(h, w), None), b["x"],
                        {"k": p["k"], "b": p["b"]})
    return _conv_head(h, p, b["y"])

  def unrolled(p, b):
    h = b["x"]
    for i in range(L):
      h = _conv(h, {"k": p[f"k{i}"], "b": p[f"b{i}"]})
    return _conv_head(h, p, b["y"])

  flat = {"out": params["out"]}
  for i in range(L):
    flat[f"k{i}"], flat[f"b{i}"] = params["k"][i], params["b"][i]
  layers = kfe.find_layers(scanned, params, batch)
  assert [(l.name, l.kind, l.has_bias) for l in layers] == [
      ("k", "conv2d", True), ("out", "dense", False)]
  _assert_slices_equal_unrolled(scanned, unrolled, params, flat, batch, "k",
                                groups, weight_sharing=sharing)


@pytest.mark.parametrize("groups", [1, 3])
def test_conv_closed_over_by_a_scan_is_one_block_over_the_steps(groups):
  """A conv kernel closed over by the scan body, applied to each step's
  input with a per-step loss: K-FAC-expand over (steps × positions) is the
  block (per group, for a depthwise conv) of the same conv applied once to
  all ``T·N`` images."""
  params = _conv_params(groups=groups)
  t, n = 3, 2
  xs = jax.random.normal(jax.random.PRNGKey(7), (t, n, 5, 5, 3))
  batch = {"x": xs, "y": jnp.array([0, 1, 1, 0, 1, 0])}
  w = lambda p: {"k": p["k"], "b": p["b"]}

  def scanned(p, b):
    _, ys = jax.lax.scan(lambda c, x: (c, _conv(x, w(p))), 0.0, b["x"])
    return _conv_head(ys.reshape((t * n,) + ys.shape[2:]), p, b["y"])

  def batched(p, b):
    return _conv_head(_conv(b["x"].reshape((t * n,) + xs.shape[2:]), w(p)), p, b["y"])

  rows = kfe.describe_layers(scanned, params, batch).splitlines()
  block = ["kronecker", "28x3"] if groups == 1 else ["3x", "kronecker", "10x1"]
  assert next(r for r in rows if r.startswith("k ")).split()[2:2 + len(block)] == (
      block)     # one block (per group), not one per step
  _assert_same_update_and_factors(scanned, params, batched, params, batch)


class _ConvBlock(nn.Module):
  """A ConvNeXt-style block: depthwise 3×3, then 3×3 and 1×1 convs."""
  @nn.compact
  def __call__(self, x, _):
    h = nn.Conv(3, (3, 3), feature_group_count=3)(x)
    h = nn.Conv(3, (3, 3))(nn.relu(h))
    return x + nn.Conv(3, (1, 1))(nn.relu(h)), None


def test_flax_nn_scan_over_conv_blocks_is_covered():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x, _ = nn.scan(nn.remat(_ConvBlock), variable_axes={"params": 0},
                     split_rngs={"params": True}, length=L)()(x, None)
      return nn.Dense(2)(x.reshape(x.shape[0], -1))

  x = jax.random.normal(jax.random.PRNGKey(8), (2, 5, 5, 3))
  params = Net().init(jax.random.PRNGKey(0), x)
  loss = lambda p, b: kfe.softmax_cross_entropy(Net().apply(p, b["x"]), b["y"])
  batch = {"x": x, "y": jnp.array([0, 1])}
  text = kfe.describe_layers(loss, params, batch)
  assert "kronecker 100.0%" in text.splitlines()[-1], text
  for block in (f"{3 * L}x kronecker 10x1", f"{L}x kronecker 28x3",
                f"{L}x kronecker 4x3"):   # depthwise: a block per step and group
    assert text.count(block) == 1, (block, text)


@pytest.mark.parametrize("in_scan", [True, False])
def test_optimized_lstm_cell_equals_the_unfused_cell(in_scan):
  """``nn.OptimizedLSTMCell`` concatenates its four gate kernels before one
  matmul: each gate still gets its own block, equal (factors and update) to
  the one ``nn.LSTMCell`` (one Dense per gate, same parameters) gets."""
  x = jax.random.normal(jax.random.PRNGKey(9), (4, 3, 2))
  batch = {"x": x if in_scan else x[:, 0], "y": jnp.array([0, 1, 1, 0])}

  def make_loss(cell_type):
    cell = lambda n: cell_type(n, param_dtype=jnp.float64, name="cell")

    class Net(nn.Module):
      @nn.compact
      def __call__(self, x):
        if in_scan:
          h = nn.RNN(cell(5))(x)[:, -1]
        else:
          c = cell(5)
          h = c(c.initialize_carry(jax.random.PRNGKey(0), x.shape), x)[1]
        return nn.Dense(2)(h)
    return Net(), lambda p, b: kfe.softmax_cross_entropy(
        Net().apply(p, b["x"]), b["y"])

  fused_net, fused = make_loss(nn.OptimizedLSTMCell)
  _, unfused = make_loss(nn.LSTMCell)
  params = fused_net.init(jax.random.PRNGKey(0), batch["x"])
  text = kfe.describe_layers(fused, params, batch)
  assert "kronecker 100.0%" in text.splitlines()[-1], text
  _assert_same_update_and_factors(fused, params, unfused, params, batch)


def _time_scan(seq, w):
  """A recurrent layer over ``seq [T, N, D]``: ``h_t = tanh(x_t U + b + h/2)``."""
  def step(h, x):
    h = jnp.tanh(x @ w["u"] + w["b"] + 0.5 * h)
    return h, h
  return jax.lax.scan(step, jnp.zeros(seq.shape[1:]), seq)[1]


@pytest.mark.parametrize("sharing", ["expand", "auto"])
def test_nested_scans_equal_the_outer_loop_unrolled(sharing):
  """A stack of recurrent layers as a scan over layers (kernels ``[L, D, D]``
  scanned over) whose body scans over time (each slice closed over): one
  block per layer with the time steps as tokens, equal to the network whose
  layer loop is unrolled (each layer a single scan over time)."""
  params = _stack_params()
  params = {"u": params["k"], "b": params["b"], "out": params["out"]}
  seq = jax.random.normal(jax.random.PRNGKey(10), (4, 5, D))     # [T, N, D]
  batch = {"x": seq, "y": jnp.array([0, 1, 0, 1, 1])}

  def nested(p, b):
    out, _ = jax.lax.scan(lambda s, w: (_time_scan(s, w), None), b["x"],
                          {"u": p["u"], "b": p["b"]})
    return kfe.softmax_cross_entropy(out[-1] @ p["out"], b["y"])

  def unrolled(p, b):
    s = b["x"]
    for i in range(L):
      s = _time_scan(s, {"u": p[f"u{i}"], "b": p[f"b{i}"]})
    return kfe.softmax_cross_entropy(s[-1] @ p["out"], b["y"])

  flat = {"out": params["out"]}
  for i in range(L):
    flat[f"u{i}"], flat[f"b{i}"] = params["u"][i], params["b"][i]
  text = kfe.describe_layers(nested, params, batch)
  assert f"{L}x kronecker {D + 1}x{D}" in text and "kronecker 100.0%" in text, text
  _assert_slices_equal_unrolled(nested, unrolled, params, flat, batch, "u",
                                weight_sharing=sharing)


@pytest.mark.parametrize("cell", [nn.LSTMCell, nn.OptimizedLSTMCell])
def test_flax_stacked_lstm_in_nested_scans_is_covered(cell):
  """``nn.RNN(cell)`` inside ``nn.scan`` over layers: every kernel gets a
  block per layer (also when the cell concatenates its gate kernels)."""
  class Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return nn.RNN(cell(4))(x), None

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x, _ = nn.scan(Layer, variable_axes={"params": 0},
                     split_rngs={"params": True}, length=2)()(x, None)
      return nn.Dense(2)(x[:, -1])

  with jax.enable_x64(False):      # the cells' carry is float32
    x = jnp.ones((3, 5, 4))
    batch = {"x": x, "y": jnp.array([0, 1, 0])}
    params = Net().init(jax.random.PRNGKey(0), x)
    loss = lambda p, b: kfe.softmax_cross_entropy(Net().apply(p, b["x"]), b["y"])
    text = kfe.describe_layers(loss, params, batch)
  assert "kronecker 100.0%" in text.splitlines()[-1], text
  assert text.count("2x kronecker") == 8, text


def test_embedding_closed_over_by_a_scan_is_one_block_over_the_steps():
  """A table closed over by the scan body, looked up at each step with a
  per-step loss: one embedding block (diagonal A of id counts) over steps ×
  examples, equal to the table looked up once for all ``T·N`` ids."""
  ks = jax.random.split(jax.random.PRNGKey(11), 2)
  params = {"table": jax.random.normal(ks[0], (7, 3)),
            "out": jax.random.normal(ks[1], (3, 2))}
  t, n = 4, 3
  ids = jax.random.randint(jax.random.PRNGKey(12), (t, n), 0, 7)
  batch = {"ids": ids, "y": jnp.arange(t * n) % 2}

  def scanned(p, b):
    _, ys = jax.lax.scan(lambda c, i: (c, jnp.tanh(p["table"][i])), 0.0, b["ids"])
    return kfe.softmax_cross_entropy(ys.reshape(t * n, 3) @ p["out"], b["y"])

  def batched(p, b):
    h = jnp.tanh(p["table"][b["ids"].reshape(-1)])
    return kfe.softmax_cross_entropy(h @ p["out"], b["y"])

  rows = kfe.describe_layers(scanned, params, batch).splitlines()
  assert next(r for r in rows if r.startswith("table")).split()[1:4] == [
      "embedding", "kronecker", "diag(7)x3"], rows
  _assert_same_update_and_factors(scanned, params, batched, params, batch)
