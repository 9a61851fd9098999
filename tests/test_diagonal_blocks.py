"""Scale-and-shift diagonal Fisher and the diagonal fallback, against vmap(grad)."""

import jax
import jax.numpy as jnp
import numpy as np

import kfac_jax_ext as kfe

LAM = 0.1


def _model(p, x):
  h = x @ p["dense"]["w"]
  mu = h.mean(-1, keepdims=True)
  h = (h - mu) * jax.lax.rsqrt(h.var(-1, keepdims=True) + 1e-5)
  return jnp.tanh(h * p["norm"]["scale"] + p["norm"]["shift"]) @ p["out"]["w"]


def _setup():
  ks = jax.random.split(jax.random.PRNGKey(0), 6)
  params = {"dense": {"w": jax.random.normal(ks[0], (4, 5), jnp.float64)},
            "norm": {"scale": 1 + 0.1 * jax.random.normal(ks[1], (5,), jnp.float64),
                     "shift": 0.1 * jax.random.normal(ks[2], (5,), jnp.float64)},
            "out": {"w": jax.random.normal(ks[3], (5, 3), jnp.float64)}}
  batch = {"x": jax.random.normal(ks[4], (9, 4), jnp.float64),
           "y": jax.random.randint(ks[5], (9,), 0, 3)}
  return params, batch


def _loss(p, b):
  return kfe.softmax_cross_entropy(_model(p, b["x"]), b["y"])


def _norm_updates_and_diagonals(**options):
  """The scale-and-shift leaves' K-FAC updates and gradients, and their
  exact empirical-Fisher diagonals from vmap(grad)."""
  params, batch = _setup()
  tx = kfe.scale_by_kfac(_loss, damping=LAM, ema_decay=0.0, fisher="empirical",
                         **options)
  grads = jax.grad(_loss)(params, batch)
  updates, _ = tx.update(grads, tx.init(params), params, batch=batch)
  per_ex = jax.vmap(jax.grad(lambda p, x, y: -jax.nn.log_softmax(
      _model(p, x[None])[0])[y]), (None, 0, 0))(params, batch["x"], batch["y"])
  return [(updates["norm"][name], grads["norm"][name],
           jnp.mean(per_ex["norm"][name] ** 2, axis=0)) for name in ("scale", "shift")]


def test_scale_and_shift_diagonal_equals_per_example_fisher_diagonal():
  params, batch = _setup()
  layers = kfe.find_layers(_loss, params, batch)
  assert [(l.name, l.kind) for l in layers] == [
      ("dense", "dense"), ("norm", "scale_and_shift"), ("out", "dense")]
  for update, grad, diag in _norm_updates_and_diagonals():
    np.testing.assert_allclose(update, grad / (diag + LAM), rtol=1e-10)


def test_relative_damping_damps_a_diagonal_by_its_mean():
  for update, grad, diag in _norm_updates_and_diagonals(damping_scale="relative"):
    np.testing.assert_allclose(update, grad / (diag + LAM * diag.mean()), rtol=1e-10)


def test_diagonal_fallback_for_an_embedding_is_unbiased():
  """With sampled targets, (∇ objective)²/M averages to the exact diagonal."""
  vocab, d = 6, 3
  ks = jax.random.split(jax.random.PRNGKey(1), 3)
  params = {"embed": jax.random.normal(ks[0], (vocab, d), jnp.float64),
            "out": {"w": jax.random.normal(ks[1], (d, 4), jnp.float64)}}
  batch = {"tokens": jnp.array([0, 1, 2, 3, 1]), "y": jnp.array([0, 1, 2, 3, 0])}

  def model(p, tokens):
    return jnp.tanh(jnp.take(p["embed"], tokens, axis=0)) @ p["out"]["w"]

  loss = lambda p, b: kfe.softmax_cross_entropy(model(p, b["tokens"]), b["y"])
  # The table is an embedding layer; laid out without example_batch it has no
  # Kronecker block and takes the diagonal fallback.
  assert [l.name for l in kfe.find_layers(loss, params, batch)] == ["embed", "out"]
  tx = kfe.scale_by_kfac(loss, damping=LAM, ema_decay=0.0, fallback="diagonal")
  grads = jax.grad(loss)(params, batch)
  run = jax.jit(jax.vmap(lambda k: tx.update(grads, tx.init(params), params,
                                             batch=batch, key=k)[1].diagonals[0]))
  diag_samples = run(jax.random.split(jax.random.PRNGKey(2), 4000))
  # exact diagonal Fisher of the embedding: mean_n E_y[u_n²], u_n per example
  logits = model(params, batch["tokens"])
  probs = jax.nn.softmax(logits)
  exact = jnp.zeros((vocab, d))
  for n in range(5):
    for c in range(4):
      u = jax.grad(lambda p: -jax.nn.log_softmax(model(p, batch["tokens"][n:n + 1])[0])
                   [c])(params)["embed"]
      exact = exact + probs[n, c] * u ** 2 / 5
  mc = diag_samples.mean(0)
  se = diag_samples.std(0) / np.sqrt(diag_samples.shape[0])
  used = exact > 1e-12
  assert np.all(np.abs(mc - exact)[used] < 5 * se[used] + 1e-12)
  assert np.all(mc[~used] == 0)
  # and the update divides by it
  upd, st = tx.update(grads, tx.init(params), params, batch=batch,
                      key=jax.random.PRNGKey(0))
  np.testing.assert_allclose(upd["embed"], grads["embed"] / (st.diagonals[0] + LAM),
                             rtol=1e-12)
