"""``kfe.natural_gradient``: a Kronecker or a Woodbury block per layer.

Float64, brute force: on a model where the cost model gives two layers a
Woodbury block and one a Kronecker block, each layer's update is its own
closed form, ``(A⊗G + λI)⁻¹∇`` or ``(UUᵀ/n + λI)⁻¹∇``, from per-example
quantities of ``oracles.py``.
"""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_ext as kfe
from kfac_jax_ext import natural_gradient_transform as ng
from kfac_jax_ext import tracing
from benchmarks import models
from tests import oracles

LAM = 0.05
SIZES = (40, 24, 3, 2)      # d_a×d_g: 41×24, 25×3 (Woodbury), 4×2 (Kronecker)
N, GRAM = 12, 8


def _problem():
  params = oracles.mlp_init(jax.random.PRNGKey(0), SIZES)
  kx, ky = jax.random.split(jax.random.PRNGKey(1))
  batch = {"x": jax.random.normal(kx, (N, SIZES[0])),
           "y": jax.random.normal(ky, (N, SIZES[-1]))}
  loss = lambda p, b: kfe.squared_error(oracles.mlp_apply(p, b["x"]), b["y"])
  return params, batch, loss


def _closed_forms(params, batch, grads, chosen):
  """Per layer, the closed-form update of the block it was given."""
  inputs, _ = oracles.mlp_inputs_and_preacts(params, batch["x"])
  per_example = lambda h, y: 0.5 * jnp.sum((h - y) ** 2)
  g = jax.vmap(oracles.mlp_output_grads(params, batch["x"], per_example))(
      batch["x"], (batch["y"],))
  out = []
  for l, kind in enumerate(chosen):
    a = oracles.homogeneous(inputs[l])
    v = jnp.concatenate([grads[l]["w"], grads[l]["b"][None]], axis=0)
    if kind == "kronecker":       # the first statistics: one batch, no EMA
      delta = oracles.kron_solve(a.T @ a / N, g[l].T @ g[l] / N, v, LAM)
    else:                         # U: the first GRAM examples' gradients
      u = jnp.einsum("ni,nj->nij", a[:GRAM], g[l][:GRAM]).reshape(GRAM, -1)
      f = u.T @ u / GRAM + LAM * jnp.eye(u.shape[1])
      delta = jnp.linalg.solve(f, v.reshape(-1)).reshape(v.shape)
    out.append({"w": delta[:-1], "b": delta[-1]})
  return out


def test_costs_choose_woodbury_for_wide_layers_and_kronecker_for_small_ones():
  params, batch, loss = _problem()
  traced = tracing.trace_loss(loss, params, batch)
  chosen = ng.choose_blocks(traced, "auto", gram_batch=GRAM)
  kinds = [chosen[m.kernel] for m in traced.layers]
  assert kinds == ["woodbury", "woodbury", "kronecker"]
  first, last = traced.layers[0], traced.layers[2]
  assert ng.kronecker_cost(first) == 41 ** 3 + 24 ** 3
  assert ng.woodbury_cost(first, GRAM, N) == GRAM ** 2 * (41 + 24) + GRAM ** 3
  assert ng.kronecker_cost(last) == 4 ** 3 + 2 ** 3
  for blocks, want in (("kronecker", ["kronecker"] * 3), ("woodbury", ["woodbury"] * 3)):
    got = ng.choose_blocks(traced, blocks, gram_batch=GRAM)
    assert [got[m.kernel] for m in traced.layers] == want


@pytest.mark.parametrize("blocks", ["auto", "kronecker", "woodbury"])
def test_each_layer_update_is_its_blocks_closed_form(blocks):
  params, batch, loss = _problem()
  tx = kfe.scale_by_natural_gradient(loss, blocks=blocks, example_batch=batch,
                                     damping=LAM, gram_batch=GRAM,
                                     fisher="empirical")
  grads = jax.grad(loss)(params, batch)
  update = jax.jit(lambda g, s, p, b: tx.update(g, s, p, batch=b))
  delta, state = update(grads, tx.init(params), params, batch)
  chosen = {"auto": ["woodbury", "woodbury", "kronecker"]}.get(blocks, [blocks] * 3)
  want = _closed_forms(params, batch, grads, chosen)
  for l in range(3):
    for leaf in ("w", "b"):
      np.testing.assert_allclose(delta[l][leaf], want[l][leaf], rtol=1e-8,
                                 atol=1e-12, err_msg=f"layer {l} {leaf} ({chosen[l]})")
  kron_entries = [f is not None for f in state.kronecker.factors]
  wood_blocks = [b is not None for b in state.woodbury.blocks]
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  kernels = [i for i, (path, _) in enumerate(leaves) if path[-1].key == "w"]
  assert [kron_entries[i] for i in kernels] == [c == "kronecker" for c in chosen]
  assert [wood_blocks[i] for i in kernels] == [c == "woodbury" for c in chosen]


