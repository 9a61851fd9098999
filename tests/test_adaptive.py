"""Martens & Grosse's adaptive mode against brute force, in float64.

The exact Fisher/GGN is built densely from ``jax.jacobian`` (``oracles.
exact_fisher``); the curvature-vector product, the quadratic model's 2×2
solve for ``(α, μ)``, the final update ``αd + μδ₀``, the invariance to a
rescaled preconditioner and the Levenberg–Marquardt rule are checked against
it for each method.
"""

import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_ext as kfe
from kfac_jax_ext import quadratic_model as qm
from tests import oracles

ravel = lambda tree: jax.flatten_util.ravel_pytree(tree)[0]


_mlp_task = oracles.mlp_classifier_task


class SmallCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(3, (3, 3), padding="SAME")(x))
    x = jnp.tanh(nn.Conv(2, (2, 2), strides=2)(x))
    return nn.Dense(2)(x.reshape(x.shape[0], -1))


def _cnn_task():
  model = SmallCNN()
  x = jax.random.normal(jax.random.PRNGKey(3), (6, 4, 4, 2))
  params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                  model.init(jax.random.PRNGKey(4), x))
  batch = {"x": x, "y": jax.random.normal(jax.random.PRNGKey(5), (6, 2))}
  predict = lambda p, b: model.apply(p, b["x"])
  loss = lambda p, b: kfe.squared_error(predict(p, b), b["y"])
  loss_of_predictions = lambda z, b: 0.5 * jnp.mean(jnp.sum((z - b["y"]) ** 2, -1))
  return params, batch, predict, loss, loss_of_predictions


TASKS = {"mlp": _mlp_task, "cnn": _cnn_task}


def _fisher(task, params, batch):
  _, _, predict, _, lop = task
  return oracles.exact_fisher(lambda p: predict(p, batch), params,
                              lambda z: lop(z, batch))


@pytest.mark.parametrize("name", sorted(TASKS))
def test_fisher_vector_product_equals_dense_fisher(name):
  task = TASKS[name]()
  params, batch, _, loss, _ = task
  fisher = _fisher(task, params, batch)
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  v = jax.random.normal(jax.random.PRNGKey(7), flat.shape)
  got = ravel(kfe.fisher_vector_product(loss, params, batch, unravel(v)))
  np.testing.assert_allclose(got, fisher @ v, rtol=1e-10, atol=1e-12)


def test_fisher_vector_product_weights_and_two_losses():
  """Per-example weights and two registered losses: F is the sum of the
  Fishers of the two weighted mean losses."""
  params, batch, predict, _, _ = _mlp_task()
  w = jnp.linspace(0.2, 2.0, 10)

  def loss(p, b):
    z = predict(p, b)
    return (kfe.softmax_cross_entropy(z, b["y"], weights=w)
            + kfe.squared_error(z[:, :2], jnp.zeros((10, 2))))

  def lop(z):
    logp = jax.nn.log_softmax(z)
    ce = -jnp.mean(w * jnp.take_along_axis(logp, batch["y"][:, None], 1)[:, 0])
    return ce + 0.5 * jnp.mean(jnp.sum(z[:, :2] ** 2, -1))

  fisher = oracles.exact_fisher(lambda p: predict(p, batch), params, lop)
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  v = jax.random.normal(jax.random.PRNGKey(8), flat.shape)
  got = ravel(kfe.fisher_vector_product(loss, params, batch, unravel(v)))
  np.testing.assert_allclose(got, fisher @ v, rtol=1e-10, atol=1e-12)


def test_fisher_vector_product_rejects_a_misshapen_vector():
  params, batch, _, loss, _ = _mlp_task()
  with pytest.raises(ValueError, match="structure and shapes of params"):
    kfe.fisher_vector_product(loss, params, batch, params[0])


