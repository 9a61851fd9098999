"""TENGraD with ``damping_scale="relative"`` against its closed form (float64):
each block ``Δ_l = solve(F_l + λ·tr(F_l)/min(n, P_l)·I, ∇_l)`` (λ times the
mean of F_l's nonzero eigenvalues) with ``F_l = U_lU_lᵀ/n`` from
``vmap(grad)`` and ``P_l`` the block's parameters — dense (factored),
conv (explicit), per group of a grouped conv, an embedding table and a tied
table — and the step's independence of the loss's scale."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_ext as kfe
from tests import test_tengrad as base
from tests import test_tengrad_scan_and_groups as groups

LAM = 0.05


def _relative_solve(u, v, lam=LAM):
  """``solve(UᵀU/n + λ·tr(UᵀU/n)/min(n, P)·I, v)`` for ``u [n, P]``, ``v [P]``."""
  n, size = u.shape
  fisher = u.T @ u / n
  lam_l = lam * jnp.trace(fisher) / min(n, size)
  return jnp.linalg.solve(fisher + lam_l * jnp.eye(fisher.shape[0]), v)


def _relative_oracle(loss, params, batch):
  """Per layer (kernel and bias one block) the relative-damped solve."""
  grads = jax.grad(loss)(params, batch)
  n = len(batch["y"])
  per_example = groups._per_example_grads(loss, params, batch)
  g_leaves = jax.tree_util.tree_leaves(grads)
  u_leaves = jax.tree_util.tree_leaves(per_example)
  out = [None] * len(g_leaves)
  for group in base._layer_groups(params):
    u = jnp.concatenate([u_leaves[i].reshape(n, -1) for i in group], axis=1)
    v = jnp.concatenate([g_leaves[i].reshape(-1) for i in group])
    delta, start = _relative_solve(u, v), 0
    for i in group:
      out[i] = delta[start:start + g_leaves[i].size].reshape(g_leaves[i].shape)
      start += g_leaves[i].size
  return out


@pytest.mark.parametrize("task", ["mlp", "mlp_more_examples_than_parameters",
                                  "cnn"])
def test_relative_damping_equals_solve_damped_by_each_blocks_mean_eigenvalue(task):
  # n = 9 examples: fewer than every block's parameters (24, 15); n = 40:
  # more than the second block's 15, whose F is then full rank
  loss, params, batch = (base._cnn_task() if task == "cnn" else
                         base._mlp_task(40 if task.endswith("parameters") else 9))
  expected = _relative_oracle(loss, params, batch)
  updates, state = base._tengrad(loss, params, batch, damping_scale="relative",
                                 gram_batch=64)
  base._assert_close(updates, expected)
  # not the absolute step: the layers' mean eigenvalues are not 1
  absolute, _ = base._tengrad(loss, params, batch, gram_batch=64)
  assert max(np.max(np.abs(a - b)) for a, b in zip(absolute, updates)) > 1e-3
  blocks = [b for b in state.blocks if b is not None]
  assert len({float(b.damping) for b in blocks}) == len(blocks)  # one λ_l each


def test_relative_damping_per_group_of_a_grouped_conv():
  model = groups._GroupedCNN()
  x = jax.random.normal(jax.random.PRNGKey(0), (groups.N, 5, 5, 4), jnp.float64)
  params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64),
                                  model.init(jax.random.PRNGKey(1), x))
  batch = {"x": x, "y": groups._labels(classes=3)}
  loss = lambda p, b: kfe.softmax_cross_entropy(model.apply(p, b["x"]), b["y"])
  grads, updates, _ = groups._tengrad(loss, params, batch,
                                      damping_scale="relative")
  u = groups._per_example_grads(loss, params, batch)["params"]["g"]
  g, up = grads["params"]["g"], updates["params"]["g"]
  n = groups.N
  for j in range(2):   # group j: output channels 3j..3j+2, its own λ_l
    cols = slice(3 * j, 3 * j + 3)
    k_shape = g["kernel"][..., cols].shape
    uj = jnp.concatenate([u["kernel"][..., cols].reshape(n, -1),
                          u["bias"][:, cols]], axis=1)
    vj = jnp.concatenate([g["kernel"][..., cols].reshape(-1), g["bias"][cols]])
    want = _relative_solve(uj, vj)
    size = int(np.prod(k_shape))
    np.testing.assert_allclose(up["kernel"][..., cols],
                               want[:size].reshape(k_shape), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(up["bias"][cols], want[size:], rtol=1e-9,
                               atol=1e-12)


@pytest.mark.parametrize("table", ["embedding", "tied"])
def test_relative_damping_of_embedding_and_tied_tables(table):
  if table == "embedding":
    loss, params, batch = groups._lookup_task()
  else:
    ks = jax.random.split(jax.random.PRNGKey(6), 3)
    params = {"embed": jax.random.normal(ks[0], (groups.V, groups.D)),
              "mid": jax.random.normal(ks[1], (groups.D, groups.D)) / 2}
    batch = {"ids": jax.random.randint(ks[2], (groups.N, groups.T), 0, groups.V),
             "y": groups._labels()}

    def loss(p, b):
      h = jnp.tanh(jnp.take(p["embed"], b["ids"], axis=0) @ p["mid"])
      return kfe.softmax_cross_entropy(h.mean(axis=1) @ p["embed"].T, b["y"])

  grads, updates, state = groups._tengrad(loss, params, batch,
                                          damping_scale="relative")
  assert int(state.health.failed_inverses) == 0
  u = groups._per_example_grads(loss, params, batch)
  for name in params:
    want = _relative_solve(u[name].reshape(groups.N, -1), grads[name].reshape(-1))
    np.testing.assert_allclose(updates[name].reshape(-1), want, rtol=1e-9,
                               atol=1e-12)


def test_relative_damping_makes_the_step_independent_of_the_loss_scale():
  """Loss × c scales the gradient and the registered loss's Fisher by c:
  with relative damping Δ is unchanged; with absolute damping it is not."""
  loss, params, batch = base._mlp_task()
  c = 64.0
  scaled = lambda p, b: kfe.softmax_cross_entropy(
      base.oracles.mlp_apply(p, b["x"]), b["y"],
      weights=jnp.full(b["y"].shape, c))
  for scale, invariant in (("relative", True), ("absolute", False)):
    small, _ = base._tengrad(loss, params, batch, damping_scale=scale)
    big, _ = base._tengrad(scaled, params, batch, damping_scale=scale)
    close = all(np.allclose(x, y, rtol=1e-9, atol=1e-12) for x, y in zip(small, big))
    assert close == invariant, scale


def test_damping_scale_is_checked_and_reaches_the_natural_gradient_blocks():
  loss, params, batch = base._mlp_task()
  with pytest.raises(ValueError, match="damping_scale must be one of"):
    kfe.scale_by_tengrad(loss, damping_scale="per_layer")
  with pytest.raises(ValueError, match="damping_scale must be one of"):
    kfe.tengrad(loss, 0.1, damping_scale="Relative")
  # the Woodbury side of natural_gradient is damped the same way
  tx = kfe.scale_by_natural_gradient(loss, blocks="woodbury", example_batch=batch,
                                     damping=LAM, fisher="empirical",
                                     gram_batch=16, damping_scale="relative")
  grads = jax.grad(loss)(params, batch)
  updates, _ = tx.update(grads, tx.init(params), params, batch=batch)
  base._assert_close(jax.tree_util.tree_leaves(updates),
                     _relative_oracle(loss, params, batch))
  # the adaptive alias takes it (λ₀ relative)
  kfe.tengrad(loss, "adaptive", momentum="adaptive", damping=1.0,
              damping_adaptation=True, damping_scale="relative").init(params)
