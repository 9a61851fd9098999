"""Diagonal Fisher blocks: scale-and-shift layers and the ``"diagonal"`` fallback.

Scale-and-shift (LayerNorm/BatchNorm affine): per token, the scale gradient is
``u = a ⊙ g`` and the shift gradient ``g``; ``diag F = (1/M) Σ_tok u²``.
Fallback for parameters no layer owns: with sampled targets the per-example
gradients have zero mean, so ``E[(Σ_n u_n)²] = Σ_n E[u_n²]`` and
``diag F ≈ (∇ objective)² / M`` is unbiased (biased for the empirical Fisher).
The preconditioned gradient is ``∇ / (diag F + λ)``.
"""

from __future__ import annotations

import jax.numpy as jnp


def from_tokens(u, num_examples, dtype):
  u = u.astype(dtype)
  return jnp.sum(u * u, axis=0) / jnp.asarray(num_examples, dtype)


def from_summed_gradient(grad, num_examples, dtype):
  grad = grad.astype(dtype)
  return grad * grad / jnp.asarray(num_examples, dtype)


def precondition(grad, diag, damping):
  return grad / (diag.reshape(grad.shape) + damping)