DAMPING = 0.3
METHODS = {
    "kfac": (kfe.kfac, kfe.scale_by_kfac, {}),
    "tkfac": (kfe.tkfac, kfe.scale_by_tkfac, {"damping_mode": "tikhonov"}),
    "tengrad": (kfe.tengrad, kfe.scale_by_tengrad, {"gram_batch": 10}),
    "two_level": (kfe.two_level_kfac, kfe.scale_by_two_level_kfac,
                  {"combine": "multiplicative", "coarse_matrix": "exact"}),
}
CASES = [("mlp", m, 0.0, "adaptive") for m in sorted(METHODS)] + [
    ("mlp", "kfac", 1e-2, "adaptive"), ("cnn", "kfac", 0.0, "adaptive"),
    ("mlp", "kfac", 0.0, 0.5),
    ("mlp", "kfac", 0.0, None)]


@pytest.mark.parametrize("task_name,method,weight_decay,momentum", CASES)
def test_adaptive_step_is_the_two_by_two_solve(task_name, method, weight_decay,
                                               momentum):
  """Three updates: the first takes ``α = −b₀/Q₀₀`` (no δ₀ yet), the next
  ``(α, μ) = −Q⁻¹b`` with ``Q``, ``b`` from the dense Fisher (a fixed μ:
  ``α = −(b₀ + μQ₀₁)/Q₀₀``; no momentum: the 1-D solve); the direction is
  the method's own preconditioned gradient (plus ``ηθ``)."""
  task = TASKS[task_name]()
  params, batch, _, loss, _ = task
  alias, scale_by, options = METHODS[method]
  options = dict(options, damping=DAMPING, inverse_every=2)
  tx = alias(loss, "adaptive", momentum=momentum, weight_decay=weight_decay,
             **options)
  ref = scale_by(loss, **options)
  state, ref_state = tx.init(params), ref.init(params)
  previous = np.zeros_like(ravel(params))
  eta = weight_decay
  for i in range(3):
    key = jax.random.PRNGKey(20 + i)
    grads = jax.grad(loss)(params, batch)
    update, state = tx.update(grads, state, params, batch=batch, key=key)
    direction, ref_state = ref.update(grads, ref_state, params, batch=batch,
                                      key=key)
    d = -(ravel(direction) + eta * ravel(params))
    grad_h = ravel(grads) + eta * ravel(params)
    f = _fisher(task, params, batch) + (DAMPING + eta) * np.eye(d.size)
    if i == 0 or momentum is None:
      c = np.array([-(grad_h @ d) / (d @ f @ d), 0.0])
    elif momentum != "adaptive":
      c = np.array([-(grad_h @ d + momentum * (d @ f @ previous)) / (d @ f @ d),
                    momentum])
    else:
      vs = np.stack([d, previous])
      c = -np.linalg.solve(vs @ f @ vs.T, vs @ grad_h)
    np.testing.assert_allclose([state.learning_rate, state.momentum], c,
                               rtol=1e-8, atol=1e-12)
    want = c[0] * d + c[1] * previous
    np.testing.assert_allclose(ravel(update), want, rtol=1e-8,
                               atol=1e-10 * np.abs(want).max())
    assert c[0] > 0
    previous = np.asarray(want)
    params = optax.apply_updates(params, update)


@pytest.mark.parametrize("momentum", [None, "adaptive"])
def test_a_rescaled_preconditioner_leaves_the_adaptive_step_unchanged(momentum):
  """``c·Δ`` for any c > 0 spans the same directions: α absorbs 1/c."""
  params, batch, _, loss, _ = _mlp_task()
  runs = []
  for scale in (1.0, 7.3):
    tx = kfe.quadratic_model_step(
        optax.chain(kfe.scale_by_kfac(loss, damping=0.1), optax.scale(scale)),
        loss, momentum=momentum, damping=0.1)
    state, p, out = tx.init(params), params, []
    for i in range(3):
      u, state = tx.update(jax.grad(loss)(p, batch), state, p, batch=batch,
                           key=jax.random.PRNGKey(i))
      out.append(ravel(u))
      p = optax.apply_updates(p, u)
    runs.append((np.stack(out), float(state.learning_rate)))
  np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=1e-9, atol=1e-14)
  np.testing.assert_allclose(runs[0][1], 7.3 * runs[1][1], rtol=1e-9)


