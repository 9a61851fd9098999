"""Damped inverses and decompositions of curvature factors.

All functions take factors in float32 (float64 under x64), symmetrize before
decomposing, and report failure as a boolean instead of returning NaN: the
caller keeps the previous inverse and counts the failure.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def factor_dtype():
  """float64 when x64 is enabled, else float32, whatever the model's dtype."""
  return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


def symmetrize(x):
  return 0.5 * (x + x.T)


def set_leading(slot, value):
  """``slot`` with ``value`` written at its leading corner (``slot[:n, :m] =
  value``): ``value`` itself when it fills the slot, else a dynamic update
  slice. Unlike ``.at[:n, :m].set``, a value that does not fit is an error,
  not silently clipped. (Both cost the same on the autoencoder's factors:
  ``python -m benchmarks.cpu_facts``, fact 5.)
  """
  if value.ndim != slot.ndim or any(v > s for v, s in zip(value.shape, slot.shape)):
    raise ValueError(f"a value of shape {value.shape} does not fit in a slot of "
                     f"shape {slot.shape}.")
  value = value.astype(slot.dtype)
  if value.shape == slot.shape:
    return value
  return jax.lax.dynamic_update_slice(slot, value, (0,) * slot.ndim)


def trace(x):
  """``tr x`` of a square matrix from a strided slice of its diagonal
  (``jnp.trace`` lowers to a select over the whole matrix, as the optimized
  HLO of a refresh step shows); a vector is a diagonal matrix (its sum)."""
  if x.ndim == 1:
    return jnp.sum(x)
  n = x.shape[0]
  return jnp.sum(x.reshape(-1)[::n + 1])


def leading(slot, shape):
  """``slot[:n, :m, ...]``: the leading corner of ``shape``."""
  return slot[tuple(slice(0, n) for n in shape)]


def all_finite(*arrays) -> jax.Array:
  ok = jnp.array(True)
  for x in arrays:
    if x is not None:
      ok = ok & jnp.all(jnp.isfinite(x))
  return ok


def damped_inverse(x, damping):
  """``(x + damping·I)⁻¹`` of a symmetric PSD matrix.

  LU (``jnp.linalg.inv``) of the symmetrized, damped matrix: for the 16
  autoencoder factors it took 228 ms against 243 ms for Cholesky +
  ``cho_solve`` on the 2-core CPU (``python -m benchmarks.cpu_facts``). ``x + damping·I`` is positive
  definite for PSD ``x`` and ``damping > 0``; a non-finite result is reported.

  Returns:
    ``(inverse, ok)``; ``ok`` is False when the result is not finite.
  """
  n = x.shape[0]
  inv = jnp.linalg.inv(symmetrize(x) + damping * jnp.eye(n, dtype=x.dtype))
  return inv, all_finite(inv)


def eigh(x):
  """Eigendecomposition ``x = Q diag(v) Qᵀ`` with eigenvalues clipped at 0.

  Returns:
    ``(eigenvalues, eigenvectors, ok)``.
  """
  vals, vecs = jnp.linalg.eigh(symmetrize(x))
  vals = jnp.maximum(vals, 0.0)
  return vals, vecs, all_finite(vals, vecs)


def pi_adjustment(a, g):
  """Martens & Grosse's π = sqrt((tr A / dim A) / (tr G / dim G)).

  Invariant to ``(A, G) -> (cA, G/c)``; 1 when either trace vanishes.
  """
  ta = trace(a) / a.shape[0]
  tg = trace(g) / g.shape[0]
  tiny = jnp.finfo(a.dtype).tiny
  ok = (ta > tiny) & (tg > tiny)
  return jnp.where(ok, jnp.sqrt(jnp.where(ok, ta / jnp.where(ok, tg, 1.0), 1.0)),
                   1.0)


def solve_spd_right(x, spd):
  """``x @ spd⁻¹`` for a symmetric positive definite ``spd``."""
  return jnp.linalg.solve(symmetrize(spd), x.T).T
