"""The block-tridiagonal K-FAC shell (``kfe.kfac(..., structure="block_tridiagonal")``).

The block-diagonal K-FAC step (``kronecker_family``) keeps every layer's
``Ā_i``, ``G_i``, their running averages and inverses; this transform adds,
for each link ``i → i+1`` of a chain of dense layers (``chains.py``), the
running cross factors

    Ā_{i,i+1} = (1/K) Σ_tok ā_i ā_{i+1}ᵀ,    G_{i,i+1} = (1/M) Σ_tok g_i g_{i+1}ᵀ

from the same statistics pass, with the same EMA schedule, and on inverse
refreshes the link data of ``blocks/tridiagonal.py`` (from the damped
diagonal factors ``Ā_i + π_i√λ I``, ``G_i + √λ/π_i I``, M&G §6.3). Chain
layers are preconditioned by ``F̂⁻¹ = Ξᵀ Λ Ξ`` (two sweeps); every other
layer keeps its block-diagonal block. A link whose refresh fails (not
finite, or ``Σ_i`` not positive definite) keeps its previous data; until its
first success it acts as block-diagonal (``Ψ = 0``). Failures are counted
in ``state.health.failed_inverses``.

Example:
  >>> tx = kfe.kfac(loss_fn, 0.1, damping=0.3, structure="block_tridiagonal",
  ...               example_batch=batch)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from kfac_jax_ext import chains as chains_lib
from kfac_jax_ext import distributed
from kfac_jax_ext import eager
from kfac_jax_ext import kronecker_family
from kfac_jax_ext import linalg
from kfac_jax_ext import plan as plan_lib
from kfac_jax_ext import relative_damping
from kfac_jax_ext import schedule
from kfac_jax_ext import statistics
from kfac_jax_ext import tracing
from kfac_jax_ext.blocks import tridiagonal
from kfac_jax_ext.state import Health, KfacState


class TridiagonalState(NamedTuple):
  """State of block-tridiagonal K-FAC (arrays only).

  Attributes:
    base: the block-diagonal K-FAC state (diagonal factors, inverses).
    cross: per link, the running ``(Ā_{i,i+1}, G_{i,i+1})``.
    links: per link, the ``tridiagonal.LinkInverse`` of the last refresh.
    lasts: per chain, the damped inverses ``(Ā_L⁻¹, G_L⁻¹)`` of its last layer.
    health: link refreshes that failed, statistics batches skipped.
  """
  base: KfacState
  cross: tuple
  links: tuple
  lasts: tuple
  health: Health


def _usable_chains(traced, plan):
  """The traced chains cut at layers without a Kronecker block (a factor
  over ``max_factor_dim``): the pieces of 2 layers or more."""
  blocked = {kl.index for kl in plan.kronecker}
  pieces = []
  for chain in chains_lib.find_chains(traced):
    piece = []
    for i in chain + (None,):
      if i is not None and i in blocked:
        piece.append(i)
        continue
      if len(piece) > 1:
        pieces.append(tuple(piece))
      piece = []
  return tuple(pieces)


def _links(traced, chains):
  """``[(chain index, i, layer, next layer)]`` over all links."""
  return [(c, k, traced.layers[chain[k]], traced.layers[chain[k + 1]])
          for c, chain in enumerate(chains) for k in range(len(chain) - 1)]


def _check(options):
  relative_damping.require_absolute(
      options, "structure='block_tridiagonal' damps its chains' factors")
  if options.get("damping_mode", "factored") != "factored":
    raise ValueError("structure='block_tridiagonal' damps the diagonal factors "
                     "(factored Tikhonov, M&G §6.3): use damping_mode='factored'.")
  if options.get("example_batch") is None:
    raise ValueError("structure='block_tridiagonal' finds the chains of layers "
                     "by tracing: pass example_batch=<a batch>.")
  if options.get("stats_batch") is not None:
    raise ValueError("structure='block_tridiagonal' takes its cross-layer "
                     "statistics from the whole batch: leave stats_batch unset.")


def scale_by_tridiagonal_kfac(loss_fn, variant, **options
                              ) -> optax.GradientTransformationExtraArgs:
  """K-FAC with M&G's block-tridiagonal inverse over chains of dense layers.

  Args:
    loss_fn: the user's loss (calls a ``kfe`` loss helper).
    variant: K-FAC's ``KroneckerVariant`` (``scale_by_kfac`` passes it).
    **options: ``scale_by_kfac``'s; ``damping_mode`` must be ``"factored"``
      and ``example_batch`` is required.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with ``scale_by_kfac``'s
    ``update``.
  """
  _check(options)
  name = "scale_by_kfac"
  base_init, base_step = kronecker_family.kronecker_stepper(
      loss_fn, variant, name=name, **options)
  example_batch = options["example_batch"]
  has_aux = options.get("has_aux", False)
  fisher = options.get("fisher", "sampled")
  ema_decay = options.get("ema_decay", 0.95)
  stats_every = options.get("stats_every", 1)
  inverse_every = options.get("inverse_every", 5)
  axis_name = options.get("axis_name")

  def init_fn(params):
    traced = tracing.trace_loss(loss_fn, params, example_batch, has_aux, axis_name)
    base_state = base_init(params)
    chains = _usable_chains(traced, plan_lib.make_plan(traced, base_state.factors))
    dtype = linalg.factor_dtype()
    cross, links = [], []
    for _, _, layer, nxt in _links(traced, chains):
      cross.append((jnp.zeros((layer.d_a, nxt.d_a), dtype),
                    jnp.zeros((layer.d_out, nxt.d_out), dtype)))
      links.append(tridiagonal.LinkInverse(   # Ψ = 0 until the first refresh
          jnp.zeros((layer.d_a, nxt.d_a), dtype),
          jnp.zeros((layer.d_out, nxt.d_out), dtype),
          jnp.eye(layer.d_a, dtype=dtype), jnp.eye(layer.d_out, dtype=dtype),
          jnp.ones((layer.d_a, layer.d_out), dtype)))
    lasts = tuple((jnp.eye(traced.layers[c[-1]].d_a, dtype=dtype),
                   jnp.eye(traced.layers[c[-1]].d_out, dtype=dtype)) for c in chains)
    zero = lambda: jnp.zeros([], jnp.int32)
    return TridiagonalState(base_state, tuple(cross), tuple(links), lasts,
                            Health(zero(), zero()))

  def update_fn(updates, state, params=None, *, batch=None, key=None,
                curvature=None, due=None, **extra_args):
    schedule.check_due(due, name)
    if params is None or batch is None:
      raise ValueError(f"{name}: update needs params and batch=.")
    traced = tracing.trace_loss(loss_fn, params, batch, has_aux)
    chains = _usable_chains(traced, plan_lib.make_plan(traced, state.base.factors))
    links = _links(traced, chains)
    if len(links) != len(state.cross):
      raise ValueError(f"{name}: the traced batch has {len(links)} chain links, "
                       f"the state {len(state.cross)}: build the optimizer with "
                       "an example_batch of the structure update receives.")
    stats_due = state.base.curvature_due
    refresh_due = state.base.count % inverse_every == 0
    static_stats = None if due is None else due.statistics
    static_refresh = None if due is None else due.inverses
    cb = curvature
    if cb is None and links and static_stats is not False:
      cb = statistics.statistics_pass(
          traced, params, batch, key, fisher,
          due=None if due is not None else stats_due, axis_name=axis_name)[2]
    out, base_state, ctx = base_step(updates, state.base, params, batch=batch,
                                     key=key, curvature=cb, due=due,
                                     damping_override=extra_args.get("damping"))
    if not links:
      return out, state._replace(base=base_state)
    dtype = ctx.damping.dtype
    m = traced.num_examples

    def accumulate(operand):
      cross, health = operand
      by_index = {kl.index: kl for kl in ctx.plan.kronecker}
      new = distributed.mean(
          [_batch_cross(cb, by_index[chains[c][k]], by_index[chains[c][k + 1]],
                        m, dtype) for c, k, _, _ in links], axis_name)
      ok = linalg.all_finite(*jax.tree_util.tree_leaves(new))
      k = base_state.statistics_count.astype(dtype)   # after this batch
      eps = jnp.minimum(1.0 - 1.0 / jnp.maximum(k, 1.0), ema_decay)
      ema = lambda old, n: jnp.where(ok, eps * old + (1 - eps) * n, old)
      health = health._replace(nonfinite_statistics=(
          health.nonfinite_statistics + (~ok).astype(jnp.int32)))
      return jax.tree_util.tree_map(ema, tuple(cross), tuple(new)), health

    cross, health = schedule.maybe(stats_every, stats_due, accumulate,
                                   lambda o: o, (state.cross, state.health),
                                   static_stats)

    def refresh(operand):
      old_links, old_lasts, health = operand
      damped = {}
      in_chains = {i for chain in chains for i in chain}
      for kl in ctx.plan.kronecker:
        if kl.index in in_chains:
          damped[kl.index] = _damped_factors(kl, base_state, variant,
                                             ctx.damping, dtype)
      new_links, failures = [], jnp.zeros([], jnp.int32)
      for (c, k, _, nxt), (ac, gc), old in zip(links, cross, old_links):
        li, lj = chains[c][k], chains[c][k + 1]
        link, ok = tridiagonal.link_inverse(*damped[li], *damped[lj], ac, gc)
        # On failure keep the previous link; one that never succeeded
        # (Ψ = 0) acts as the block-diagonal block of today's factors.
        never = ~(jnp.any(old.psi_a != 0) | jnp.any(old.psi_g != 0))
        fallback = jax.tree_util.tree_map(
            lambda b, o: jnp.where(never, b, o),
            tridiagonal.block_diagonal_link(*damped[li], nxt.d_a, nxt.d_out), old)
        new_links.append(jax.tree_util.tree_map(
            lambda n, o: jnp.where(ok, n, o), link, fallback))
        failures = failures + (~ok).astype(jnp.int32)
      new_lasts = []
      for chain, old in zip(chains, old_lasts):
        a, g = damped[chain[-1]]
        inv = (jnp.linalg.inv(a), jnp.linalg.inv(g))
        ok = linalg.all_finite(*inv)
        new_lasts.append(tuple(jnp.where(ok, n, o) for n, o in zip(inv, old)))
        failures = failures + (~ok).astype(jnp.int32)
      health = health._replace(failed_inverses=health.failed_inverses + failures)
      return tuple(new_links), tuple(new_lasts), health

    new_links, lasts, health = schedule.maybe(
        inverse_every, refresh_due, refresh, lambda o: o,
        (state.links, state.lasts, health), static_refresh)
    out = _precondition_chains(traced, ctx.plan, chains, updates, out, new_links,
                               lasts, dtype)
    return out, TridiagonalState(base_state, cross, new_links, lasts, health)

  return optax.GradientTransformationExtraArgs(
      init_fn, eager.compile_when_eager(update_fn))


def _damped_factors(kl, base_state, variant, damping, dtype):
  """``(Ā + π√λ I, G + √λ/π I)`` of a layer's running factors (M&G §6.3)."""
  a, g, lam_l = kronecker_family.layer_factors(
      kl, base_state.factors[kl.layer.kernel], base_state.traces[kl.layer.kernel],
      variant, damping)
  pi = linalg.pi_adjustment(a, g)
  root = jnp.sqrt(lam_l)
  eye = lambda n: jnp.eye(n, dtype=dtype)
  return (linalg.symmetrize(a) + pi * root * eye(a.shape[0]),
          linalg.symmetrize(g) + root / pi * eye(g.shape[0]))