def test_the_alias_trains_and_the_fused_step_equals_the_plain_one():
  params, batch, loss = _problem()
  opt = kfe.natural_gradient(loss, 0.1, damping=LAM, gram_batch=GRAM,
                             example_batch=batch, inverse_every=2,
                             fisher="empirical")
  step = kfe.make_train_step(loss, opt, donate=False)
  p_fast, s_fast = params, opt.init(params)
  p_plain, s_plain = params, opt.init(params)
  losses = []
  for i in range(4):
    p_fast, s_fast, value = step(p_fast, s_fast, batch, jax.random.PRNGKey(i), i)
    losses.append(float(value))
    grads = jax.grad(loss)(p_plain, batch)
    up, s_plain = opt.update(grads, s_plain, p_plain, batch=batch)
    p_plain = optax.apply_updates(p_plain, up)
  flat = lambda t: jax.flatten_util.ravel_pytree(t)[0]
  np.testing.assert_allclose(flat(p_fast), flat(p_plain), rtol=1e-9, atol=1e-12)
  losses.append(float(loss(p_fast, batch)))
  assert losses[-1] < 0.6 * losses[0], losses       # momentum 0.9: not monotone


def test_3c1f_net_preconditions_every_layer():
  """The 10368→500 dense layer K-FAC cannot hold (A is 10369²) gets a
  Woodbury block, the first conv (10×128) a Kronecker block, and every
  other layer the block whose refresh is cheaper at n = 64."""
  model = models.ConvNet3C1F()
  x = jax.ShapeDtypeStruct((64, 28, 28, 1), jnp.float32)
  batch = {"x": x, "y": jax.ShapeDtypeStruct((64,), jnp.int32)}
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  loss = lambda p, b: kfe.softmax_cross_entropy(model.apply(p, b["x"]), b["y"])
  text = kfe.describe_layers(loss, params, batch, blocks="auto", gram_batch=64)
  assert "woodbury n=64 10369x500" in text
  assert "fallback" not in text.split("Share of parameters")[1].replace(
      "fallback 0.0%", "")
  traced = tracing.trace_loss(loss, params, batch)
  chosen = ng.choose_blocks(traced, "auto", gram_batch=64)
  kinds = {m.name.split("/")[-1]: chosen.get(m.kernel) for m in traced.layers}
  assert kinds["Dense_0"] == "woodbury"
  assert kinds["Conv_0"] == "kronecker"     # 10×128: cheaper than any Gram
  for m in traced.layers:                   # the rest by the cost model
    costs = {"kronecker": ng.kronecker_cost(m),
             "woodbury": ng.woodbury_cost(m, 64, 64)}
    if m.name.split("/")[-1] != "Dense_0":
      assert chosen[m.kernel] == min(costs, key=costs.get), m.name
  plain = kfe.describe_layers(loss, params, batch)
  assert "fallback (factor 10369 > max_factor_dim)" in plain


def test_bad_options_are_named():
  params, batch, loss = _problem()
  with pytest.raises(ValueError, match="example_batch"):
    kfe.scale_by_natural_gradient(loss)
  with pytest.raises(ValueError, match="blocks must be one of"):
    kfe.scale_by_natural_gradient(loss, blocks="shampoo", example_batch=batch)
  with pytest.raises(ValueError, match="stats_every must divide"):
    kfe.scale_by_natural_gradient(loss, example_batch=batch, stats_every=2,
                                  inverse_every=5)
  with pytest.raises(ValueError, match="gram_batch"):
    kfe.scale_by_natural_gradient(loss, example_batch=batch, gram_batch=0)
