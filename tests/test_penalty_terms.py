"""Terms added to the registered losses (an L2 or L1 penalty on the
weights, a VAE's KL term) do not cost a layer its block.

A penalty's use of a kernel reaches the loss value but no registered loss's
inputs: it has no Fisher of the model's predictive distribution, so it is
not a second use of the kernel (before, ``loss + c·Σw²`` made every
penalised kernel "used 2 times: tied or shared" and fall back). The
statistics stay those of the registered losses; the update preconditions
the whole gradient, the penalty's included. Float64, against the oracle's
factors of the registered loss alone. Inside a ``scan`` body the same holds
for a penalty accumulated in the carry.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_ext as kfe
from tests import oracles

LAM, C1, C2 = 0.05, 0.1, 0.03


def _batch():
  k = jax.random.split(jax.random.PRNGKey(1), 2)
  return {"x": jax.random.normal(k[0], (12, 5)),
          "y": jax.random.randint(k[1], (12,), 0, 3)}


def _penalised(params, batch):
  data = kfe.softmax_cross_entropy(oracles.mlp_apply(params, batch["x"]), batch["y"])
  return (data + C1 * jnp.sum(params[0]["w"] ** 2)
          + C2 * jnp.sum(jnp.abs(params[1]["w"])))


def _matrix(layer):
  return jnp.concatenate([layer["w"], layer["b"][None]], axis=0)


def test_penalised_kernels_keep_their_blocks_and_the_update_is_exact():
  params = oracles.mlp_init(jax.random.PRNGKey(3), [5, 4, 3])
  batch = _batch()
  text = kfe.describe_layers(_penalised, params, batch)
  assert "Every parameter belongs to a layer." in text, text
  assert "kronecker 100.0%" in text.splitlines()[-1], text
  assert ("Also used in terms added to the registered losses (a penalty): "
          "0/w, 1/w.") in text, text
  tx = kfe.scale_by_kfac(_penalised, damping=LAM, damping_mode="tikhonov",
                         ema_decay=0.0, fisher="empirical", example_batch=batch)
  grads = jax.grad(_penalised)(params, batch)
  updates, _ = jax.jit(lambda g: tx.update(g, tx.init(params), params,
                                           batch=batch))(grads)
  # the factors of the registered loss alone; the penalty's gradient in ∇
  for layer, (a, g) in enumerate(oracles.mlp_empirical_factors(params, batch)):
    expected = oracles.kron_solve(a, g, _matrix(grads[layer]), LAM)
    np.testing.assert_allclose(_matrix(updates[layer]), expected, rtol=1e-9,
                               atol=1e-12)
  # and the penalty is in that gradient: without it the update differs
  plain = jax.grad(lambda p, b: kfe.softmax_cross_entropy(
      oracles.mlp_apply(p, b["x"]), b["y"]))(params, batch)
  assert not np.allclose(_matrix(plain[0]), _matrix(grads[0]), rtol=1e-3)


def test_a_leaf_used_only_in_a_penalty_says_so():
  params = {"mlp": oracles.mlp_init(jax.random.PRNGKey(3), [5, 3]),
            "prior": jnp.ones((3,))}

  def loss_fn(p, b):
    data = kfe.softmax_cross_entropy(oracles.mlp_apply(p["mlp"], b["x"]), b["y"])
    return data + jnp.sum((p["prior"] - 0.5) ** 2)

  text = kfe.describe_layers(loss_fn, params, _batch())
  row = next(r for r in text.splitlines() if r.startswith("prior"))
  assert "used only in terms added to the registered losses (a penalty)" in row, text
  assert "Also used in terms added to the registered losses (a penalty): prior." in text


def test_weight_standardisation_before_the_loss_still_falls_back():
  """A kernel transformed before it reaches the predictions is not a
  penalty: that use reaches the loss's inputs."""
  params = oracles.mlp_init(jax.random.PRNGKey(3), [5, 3])

  def loss_fn(p, b):
    w = p[0]["w"]
    w = (w - w.mean(0)) / (w.std(0) + 1e-5)
    logits = b["x"] @ w + p[0]["b"]
    return kfe.softmax_cross_entropy(logits, b["y"]) + 0.1 * jnp.sum(p[0]["w"] ** 2)

  text = kfe.describe_layers(loss_fn, params, _batch())
  row = next(r for r in text.splitlines() if r.startswith("0/w"))
  assert "transformed before use" in row or "tied or shared" in row, text


def test_a_penalty_inside_a_jitted_loss_function():
  """The loss tag inside a ``jax.jit`` body: the walk into the call finds
  which of its inputs reach the tag."""
  params = oracles.mlp_init(jax.random.PRNGKey(3), [5, 4, 3])
  text = kfe.describe_layers(jax.jit(_penalised), params, _batch())
  assert "Every parameter belongs to a layer." in text, text
  assert "kronecker 100.0%" in text.splitlines()[-1], text
  assert "(a penalty): 0/w, 1/w." in text, text


def _scanned(penalty, per_step_extra):
  """A scan over three stacked ``tanh(h W_l)`` layers; ``penalty``: ``C1·Σw²``
  accumulated in the carry and added to the loss; ``per_step_extra``: a
  per-step output ``Σ W_l`` the loss never reads."""
  def loss(p, b):
    def body(carry, w):
      h, pen = carry
      return (jnp.tanh(h @ w), pen + jnp.sum(w ** 2)), (
          jnp.sum(w) if per_step_extra else None)
    (h, pen), _ = jax.lax.scan(body, (b["x"], 0.0), p["k"])
    data = kfe.softmax_cross_entropy(h @ p["out"], b["y"])
    return data + C1 * pen if penalty else data
  return loss


@pytest.mark.parametrize("penalty, per_step_extra", [(True, False), (False, True),
                                                     (True, True)])
def test_a_penalty_in_a_scan_body_keeps_the_scanned_blocks(penalty, per_step_extra):
  """Inside the body, a use of the scanned kernel that reaches only the loss
  value (through the carry) or nothing (an output the loss never reads) is
  not a second use: the stacked kernel keeps its per-step blocks, equal to
  those of the loss without it, applied to the whole gradient."""
  ks = jax.random.split(jax.random.PRNGKey(0), 2)
  params = {"k": jax.random.normal(ks[0], (3, 5, 5)) / 2,
            "out": jax.random.normal(ks[1], (5, 3))}
  batch = _batch()
  loss, plain = _scanned(penalty, per_step_extra), _scanned(False, False)
  text = kfe.describe_layers(loss, params, batch)
  assert "Every parameter belongs to a layer." in text, text
  assert ("(a penalty): k." in text) == penalty, text
  grads = jax.grad(loss)(params, batch)
  updates = []
  for fn in (loss, plain):
    tx = kfe.scale_by_kfac(fn, damping=LAM, damping_mode="tikhonov", ema_decay=0.0,
                           fisher="empirical", example_batch=batch)
    updates.append(tx.update(grads, tx.init(params), params, batch=batch)[0])
  for leaf in ("k", "out"):
    np.testing.assert_allclose(updates[0][leaf], updates[1][leaf], rtol=1e-12)
  assert np.max(np.abs(updates[0]["k"] - grads["k"] / LAM)) > 1e-3   # not the fallback
