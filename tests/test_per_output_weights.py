"""Per-output loss weights (``weights`` of the predictions' shape) for the
sigmoid and squared-error helpers, whose outputs are independent: a
multi-label task's mask of the labels each example has (flax's
``ogbg_molpcba``), regression targets some examples lack (float64).

Oracles: with ``L = mean_n Σ_d w_nd l_nd``, the exact Fisher is
``(1/N) Σ_n J_nᵀ diag(w_n) H_n J_n`` (``jax.jacobian``); K-FAC's empirical
output factor is ``(1/N) Σ_n ĝ_n ĝ_nᵀ`` with ``ĝ_n = √w_n ⊙ ∂l_n/∂z_n``
(``oracles.kfac_block_by_vjp``); TENGraD's empirical block with a 0/1 mask
is ``(1/N) Σ_n u_n u_nᵀ``, ``u_n`` the gradient of example n's masked loss
(``vmap(grad)``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_ext as kfe
from tests import oracles

N, D_IN, D_OUT, LAM = 7, 3, 4, 0.05
HELPERS = {"sigmoid_cross_entropy": kfe.sigmoid_cross_entropy,
           "squared_error": kfe.squared_error}


def _task(kind, mask=False):
  ks = jax.random.split(jax.random.PRNGKey(0), 5)
  params = {"w": jax.random.normal(ks[0], (D_IN, D_OUT)),
            "b": 0.1 * jax.random.normal(ks[1], (D_OUT,))}
  x = jax.random.normal(ks[2], (N, D_IN))
  y = (jax.random.bernoulli(ks[3], 0.5, (N, D_OUT)).astype(jnp.float64)
       if kind == "sigmoid_cross_entropy" else jax.random.normal(ks[3], (N, D_OUT)))
  w = (jax.random.bernoulli(ks[4], 0.6, (N, D_OUT)) if mask
       else jax.random.uniform(ks[4], (N, D_OUT)) * 2.0)
  w = w.at[0, 0].set(jnp.zeros((), w.dtype))    # a missing label
  batch = {"x": x, "y": y, "w": w}
  loss = lambda p, b: HELPERS[kind](b["x"] @ p["w"] + p["b"], b["y"],
                                    weights=b["w"])
  return params, batch, loss


def _output_grad(kind, z, y):
  return jax.nn.sigmoid(z) - y if kind == "sigmoid_cross_entropy" else z - y


def _flat(tree):
  return jax.flatten_util.ravel_pytree(tree)[0]


@pytest.mark.parametrize("kind", sorted(HELPERS))
def test_value_is_the_weighted_mean(kind):
  params, batch, loss = _task(kind)
  z = batch["x"] @ params["w"] + params["b"]
  terms = (-(batch["y"] * jax.nn.log_sigmoid(z)
             + (1 - batch["y"]) * jax.nn.log_sigmoid(-z))
           if kind == "sigmoid_cross_entropy" else 0.5 * (z - batch["y"]) ** 2)
  np.testing.assert_allclose(loss(params, batch),
                             jnp.sum(batch["w"] * terms) / N, rtol=1e-12)


@pytest.mark.parametrize("kind", sorted(HELPERS))
def test_exact_fisher_product_weighs_each_output(kind):
  params, batch, loss = _task(kind)
  v = jax.tree_util.tree_map(lambda p: jnp.cos(jnp.arange(p.size)).reshape(
      p.shape), params)
  got = _flat(kfe.fisher_vector_product(loss, params, batch, v))
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  jac = jax.jacobian(lambda f: batch["x"] @ unravel(f)["w"] + unravel(f)["b"])(
      flat)                                            # [N, D_OUT, P]
  z = batch["x"] @ params["w"] + params["b"]
  h = (jax.nn.sigmoid(z) * (1 - jax.nn.sigmoid(z))
       if kind == "sigmoid_cross_entropy" else jnp.ones_like(z))
  jv = jnp.einsum("ndp,p->nd", jac, _flat(v))
  want = jnp.einsum("ndp,nd->p", jac, batch["w"] * h * jv) / N
  np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kind", sorted(HELPERS))
def test_kfac_empirical_update_against_the_closed_form(kind):
  params, batch, loss = _task(kind)
  z = batch["x"] @ params["w"] + params["b"]
  g = jnp.sqrt(batch["w"]) * _output_grad(kind, z, batch["y"])   # ĝ_n
  block, _, _ = oracles.kfac_block_by_vjp(
      lambda q, x: x @ q["w"] + q["b"], params, batch["x"], g)
  grads = jax.grad(loss)(params, batch)
  v = _flat(grads)
  want = jnp.linalg.solve(block + LAM * jnp.eye(v.shape[0]), v)
  tx = kfe.scale_by_kfac(loss, damping=LAM, damping_mode="tikhonov",
                         ema_decay=0.0, fisher="empirical", example_batch=batch)
  got = _flat(tx.update(grads, tx.init(params), params, batch=batch)[0])
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", sorted(HELPERS))
def test_tengrad_block_with_a_label_mask_is_exact(kind):
  params, batch, loss = _task(kind, mask=True)
  grads = jax.grad(loss)(params, batch)
  one = lambda p, b: loss(p, jax.tree_util.tree_map(lambda t: t[None], b))
  per = jax.vmap(jax.grad(one), (None, 0))(params, batch)
  u = jax.vmap(lambda i: _flat(jax.tree_util.tree_map(lambda t: t[i], per)))(
      jnp.arange(N))                                  # [N, P]
  v = _flat(grads)
  want = jnp.linalg.solve(u.T @ u / N + LAM * jnp.eye(v.shape[0]), v)
  tx = kfe.scale_by_tengrad(loss, damping=LAM, fisher="empirical",
                            gram_batch=N, example_batch=batch)
  got = _flat(tx.update(grads, tx.init(params), params, batch=batch)[0])
  np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", sorted(HELPERS))
def test_per_example_weights_spread_over_the_outputs_change_nothing(kind):
  """``w_nd = w_n`` gives the per-example weights' updates, sampled Fisher
  included (the same draws)."""
  params, batch, loss = _task(kind)
  w = batch["w"][:, 0] + 0.5
  updates = []
  for weights in (w, jnp.broadcast_to(w[:, None], (N, D_OUT))):
    b = dict(batch, w=weights)
    tx = kfe.scale_by_kfac(loss, damping=LAM, example_batch=b)
    updates.append(_flat(tx.update(jax.grad(loss)(params, b), tx.init(params),
                                   params, batch=b, key=jax.random.PRNGKey(1))[0]))
  np.testing.assert_allclose(updates[0], updates[1], rtol=1e-12)


def test_softmax_takes_per_example_weights_only():
  logits, labels = jnp.zeros((4, 3)), jnp.zeros(4, jnp.int32)
  with pytest.raises(ValueError, match=r"weights of shape \(4, 3\) must have "
                     r"the examples' shape \(4,\)\.$"):
    kfe.softmax_cross_entropy(logits, labels, weights=jnp.ones((4, 3)))
  with pytest.raises(ValueError, match=r"or, one per output, \(4, 3\)"):
    kfe.sigmoid_cross_entropy(logits, logits, weights=jnp.ones((3,)))
