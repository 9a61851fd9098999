"""TENGraD (Soori et al. 2021) as optax: exact Fisher-block inverses by Woodbury.

The shell (refresh, storage, application) is ``woodbury_family``; this module
is the public transform and its options.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from kfac_jax_ext import eager
from kfac_jax_ext import woodbury_family
from kfac_jax_ext.state import TengradState

__all__ = ["TengradState", "scale_by_tengrad"]


def scale_by_tengrad(
    loss_fn: Callable[..., Any],
    *,
    damping: float | Callable[[jax.Array], jax.Array] = 0.1,
    gram_batch: int = 128,
    conv_gram: str = "exact",
    damping_mode: str = "tikhonov",
    fisher: str = "sampled",
    stats_every: int = 1,
    inverse_every: int = 5,
    ema_decay: float = 0.0,
    fallback: str = "identity",
    axis_name: str | None = None,
    has_aux: bool = False,
    example_batch: Any = None,
    damping_scale: str = "absolute",
) -> optax.GradientTransformationExtraArgs:
  r"""Preconditions gradients with TENGraD's exact per-layer Fisher blocks.

  Per dense/conv layer (weight and bias one block, ``ā = [a; 1]``) with the
  per-example gradients ``U`` of the first ``n = min(M, gram_batch)``
  examples of the statistics batch:

  ``Δ = (UUᵀ/n + λI)⁻¹ ∇ = (1/λ)[∇ − U (K/n + λI)⁻¹ Uᵀ∇ / n]``, ``K = UᵀU``.

  Dense layers keep ``Ā``, ``G`` and use ``K = (ĀĀᵀ)∘(GGᵀ)``; conv layers keep
  their per-example gradients ``[n, d_a, d_g]`` and build the exact Gram
  ``Σ_{t,t'}(ā_nt·ā_mt')(g_nt·g_mt')`` by the cheaper of the factored and
  the explicit path (``T²(d_a+d_g) < d_a d_g``). No running average: the
  stored batch and its inverted Gram are replaced every ``inverse_every``
  updates and applied to every fresh gradient in between. Scale-and-shift
  layers get their diagonal Fisher; leaves no layer owns pass through
  (``fallback="identity"``) or are divided by the diagonal Fisher.

  Grouped convs and kernels scanned over get one block per group or slice,
  kernels closed over by a scan body one block over the steps, embedding
  tables a block from their lookups (``blocks/woodbury_batched.py``,
  ``blocks/woodbury_embedding.py``); these and dense layers that see
  several locations per example (``[N, T, D]`` inputs) need
  ``example_batch`` (without it they use the fallback, with a warning), and
  a layer's tokens must be grouped by example (its output's leading axis
  the loss examples). A tied table stores its per-example gradients summed
  over its uses (``blocks/woodbury_tied.py``). Under a loss with one example
  per position (a mean over a sequence's tokens), a layer whose output at
  one position reaches other positions' losses (keys, values and embeddings
  before a causal attention, every layer before the last attention, the
  convs of a per-pixel loss) has no per-example gradients in the
  statistics; if no loss reaches another sequence (image), its block takes
  the sequences as examples: ``U`` holds each sequence's gradient
  ``u_s = Σ_t ā_st g_stᵀ`` over ``√R`` (R losses per sequence), so
  ``UUᵀ/n`` estimates the same Fisher at rank ``min(n, sequences)``
  (explicit layout, ``N·d_a·d_g`` per layer); otherwise it falls back,
  with a warning (``position_mixing.py``). ``describe_layers(...,
  blocks="woodbury")`` marks such blocks ``per sequence``.

  Args:
    loss_fn: ``loss_fn(params, batch)`` using a ``kfe`` loss helper.
    damping: λ, a float or a schedule ``step -> λ`` (default 0.1, TENGraD's).
      Directions outside ``span(U)`` are scaled by ``1/λ``.
    gram_batch: ``N``, the number of examples of a statistics batch used for
      the blocks (default 128); fixes the state's size (``N²`` per layer, plus
      ``N(d_a+d_g)`` per dense and ``N·d_a·d_g`` per conv layer). ``init``
      raises ``MemoryError`` if that exceeds the free memory.
    conv_gram: ``"exact"`` (default), or the approximations
      ``"spatial_sum"`` (rank-one per-example gradients ``(Σ_t g)(Σ_t ā)ᵀ``)
      and ``"same_location"`` (ASDL's Gram without cross-location terms; the
      stored gradients stay exact, so the preconditioner is not the inverse of
      a damped Fisher and need not be positive definite). Both are exact only
      with one location per example.
    damping_mode: only ``"tikhonov"`` (the block is inverted exactly).
    fisher: ``"sampled"`` (default; needs ``key``) or ``"empirical"``.
    stats_every: 1 or ``inverse_every`` (statistics are only taken with a
      refresh).
    inverse_every: refresh the stored batch and Gram inverse every k updates
      (default 5; TENGraD's reference runs use 100).
    ema_decay: must be 0.0 (no running average).
    fallback: ``"identity"`` (default) or ``"diagonal"``.
    axis_name: inside ``jax.pmap`` / ``jax.shard_map``, the data axis. Each
      of the D devices contributes its first ``min(M_d, gram_batch // D)``
      examples; their tokens are gathered, so every device stores the same
      blocks (with ``gram_batch ≥ M``: the whole global batch, as on one
      device), and each device builds and inverts the Grams of the layers
      it owns (``kfac_jax_ext.distributed``). Scale: ``F = UUᵀ/n`` with n the
      gathered count.
    has_aux: ``loss_fn`` returns ``(loss, aux)``.
    example_batch: a batch (arrays or shape structs), used only to trace
      ``loss_fn`` at ``init`` and lay the blocks out per layer: a layer with
      one position per loss example stores ``Ā``, ``G``; one with several
      (a dense layer over tokens of a per-sequence loss, a conv) stores its
      exact per-example gradients, so ``[N, T, D]`` layers and 3-D attention
      kernels get exact Woodbury blocks. Without it the layout follows the
      leaf shapes and such layers fall back (a warning names them).
    damping_scale: ``"absolute"`` (default: every block damped by λ) or
      ``"relative"``: λ in units of the mean of each block's (at most n)
      nonzero eigenvalues, those of ``K/n``: ``λ_l = λ·tr(K)/(n·min(n,
      P_l))`` (``P_l`` the block's parameters; per group or slice of a
      batched block), fixed at each refresh; a diagonal-Fisher leaf is
      damped by ``λ·mean(diag F)`` (``kfac_jax_ext.relative_damping``).
      Then multiplying the loss by a constant leaves the step unchanged.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` has the
    signature of ``kfe.scale_by_kfac``'s: ``(updates, state, params, *,
    batch, key=None, curvature=None, due=None)`` and an optional per-update
    ``damping=λ``.

  Example:
    >>> tx = optax.chain(kfe.scale_by_tengrad(loss_fn, damping=0.1, gram_batch=64),
    ...                  optax.sgd(0.01, momentum=0.9))
    >>> state = tx.init(params)
    >>> updates, state = tx.update(grads, state, params, batch=batch, key=key)
  """
  init_fn, update_fn = woodbury_family.tengrad_stepper(
      loss_fn, damping=damping, gram_batch=gram_batch, conv_gram=conv_gram,
      damping_mode=damping_mode, fisher=fisher, stats_every=stats_every,
      inverse_every=inverse_every, ema_decay=ema_decay, fallback=fallback,
      axis_name=axis_name, has_aux=has_aux, example_batch=example_batch,
      damping_scale=damping_scale)
  return optax.GradientTransformationExtraArgs(
      init_fn, eager.compile_when_eager(update_fn))
