"""M&G §6.6: the preconditioner's damping γ² adapted apart from λ
(``preconditioner_damping_adaptation``), checked in float64 against the
Tikhonov-damped exact Kronecker blocks and the dense Fisher."""

import chex
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_ext as kfe
from tests import oracles

ravel = lambda tree: jax.flatten_util.ravel_pytree(tree)[0]
LAM = 0.05
DECAY = 0.5


def _task():
  params, batch, predict, loss, loss_of_predictions = (
      oracles.mlp_classifier_task())
  fisher = lambda p: oracles.exact_fisher(
      lambda q: predict(q, batch), p, lambda z: loss_of_predictions(z, batch))
  return params, batch, loss, fisher


def _direction(params, batch, grads, strength):
  """``−(A⊗G + sI)⁻¹∇`` per layer from the batch's exact empirical factors
  (``ema_decay=0``, a refresh every update)."""
  out = []
  for (a, g), grad in zip(oracles.mlp_empirical_factors(params, batch), grads):
    v = jnp.concatenate([grad["w"], grad["b"][None]], axis=0)
    x = oracles.kron_solve(a, g, v, strength)
    out.append({"w": -x[:-1], "b": -x[-1]})
  return ravel(out)


def _model(f, grad, vectors, first):
  """``(c, M(δ))`` minimising ``½cᵀQc + cᵀb`` over ``δ = Σ c_i v_i``."""
  vs = np.stack(vectors[:1] if first else vectors)
  q, b = vs @ f @ vs.T, vs @ grad
  c = -np.linalg.solve(q, b)
  return np.pad(c, (0, 2 - c.size)), 0.5 * c @ q @ c + c @ b


def test_each_refresh_keeps_the_strength_whose_step_has_the_lowest_model_value():
  """Four updates, a refresh and a trial on each: the update is the model's
  best step along the direction of whichever ``γ'² ∈ {γ², ω₂²γ², γ²/ω₂²}``
  gives the lowest ``M(δ)`` (``F̃ = F + λI``, F dense); the state keeps that
  γ'²; λ itself does not move. Strength 4 starts far above λ = 0.05, so the
  trials move it down (asserted)."""
  params, batch, loss, fisher = _task()
  pre = kfe.scale_by_kfac(loss, damping=4.0, damping_mode="tikhonov",
                          fisher="empirical", ema_decay=0.0, inverse_every=1)
  tx = kfe.quadratic_model_step(
      pre, loss, damping=LAM, preconditioner_damping_adaptation=True,
      preconditioner_damping_interval=1, preconditioner_damping_decay=DECAY)
  state = tx.init(params)
  state = state._replace(preconditioner_damping=jnp.asarray(4.0))
  previous, chosen = np.zeros_like(ravel(params)), []
  for i in range(4):
    grads = jax.grad(loss)(params, batch)
    g, f = np.asarray(ravel(grads)), fisher(params) + LAM * np.eye(previous.size)
    strength = float(state.preconditioner_damping)
    best = None
    for s in (strength, strength * DECAY ** 2, strength / DECAY ** 2):
      d = np.asarray(_direction(params, batch, grads, s))
      c, value = _model(f, g, [d, previous], first=i == 0)
      if best is None or value < best[0]:
        best = (value, s, c[0] * d + c[1] * previous, c)
    update, state = tx.update(grads, state, params, batch=batch)
    np.testing.assert_allclose(float(state.preconditioner_damping), best[1],
                               rtol=1e-12)
    np.testing.assert_allclose([state.learning_rate, state.momentum], best[3],
                               rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(ravel(update), best[2], rtol=1e-7,
                               atol=1e-10 * np.abs(best[2]).max())
    chosen.append(best[1])
    previous = best[2]
    params = optax.apply_updates(params, update)
  assert chosen[-1] < 4.0                       # γ² moved
  assert float(state.damping) == LAM           # λ did not


def test_trials_run_on_the_refreshes_with_a_static_schedule_or_the_counter():
  """The alias with ``inverse_every=2``: ``kfe.due_at`` and the counter give
  the same updates and γ²; γ² changes only on the refresh updates and it
  moves from λ₀; one trace under jit."""
  params, batch, loss, _ = _task()
  tx = kfe.kfac(loss, "adaptive", momentum="adaptive", damping=2.0,
                damping_adaptation=True, damping_adaptation_interval=2,
                inverse_every=2, fisher="empirical",
                preconditioner_damping_adaptation=True,
                preconditioner_damping_decay=DECAY)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def counted(p, state):
    updates, state = tx.update(jax.grad(loss)(p, batch), state, p, batch=batch)
    return optax.apply_updates(p, updates), state

  step = jax.jit(lambda p, s, due: tx.update(jax.grad(loss)(p, batch), s, p,
                                             batch=batch, due=due),
                 static_argnames="due")
  p1, s1, p2, s2 = params, tx.init(params), params, tx.init(params)
  strengths = [float(s1.preconditioner_damping)]
  for i in range(6):
    p1, s1 = counted(p1, s1)
    u, s2 = step(p2, s2, kfe.due_at(i, inverse_every=2, damping_every=2))
    p2 = optax.apply_updates(p2, u)
    np.testing.assert_allclose(ravel(p1), ravel(p2), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(s1.preconditioner_damping,
                               s2.preconditioner_damping, rtol=1e-12)
    strengths.append(float(s1.preconditioner_damping))
  assert strengths[0] == 2.0
  for i in (2, 4, 6):                  # after updates 1, 3, 5: no refresh
    assert strengths[i] == strengths[i - 1]
  assert strengths[1] != 2.0
  assert loss(p1, batch) < 0.5 * loss(params, batch)
  assert int(s1.health.fallback_steps) == 0


def test_without_adaptation_the_preconditioner_gets_lambda():
  params, batch, loss, _ = _task()
  tx = kfe.kfac(loss, "adaptive", damping=0.3, damping_adaptation=True,
                damping_adaptation_interval=1, fisher="empirical")
  state = tx.init(params)
  for _ in range(3):
    update, state = tx.update(jax.grad(loss)(params, batch), state, params,
                              batch=batch)
    params = optax.apply_updates(params, update)
  assert float(state.damping) != 0.3
  assert float(state.preconditioner_damping) == float(state.damping)


@pytest.mark.parametrize("kwargs, match", [
    (dict(learning_rate=0.1, momentum=None), "learning_rate='adaptive'"),
    (dict(preconditioner_damping_interval=None), "inverse_every"),
    (dict(preconditioner_damping_interval=0), "inverse_every"),
    (dict(preconditioner_damping_decay=1.5), r"\(0, 1\)"),
])
def test_bad_options_are_named(kwargs, match):
  params, batch, loss, _ = _task()
  options = {"preconditioner_damping_adaptation": True,
             "preconditioner_damping_interval": 5, **kwargs}
  with pytest.raises(ValueError, match=match):
    kfe.quadratic_model_step(kfe.scale_by_kfac(loss), loss, **options)
  if "learning_rate" in kwargs:
    with pytest.raises(ValueError, match=match):
      kfe.kfac(loss, 0.1, preconditioner_damping_adaptation=True)
