"""TKFAC as optax: the trace-restricted variant of the Kronecker family."""

from __future__ import annotations

from typing import Any, Callable

import optax

from kfac_jax_ext import kronecker_family
from kfac_jax_ext import model_damping
from kfac_jax_ext.kronecker_variants import tkfac_variant


def scale_by_tkfac(loss_fn: Callable[..., Any], *, factors: str = "weighted",
                   trace: str = "tokens", conv_damping: float | None = None,
                   **options) -> optax.GradientTransformationExtraArgs:
  r"""Preconditions gradients with TKFAC's trace-restricted Kronecker blocks.

  Per dense/conv layer ``F̃ = δ Φ⊗Ψ`` with ``δ = tr F = E[‖ā‖²‖g‖²]``,
  ``Φ = E[‖g‖² āāᵀ]/δ``, ``Ψ = E[‖ā‖² ggᵀ]/δ`` (``factors="weighted"``) or
  ``Φ = A/trA``, ``Ψ = G/trG`` (``"unweighted"``), so ``tr F̃ = tr F`` where
  K-FAC has ``tr(A⊗G) = E‖ā‖²·E‖g‖²``. Damped and applied exactly as K-FAC:
  ``(δΦ⊗Ψ + λI)⁻¹`` (tikhonov) or the π-factored form; π is invariant to how
  δ is split between the factors.

  Conv layers treat every (example, location) as a token (``algorithms.md``
  §3.3). ``conv_damping`` is a **reconstruction** of the paper's "new damping
  for convolutional layers" (TKFAC_new; the paper's formula could not be
  retrieved): conv blocks get ``λ_l = λ + conv_damping · tr(F̃_l)/(d_a d_g)``,
  a damping relative to the block's mean eigenvalue, so that a fixed λ does
  not swamp a shrinking conv Fisher. It is not a transcription of the paper.

  Args:
    loss_fn: ``loss_fn(params, batch)`` using a ``kfe`` loss helper.
    factors: ``"weighted"`` (default) or ``"unweighted"``.
    trace: ``"tokens"`` (default; exact for dense layers, for conv the trace
      without cross-location terms) or ``"exact"`` (the exact per-example
      block trace, ``O(N|T|²(d_a+d_g))`` or ``O(N|T| d_a d_g)``).
    conv_damping: trace-relative extra damping of conv blocks, or None (off).
    **options: the options of ``scale_by_kfac`` (damping, damping_mode,
      fisher, stats_every, inverse_every, ema_decay, fallback, ...).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` (same ``update`` signature as
    ``scale_by_kfac``).

  Example:
    >>> tx = optax.chain(kfe.scale_by_tkfac(loss_fn, damping=1e-3),
    ...                  optax.sgd(0.1, momentum=0.9))
  """
  variant = tkfac_variant(factors, trace, conv_damping)
  return model_damping.register_kronecker(kronecker_family.scale_by_kronecker(
      loss_fn, variant, name="scale_by_tkfac", **options), loss_fn, variant,
      options)
