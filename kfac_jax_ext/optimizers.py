"""Complete optimizers: preconditioner → KL-clip → weight decay → momentum → lr.

The pipeline of the reference K-FAC codes (``algorithms.md`` §0.5) as an
``optax.chain``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kfac_jax_ext import kfac_transform


class KlClipState(NamedTuple):
  count: jax.Array
  inner: Any


def clip_by_kl(inner: optax.GradientTransformation, max_kl,
               learning_rate) -> optax.GradientTransformationExtraArgs:
  r"""Wraps a preconditioner with KL-clipping (Ba, Grosse & Martens 2017).

  ``ν = min(1, sqrt(κ / (lr² Σ⟨Δ, ∇⟩)))`` and ``Δ ← νΔ``, where ``∇`` is the
  raw gradient and ``Δ`` the preconditioned one, so that afterwards
  ``lr² ν² Σ⟨Δ, ∇⟩ ≤ κ`` (equality iff clipped).

  Args:
    inner: the preconditioner (e.g. ``scale_by_kfac(...)``).
    max_kl: κ (float or array).
    learning_rate: float or schedule, the same one the optimizer applies.

  Returns:
    An ``optax.GradientTransformationExtraArgs``.
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    return KlClipState(jnp.zeros([], jnp.int32), inner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    delta, inner_state = inner.update(updates, state.inner, params, **extra_args)
    lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
    wide = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))
    inner_product = sum(
        jnp.vdot(wide(d), wide(g))
        for d, g in zip(jax.tree_util.tree_leaves(delta),
                        jax.tree_util.tree_leaves(updates)))
    quad = jnp.asarray(lr, inner_product.dtype) ** 2 * jnp.abs(inner_product)
    nu = jnp.where(quad > 0, jnp.minimum(1.0, jnp.sqrt(max_kl / jnp.where(
        quad > 0, quad, 1.0))), 1.0)
    delta = jax.tree_util.tree_map(lambda d: (d * nu).astype(d.dtype), delta)
    return delta, KlClipState(state.count + 1, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _is_zero(x) -> bool:
  return isinstance(x, (int, float)) and x == 0


def with_optimizer_steps(preconditioner, learning_rate, *, momentum=0.9,
                         weight_decay=0.0, kl_clip=None):
  """``chain(clip_by_kl(preconditioner), add_decayed_weights, trace, -lr)``."""
  parts = [preconditioner if kl_clip is None else
           clip_by_kl(preconditioner, kl_clip, learning_rate)]
  if not _is_zero(weight_decay):
    parts.append(optax.add_decayed_weights(weight_decay))
  if momentum is not None and not _is_zero(momentum):
    parts.append(optax.trace(decay=momentum, nesterov=False))
  parts.append(optax.scale_by_learning_rate(learning_rate))
  return optax.chain(*parts)


def kfac(loss_fn: Callable, learning_rate, *, momentum=0.9, weight_decay=0.0,
         kl_clip=None, damping=1e-3, damping_mode="factored", fisher="sampled",
         stats_every=1, inverse_every=5, ema_decay=0.95, fallback="identity",
         max_factor_dim=4096, axis_name=None,
         has_aux=False) -> optax.GradientTransformationExtraArgs:
  """K-FAC optimizer: ``scale_by_kfac`` with KL-clip, weight decay, momentum, lr.

  Options are explicit keywords (not ``**kwargs``) so that
  ``optax.inject_hyperparams(kfe.kfac, static_args=("loss_fn",))`` can bind them.

  Args:
    loss_fn: ``loss_fn(params, batch)`` using a ``kfe`` loss helper.
    learning_rate: float or optax schedule.
    momentum: heavy-ball momentum (no dampening, no Nesterov); 0 or None: off.
    weight_decay: added to the preconditioned direction (``Δ + wd·θ``).
    kl_clip: κ for KL-clipping, or None.
    damping, damping_mode, fisher, stats_every, inverse_every, ema_decay,
    fallback, max_factor_dim, axis_name, has_aux: see ``scale_by_kfac``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` needs
    ``params``, ``batch=`` and (sampled Fisher) ``key=``.

  Example:
    >>> opt = kfe.kfac(loss_fn, learning_rate=0.1, damping=1e-3)
    >>> state = opt.init(params)
    >>> updates, state = opt.update(grads, state, params, batch=batch, key=key)
  """
  preconditioner = kfac_transform.scale_by_kfac(
      loss_fn, damping=damping, damping_mode=damping_mode, fisher=fisher,
      stats_every=stats_every, inverse_every=inverse_every, ema_decay=ema_decay,
      fallback=fallback, max_factor_dim=max_factor_dim, axis_name=axis_name,
      has_aux=has_aux)
  return with_optimizer_steps(preconditioner, learning_rate, momentum=momentum,
                              weight_decay=weight_decay, kl_clip=kl_clip)
