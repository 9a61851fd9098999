r"""The Kronecker model's Galerkin corrections on the refreshed residual spaces.

``fisher_products="kronecker"`` with ``coarse_space="residual"`` or
``"krylov_residual"`` and ``residual_refresh="statistics"``. ``coarse_model``
reads Tselepidis' model of the whole Fisher, ``F̃_jl = A_jl ⊗ G_jl``
(``A_jl = E[ā_j ā_lᵀ]``, ``G_jl = E[g_j g_lᵀ]``), through rank-one atoms;
the residual bases (``M_l⁻¹res_l``, ``{res_l, M_l⁻¹res_l}``) are full
``[d_a, d_g]`` matrices, so here the model is read through their products:
for the basis vector ``Z_k`` of layer ``l``,

    B_kj = (F̃ Rᵀe_k)_j = A_jl Z_k G_lj       [d_aj, d_gj], every layer j

    (R F̃ x)_k = Σ_j ⟨B_kj, X_j⟩               (projected)
    (F̃ Rᵀβ)_j = Σ_k β_k B_kj                   (lifted)
    (R F̃ Rᵀ)_kk' = ⟨B_k l(k'), Z_k'⟩          (F_c)

On each statistics step the basis is rebuilt (``coarse_refresh``: the
residual ``res = ∇ − F_λM⁻¹∇`` with that batch's statistics' Fisher and the
refreshed ``M⁻¹``), ``B`` is formed from the same batch's tokens (the
factors as ``coarse_model``'s: K-FAC's scaling, pooled per example where
token counts differ) and ``F_c = R F̃ Rᵀ`` from ``B`` inverted; the three
are kept until the next one. Between statistics steps a multiplicative or
balanced step then costs ``O(S·P)`` (``S`` basis vectors, ``P`` coarse-layer
parameters: a read of ``B``) and no statistics pass, as on the fixed
spaces, and Galerkin orthogonality ``R(∇ − F̃_λΔ) = 0`` holds exactly for
the model's ``F̃_λ = F̃ + λI``. The fine step's model scale ``α`` is measured
on statistics steps with the statistics' Fisher and held (``coarse_model``).

Memory and cost: ``B`` is ``S × P`` numbers (8 × 2.8 M on the MNIST
autoencoder with ``"residual"``, twice that with ``"krylov_residual"``); a
statistics step forms it in ``O(N·P + N²·Σd_g)`` per basis vector for ``N``
examples (``batch_products``): pass ``coarse_batch`` (e.g. a quarter of the
batch) to take the model, the residual's Fisher and α from the first
``N`` examples only. Meant for models of tens of layers, as the coarse
level's ``S × S`` matrix is.

A non-finite batch or basis, or a failed ``F_c`` inverse, keeps the previous
basis, ``B`` and ``F_c⁻¹`` together, and is counted in ``health``.

Example::

  >>> tx = kfe.two_level_kfac(loss_fn, 0.3, damping=0.03, kl_clip=1.0,
  ...                         combine="multiplicative", coarse_space="residual",
  ...                         residual_refresh="statistics",
  ...                         fisher_products="kronecker", coarse_batch=250)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kfac_jax_ext import coarse_krylov
from kfac_jax_ext import coarse_level as level
from kfac_jax_ext import coarse_model
from kfac_jax_ext import coarse_refresh
from kfac_jax_ext import distributed
from kfac_jax_ext import initial_arrays
from kfac_jax_ext import linalg
from kfac_jax_ext import schedule
from kfac_jax_ext.blocks import kronecker


class BasesModelState(NamedTuple):
  """The model's products with the kept basis, and the held model scale.

  Attributes:
    products: per ≥2-D leaf ``j``, ``[S, rows, cols]``: row ``k`` holds
      ``B_kj`` in the leaf's slot orientation (``coarse_krylov.oriented``);
      None for ≤1-D leaves.
    scale: the fine step's ``α`` of the last statistics step (1 before).
    coarse_scale: the coarse step's ``γ`` (``fine_scale="both"``; else 1).
  """
  products: tuple
  scale: jax.Array
  coarse_scale: jax.Array


def initial(shapes, size: int, dtype) -> BasesModelState:
  """Zeros: no correction before the first statistics step (the basis is
  zero too, ``coarse_refresh.slots``)."""
  return BasesModelState(
      tuple(initial_arrays.zeros((size,) + tuple(kronecker.slot_sizes(s)), dtype)
            if len(s) >= 2 else None for s in shapes),
      initial_arrays.ones((), dtype), initial_arrays.ones((), dtype))


def cross_factors(tok_j, tok_l):
  """``(A_jl [d_aj, d_al], G_lj [d_gl, d_gj])`` of one statistics batch from
  two layers' tokens ``(ā [M,T,d_a], g [M,T,d_g])``, with ``coarse_model``'s
  scaling (equal token counts: ``Σ_tok ā_j ā_lᵀ/(MT)``, ``Σ_tok g_l g_jᵀ/M``;
  else pooled per example: means of ``ā``, sums of ``g`` over ``√(T_jT_l)``)."""
  (a_j, g_j), (a_l, g_l) = tok_j, tok_l
  m, tj, tl = a_j.shape[0], a_j.shape[1], a_l.shape[1]
  if tj == tl:
    return (jnp.einsum("mtd,mte->de", a_j, a_l) / (m * tj),
            jnp.einsum("mtd,mte->de", g_l, g_j) / m)
  return (jnp.einsum("md,me->de", a_j.mean(1), a_l.mean(1)) / m,
          jnp.einsum("md,me->de", g_l.sum(1), g_j.sum(1)) / (m * (tj * tl) ** 0.5))


def batch_products(layers, toks, size: int, dtype, axis_name=None):
  """Per coarse layer ``j``, ``[S, d_aj, d_gj]``: ``B_kj = A_jl Z_k G_lj``
  for every basis vector ``k`` (of layer ``l``: ``layers[l].basis``, at its
  indices ``idx``) from this batch's tokens; 0 at unused indices.

  Where a pair's factors are one token per example (dense layers, or
  pooled per example where the token counts differ) through the examples:
  ``C_k = P_al Z_k P_glᵀ`` ``[N, N]`` and ``B_kj = P_ajᵀ C_k P_gj /
  (N²√(T_jT_l))`` (``P_a``: per-example means of ``ā``, ``P_g``: sums of
  ``g``), ``O(N·P + N²·Σd_g)`` per basis vector for ``N`` examples, the
  devices' examples gathered (``B`` is bilinear in the batch). Two layers
  with the same ``T > 1`` tokens per example (convs of one map size) through
  their cross factors (``cross_factors``, the devices' mean), as the
  examples' ``C_k`` would be ``[NT, NT]``.
  """
  gather = lambda x: distributed.gather_examples(x, axis_name)
  pooled = [(gather(a.mean(1)), gather(g.sum(1))) for a, g in toks]
  count = pooled[0][0].shape[0]
  tokens = [a.shape[1] for a, _ in toks]
  # every basis vector's C_k / √T_l [S, N, N] (0 at unused indices): each
  # layer j's blocks are then one contraction over all k
  c = jnp.zeros((size, count, count), dtype)
  for l, l_l in enumerate(layers):
    c = c.at[l_l.idx].set(jnp.einsum("nd,kde,me->knm", pooled[l][0], l_l.basis,
                                     pooled[l][1]) / tokens[l] ** 0.5)
  out = []
  for j in range(len(layers)):
    p_a, p_g = pooled[j]
    block = jnp.einsum("nd,kne->kde", p_a, jnp.einsum("knm,me->kne", c, p_g)) / (
        count ** 2 * tokens[j] ** 0.5)
    crossed = [l for l in range(len(layers)) if tokens[l] == tokens[j] > 1]
    for l in crossed:   # these rows from the cross factors: C_k would be [NT, NT]
      a_jl, g_lj = distributed.mean(cross_factors(toks[j], toks[l]), axis_name)
      block = block.at[layers[l].idx].set(
          jnp.einsum("de,kef,fg->kdg", a_jl, layers[l].basis, g_lj))
    out.append(block)
  return out


def _slot_of(layers, model: BasesModelState):
  """Per coarse layer, its ``[S, rows, cols]`` slot of ``B`` (not sliced:
  ``BasesFisher`` brings ``x`` to the slot instead, as a sliced ``B`` would
  be a copy of ``S × P`` numbers on every step)."""
  return [model.products[l.kl.layer.kernel] for l in layers]


def _written(model: BasesModelState, layers, products) -> tuple:
  slots = list(model.products)
  for l, p in zip(layers, products):
    slots[l.kl.layer.kernel] = coarse_refresh.written_matrices(
        slots[l.kl.layer.kernel], l.kl, p)
  return tuple(slots)


def _to_slot(kl, x, shape):
  """A ``[d_a, d_g]`` matrix in a ``shape`` ``(rows, cols)`` slot's
  orientation, zero-padded to it (so ``⟨B_k, x⟩`` over the slot ignores
  what ``B``'s padding holds)."""
  x = coarse_krylov.oriented(kl, x)
  return jnp.pad(x, [(0, n - m) for n, m in zip(shape, x.shape)])


def _from_slot(kl, y):
  """``_to_slot``'s inverse on a ``(rows, cols)`` matrix."""
  return coarse_krylov.oriented(kl, linalg.leading(y, coarse_krylov.oriented_shape(kl)))


class BasesFisher(NamedTuple):
  """``F̃_λ`` on the coarse layers through the kept ``B`` (duck-types
  ``coarse_model.ModelFisher``'s products for ``coarse_model.step``).

  Attributes:
    layers: the ``CoarseLayer``s with the kept basis.
    slots: per layer, ``B`` in its state slot ``[S, rows, cols]``
      (``BasesModelState.products``).
    damping: ``λ``.
  """
  layers: Any
  slots: Any
  damping: Any

  def project(self, xs, size, dtype):
    """``R F̃_λ x`` ``[S]``."""
    on = sum(jnp.einsum("kde,de->k", p, _to_slot(l.kl, x, p.shape[1:]))
             for l, p, x in zip(self.layers, self.slots, xs))
    return on + self.damping * level.project_all(self.layers, xs, size, dtype)

  def lift(self, beta):
    """``F̃_λ Rᵀβ`` per layer."""
    return [_from_slot(l.kl, jnp.einsum("k,kde->de", beta, p)) + self.damping * x
            for l, p, x in zip(self.layers, self.slots,
                               level.lift_all(self.layers, beta))]


class FormedProducts(NamedTuple):
  """A statistics step's ``B`` as formed (``batch_products``), for
  ``coarse_model.coarse_inverse``.

  Attributes:
    layers: the ``CoarseLayer``s with the new basis.
    products: per layer, ``[S, d_a, d_g]``.
  """
  layers: Any
  products: Any

  def coarse_matrix(self, size, dtype):
    """``R F̃ Rᵀ`` ``[S, S]`` (undamped)."""
    fc = jnp.zeros((size, size), dtype)
    for l, p in zip(self.layers, self.products):
      fc = fc.at[:, l.idx].set(jnp.einsum("kde,nde->kn", p, l.basis))
    return fc


def corrected(space, combine, layers, state, toks_of, v, b, precondition,
              scaled, size, dtype, m, lam, coarse_damping, schedule_of_stats,
              axis_name, scale_tokens=None):
  """One multiplicative or balanced correction on a refreshed residual space
  with the model's products.

  Args:
    space: ``"residual"`` or ``"krylov_residual"``.
    The others as ``coarse_model.corrected``'s (``layers`` with placeholder
    bases; ``state`` gives ``bases`` too).

  Returns:
    ``(Δ per layer, α, inverse, model, coarse_count, health, bases)``.
    ``F_c⁻¹`` is formed on statistics steps with the basis and ``B`` (all
    three fixed between them); a non-finite batch or a failed inverse keeps
    the previous three and is counted.
  """
  every, due, static = schedule_of_stats

  def rebuild(operand):
    bases, model, inverse, count, health = operand
    toks = toks_of()
    fb = level.statistics_fvp(toks, m, lam, axis_name)(b)
    new_bases, ok = coarse_refresh.rebuilt(
        space, layers, bases, [x - f for x, f in zip(v, fb)], precondition)
    new_layers = coarse_refresh.stored_layers(layers, new_bases)
    products = batch_products(new_layers, toks, size, dtype, axis_name)
    stats_ok = ok & linalg.all_finite(*products)
    new_inverse, inverse_ok = coarse_model.coarse_inverse(
        FormedProducts(new_layers, products), lam, coarse_damping, size, dtype)
    ok = stats_ok & inverse_ok       # basis, B and F_c⁻¹ change together
    keep = lambda old, new: None if old is None else jnp.where(ok, new, old)
    health = health._replace(
        nonfinite_statistics=health.nonfinite_statistics
        + (~stats_ok).astype(jnp.int32),
        failed_inverses=health.failed_inverses
        + (stats_ok & ~inverse_ok).astype(jnp.int32))
    return (tuple(map(keep, bases, new_bases)),
            model._replace(products=tuple(map(
                keep, model.products, _written(model, new_layers, products)))),
            keep(inverse, new_inverse), count + ok.astype(jnp.int32), health)

  bases, model, inverse, count, health = schedule.maybe(
      every, due, rebuild, lambda o: o, (state.bases, state.model,
                                         state.coarse_inverse, state.coarse_count,
                                         state.health), static)
  kept = coarse_refresh.stored_layers(layers, bases)
  fisher = BasesFisher(kept, _slot_of(kept, model), lam)
  delta, (alpha, gamma) = coarse_model.step(
      combine, fisher, inverse, v, b, precondition, scaled, size, dtype,
      coarse_model.scale_of(model, *(scale_tokens or (toks_of, m)), lam, every,
                            due, static, axis_name))
  return (delta, alpha, inverse, model._replace(scale=alpha, coarse_scale=gamma),
          count, health, bases)
