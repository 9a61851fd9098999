"""A kernel with several uses gets one Kronecker block: K-FAC-expand over
the uses (float64 oracles)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_ext as kfe
from kfac_jax_ext import tracing
from tests import oracles

LAM = 0.05




def _update_and_state(loss, params, batch):
  tx = kfe.scale_by_kfac(loss, damping=LAM, damping_mode="tikhonov",
                         ema_decay=0.0, fisher="empirical", inverse_every=1,
                         example_batch=batch)
  return tx.update(jax.grad(loss)(params, batch), tx.init(params), params,
                   batch=batch)


def test_tied_uses_match_the_untied_tokens_exactly():
  """``W`` applied to two inputs, each with its own loss position, is the
  same layer as ``W`` applied to both stacked as tokens: same factors, same
  update (expand over the uses is exact here in the sense the sequence block
  is)."""
  d, c, n = 3, 4, 5
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  w = jax.random.normal(ks[0], (d, c))
  batch = {"x1": jax.random.normal(ks[1], (n, d)),
           "x2": jax.random.normal(ks[2], (n, d)),
           "y": jnp.arange(2 * n).reshape(n, 2) % c}
  tied = lambda p, b: kfe.softmax_cross_entropy(
      jnp.stack([b["x1"] @ p["w"], b["x2"] @ p["w"]], axis=1), b["y"])
  stacked = lambda p, b: kfe.softmax_cross_entropy(
      jnp.stack([b["x1"], b["x2"]], axis=1) @ p["w"], b["y"])
  (up_t, st_t), (up_s, st_s) = [_update_and_state(f, {"w": w}, batch)
                                for f in (tied, stacked)]
  assert kfe.find_layers(tied, {"w": w}, batch)[0].kind == "tied"
  assert kfe.find_layers(stacked, {"w": w}, batch)[0].kind == "dense"
  np.testing.assert_allclose(st_t.factors[0].rows, st_s.factors[0].rows,
                             rtol=1e-12)
  np.testing.assert_allclose(st_t.factors[0].cols, st_s.factors[0].cols,
                             rtol=1e-12)
  np.testing.assert_allclose(up_t["w"], up_s["w"], rtol=1e-10)


VOCAB, WIDTH = 5, 3


def _tied_table():
  """``E`` as embedding and as logits ``h Eᵀ``, a loss per position (M = 6).

  Returns ``(params, batch, model, loss, tokens)`` with ``tokens`` the
  brute-force per-token ``(g_logit, g_embed, h)``: the logits' output
  gradients, the embedding lookups' output gradients and the logits' inputs.
  """
  ks = jax.random.split(jax.random.PRNGKey(1), 3)
  params = {"embed": jax.random.normal(ks[0], (VOCAB, WIDTH)),
            "mid": jax.random.normal(ks[1], (WIDTH, WIDTH))}
  ids = jnp.array([[0, 1, 1], [4, 2, 0]])
  batch = {"x": ids, "y": jnp.array([[1, 2, 3], [0, 0, 4]])}

  def model(p, ids, probe=0.0):
    h = jnp.tanh((jnp.take(p["embed"], ids, axis=0) + probe) @ p["mid"])
    return h @ p["embed"].T, h

  loss = lambda p, b: kfe.softmax_cross_entropy(model(p, b["x"])[0], b["y"])
  m = ids.size
  logits, h = model(params, ids)
  g_logit = (jax.nn.softmax(logits).reshape(m, VOCAB)
             - jax.nn.one_hot(batch["y"].reshape(m), VOCAB))
  g_embed = jax.vmap(jax.grad(lambda pr, i, y: -jax.nn.log_softmax(
      model(params, i[None], pr[None])[0][0])[y]), (None, 0, 0))(
          jnp.zeros(WIDTH), ids.reshape(m), batch["y"].reshape(m))
  return params, batch, model, loss, (g_logit, g_embed, h.reshape(m, WIDTH))


def test_embedding_tied_to_the_output_projection():
  """``E`` as embedding (rows = ids) and as logits ``h Eᵀ`` (rows = logit
  gradients): ``R = diag(counts)/K + Σ g_l g_lᵀ/M``, ``C = Σ g_e g_eᵀ/M +
  Σ h hᵀ/K`` with K the tokens of both uses; the update is
  ``solve(R⊗C + λI, ∇)``. It is an approximation: the test also shows it
  differs from the exact block."""
  params, batch, model, loss, (g_logit, g_embed, hs) = _tied_table()
  ids = batch["x"]
  traced = tracing.trace_loss(loss, params, batch)
  tied = [l for l in traced.layers if l.kind == "tied"]
  assert len(tied) == 1 and tied[0].transposed == (False, True)
  up, st = _update_and_state(loss, params, batch)
  m, k = ids.size, 2 * ids.size   # the loss is per position: M = 6 examples
  counts = jnp.bincount(ids.reshape(-1), length=VOCAB)
  rows = jnp.diag(counts) / k + g_logit.T @ g_logit / m
  cols = g_embed.T @ g_embed / m + hs.T @ hs / k
  np.testing.assert_allclose(st.factors[0].rows, rows, rtol=1e-10, atol=1e-14)
  np.testing.assert_allclose(st.factors[0].cols, cols, rtol=1e-10, atol=1e-14)
  grads = jax.grad(loss)(params, batch)
  expected = oracles.kron_solve(rows, cols, grads["embed"], LAM)
  np.testing.assert_allclose(up["embed"], expected, rtol=1e-9)
  # the exact (empirical) Fisher block of the table is not R⊗C
  per_tok = jax.vmap(jax.grad(lambda p, i, y: -jax.nn.log_softmax(
      model(p, i[None])[0][0])[y]), (None, 0, 0))(
          params, ids.reshape(m), batch["y"].reshape(m))["embed"].reshape(m, -1)
  exact = per_tok.T @ per_tok / m
  rel = jnp.linalg.norm(jnp.kron(rows, cols) - exact) / jnp.linalg.norm(exact)
  assert rel > 0.05, rel


def _tkfac_update(loss, params, batch, factors):
  tx = kfe.scale_by_tkfac(loss, damping=LAM, damping_mode="tikhonov",
                          ema_decay=0.0, fisher="empirical", inverse_every=1,
                          factors=factors, example_batch=batch)
  return tx.update(jax.grad(loss)(params, batch), tx.init(params), params,
                   batch=batch)[0]


@pytest.mark.parametrize("factors", ["weighted", "unweighted"])
def test_tkfac_tied_uses_match_the_untied_tokens_exactly(factors):
  d, c, n = 3, 4, 5
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  w = jax.random.normal(ks[0], (d, c))
  batch = {"x1": jax.random.normal(ks[1], (n, d)),
           "x2": 2.0 * jax.random.normal(ks[2], (n, d)),
           "y": jnp.arange(2 * n).reshape(n, 2) % c}
  tied = lambda p, b: kfe.softmax_cross_entropy(
      jnp.stack([b["x1"] @ p["w"], b["x2"] @ p["w"]], axis=1), b["y"])
  stacked = lambda p, b: kfe.softmax_cross_entropy(
      jnp.stack([b["x1"], b["x2"]], axis=1) @ p["w"], b["y"])
  up_t = _tkfac_update(tied, {"w": w}, batch, factors)
  up_s = _tkfac_update(stacked, {"w": w}, batch, factors)
  np.testing.assert_allclose(up_t["w"], up_s["w"], rtol=1e-10)


def test_tkfac_embedding_tied_to_the_output_projection():
  """``δ·Φ⊗Ψ`` over both uses: the table's rows hold the embedding's ids
  (weighted by ‖g‖²) and the logits' output gradients (weighted by ‖h‖²)."""
  params, batch, _, loss, (g_logit, g_embed, hs) = _tied_table()
  up = _tkfac_update(loss, params, batch, "weighted")
  m = batch["x"].size
  beta_e, beta_l = jnp.sum(g_embed ** 2, 1), jnp.sum(g_logit ** 2, 1)
  alpha_l = jnp.sum(hs ** 2, 1)
  counts = jnp.zeros(VOCAB).at[batch["x"].reshape(-1)].add(beta_e)
  rows = jnp.diag(counts) / m + (g_logit * alpha_l[:, None]).T @ g_logit / m
  cols = g_embed.T @ g_embed / m + (hs * beta_l[:, None]).T @ hs / m
  delta = (jnp.sum(beta_e) + jnp.sum(alpha_l * beta_l)) / m
  block = delta * jnp.kron(rows / jnp.trace(rows), cols / jnp.trace(cols))
  grad = jax.grad(loss)(params, batch)["embed"]
  want = jnp.linalg.solve(block + LAM * jnp.eye(VOCAB * WIDTH),
                          grad.reshape(-1))
  np.testing.assert_allclose(up["embed"], want.reshape(VOCAB, WIDTH),
                             rtol=1e-9)
