"""Exact curvature-vector products of the registered predictive distribution.

For the loss helpers' losses (canonical links) the Fisher of the model's
predictive distribution equals the generalised Gauss–Newton matrix:

    F = (1/M) Σ_n J_nᵀ H_n J_n,

with ``J_n`` the Jacobian of example n's registered predictions ``z_n`` in
the parameters and ``H_n`` the Fisher of its distribution in ``z``
(softmax: ``diag(p) − ppᵀ``; sigmoid: ``diag(p(1−p))``; Gaussian: ``I``),
weighted by the helper's per-example weights. Several registered losses add
up (the loss is the sum of their means). ``J v`` is one forward-mode pass
(``jax.linearize`` of ``params → z``), ``Jᵀ u`` its transpose.

Quadratic forms ``vᵢᵀ F vⱼ = (J vᵢ)ᵀ H (J vⱼ)`` need only forward-mode passes:
this is what the adaptive step (``quadratic_model_step``) uses, two of them
per step. Under ``axis_name`` (pmap/shard_map over the examples) products and
forms are averaged over the devices: the Fisher of the global batch when the
shards are equal.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from kfac_jax_ext import distributed
from kfac_jax_ext import losses as losses_lib
from kfac_jax_ext import statistics
from kfac_jax_ext import tracing


def _wide(dtype):
  return jnp.promote_types(dtype, jnp.float32)


def _linearize(traced, p_leaves, b_leaves):
  """``(loss, registered, jvp_fn)``: the loss at ``p_leaves``, the registered
  losses (their predictions and weights at ``p_leaves``) and
  ``jvp_fn(v_leaves) -> [J_k v]``, one entry per registered loss."""
  kinds = []

  def predictions(p):
    outs, regs = statistics.evaluate_losses(traced, p, b_leaves)
    kinds[:] = [r.kind for r in regs]
    return (outs[0], [r.predictions for r in regs],
            [jax.lax.stop_gradient(r.weights) for r in regs])

  (loss, preds, weights), jvp_full = jax.linearize(predictions, p_leaves)
  regs = [losses_lib.RegisteredLoss(k, z, None, w)
          for k, z, w in zip(kinds, preds, weights)]
  return loss, regs, lambda v: jvp_full(v)[1]


def _cast_like(vector_leaves, p_leaves):
  return [jnp.asarray(v).astype(p.dtype) for v, p in zip(vector_leaves, p_leaves)]


def _check_vector(vector, params, name):
  v_leaves, v_def = jax.tree_util.tree_flatten(vector)
  p_leaves, p_def = jax.tree_util.tree_flatten(params)
  if v_def != p_def or any(jnp.shape(v) != jnp.shape(p)
                           for v, p in zip(v_leaves, p_leaves)):
    raise ValueError(f"{name}: the vector must have the structure and shapes "
                     f"of params; got {v_def} for params {p_def}.")
  return v_leaves


class FisherOperator(NamedTuple):
  """The exact Fisher (GGN) of a batch, linearized once at ``params``.

  Attributes:
    loss: the loss at ``params`` (this device's, under ``axis_name``).
    product: ``[v leaves] -> [F v leaves]`` (one forward-mode and one
      transposed pass; averaged over ``axis_name``).
    forms: ``[[v leaves], ...] -> Q``, ``Q[i, j] = vᵢᵀ F vⱼ`` (forward-mode
      passes only; symmetric, float32 or wider; averaged over ``axis_name``).
  """
  loss: Any
  product: Callable
  forms: Callable


def fisher_operator(traced: tracing.TracedLoss, params, batch, *,
                    axis_name=None) -> FisherOperator:
  """Linearizes ``params → registered predictions`` once, for several
  products and forms with the same Fisher ``F = (1/M) Σ_n J_nᵀ H_n J_n``."""
  p_leaves = jax.tree_util.tree_leaves(params)
  p_leaves = distributed.per_device(p_leaves, axis_name)
  b_leaves = jax.tree_util.tree_leaves(batch)
  loss, regs, jvp_fn = _linearize(traced, p_leaves, b_leaves)
  tangent = lambda v: jvp_fn(distributed.per_device(_cast_like(v, p_leaves),
                                                    axis_name))

  def product(v_leaves):
    us = tangent(v_leaves)
    hus = [r.hessian_product(u.astype(_wide(u.dtype))).astype(u.dtype)
           for r, u in zip(regs, us)]
    (fv,) = jax.linear_transpose(jvp_fn, p_leaves)(hus)
    return distributed.mean(list(fv), axis_name)

  def forms(vectors):
    us = [[u.astype(_wide(u.dtype)) for u in tangent(v)] for v in vectors]
    rows = []
    for i in range(len(vectors)):
      hu = [r.hessian_product(u) for r, u in zip(regs, us[i])]
      rows.append([sum(jnp.vdot(h, u) for h, u in zip(hu, us[j]))
                   for j in range(len(vectors))])
    q = jnp.asarray(rows)
    return distributed.mean(0.5 * (q + q.T), axis_name)

  return FisherOperator(loss, product, forms)


def fisher_vector_product(loss_fn: Callable[..., Any], params, batch, vector, *,
                          has_aux: bool = False, axis_name=None):
  """``F v`` with F the exact Fisher (= GGN) of the registered losses on ``batch``.

  ``F v = (1/M) Σ_n J_nᵀ H_n J_n v``: one forward-mode pass for ``J v``,
  the helpers' ``H_n``, then the transposed pass. No Kronecker or other
  approximation; the cost is about that of one gradient evaluation.

  Args:
    loss_fn: ``loss_fn(params, batch)`` calling a ``kfe`` loss helper.
    params: where the Fisher is taken.
    batch: what ``loss_fn`` takes; F is the mean over its examples.
    vector: a pytree with the structure and shapes of ``params``.
    has_aux: ``loss_fn`` returns ``(loss, aux)``.
    axis_name: inside pmap/shard_map over the examples, the axis to average
      the product over.

  Returns:
    ``F v``, with the structure and dtypes of ``params``.

  Example:
    >>> fv = kfe.fisher_vector_product(loss_fn, params, batch, grads)
    >>> curvature = sum(jnp.vdot(a, b) for a, b in zip(
    ...     jax.tree.leaves(grads), jax.tree.leaves(fv)))   # ∇ᵀF∇
  """
  traced = tracing.trace_loss(loss_fn, params, batch, has_aux)
  v_leaves = _check_vector(vector, params, "fisher_vector_product")
  operator = fisher_operator(traced, params, batch, axis_name=axis_name)
  treedef = jax.tree_util.tree_structure(params)
  return jax.tree_util.tree_unflatten(treedef, operator.product(v_leaves))


def curvature_forms(traced: tracing.TracedLoss, params, batch,
                    vectors: Sequence[Any], *, axis_name=None):
  """``(loss, Q)``: the loss at ``params`` and ``Q[i, j] = vᵢᵀ F vⱼ``.

  ``vectors`` are pytrees shaped like ``params``; one forward-mode pass
  each, no transposed pass. ``Q`` is symmetric, in float32 or wider.
  Under ``axis_name`` both are averaged over the devices.
  """
  operator = fisher_operator(traced, params, batch, axis_name=axis_name)
  q = operator.forms([jax.tree_util.tree_leaves(v) for v in vectors])
  loss = jnp.asarray(operator.loss).astype(q.dtype)
  return distributed.mean(loss, axis_name), q