OMEGA = 0.95 ** 5


@pytest.mark.parametrize("rho,factor", [(0.9, OMEGA), (0.76, OMEGA), (0.5, 1.0),
                                        (0.25, 1.0), (0.1, 1 / OMEGA),
                                        (-3.0, 1 / OMEGA)])
def test_levenberg_marquardt_rule(rho, factor):
  lam, adapted = qm.adapt_damping(jnp.asarray(0.2), jnp.asarray(rho),
                                  omega=OMEGA, bounds=(1e-8, 1e8))
  np.testing.assert_allclose(lam, 0.2 * factor, rtol=1e-14)
  assert bool(adapted)


def test_levenberg_marquardt_clips_and_skips_non_finite():
  lam, _ = qm.adapt_damping(jnp.asarray(0.2), jnp.asarray(0.1), omega=0.5,
                            bounds=(0.0, 0.3))
  assert float(lam) == 0.3
  lam, _ = qm.adapt_damping(jnp.asarray(0.2), jnp.asarray(0.9), omega=0.5,
                            bounds=(0.15, 1.0))
  assert float(lam) == 0.15
  for bad in (np.nan, np.inf):
    lam, adapted = qm.adapt_damping(jnp.asarray(0.2), jnp.asarray(bad),
                                    omega=0.5, bounds=(0.0, 1.0))
    assert float(lam) == 0.2 and not bool(adapted)


@pytest.mark.parametrize("learning_rate", ["adaptive", 0.5])
def test_damping_adapts_from_the_measured_reduction_ratio(learning_rate):
  """Every update (T₁ = 1): ρ is the real change of the loss on the batch over
  the model's prediction with the dense Fisher, and λ moves by the rule."""
  task = _mlp_task()
  params, batch, _, loss, _ = task
  decay, lam = 0.8, 2.0
  momentum = "adaptive" if learning_rate == "adaptive" else 0.0
  tx = kfe.kfac(loss, learning_rate, momentum=momentum, damping=lam,
                damping_adaptation=True, damping_adaptation_interval=1,
                damping_adaptation_decay=decay, min_damping=1e-6)
  state, seen = tx.init(params), set()
  for i in range(6):
    grads = jax.grad(loss)(params, batch)
    update, state = tx.update(grads, state, params, batch=batch,
                              key=jax.random.PRNGKey(i))
    delta = ravel(update)
    f = _fisher(task, params, batch) + lam * np.eye(delta.size)
    predicted = 0.5 * delta @ f @ delta + ravel(grads) @ delta
    moved = optax.apply_updates(params, update)
    rho = (loss(moved, batch) - loss(params, batch)) / predicted
    np.testing.assert_allclose(state.rho, rho, rtol=1e-8)
    lam = lam * decay if rho > 0.75 else lam / decay if rho < 0.25 else lam
    np.testing.assert_allclose(state.damping, lam, rtol=1e-12)
    seen.add("down" if rho > 0.75 else "up" if rho < 0.25 else "same")
    params = moved
  assert "down" in seen


