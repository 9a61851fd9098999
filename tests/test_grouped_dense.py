"""Per-head and per-expert kernels: a ``dot_general`` with batch dimensions
on the kernel (Griffin's ``BlockDiagonalLinear``, ``"...hi,hij->...hj"``;
mixture-of-experts weights, ``"ned,edf->nef"``) is a grouped dense layer,
one block per head or expert, like a grouped conv's per group (float64).

Oracles: the layout-free ``A ⊗ G`` of ``oracles.kfac_block_by_vjp`` with
the entries across heads zeroed (K-FAC), ``solve(λI + UUᵀ/n, ∇)`` per head
with ``U`` from ``vmap(grad)`` (TENGraD), the same network written with
one plain dense layer per head (K-FAC expand and reduce, TKFAC), and, for
two-level K-FAC (whose coarse level leaves grouped layers on their fine
blocks), K-FAC's step on the grouped layer and Galerkin orthogonality on
the plain head's row with the exact coarse matrix.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_ext as kfe
from tests import test_layer_kinds as kinds
from tests import test_tengrad_scan_and_groups as tg
from tests import test_two_level as two_level

H, I, J, C = 3, 2, 4, 3     # heads, inputs and outputs per head, classes


class PerHeadDense(nn.Module):
  """``y[..., h, :] = x[..., h, :] @ w[h] + b[h]`` (block-diagonal weights)."""
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.normal(0.7), (H, I, J), jnp.float64)
    y = jnp.einsum("...hi,hij->...hj", x, w)
    if self.use_bias:
      y = y + self.param("b", nn.initializers.normal(0.3), (H, J), jnp.float64)
    return y


def _membership(use_bias):
  """Per flattened parameter (``ravel_pytree`` order: b, then w) its head."""
  w = np.broadcast_to(np.arange(H)[:, None, None], (H, I, J)).ravel()
  return jnp.asarray(np.concatenate([np.repeat(np.arange(H), J), w])
                     if use_bias else w)


def _model(use_bias):
  mix, head = PerHeadDense(use_bias), nn.Dense(C, param_dtype=jnp.float64)

  def model(p, x, probe=0.0):      # x [..., H, I] -> logits [..., C]
    h = mix.apply({"params": p["params"]["mix"]}, x) + probe
    return head.apply({"params": p["params"]["head"]},
                      jnp.tanh(h).reshape(h.shape[:-2] + (H * J,)))

  def init(x):
    return {"params": {
        "mix": mix.init(jax.random.PRNGKey(1), x)["params"],
        "head": head.init(jax.random.PRNGKey(2), jnp.ones((1, H * J)))["params"]}}

  return mix, model, init


@pytest.mark.parametrize("use_bias", [False, True])
def test_per_head_kernel_is_one_kronecker_block_per_head(use_bias):
  mix, model, init = _model(use_bias)
  x = jax.random.normal(jax.random.PRNGKey(0), (6, H, I), jnp.float64)
  batch = {"x": x, "y": jnp.array([0, 1, 2, 0, 1, 2])}
  text = kinds._check_update(
      model, init(x), batch, "mix",
      lambda q, xn: mix.apply({"params": q}, xn), lambda p, xn: xn, (H, J),
      groups=_membership(use_bias))
  assert f"{H}x kronecker {I + int(use_bias)}x{J}" in text, text
  assert "Every parameter belongs to a layer" in text, text


def test_per_head_kernel_over_positions_of_a_per_token_loss():
  """Tokens ``[N, T, H, I]`` each reaching its own loss term: every
  position is an example of the block (K-FAC-expand, exact per token)."""
  mix, model, init = _model(True)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, H, I), jnp.float64)
  y = jax.random.randint(jax.random.PRNGKey(3), (3, 4), 0, C)
  text = kinds._check_update(
      model, init(x), {"x": x, "y": y}, "mix",
      lambda q, xn: mix.apply({"params": q}, xn), lambda p, xn: xn, (H, J),
      groups=_membership(True))
  assert f"{H}x kronecker {I + 1}x{J}" in text, text


def _split_model(pool):
  """The per-head network with plain dense layers (``w_h``, ``b_h``): the
  reference a grouped block must equal. ``pool``: the tokens ``[N, T]`` are
  averaged before the classifier."""
  def logits(p, x):
    hs = [x[..., h, :] @ p[f"w{h}"] + p[f"b{h}"] for h in range(H)]
    z = jnp.tanh(jnp.stack(hs, axis=-2)).reshape(x.shape[:-2] + (H * J,))
    return (z.mean(axis=1) if pool else z) @ p["out"]
  return logits


def _grouped_model(pool, rhs_kernel):
  """The same network with one ``[H, I, J]`` kernel; ``rhs_kernel``: the
  kernel is ``dot_general``'s second operand (else its first)."""
  def logits(p, x):
    if rhs_kernel:
      y = jax.lax.dot_general(x, p["w"], (((3,), (1,)), ((2,), (0,))))
      y = jnp.moveaxis(y, 0, 2)                 # [H, N, T, J] -> [N, T, H, J]
    else:
      y = jax.lax.dot_general(p["w"], x, (((1,), (3,)), ((0,), (2,))))
      y = jnp.moveaxis(y, (0, 1), (2, 3))       # [H, J, N, T] -> [N, T, H, J]
    z = jnp.tanh(y + p["b"]).reshape(x.shape[:-2] + (H * J,))
    return (z.mean(axis=1) if pool else z) @ p["out"]
  return logits


