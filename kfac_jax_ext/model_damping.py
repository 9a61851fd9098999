r"""The quadratic model's damping term in the preconditioner's units of λ.

Martens & Grosse's model of a step δ (``kfac_jax_ext.quadratic_model``) is

  ``M(δ) = ½ δᵀ(F + ηI)δ + ½ λ δᵀDδ + ∇hᵀδ``

with ``D = I`` by default. With ``damping_scale="relative"`` the
preconditioner damps block l by ``λ_l = λ·u_l`` (``kfac_jax_ext.relative_damping``:
``u_l = m_A m_G`` of a Kronecker block, ``mean(diag F)`` of a leaf served by
a diagonal); ``D = diag(u_l I_l)`` damps the model the same way. Then the λ
that the Levenberg–Marquardt rule adapts and the λ the preconditioner reads
are one number in one unit, and a loss multiplied by c (its gradient, Fisher
and every ``u_l`` with it) leaves α, μ, ρ and λ's path unchanged (with
``D = I`` it does not).

**Opt-in, measured** (2026-12-01, ``docs/methods.md``): with this D the
adaptive mode from relative λ₀ = 1 reached the autoencoder's target a little
sooner (0.26–0.28× Adam's time against 0.25–0.31×) but diverged on the
Fashion-MNIST CNN on both seeds, where ``D = I`` reached it first: there
``u_l ≪ 1``, so ``D = I`` is a far stronger trust region in the first steps
(with D: ρ = −0.55 on the first step, then μ = −0.94, −9.8, −674;
``python -m benchmarks.adaptive_trace --model-units``). In the
factored mode the preconditioner's damping is not ``λ u_l`` either:
``(A + √λ m_A I)⊗(G + √λ m_G I)`` adds ``√λ`` cross terms that dominate
for small λ. So the aliases keep ``D = I`` and this is an option of
``quadratic_model_step``::

  >>> pre = kfe.scale_by_kfac(loss_fn, damping_scale="relative")
  >>> tx = kfe.quadratic_model_step(pre, loss_fn, damping=1.0,
  ...                               damping_units=kfe.damping_units_of(pre))
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import jax
import jax.numpy as jnp

from kfac_jax_ext import kronecker_family
from kfac_jax_ext import plan as plan_lib
from kfac_jax_ext import relative_damping
from kfac_jax_ext import tracing
from kfac_jax_ext.blocks import diagonal
from kfac_jax_ext.state import KfacState

_UNITS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def find_state(tree, cls):
  """The one ``cls`` instance inside an optax state ``tree`` (a chain's
  tuple, an ``inject_hyperparams`` state, ...).

  Raises:
    ValueError: none, or more than one (two preconditioners of this kind:
      write a ``damping_units(inner_state, params, batch)`` that picks the
      state of the one whose λ the model should share).
  """
  found = [s for s in jax.tree_util.tree_leaves(
      tree, is_leaf=lambda x: isinstance(x, cls)) if isinstance(s, cls)]
  if len(found) != 1:
    raise ValueError(f"damping_units: the inner state holds {len(found)} "
                     f"{cls.__name__}s, not one; with several preconditioners "
                     "pass your own damping_units(inner_state, params, batch) "
                     "that calls kfe.damping_units_of(pre) on the state of the "
                     "one whose λ the model should share.")
  return found[0]


def kronecker_units(loss_fn: Callable[..., Any], variant, fallback: str,
                    has_aux: bool) -> Callable:
  """``units(inner_state, params, batch) -> (δ ↦ Dδ)`` for a Kronecker-family
  preconditioner with relative damping (``variant``: its variant, relative
  units applied).

  ``u_l = λ_l(1) − λ_l(0)`` of each Kronecker layer (the λ-proportional part
  of its damping; TKFAC's ``conv_damping`` is not), from the factors in
  ``inner_state``'s ``KfacState`` (the ones the step's preconditioner used
  in the Tikhonov mode; in the factored mode the inverses hold the units of
  their refresh); per group for a grouped conv; ``mean(diag F)`` (or 1
  while it is zero) for a diagonal leaf; 1 for every other leaf.
  """
  def units(inner_state, params, batch):
    state = find_state(inner_state, KfacState)
    traced = tracing.trace_loss(loss_fn, params, batch, has_aux)
    plan = plan_lib.make_plan(traced, state.factors,
                              unsupported=variant.unsupported)
    dtype = state.diagonals[0].dtype if state.diagonals else jnp.float32

    def unit(kl):
      at = lambda lam: kronecker_family.layer_factors(
          kl, state.factors[kl.layer.kernel], state.traces[kl.layer.kernel],
          variant, jnp.asarray(lam, dtype))[2]
      u = at(1.0) - at(0.0)
      return u[:, None, None] if kl.layer.groups > 1 else u

    # computed once: weigh runs for every pair of the model's vectors
    layer_units = {kl.layer.kernel: unit(kl) for kl in plan.kronecker}
    leaf_units = {leaf: relative_damping.positive_or_one(
        jnp.mean(state.diagonals[leaf]))
        for leaf in diagonal.served_leaves(plan, fallback)}

    def weigh(tree):
      leaves, treedef = jax.tree_util.tree_flatten(tree)
      out = plan_lib.precondition_layers(
          plan, leaves, dtype, lambda kl, v: layer_units[kl.layer.kernel] * v)
      for leaf, u in leaf_units.items():
        out[leaf] = (u * leaves[leaf].astype(dtype)).astype(leaves[leaf].dtype)
      return jax.tree_util.tree_unflatten(treedef, out)
    return weigh
  return units


def register_kronecker(transform, loss_fn, variant, options: dict):
  """Records ``transform``'s units when ``options`` ask for relative damping
  (``scale_by_kfac``/``scale_by_tkfac``); returns ``transform``."""
  if options.get("damping_scale", "absolute") == "relative":
    _UNITS[transform.update] = kronecker_units(
        loss_fn, relative_damping.apply(variant, "relative", "damping_units"),
        options.get("fallback", "identity"), options.get("has_aux", False))
  return transform


def units_of(transform) -> Callable | None:
  """The ``damping_units`` of a preconditioner, for
  ``kfe.quadratic_model_step(damping_units=...)`` (``kfe.damping_units_of``).

  Args:
    transform: a preconditioner, e.g. ``kfe.scale_by_kfac(loss_fn,
      damping_scale="relative")``.

  Returns:
    For a ``scale_by_kfac``/``scale_by_tkfac`` built with
    ``damping_scale="relative"``: ``units(inner_state, params, batch)``,
    which returns ``δ ↦ Dδ`` (``D = diag(u_l I_l)``, ``λ_l = λ·u_l`` the
    block's damping); None for any other transform (λ absolute, ``D = I``).

  Example:
    >>> pre = kfe.scale_by_kfac(loss_fn, damping_scale="relative")
    >>> tx = kfe.quadratic_model_step(
    ...     optax.chain(pre, optax.add_decayed_weights(1e-5)), loss_fn,
    ...     weight_decay=1e-5, damping=1.0, damping_adaptation=True,
    ...     damping_units=kfe.damping_units_of(pre))
  """
  try:
    return _UNITS.get(transform.update)
  except TypeError:
    return None
