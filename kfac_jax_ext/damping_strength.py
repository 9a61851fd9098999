"""The preconditioner's own damping strength γ, adapted apart from λ (M&G §6.6).

In Martens & Grosse's adaptive K-FAC two dampings play different roles.
λ (Levenberg–Marquardt, ``quadratic_model.adapt_damping``) damps the
quadratic model ``M(δ) = ½δᵀ(F + (λ+η)I)δ + ∇hᵀδ`` that chooses α and μ.
γ damps the approximate Fisher that is inverted: ``(A + πγI) ⊗ (G + γ/π I)``
in the factored form, so its strength is ``γ²`` in the preconditioner's
``damping=`` (which is what this module stores and passes). The two are
not the same quantity: the factored product adds ``γ(πI⊗G + A⊗I/π)`` on
top of ``γ²I``, and the best γ for the preconditioner need not be the λ
that makes the model trustworthy.

M&G re-tune γ greedily every ``T₂`` updates: the update is computed with
each of ``γ' ∈ {γ, ω₂γ, γ/ω₂}`` (each with its own α, μ from the model) and
the γ' whose update has the lowest model value ``M(δ)`` is kept, with the
inverses built for it. ``ω₂ = decay^{T₂}`` with M&G's ``decay = √(19/20)``,
``T₂ = 20``. Here ``T₂`` is the preconditioner's refresh period: a trial
needs inverses built for each γ', and the trial is the refresh.

Example:
  >>> strengths = candidates(0.04, omega(DEFAULT_DECAY, 20), (1e-8, 1e8))
  >>> index = best_candidate(changes, ok)     # lowest finite M(δ) per γ'²
  >>> out = select(index, [out0, out1, out2])
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DEFAULT_DECAY = (19 / 20) ** 0.5   # M&G: ω₂ = (√(19/20))^{T₂}


def omega(decay, interval):
  """``ω₂ = decay ** T₂``."""
  return decay ** interval


def candidates(strength, omega2, bounds):
  """``γ'²`` for ``γ' ∈ {γ, ω₂γ, γ/ω₂}`` (that order: a tie keeps γ),
  clipped to ``bounds``. ``strength`` is ``γ²``."""
  lo, hi = bounds
  return [jnp.clip(s, lo, hi).astype(jnp.result_type(strength)) for s in (
      strength, strength * omega2 ** 2, strength / omega2 ** 2)]


def best_candidate(changes, ok):
  """Index of the lowest finite model change among the candidates whose
  coefficients solved (``ok``); 0 (keep γ) when none did.

  Args:
    changes: ``[k]`` model changes ``M(δ_i) − M(0)``.
    ok: ``[k]`` bools, whether candidate i's α, μ were finite.

  Returns:
    A scalar int32 index.
  """
  safe = jnp.where(ok & jnp.isfinite(changes), changes, jnp.inf)
  index = jnp.argmin(safe)   # the first of equal values: γ on a tie
  return jnp.where(jnp.isfinite(safe[index]), index, 0).astype(jnp.int32)


def select(index, trees):
  """``trees[index]`` for a traced index; the trees share one structure."""
  def pick(*leaves):
    out = leaves[0]
    for i, leaf in enumerate(leaves[1:], start=1):
      out = jnp.where(index == i, leaf, out)
    return out
  return jax.tree_util.tree_map(pick, *trees)


def check(adaptation, learning_rate, interval, decay):
  """Clear errors for the options of ``quadratic_model_step``."""
  if not adaptation:
    return
  if learning_rate != "adaptive":
    raise ValueError(
        "preconditioner_damping_adaptation=True picks γ by the value of the "
        "quadratic model at each candidate's best step: it needs "
        "learning_rate='adaptive'.")
  if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
    raise ValueError(
        "preconditioner_damping_interval must be a positive int, the "
        "preconditioner's inverse_every (the trial is its refresh), got "
        f"{interval!r}.")
  if isinstance(decay, (int, float)) and not 0 < decay < 1:
    raise ValueError("preconditioner_damping_decay must lie in (0, 1) "
                     f"(M&G: √(19/20)), got {decay!r}.")