def _split_params(p):
  out = {"out": p["out"]}
  for h in range(H):
    out[f"w{h}"], out[f"b{h}"] = p["w"][h], p["b"][h]
  return out


def _grouped_and_split_updates(transform, pool, rhs_kernel, **options):
  ks = jax.random.split(jax.random.PRNGKey(5), 4)
  params = {"w": jax.random.normal(ks[0], (H, I, J)) / 2,
            "b": 0.1 * jax.random.normal(ks[1], (H, J)),
            "out": jax.random.normal(ks[2], (H * J, C)) / 2}
  n, t = 5, 4
  batch = {"x": jax.random.normal(ks[3], (n, t, H, I)),
           "y": jax.random.randint(ks[1], (n,) if pool else (n, t), 0, C)}
  results = []
  for logits, p in ((_grouped_model(pool, rhs_kernel), params),
                    (_split_model(pool), _split_params(params))):
    loss = lambda q, b, logits=logits: kfe.softmax_cross_entropy(
        logits(q, b["x"]), b["y"])
    tx = transform(loss, damping=0.05, fisher="empirical", example_batch=batch,
                   **options)
    grads = jax.grad(loss)(p, batch)
    results.append(jax.jit(lambda g, p=p, tx=tx: tx.update(
        g, tx.init(p), p, batch=batch)[0])(grads))
  grouped, split = results
  np.testing.assert_allclose(_split_params(grouped)["out"], split["out"],
                             rtol=1e-9, atol=1e-12)
  for h in range(H):
    np.testing.assert_allclose(grouped["w"][h], split[f"w{h}"], rtol=1e-9,
                               atol=1e-12)
    np.testing.assert_allclose(grouped["b"][h], split[f"b{h}"], rtol=1e-9,
                               atol=1e-12)
  return grouped, split


@pytest.mark.parametrize("rhs_kernel", [False, True])
@pytest.mark.parametrize("pool,sharing", [(False, "expand"), (True, "reduce"),
                                          (True, "auto")])
def test_grouped_kfac_equals_one_dense_layer_per_head(rhs_kernel, pool, sharing):
  """Either operand order, with the bias added after the output is moved
  back to ``[N, T, H, J]``; K-FAC-reduce (and ``"auto"``, which picks it for
  the pooled tokens) averages each example's tokens per head as it does a
  plain layer's."""
  _grouped_and_split_updates(kfe.scale_by_kfac, pool, rhs_kernel,
                             weight_sharing=sharing, ema_decay=0.0,
                             damping_mode="tikhonov")


def test_grouped_tkfac_equals_one_dense_layer_per_head():
  _grouped_and_split_updates(kfe.scale_by_tkfac, True, False,
                             weight_sharing="reduce", ema_decay=0.0)


