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
  return jnp.sum(diagonal(x))


def diagonal(x):
  """The diagonal of ``x [..., n, n]`` as ``[..., n]``, a strided slice
  (``jnp.diagonal`` traces to a platform ``cond``, which a step on the
  static schedule must not contain; ``jnp.trace`` to a select)."""
  n = x.shape[-1]
  return x.reshape(x.shape[:-2] + (n * n,))[..., ::n + 1]


def leading(slot, shape):
  """``slot[:n, :m, ...]``: the leading corner of ``shape``."""
  return slot[tuple(slice(0, n) for n in shape)]


def all_finite(*arrays) -> jax.Array:
  ok = jnp.array(True)
  for x in arrays:
    if x is not None:
      ok = ok & jnp.all(jnp.isfinite(x))
  return ok


# Rows at which ``spd_inverse`` stops splitting and calls LU (0: LU only).
INVERSE_LEAF = 128


def spd_inverse(m, leaf: int | None = None):
  """Inverse of a symmetric positive definite ``m`` by recursive 2×2 block
  elimination, so that most of its FLOPs are GEMMs.

  With ``m = [[A, B], [Bᵀ, C]]`` and the Schur complement ``S = C − Bᵀ A⁻¹ B``
  (positive definite when ``m`` is):

      m⁻¹ = [[A⁻¹ + A⁻¹B S⁻¹ BᵀA⁻¹,  −A⁻¹B S⁻¹],
             [−S⁻¹ BᵀA⁻¹,            S⁻¹      ]],

  ``A⁻¹`` and ``S⁻¹`` by the same rule down to ``leaf`` rows (then LU,
  ``jnp.linalg.inv``). Four GEMMs of ``n³/4`` FLOPs per level; LU's
  ``2n³`` LAPACK FLOPs shrink to ``2n·leaf²``. On the 2-core CPU
  (2026-12-02, ``python -m benchmarks.cpu_facts inverse_options``) the 16
  damped autoencoder factors (λ = 1e-3, float32) took 76.1 ms against
  LU's 148.0 ms with ``OPENBLAS_NUM_THREADS=1`` and 100.4 against 228.8 ms
  with ``OPENBLAS_THREAD_TIMEOUT=4``, and the residual ``max|X m − I|``
  was 3.7e-3 against LU's 6.9e-2 (Cholesky-based inverses: 2e-4 and
  7e-5, but 114–282 ms). ``S`` is symmetrized before it is inverted, and
  the GEMMs run at ``Precision.HIGHEST``.

  Args:
    m: ``[n, n]``, symmetric positive definite.
    leaf: rows at which to stop splitting; ``INVERSE_LEAF`` if None (0:
      LU of the whole matrix).

  Returns:
    ``m⁻¹`` (not finite where ``m`` is numerically singular).

  Example:
    >>> x = jax.random.normal(jax.random.PRNGKey(0), (500, 300))
    >>> inv = spd_inverse(x.T @ x / 500 + 1e-3 * jnp.eye(300))
  """
  leaf = INVERSE_LEAF if leaf is None else leaf
  n = m.shape[0]
  if leaf <= 0 or n <= leaf:
    return jnp.linalg.inv(m)
  # full float32 GEMMs wherever the backend would round their inputs (TPUs'
  # bfloat16 passes, GPUs' TF32): an inverse's error grows with the condition
  mm = lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST)
  h = n // 2
  a, b, c = m[:h, :h], m[:h, h:], m[h:, h:]
  a_inv = spd_inverse(a, leaf)
  a_inv_b = mm(a_inv, b)
  s_inv = spd_inverse(symmetrize(c - mm(b.T, a_inv_b)), leaf)
  upper_right = -mm(a_inv_b, s_inv)
  upper_left = a_inv - mm(upper_right, a_inv_b.T)
  return jnp.concatenate([jnp.concatenate([upper_left, upper_right], axis=1),
                          jnp.concatenate([upper_right.T, s_inv], axis=1)], axis=0)


def damped_inverse(x, damping):
  """``(x + damping·I)⁻¹`` of a symmetric PSD matrix.

  ``spd_inverse`` (block elimination at GEMM speed, LU below 128 rows) of
  the symmetrized, damped matrix, positive definite for PSD ``x`` and
  ``damping > 0``; a non-finite result is reported. (LU of the whole matrix
  took 1.9–2.3× longer on the autoencoder's factors, Cholesky + ``cho_solve``
  1.5–2.8×: ``python -m benchmarks.cpu_facts inverse_options``.)

  Returns:
    ``(inverse, ok)``; ``ok`` is False when the result is not finite.
  """
  n = x.shape[0]
  inv = spd_inverse(symmetrize(x) + damping * jnp.eye(n, dtype=x.dtype))
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


def map_blocks(fn, *xs):
  """``jax.vmap(fn)(*xs)``, but one block at a time (``lax.map``) on CPU.

  ``fn`` runs decompositions (``eigh``, LU: a block's refresh). jaxlib's CPU
  LAPACK kernels split a batched call over XLA's intra-op thread pool and
  wait for it from a thread of that pool; when several batched calls run at
  once (one per stacked or grouped layer) every thread of a small pool can
  be waiting and the step never ends (jax 0.10.2, 2-core CPU: six
  concurrent ``inv`` of ``[8, 50, 50]`` in one jitted program hung in 3
  runs of 3; mapped one block at a time, 60 calls each of three such
  programs ran; a ConvNeXt's depthwise convs hung K-FAC's first refresh,
  ``tests/test_batched_refresh.py``). Unbatched calls run inline.

  Args:
    fn: a function of the per-block slices of ``xs``.
    *xs: arrays (or pytrees) with the blocks on their leading axis.

  Returns:
    ``fn``'s outputs stacked over the blocks.

  Example:
    >>> inv = map_blocks(jnp.linalg.inv, jnp.eye(3)[None].repeat(4, 0))
  """
  if jax.default_backend() == "cpu":
    return jax.lax.map(lambda args: fn(*args), xs)
  return jax.vmap(fn)(*xs)
