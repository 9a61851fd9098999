"""K-FAC (Martens & Grosse 2015; KFC for conv, Grosse & Martens 2016) as optax.

The K-FAC variant of the Kronecker family: ``A = E[āāᵀ]``, ``G = E[ggᵀ]``
(see ``blocks/kronecker.py`` for the scale conventions) and one damping λ.
"""

from __future__ import annotations

from typing import Any, Callable

import optax

from kfac_jax_ext import kronecker_family
from kfac_jax_ext import model_damping
from kfac_jax_ext import tridiagonal_family
from kfac_jax_ext.kronecker_variants import KFAC


def scale_by_kfac(loss_fn: Callable[..., Any], **options
                  ) -> optax.GradientTransformationExtraArgs:
  r"""Preconditions gradients with K-FAC's Kronecker-factored Fisher blocks.

  Per dense/conv layer with factors ``A = E[āāᵀ]``, ``G = E[ggᵀ]`` (running
  averages ``X ← εX + (1-ε)X_b``, ``ε_k = min(1 - 1/k, ema_decay)``):

  * ``damping_mode="tikhonov"``: ``Δ = (A⊗G + λI)⁻¹ vec(∇)`` exactly, via the
    eigenbases of A and G;
  * ``damping_mode="factored"``: ``Δ = (A + π√λI)⁻¹ ∇ (G + √λ/π I)⁻¹``,
    ``π = sqrt((trA/dim A)/(trG/dim G))``.

  Scale-and-shift layers get their diagonal Fisher; leaves no layer owns pass
  through (``fallback="identity"``) or are divided by a running diagonal
  (``"diagonal"``). See ``kfe.describe_layers`` for the assignment.

  Args:
    loss_fn: ``loss_fn(params, batch)`` returning a loss made with a loss
      helper (``kfe.softmax_cross_entropy`` ...).
    damping: Tikhonov λ, a float or a schedule ``step -> λ`` (default 1e-3).
    damping_mode: ``"tikhonov"`` or ``"factored"`` (π-adjusted, cheaper;
      default).
    damping_scale: ``"absolute"`` (default: every block damped by λ) or
      ``"relative"``: λ in units of each block's mean eigenvalue,
      ``λ_l = λ·(trA/dim A)(trG/dim G)``, so that one λ means the same for
      every layer and any loss scale (``kfac_jax_ext.relative_damping``).
    fisher: ``"sampled"`` (targets from the model; needs ``key``; default) or
      ``"empirical"`` (data targets).
    stats_every: refresh statistics every k updates (default 1; the first
      update always does).
    inverse_every: refresh inverses every k updates (default 5).
    ema_decay: running-average cap ε (default 0.95); 0.0 = latest batch only.
      It acts per statistics update, not per step: Martens & Grosse's 0.95
      took statistics every step, so with ``stats_every=T`` the same
      averaging horizon (about 20 steps) is ``0.95**T`` (0.6 at T = 10).
    fallback: ``"identity"`` (default) or ``"diagonal"`` for leaves no layer
      owns.
    max_factor_dim: layers whose factors would be larger fall back (4096).
    example_batch: a batch (arrays or ``jax.ShapeDtypeStruct``s of the shapes
      ``loss_fn`` takes), used only to trace ``loss_fn`` at ``init``: the
      state is then laid out per traced layer with exact factor sizes, which
      attention kernels ``[D, H, Dh]``, embeddings (a diagonal input factor),
      grouped/depthwise convs (one block per group) and tied tables need.
      Without it the state is laid out from the parameter shapes alone and
      those layers fall back (a warning names them).
    weight_sharing: ``"expand"`` (default: token/patch positions are extra
      examples, KFC for convs), ``"reduce"`` (positions averaged/summed per
      example before the statistics) or ``"auto"`` (reduce for layers whose
      positions are pooled before the loss, expand otherwise); see
      ``kfac_jax_ext.weight_sharing``.
    axis_name: inside ``jax.pmap`` / ``jax.shard_map``, the data-parallel
      axis: statistics are averaged over it (the curvature of the global
      batch) and each device refreshes only the blocks it owns, shared by
      one ``psum`` (``kfac_jax_ext.distributed``). Pass the same ``key`` on
      every device and the gradient averaged over the axis; use the same
      ``axis_name`` in ``kfe.value_and_grad``. Under ``jax.jit`` with a
      ``Mesh`` leave it None.
    has_aux: ``loss_fn`` returns ``(loss, aux)``.
    stats_batch: take the curvature statistics from the batch's first n
      rows (Martens & Grosse §8; rows: the leading axis of every array leaf,
      the examples, or the sequences of a per-token loss) while the gradient
      uses the whole batch: the statistics step costs about n/rows of its
      factor products and sampled backward (``kfac_jax_ext.stats_subsample``).
      None (default): the whole batch.
    product_dtype: None (default) or ``"bfloat16"`` / ``"float16"``: the
      inputs of the dense and conv blocks' factor products (``āᵀā``,
      ``gᵀg``; TKFAC's weighted factors keep full precision) and
      preconditioning GEMMs are rounded to it and accumulated
      in the factors' dtype; factors and inverses stay float32 (float64
      with x64). Per GEMM entry the error is at most ``(2u + u²)(|x||y|)``
      plus the accumulation's, u = 2⁻⁸ for bfloat16
      (``blocks.kronecker.matmul``). Faster where bfloat16 GEMMs are (CPUs
      with AVX512-BF16, GPUs, TPUs); measured in ``docs/performance.md``.
    structure: ``"block_diagonal"`` (default) or ``"block_tridiagonal"``:
      M&G's §4.3 inverse over chains of dense layers, with cross-layer
      factors (``tridiagonal_family``; needs ``example_batch`` and
      ``damping_mode="factored"``).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` takes
    ``(updates, state, params, *, batch, key=None, curvature=None, due=None)``;
    ``due`` (a static ``kfe.Due``, see ``kfac_jax_ext.schedule``) replaces
    the counters' ``lax.cond`` schedule for that update; an extra
    ``damping=λ`` (an array) replaces the ``damping`` option for that update
    (the adaptive mode passes its adapted λ this way).

  Example:
    >>> tx = optax.chain(kfe.scale_by_kfac(loss_fn, damping=1e-3),
    ...                  optax.sgd(0.1, momentum=0.9))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params, batch=batch, key=key)
  """
  structure = options.pop("structure", "block_diagonal")
  if structure == "block_tridiagonal":
    return tridiagonal_family.scale_by_tridiagonal_kfac(loss_fn, KFAC, **options)
  if structure != "block_diagonal":
    raise ValueError(f"structure must be 'block_diagonal' or 'block_tridiagonal', "
                     f"got {structure!r}.")
  return model_damping.register_kronecker(kronecker_family.scale_by_kronecker(
      loss_fn, KFAC, name="scale_by_kfac", **options), loss_fn, KFAC, options)