def test_grouped_kfac_reduce_is_not_expand():
  """The pooled network's reduce and expand updates differ (so the reduce
  test above cannot pass with expand's statistics)."""
  reduce_, _ = _grouped_and_split_updates(
      kfe.scale_by_kfac, True, False, weight_sharing="reduce", ema_decay=0.0,
      damping_mode="tikhonov")
  expand, _ = _grouped_and_split_updates(
      kfe.scale_by_kfac, True, False, weight_sharing="expand", ema_decay=0.0,
      damping_mode="tikhonov")
  assert float(jnp.max(jnp.abs(reduce_["w"] - expand["w"]))) > 1e-3


@pytest.mark.parametrize("rhs_kernel", [False, True])
def test_per_expert_kernel_has_an_exact_woodbury_block_per_expert(rhs_kernel):
  """TENGraD: each expert's block is its exact damped empirical Fisher block
  (the experts' kernels ``[E, D, F]`` see every example's ``x[n, e]``)."""
  e, d, f = 3, 2, 2
  ks = jax.random.split(jax.random.PRNGKey(7), 3)
  params = {"w": jax.random.normal(ks[0], (e, d, f)),
            "out": jax.random.normal(ks[1], (e * f, 2))}
  batch = {"x": jax.random.normal(ks[2], (tg.N, e, d)), "y": tg._labels()}

  def loss(p, b):
    if rhs_kernel:   # "ned,edf->enf"
      y = jax.lax.dot_general(b["x"], p["w"], (((2,), (1,)), ((1,), (0,))))
      y = jnp.moveaxis(y, 0, 1)
    else:            # "edf,ned->efn"
      y = jnp.moveaxis(jax.lax.dot_general(
          p["w"], b["x"], (((1,), (2,)), ((0,), (1,)))), 2, 0)
    z = jnp.tanh(y).reshape(-1, e * f)
    return kfe.softmax_cross_entropy(z @ p["out"], b["y"])

  grads, updates, state = tg._tengrad(loss, params, batch)
  assert int(state.health.failed_inverses) == 0
  u = tg._per_example_grads(loss, params, batch)["w"]
  for k in range(e):
    (want,) = tg._solve([u[:, k]], [grads["w"][k]])
    np.testing.assert_allclose(updates["w"][k], want, rtol=1e-9, atol=1e-12)
  text = kfe.describe_layers(loss, params, batch, blocks="woodbury",
                             gram_batch=8)
  assert f"{e}x woodbury n={tg.N} {d}x{f}" in text, text
  assert "woodbury 100.0%" in text, text


@pytest.mark.parametrize("combine", ["multiplicative", "balanced"])
def test_two_level_with_a_per_head_kernel(combine):
  """The per-head layer keeps its fine-level blocks only (as a grouped conv
  or an embedding does: the coarse level takes plain layers): its part of
  the step is K-FAC's, and with the exact coarse matrix the head's part is
  Galerkin-orthogonal, ``r_headᵀ(∇ − (F + λI)δ) = 0`` over the head's
  parameters."""
  mix, head = PerHeadDense(True), nn.Dense(2, param_dtype=jnp.float64)
  x = jax.random.normal(jax.random.PRNGKey(0), (7, H, I), jnp.float64)
  params = {"mix": mix.init(jax.random.PRNGKey(1), x)["params"],
            "head": head.init(jax.random.PRNGKey(2), jnp.ones((1, H * J)))["params"]}
  batch = {"x": x, "y": jax.random.normal(jax.random.PRNGKey(3), (7, 2))}

  def loss(p, b):
    h = jnp.tanh(mix.apply({"params": p["mix"]}, b["x"])).reshape(-1, H * J)
    return kfe.squared_error(head.apply({"params": p["head"]}, h), b["y"])

  assert f"{H}x kronecker {I + 1}x{J}" in kfe.describe_layers(loss, params, batch)
  delta, _ = two_level._direction(loss, params, batch, coarse_matrix="exact",
                                  combine=combine, fine_scale="none",
                                  example_batch=batch)
  fine = kfe.scale_by_kfac(loss, example_batch=batch, **two_level.EXACT)
  grads = jax.grad(loss)(params, batch)
  kfac = two_level._flat(fine.update(grads, fine.init(params), params,
                                     batch=batch)[0])
  grad, u = two_level._brute(loss, params, batch)
  n_head = sum(x.size for x in jax.tree_util.tree_leaves(params["head"]))
  h = slice(0, n_head)                          # "head" flattens before "mix"
  np.testing.assert_allclose(delta[n_head:], kfac[n_head:], rtol=1e-10)
  u_h = u[h]
  residual = grad[h] - (u_h @ u_h.T / u.shape[1] + two_level.LAM * jnp.eye(
      n_head)) @ delta[h]
  scale = float(jnp.max(jnp.abs(grad[h])))
  np.testing.assert_allclose(jnp.sum(residual), 0.0, atol=1e-10 * scale)
  assert float(jnp.max(jnp.abs(residual))) > 1e-4 * scale   # not trivially exact
  assert float(jnp.max(jnp.abs(delta[h] - kfac[h]))) > 1e-4 * scale