def _batch_cross(cb, kl_i, kl_j, num_examples, dtype):
  """``(Ā_{i,j}, G_{i,j})`` of one batch (token-paired statistics) of two
  ``plan.KroneckerLayer``s."""
  a_i, g_i = cb.layers[kl_i.index]
  a_j, g_j = cb.layers[kl_j.index]
  a_i, a_j = a_i.astype(dtype), a_j.astype(dtype)
  if kl_i.has_bias:
    a_i = jnp.concatenate([a_i, jnp.ones((a_i.shape[0], 1), dtype)], axis=1)
  if kl_j.has_bias:
    a_j = jnp.concatenate([a_j, jnp.ones((a_j.shape[0], 1), dtype)], axis=1)
  g_i, g_j = g_i.astype(dtype), g_j.astype(dtype)
  return (a_i.T @ a_j / a_i.shape[0],
          g_i.T @ g_j / jnp.asarray(num_examples, dtype))


def _precondition_chains(traced, plan, chains, grads_tree, out_tree, links, lasts,
                         dtype):
  """Replaces the chain layers' block-diagonal outputs by ``F̂⁻¹ v``."""
  grads = jax.tree_util.tree_leaves(grads_tree)
  out, treedef = jax.tree_util.tree_flatten(out_tree)
  by_index = {kl.index: kl for kl in plan.kronecker}
  start = 0
  for c, chain in enumerate(chains):
    n = len(chain) - 1
    if not all(i in by_index for i in chain):
      raise ValueError(f"block_tridiagonal: a chain layer has no Kronecker block "
                       f"({[traced.layers[i].name for i in chain]}); see "
                       "kfe.describe_layers.")
    kls = [by_index[i] for i in chain]
    vs = [plan_lib.layer_matrix(kl, grads, dtype) for kl in kls]
    deltas = tridiagonal.apply_chain_inverse(links[start:start + n], lasts[c], vs)
    start += n
    for kl, delta in zip(kls, deltas):
      plan_lib.write_layer(out, kl, delta, grads)
  return jax.tree_util.tree_unflatten(treedef, out)
