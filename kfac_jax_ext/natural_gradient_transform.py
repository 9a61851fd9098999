r"""Per-layer choice of block: Kronecker or Woodbury, whichever is cheaper.

``scale_by_natural_gradient(loss_fn, blocks="auto", example_batch=...)``
gives every dense, conv and embedding layer one exactly damped block:

* **Kronecker** (K-FAC, ``damping_mode="tikhonov"``):
  ``Δ = (A⊗G + λI)⁻¹ vec(∇)`` through the eigenbases of the running factors;
  a refresh costs ``d_a³ + d_g³`` (per group or slice);
* **Woodbury** (TENGraD): ``Δ = (UUᵀ/n + λI)⁻¹ vec(∇)`` with the
  per-example gradients ``U`` of ``n = min(gram_batch, M)`` examples of the
  statistics batch; a refresh costs ``n²(d_a + d_g) + n³`` (a layer with
  ``T`` positions per example: ``n²·min(T²(d_a + d_g), d_a d_g) + n³``).

``blocks="auto"`` takes, per layer, the cheaper of the two that the layer
supports (a Kronecker block needs both factors within ``max_factor_dim``;
TENGraD has no block for layers whose tokens are not grouped by
example), except that it does not take a Woodbury block over a layer's
sequences (``tengrad_plan.layer_examples``) where a Kronecker block exists:
that block's rank is the number of sequences, the Kronecker factors see
every token; ``"kronecker"`` / ``"woodbury"`` prefer one kind
and take the other only where the preferred one has no block. Scale-and-shift layers get
their diagonal Fisher and the leaves no layer owns the ``fallback``, from
the Kronecker side. The choice depends on the shapes only (the layers
traced on ``example_batch``), so it is the same at ``init`` and at every
``update``; ``kfe.describe_layers(..., blocks="auto")`` prints it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import optax

from kfac_jax_ext import checks
from kfac_jax_ext import eager
from kfac_jax_ext import kronecker_family
from kfac_jax_ext import plan as plan_lib
from kfac_jax_ext import schedule
from kfac_jax_ext import statistics
from kfac_jax_ext import tengrad_plan
from kfac_jax_ext import tracing
from kfac_jax_ext import weight_sharing as sharing_lib
from kfac_jax_ext import woodbury_family
from kfac_jax_ext.blocks import table
from kfac_jax_ext.kronecker_variants import KFAC
from kfac_jax_ext.state import KfacState, TengradState

BLOCKS = ("auto", "kronecker", "woodbury")


class NaturalGradientState(NamedTuple):
  """State of ``scale_by_natural_gradient``.

  Attributes:
    kronecker: the Kronecker side's ``KfacState`` (entries for its layers).
    woodbury: the Woodbury side's ``TengradState`` (blocks for its layers).
  """
  kronecker: KfacState
  woodbury: TengradState


def _check_blocks(blocks) -> None:
  if blocks not in BLOCKS:
    raise ValueError(f"blocks must be one of {BLOCKS}, got {blocks!r}.")


def kronecker_cost(layer) -> float:
  """Refresh cost of a layer's Kronecker block: ``d_a³ + d_g³`` per group or
  slice (an embedding's diagonal A: ``V + d_g³``)."""
  return table.kronecker_block(layer).refresh_cost()


def woodbury_cost(layer, gram_batch: int, num_examples: int) -> float:
  """Refresh cost of a layer's Woodbury block for a Gram of
  ``n = min(gram_batch, E)`` of its E examples: ``n²(d_a + d_g) + n³``, or
  with ``T`` positions per example ``n²·min(T²(d_a + d_g), d_a d_g) + n³``
  (TENGraD's cheaper Gram path); per group or slice."""
  t = sharing_lib.tokens(layer) // num_examples
  return tengrad_plan.woodbury_kind(layer)(
      layer, gram_size=min(gram_batch, num_examples), positions=t).refresh_cost()


def choose_blocks(traced, blocks: str = "auto", gram_batch: int = 128,
                  max_factor_dim: int = 4096) -> dict:
  """``{kernel leaf: "kronecker" | "woodbury"}`` for every dense, conv and
  embedding layer that has a block of either kind (see the module doc)."""
  _check_blocks(blocks)
  choice = {}
  for layer in traced.layers:
    if layer.kind == "scale_and_shift":
      continue
    options = []
    if KFAC.unsupported(layer) is None and plan_lib.largest_dense_dim(
        layer) <= int(max_factor_dim):
      options.append(("kronecker", kronecker_cost(layer)))
    examples = tengrad_plan.layer_examples(layer, traced)
    if tengrad_plan.unsupported(layer, traced.num_examples, traced) is None and (
        blocks != "auto" or examples == traced.num_examples or not options):
      options.append(("woodbury", woodbury_cost(layer, gram_batch, examples)))
    if not options:
      continue
    if blocks == "auto":
      choice[layer.kernel] = min(options, key=lambda o: o[1])[0]
    else:
      kinds = [kind for kind, _ in options]
      choice[layer.kernel] = blocks if blocks in kinds else kinds[0]
  return choice


def scale_by_natural_gradient(
    loss_fn: Callable[..., Any],
    *,
    blocks: str = "auto",
    example_batch: Any = None,
    damping: float | Callable[[jax.Array], jax.Array] = 1e-3,
    gram_batch: int = 128,
    conv_gram: str = "exact",
    fisher: str = "sampled",
    stats_every: int = 1,
    inverse_every: int = 5,
    ema_decay: float = 0.95,
    fallback: str = "identity",
    max_factor_dim: int = 4096,
    weight_sharing: str = "expand",
    axis_name: str | None = None,
    has_aux: bool = False,
    damping_scale: str = "absolute",
) -> optax.GradientTransformationExtraArgs:
  r"""Preconditions each layer with its cheaper exactly damped block.

  Kronecker layers: ``Δ = (A⊗G + λI)⁻¹ vec(∇)`` with K-FAC's running factors
  (``scale_by_kfac`` with ``damping_mode="tikhonov"``); Woodbury layers:
  ``Δ = (UUᵀ/n + λI)⁻¹ vec(∇)`` with the per-example gradients of the last
  refresh's first ``n = min(gram_batch, M)`` examples (``scale_by_tengrad``).
  Both damp the block they approximate with the same λ. The choice per layer
  is in the module doc (``kfac_jax_ext.natural_gradient_transform``).

  Args:
    loss_fn: ``loss_fn(params, batch)`` using a ``kfe`` loss helper.
    blocks: ``"auto"`` (default: the cheaper refresh per layer),
      ``"kronecker"`` or ``"woodbury"`` (that kind wherever it exists).
    example_batch: required; a batch (arrays or ``jax.ShapeDtypeStruct``s)
      on which ``loss_fn`` is traced to choose and lay out the blocks. Its
      number of examples sets the Gram size the cost model assumes.
    damping: λ, a float or a schedule ``step -> λ``.
    gram_batch, conv_gram: the Woodbury blocks' options (``scale_by_tengrad``).
    fisher: ``"sampled"`` (needs ``key``) or ``"empirical"``.
    stats_every: statistics every k updates (Kronecker running averages);
      must divide ``inverse_every``, so that every refresh has statistics.
    inverse_every: refresh the inverses and Woodbury blocks every k updates.
    ema_decay: the Kronecker factors' running-average cap (Woodbury blocks
      use one batch).
    fallback: ``"identity"`` or ``"diagonal"``, for leaves no layer owns.
    max_factor_dim: the largest Kronecker factor allowed.
    weight_sharing: the Kronecker side's ``weight_sharing``.
    axis_name: the pmap / shard_map data axis (both sides).
    has_aux: ``loss_fn`` returns ``(loss, aux)``.
    damping_scale: ``"absolute"`` or ``"relative"``: λ in units of each
      block's mean eigenvalue, ``scale_by_kfac``'s ``λ·m_A·m_G`` on the
      Kronecker side and ``scale_by_tengrad``'s mean of the nonzero
      eigenvalues on the Woodbury side.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    ``NaturalGradientState``; ``update`` takes ``(updates, state, params, *,
    batch, key=None, curvature=None, due=None)``. Without ``curvature`` and
    with ``stats_every=1`` one statistics pass serves both sides.

  Example:
    >>> tx = optax.chain(
    ...     kfe.scale_by_natural_gradient(loss_fn, example_batch=batch,
    ...                                   damping=1e-2, gram_batch=64),
    ...     optax.sgd(0.1, momentum=0.9))
  """
  name = "scale_by_natural_gradient"
  _check_blocks(blocks)
  if example_batch is None:
    raise ValueError(f"{name} chooses each layer's block from the layers traced "
                     "on a batch: pass example_batch=<a batch, or "
                     "jax.ShapeDtypeStructs of one>.")
  if not (isinstance(stats_every, int) and isinstance(inverse_every, int)
          and stats_every >= 1 and inverse_every % stats_every == 0):
    raise ValueError(f"{name} refreshes its Woodbury blocks from the statistics "
                     "of the refresh step: stats_every must divide "
                     f"inverse_every, got {stats_every} and {inverse_every}.")
  kron_init, kron_step = kronecker_family.kronecker_stepper(
      loss_fn, KFAC, damping=damping, damping_mode="tikhonov", fisher=fisher,
      stats_every=stats_every, inverse_every=inverse_every,
      ema_decay=ema_decay, fallback=fallback, max_factor_dim=max_factor_dim,
      axis_name=axis_name, has_aux=has_aux, example_batch=example_batch,
      weight_sharing=weight_sharing, damping_scale=damping_scale, name=name)
  wood_init, wood_update = woodbury_family.tengrad_stepper(
      loss_fn, damping=damping, gram_batch=gram_batch, conv_gram=conv_gram,
      damping_mode="tikhonov", fisher=fisher, stats_every=1,
      inverse_every=inverse_every, ema_decay=0.0, fallback="identity",
      axis_name=axis_name, has_aux=has_aux, example_batch=example_batch,
      damping_scale=damping_scale, name=name)

  @functools.lru_cache(maxsize=8)
  def shares(structure):
    params = jax.tree_util.tree_unflatten(structure[0], [
        jax.ShapeDtypeStruct(s, d) for s, d in structure[1]])
    traced = tracing.trace_loss(loss_fn, params, example_batch, has_aux, axis_name)
    chosen = choose_blocks(traced, blocks, gram_batch, max_factor_dim)
    wood = frozenset(k for k, kind in chosen.items() if kind == "woodbury")
    return plan_lib.Share(wood, True), plan_lib.Share(wood, False)

  def shares_of(params):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    return shares((treedef, tuple((tuple(x.shape), x.dtype) for x in leaves)))

  def init_fn(params):
    kron_share, wood_share = shares_of(params)
    return NaturalGradientState(kron_init(params, kron_share),
                                wood_init(params, wood_share))

  def update_fn(updates, state, params=None, *, batch=None, key=None,
                curvature=None, due=None, **extra_args):
    schedule.check_due(due, name)
    checks.check_update_args(name, params, batch, curvature, fisher, key, due)
    kron_share, wood_share = shares_of(params)
    if curvature is None and stats_every == 1 and wood_share.kernels:
      traced = tracing.trace_loss(loss_fn, params, batch, has_aux)
      curvature = statistics.statistics_pass(traced, params, batch, key, fisher,
                                             axis_name=axis_name)[2]
    lam = extra_args.get("damping")
    out, kron_state, _ = kron_step(
        updates, state.kronecker, params, batch=batch, key=key,
        curvature=curvature, due=due, damping_override=lam, share=kron_share)
    wood_due = None if due is None else due._replace(statistics=due.inverses)
    out, wood_state = wood_update(
        out, state.woodbury, params, batch=batch, key=key, curvature=curvature,
        due=wood_due, share=wood_share, **extra_args)
    return out, NaturalGradientState(kron_state, wood_state)

  return optax.GradientTransformationExtraArgs(
      init_fn, eager.compile_when_eager(update_fn))