def _routed_experts(routed):
  """``(loss, logits, params, batch)``: tokens dispatched to experts'
  capacity slots (``"nd,nec->ecd"``, a closed-over one-hot routing, one slot
  per example and expert, as many slots as examples); ``routed``: slot c of
  expert j holds example ``c - j - 1`` (else example c)."""
  e, d, f = 2, 3, 2
  ks = jax.random.split(jax.random.PRNGKey(9), 3)
  params = {"w": jax.random.normal(ks[0], (e, d, f)),
            "out": jax.random.normal(ks[1], (f, 2))}
  dispatch = np.zeros((tg.N, e, tg.N))
  for j in range(e):
    slots = np.roll(np.arange(tg.N), j + 1) if routed else np.arange(tg.N)
    dispatch[slots, j, np.arange(tg.N)] = 1.0
  batch = {"x": jax.random.normal(ks[2], (tg.N, d)), "y": tg._labels()}

  def logits(p, x):   # (a routing passed in the batch is checked at random
    xe = jnp.einsum("nd,nec->ecd", x, dispatch)   # values: it "mixes")
    y = jnp.tanh(jnp.einsum("ecd,edf->ecf", xe, p["w"]))
    return jnp.einsum("ecf,nec->nf", y, dispatch) @ p["out"]

  loss = lambda p, b: kfe.softmax_cross_entropy(logits(p, b["x"]), b["y"])
  return loss, logits, params, batch


def test_experts_capacity_slots_in_example_order_get_exact_woodbury_blocks():
  loss, logits, params, batch = _routed_experts(False)
  assert "2x kronecker 3x2" in kfe.describe_layers(loss, params, batch)
  grads, updates, _ = tg._tengrad(loss, params, batch)
  per_example = lambda p: -jnp.take_along_axis(   # ℓ_n, whose gradients
      jax.nn.log_softmax(logits(p, batch["x"])),     # are U's rows
      batch["y"][:, None], axis=1)[:, 0]
  u = jax.jacobian(per_example)(params)["w"]
  for k in range(2):
    (want,) = tg._solve([u[:, k]], [grads["w"][k]])
    np.testing.assert_allclose(updates["w"][k], want, rtol=1e-9, atol=1e-12)


def test_experts_capacity_slots_out_of_example_order_get_no_woodbury_block():
  """With the slots permuted, slot c's ``ā gᵀ`` is another example's
  gradient: the layer falls back, saying why, instead of building a wrong
  Gram. Checked right after the same program with the identity routing
  (whose jaxpr prints alike: the check's cache keys on the constants too)."""
  loss, _, params, batch = _routed_experts(False)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    tg._tengrad(loss, params, batch)
  loss, _, params, batch = _routed_experts(True)
  with pytest.warns(UserWarning, match="not in the loss examples' order"):
    tg._tengrad(loss, params, batch)