@pytest.mark.parametrize("learning_rate", ["adaptive", 0.5])
def test_model_batch_takes_the_fisher_of_the_first_examples(learning_rate):
  """``model_batch=4`` of 10: ``(α, μ)`` solve the model with the dense Fisher
  of the first 4 examples and the whole batch's gradient; ρ is the whole
  batch's loss change over that model's prediction (λ adapted every update);
  ``model_batch`` ≥ the batch is the plain adaptive step."""
  task = _mlp_task()
  params, batch, _, loss, _ = task
  first = {k: v[:4] for k, v in batch.items()}
  adaptive = learning_rate == "adaptive"
  options = dict(momentum="adaptive" if adaptive else 0.0, damping=DAMPING,
                 damping_adaptation=True, damping_adaptation_interval=1,
                 damping_adaptation_decay=0.8, inverse_every=2)
  tx = kfe.kfac(loss, learning_rate, model_batch=4, **options)
  whole, plain = (kfe.kfac(loss, learning_rate, model_batch=m, **options)
                  for m in (10, None))
  state, whole_state, plain_state = tx.init(params), whole.init(params), plain.init(params)
  ref = kfe.scale_by_kfac(loss, damping=DAMPING, inverse_every=2)
  ref_state, previous, lam = ref.init(params), np.zeros_like(ravel(params)), DAMPING
  for i in range(3):
    key = jax.random.PRNGKey(30 + i)
    grads = jax.grad(loss)(params, batch)
    update, state = tx.update(grads, state, params, batch=batch, key=key)
    f = _fisher(task, params, first) + lam * np.eye(previous.size)
    g = ravel(grads)
    if adaptive:
      direction, ref_state = ref.update(grads, ref_state, params, batch=batch,
                                        key=key, damping=lam)
      d = -ravel(direction)
      if i == 0:
        c = np.array([-(g @ d) / (d @ f @ d), 0.0])
      else:
        vs = np.stack([d, previous])
        c = -np.linalg.solve(vs @ f @ vs.T, vs @ g)
      np.testing.assert_allclose([state.learning_rate, state.momentum], c,
                                 rtol=1e-8, atol=1e-12)
      np.testing.assert_allclose(ravel(update), c[0] * d + c[1] * previous,
                                 rtol=1e-8, atol=1e-12)
    delta = ravel(update)
    moved = optax.apply_updates(params, update)
    rho = (loss(moved, batch) - loss(params, batch)) / (
        0.5 * delta @ f @ delta + g @ delta)
    np.testing.assert_allclose(state.rho, rho, rtol=1e-8)
    lam = lam * 0.8 if rho > 0.75 else lam / 0.8 if rho < 0.25 else lam
    np.testing.assert_allclose(state.damping, lam, rtol=1e-12)
    a, whole_state = whole.update(grads, whole_state, params, batch=batch, key=key)
    b, plain_state = plain.update(grads, plain_state, params, batch=batch, key=key)
    np.testing.assert_allclose(ravel(a), ravel(b), rtol=1e-12, atol=1e-15)
    previous = delta
    params = moved


def test_zero_direction_falls_back_and_skips_the_adaptation():
  params, batch, _, loss, _ = _mlp_task()
  tx = kfe.kfac(loss, "adaptive", momentum="adaptive", damping=0.5,
                damping_adaptation=True, damping_adaptation_interval=1)
  state = tx.init(params)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  update, state = tx.update(zeros, state, params, batch=batch,
                            key=jax.random.PRNGKey(0))
  assert np.all(ravel(update) == 0)
  assert int(state.health.fallback_steps) == 1
  assert int(state.health.skipped_adaptations) == 1
  assert float(state.damping) == 0.5


@pytest.mark.parametrize("kwargs,match", [
    ({"learning_rate": 0.1, "momentum": "adaptive"}, "needs learning_rate='adaptive'"),
    ({"learning_rate": "adaptive", "kl_clip": 1e-3}, "drop kl_clip"),
    ({"learning_rate": "fast"}, "'adaptive'"),
    ({"learning_rate": "adaptive", "damping": lambda t: 0.1,
      "damping_adaptation": True}, "not a schedule"),
    ({"learning_rate": "adaptive", "damping_adaptation_decay": 1.5,
      "damping_adaptation": True}, r"\(0, 1\)"),
    ({"learning_rate": 0.1, "model_batch": 4}, "drop model_batch"),
    ({"learning_rate": "adaptive", "model_batch": 0}, "model_batch must be a positive"),
])
def test_bad_adaptive_options_are_named(kwargs, match):
  _, _, _, loss, _ = _mlp_task()
  with pytest.raises(ValueError, match=match):
    kfe.kfac(loss, **kwargs)
