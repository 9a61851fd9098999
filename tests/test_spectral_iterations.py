"""The spectral coarse space by warm-started inverse iteration
(``spectral_iterations=k``) against its closed form in float64: k steps of
``v ← (X + γI)⁻¹v`` (scaled to ∞-norm 1, largest entry +1) on each factor,
from the previous refresh's vectors, with the base's factored damping
``γ_A = π√λ``, ``γ_G = √λ/π``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_ext as kfe
from tests.test_two_level import LAM, _mlp

FACTORED = dict(damping=LAM, fisher="empirical", ema_decay=0.0, inverse_every=1,
                combine="multiplicative", coarse_space="spectral")


def _signed_unit(v):
  return v / v[np.argmax(np.abs(v))]


def _expected(factors, previous, steps):
  """Per kernel leaf ``(rows, cols)``: the closed form above, by numpy."""
  out = []
  for entry, prev in zip(factors, previous):
    if entry is None:
      out.append(None)
      continue
    a, g = np.asarray(entry.rows), np.asarray(entry.cols)   # dense: A rows
    d_g = g.shape[0] - 1                   # the cols slot has d_out + 1 rows
    g = g[:d_g, :d_g]
    pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / d_g))
    vecs = []
    for x, gamma, v in ((a, pi * np.sqrt(LAM), prev[0][:a.shape[0]]),
                        (g, np.sqrt(LAM) / pi, prev[1][:d_g])):
      inverse = np.linalg.inv(0.5 * (x + x.T) + gamma * np.eye(x.shape[0]))
      v = np.asarray(v)
      for _ in range(steps):
        v = _signed_unit(inverse @ v)
      vecs.append(v)
    out.append(tuple(vecs))
  return out


def _updates(options, batches, params, loss):
  tx = kfe.scale_by_two_level_kfac(loss, **options)
  state = tx.init(params)
  states = [state]
  for batch in batches:
    grads = jax.grad(loss)(params, batch)
    _, state = jax.jit(lambda g, s, b: tx.update(g, s, params, batch=b))(
        grads, state, batch)
    states.append(state)
  return states


def test_vectors_are_warm_started_inverse_iteration_on_the_damped_factors():
  loss, params, first = _mlp(n=9, sizes=(3, 5, 4), squared=True)
  second = jax.tree_util.tree_map(lambda t: t[::-1] * 1.5, first)
  states = _updates({**FACTORED, "spectral_iterations": 2}, [first, second],
                    params, loss)
  for before, after in zip(states[:-1], states[1:]):
    previous = list(before.spectral)
    kernels = [f if s is not None else None
               for f, s in zip(after.base.factors, after.spectral)]
    for got, want in zip(after.spectral, _expected(kernels, previous, 2)):
      if want is None:
        continue
      for g_vec, w_vec in zip(got, want):
        np.testing.assert_allclose(np.asarray(g_vec)[:w_vec.size], w_vec,
                                   rtol=0, atol=1e-12)
  # the second refresh started from the first's vectors, not from ones
  first_vectors = states[1].spectral[1][0][:4]
  assert float(jnp.max(jnp.abs(first_vectors - 1.0))) > 1e-3


def test_many_steps_converge_to_the_eigendecomposition_and_tikhonov_reads_it():
  loss, params, batch = _mlp(n=9, sizes=(3, 5, 4), squared=True)
  # (the smallest gap: μ₁, μ₂ = 1.0e-4, 3.9e-4 against γ_A = 0.113, a rate
  # of 0.9975 a step, so 20000 steps leave 1e-22 of the other directions)
  for mode, steps in (("factored", 20000), ("tikhonov", 1)):
    options = {**FACTORED, "damping_mode": mode}
    exact = _updates(options, [batch], params, loss)[-1].spectral
    iterated = _updates({**options, "spectral_iterations": steps}, [batch],
                        params, loss)[-1].spectral
    tol = 1e-8 if mode == "factored" else 1e-12
    for got, want in zip(iterated, exact):
      if want is not None:
        for g_vec, w_vec in zip(got, want):
          np.testing.assert_allclose(g_vec, w_vec, rtol=0, atol=tol)


@pytest.mark.parametrize("options,match", [
    ({"coarse_space": "nicolaides", "spectral_iterations": 2}, "coarse_space='spectral'"),
    ({"coarse_space": "spectral", "spectral_iterations": 0}, "positive int"),
    ({"coarse_space": "spectral", "spectral_iterations": True}, "positive int"),
])
def test_bad_spectral_iterations_are_refused(options, match):
  loss, _, _ = _mlp()
  with pytest.raises(ValueError, match=match):
    kfe.scale_by_two_level_kfac(loss, **options)
  with pytest.raises(ValueError, match=match):
    kfe.two_level_kfac(loss, 0.1, **options)