def test_per_head_kernels_stacked_under_scan_equal_the_unrolled_network():
  """A scanned stack of per-head layers (kernel ``[L, H, I, I]``, bias
  ``[L, H, I]``): one block per slice and head, the unrolled network's."""
  layers = 2
  ks = jax.random.split(jax.random.PRNGKey(11), 4)
  params = {"w": jax.random.normal(ks[0], (layers, H, I, I)) / 2,
            "b": 0.1 * jax.random.normal(ks[1], (layers, H, I)),
            "out": jax.random.normal(ks[2], (H * I, C))}
  batch = {"x": jax.random.normal(ks[3], (tg.N, H, I)),
           "y": jnp.array([0, 1, 2, 0, 1, 2])}
  step = lambda h, w, b: jnp.tanh(jnp.einsum("nhi,hij->nhj", h, w) + b)

  def scanned(p, bt):
    h, _ = jax.lax.scan(lambda h, wb: (step(h, *wb), None), bt["x"],
                        (p["w"], p["b"]))
    return kfe.softmax_cross_entropy(h.reshape(-1, H * I) @ p["out"], bt["y"])

  def unrolled(p, bt):
    h = bt["x"]
    for k in range(layers):
      h = step(h, p[f"w{k}"], p[f"b{k}"])
    return kfe.softmax_cross_entropy(h.reshape(-1, H * I) @ p["out"], bt["y"])

  flat = {"out": params["out"]}
  for k in range(layers):
    flat[f"w{k}"], flat[f"b{k}"] = params["w"][k], params["b"][k]
  text = kfe.describe_layers(scanned, params, batch)
  assert f"{layers * H}x kronecker {I + 1}x{I}" in text, text
  got, want = [kfe.scale_by_kfac(
      f, damping=0.05, damping_mode="tikhonov", ema_decay=0.0,
      fisher="empirical", example_batch=batch) for f in (scanned, unrolled)]
  got = got.update(jax.grad(scanned)(params, batch), got.init(params), params,
                   batch=batch)[0]
  want = want.update(jax.grad(unrolled)(flat, batch), want.init(flat), flat,
                     batch=batch)[0]
  np.testing.assert_allclose(got["out"], want["out"], rtol=1e-9, atol=1e-12)
  for k in range(layers):
    np.testing.assert_allclose(got["w"][k], want[f"w{k}"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(got["b"][k], want[f"b{k}"], rtol=1e-9, atol=1e-12)
  # TENGraD: per slice and head, the exact damped empirical Fisher block
  grads, updates, state = tg._tengrad(scanned, params, batch)
  assert int(state.health.failed_inverses) == 0
  u = tg._per_example_grads(scanned, params, batch)
  for k in range(layers):
    for h in range(H):
      want_w, want_b = tg._solve([u["w"][:, k, h], u["b"][:, k, h]],
                                 [grads["w"][k, h], grads["b"][k, h]])
      np.testing.assert_allclose(updates["w"][k, h], want_w, rtol=1e-9,
                                 atol=1e-12)
      np.testing.assert_allclose(updates["b"][k, h], want_b, rtol=1e-9,
                                 atol=1e-12)


def test_flax_nn_vmap_over_members_is_a_grouped_layer():
  """``nn.vmap(nn.Dense)`` over members with their own inputs (an ensemble
  or per-expert MLPs): the stacked kernel ``[M, I, J]`` gets a block per
  member, the update equal to that of the same layer written as
  ``einsum("nmi,mij->nmj") + b``."""
  members = 3
  dense = nn.vmap(nn.Dense, variable_axes={"params": 0},
                  split_rngs={"params": True}, in_axes=1, out_axes=1,
                  axis_size=members)(J, param_dtype=jnp.float64)
  x = jax.random.normal(jax.random.PRNGKey(0), (6, members, I), jnp.float64)
  params = dense.init(jax.random.PRNGKey(1), x)["params"]
  assert params["kernel"].shape == (members, I, J)
  head = jax.random.normal(jax.random.PRNGKey(2), (members * J, C))
  batch = {"x": x, "y": jnp.array([0, 1, 2, 0, 1, 2])}

  def logits(out):
    return jnp.tanh(out).reshape(6, -1) @ head

  mapped = lambda p, b: kfe.softmax_cross_entropy(
      logits(dense.apply({"params": p}, b["x"])), b["y"])
  written = lambda p, b: kfe.softmax_cross_entropy(logits(
      jnp.einsum("nmi,mij->nmj", b["x"], p["kernel"]) + p["bias"]), b["y"])
  assert f"{members}x kronecker {I + 1}x{J}" in kfe.describe_layers(
      mapped, params, batch)
  updates = []
  for loss in (mapped, written):
    tx = kfe.scale_by_kfac(loss, damping=0.05, ema_decay=0.0, fisher="empirical",
                           damping_mode="tikhonov", example_batch=batch)
    updates.append(tx.update(jax.grad(loss)(params, batch), tx.init(params),
                             params, batch=batch)[0])
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-10, atol=1e-13), *updates)
