"""The quadratic model of Martens & Grosse (2015, §6–7): step size, momentum, λ.

With ``h`` the objective (the loss plus ``η‖θ‖²/2`` for weight decay η), ``F``
the exact Fisher of the mini-batch and λ the damping, the model of
``h(θ + δ) − h(θ)`` is

    M(δ) = ½ δᵀ(F + (λ + η)I)δ + ∇hᵀδ.

Over ``δ = α d + μ δ₀`` (``d`` the descent direction, ``δ₀`` the previous
update) it is ``M = ½ cᵀQc + cᵀb`` with ``c = (α, μ)``,

    Q = [[dᵀF̃d, dᵀF̃δ₀], [δ₀ᵀF̃d, δ₀ᵀF̃δ₀]],  F̃ = F + (λ + η)I,
    b = [∇hᵀd, ∇hᵀδ₀],

minimised by ``c = −Q⁻¹b``; without momentum (or on the first step, δ₀ = 0)
by ``α = −b₀/Q₀₀``; with a fixed momentum μ by ``α = −(b₀ + μQ₀₁)/Q₀₀``.
The Levenberg–Marquardt rule then compares the model with the real change:
``ρ = (h(θ+δ) − h(θ)) / M(δ)``; ``ρ > 3/4 ⇒ λ ← ω₁λ``, ``ρ < 1/4 ⇒ λ ← λ/ω₁``.

Example:
  >>> c, ok = solve_coefficients(q, b, momentum="adaptive", use_previous=True)
  >>> change = model_change(q, b, c)
  >>> lam = adapt_damping(lam, rho, omega=0.95 ** 5, bounds=(1e-8, 1e8))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _finite(*xs):
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]))


def solve_coefficients(q, b, *, momentum, use_previous):
  """The ``c = (α, μ)`` minimising ``½cᵀQc + cᵀb``.

  Args:
    q: ``[2, 2]`` symmetric (damped) curvature forms; with one vector only
      ``q[0, 0]`` is read.
    b: ``[2]`` gradient forms.
    momentum: ``"adaptive"`` (μ from the 2×2 solve), a number (fixed μ), or
      None (μ = 0).
    use_previous: (traced) bool, whether ``δ₀`` is usable (not the first
      step). Without it μ = 0 and the 1-D solve is used.

  Returns:
    ``(c, ok)``: ``c`` a ``[2]`` vector; ``ok`` is False when the model has
    no finite minimiser along the direction (``Q₀₀ ≤ 0`` or non-finite
    values), in which case ``c`` is zeros and the caller falls back.
  """
  q00 = q[0, 0]
  safe00 = jnp.where(q00 > 0, q00, 1.0)
  alpha_1d = -b[0] / safe00
  ok_1d = (q00 > 0) & _finite(q00, b[0])
  if momentum is None:
    c, ok = jnp.stack([alpha_1d, jnp.zeros_like(alpha_1d)]), ok_1d
  elif isinstance(momentum, str):   # "adaptive"
    det = q[0, 0] * q[1, 1] - q[0, 1] * q[1, 0]
    # Cramer's rule for −Q⁻¹b; the 2×2 solve only where Q is positive
    # definite (det > 0 relative to its scale), else the 1-D solve.
    scale = jnp.abs(q[0, 0] * q[1, 1])
    two_d = use_previous & (det > 1e-12 * scale) & _finite(q, b)
    safe_det = jnp.where(two_d, det, 1.0)
    alpha = -(q[1, 1] * b[0] - q[0, 1] * b[1]) / safe_det
    mu = -(q[0, 0] * b[1] - q[1, 0] * b[0]) / safe_det
    c = jnp.where(two_d, jnp.stack([alpha, mu]),
                  jnp.stack([alpha_1d, jnp.zeros_like(alpha_1d)]))
    ok = jnp.where(two_d, _finite(alpha, mu), ok_1d)
  else:
    mu = jnp.where(use_previous, jnp.asarray(momentum, q.dtype), 0.0)
    alpha = -(b[0] + mu * q[0, 1]) / safe00
    c, ok = jnp.stack([alpha, mu]), ok_1d & _finite(alpha, q[0, 1])
  return jnp.where(ok, c, jnp.zeros_like(c)), ok


def model_change(q, b, c):
  """``M(δ) − M(0) = ½ cᵀQc + cᵀb`` for ``δ = c₀v₀ + c₁v₁``."""
  return 0.5 * c @ q @ c + c @ b


def reduction_ratio(actual_change, predicted_change):
  """``ρ = actual / predicted``; NaN when the prediction is not negative
  (the model predicts no decrease: ρ carries no information)."""
  return jnp.where(predicted_change < 0,
                   actual_change / jnp.where(predicted_change < 0,
                                             predicted_change, -1.0),
                   jnp.nan)


def adapt_damping(damping, rho, *, omega, bounds):
  """One Levenberg–Marquardt move of λ.

  Args:
    damping: the current λ.
    rho: the reduction ratio ``ρ``.
    omega: ``ω₁ ∈ (0, 1)``; M&G use ``(19/20)^{T₁}``.
    bounds: ``(min, max)`` λ is clipped to.

  Returns:
    ``(λ', adapted)``: ``ω₁λ`` when ``ρ > 3/4``, ``λ/ω₁`` when ``ρ < 1/4``,
    else λ, clipped; ``adapted`` is False (and λ' = λ) for a non-finite ρ.
  """
  finite = jnp.isfinite(rho)
  new = jnp.where(rho > 0.75, damping * omega,
                  jnp.where(rho < 0.25, damping / omega, damping))
  new = jnp.clip(new, bounds[0], bounds[1]).astype(jnp.result_type(damping))
  return jnp.where(finite, new, damping), finite


def tree_vdot(a, b):
  """``Σ ⟨a_i, b_i⟩`` over the leaves, in float32 or wider."""
  wide = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return sum(jnp.vdot(wide(x), wide(y)) for x, y in zip(
      jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
