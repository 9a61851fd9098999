r"""Damping in units of each block's curvature: ``damping_scale="relative"``.

With ``damping_scale="absolute"`` (the default) every Kronecker block
``A ⊗ G`` is damped by the same λ. A loss's scale sets its curvature's: a
mean over the 64 tokens of a window has 1/64 of the sum's Fisher, and the
layers of one model differ by orders of magnitude, so one absolute λ is
mostly damping for some blocks and negligible for others. With
``"relative"``, λ is measured in units of the block's mean eigenvalue:

  ``λ_l = λ · m_A · m_G``,  ``m_X = tr(X) / dim X``

(``m_A m_G = tr(A⊗G) / dim(A⊗G)``; a diagonal factor kept as a vector: its
mean; a grouped conv: per group). So

* ``damping_mode="tikhonov"``: ``Δ = (A⊗G + λ m_A m_G I)⁻¹ vec(∇)``;
* ``damping_mode="factored"``: π-adjusted with ``λ_l``, which is
  ``(A + √λ m_A I) ⊗ (G + √λ m_G I)``: each factor damped by √λ times its own
  mean eigenvalue;

and when the loss is multiplied by a constant c (e.g. summed over tokens
instead of averaged), its gradient and its Fisher ``A⊗G`` scale by c,
``λ_l`` with them, and ``Δ`` is exactly unchanged, as the undamped natural
gradient ``F⁻¹∇`` is (with an absolute λ it is not). TKFAC's
``conv_damping`` term is added as before (it is already relative to the
block's trace). Leaves served by a diagonal
Fisher (scale-and-shift layers, ``fallback="diagonal"``) are damped by
``λ·mean(diag F)``. TENGraD's exact blocks ``F_l = UUᵀ/n`` (``kfe.tengrad``)
have at most n nonzero eigenvalues, those of ``K/n``; they are damped by λ
times their mean, ``λ·tr(K)/(n·min(n, P_l))`` (``P_l`` parameters; per
group or slice of a batched block), fixed at each refresh. A block with
no curvature mass yet (a zero mean) is damped by λ. In the adaptive mode
(``kfe.quadratic_model_step``) the quadratic model's damping term stays
``½(λ+η)‖δ‖²``; ``damping_units=kfe.damping_units_of(pre)`` puts it in the
preconditioner's units (K-FAC, TKFAC; ``kfac_jax_ext.model_damping``).

Example::

  >>> opt = kfe.kfac(loss_fn, 0.1, damping=1e-2, damping_scale="relative")
"""

from __future__ import annotations

import jax.numpy as jnp

from kfac_jax_ext import linalg

SCALES = ("absolute", "relative")


def require_absolute(options: dict, what: str) -> None:
  """Refuses ``damping_scale="relative"`` where ``what`` shares one
  absolute λ (e.g. two levels of one preconditioner)."""
  if options.get("damping_scale", "absolute") != "absolute":
    raise ValueError(f"{what} with one absolute λ: leave damping_scale='absolute'.")


def mean_eigenvalue(factor: jnp.ndarray) -> jnp.ndarray:
  """``tr(X) / dim X`` of a factor ``[d, d]`` (a vector: a diagonal factor,
  its mean; a stack ``[..., d, d]``: the mean over the stack)."""
  if factor.ndim == 1:
    return jnp.mean(factor)
  return jnp.mean(linalg.diagonal(factor))


def positive_or_one(unit: jnp.ndarray) -> jnp.ndarray:
  """``unit`` where it is positive, else 1: a block with no curvature mass
  yet is damped by λ itself."""
  return jnp.where(unit > 0, unit, jnp.ones_like(unit))


def check(damping_scale: str, name: str) -> None:
  """Raises ``ValueError`` naming ``name`` unless ``damping_scale`` is one of
  ``SCALES``."""
  if damping_scale not in SCALES:
    raise ValueError(f"{name}: damping_scale must be one of {SCALES}, got "
                     f"{damping_scale!r}.")


def exact_block_damping(damping, gram, n: int, size: int):
  """``λ · tr(K)/(n·min(n, P))`` for an exact block ``F = UUᵀ/n`` of ``n``
  examples and ``P`` parameters with Gram ``K = UᵀU``: λ times the mean of
  F's at most ``min(n, P)`` nonzero eigenvalues (those of ``K/n``); λ where
  ``tr K`` is zero. The mean over all P eigenvalues, ``tr(F)/P``, would
  count the ``P − n`` directions the batch did not see: for a layer of 200k
  parameters and 128 examples it is ~1/1500 of the seen eigenvalues, and
  the unseen directions, scaled by ``1/λ_l``, blow up."""
  mean = jnp.trace(gram) / (n * min(n, size))
  return damping * positive_or_one(mean)


def apply(variant, damping_scale: str, name: str):
  """``variant`` (a ``kronecker_family.KroneckerVariant``) with its damping
  in the units ``damping_scale`` names.

  Raises:
    ValueError: ``damping_scale`` is not one of ``SCALES`` (``name``: the
      transform, for the message).
  """
  check(damping_scale, name)
  if damping_scale == "absolute":
    return variant
  base = variant.layer_damping

  def layer_damping(damping, layer, side_a, side_g, trace):
    a, g = variant.effective_factors(side_a, side_g, trace)
    scale = positive_or_one(mean_eigenvalue(a) * mean_eigenvalue(g))
    return base(damping * scale, layer, side_a, side_g, trace)

  return variant._replace(layer_damping=layer_damping, damping_scale=damping_scale)
