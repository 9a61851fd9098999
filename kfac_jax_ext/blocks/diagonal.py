"""Diagonal Fisher blocks: scale-and-shift layers and the ``"diagonal"`` fallback.

Scale-and-shift (LayerNorm/BatchNorm affine): per token, the scale gradient is
``u = a ⊙ g`` and the shift gradient ``g``; ``diag F = (1/M) Σ_tok u²``.
Fallback for parameters no layer owns: with sampled targets the per-example
gradients have zero mean, so ``E[(Σ_n u_n)²] = Σ_n E[u_n²]`` and
``diag F ≈ (∇ objective)² / M`` is unbiased (biased for the empirical Fisher).
The preconditioned gradient is ``∇ / (diag F + λ)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kfac_jax_ext import distributed
from kfac_jax_ext import plan as plan_lib
from kfac_jax_ext import relative_damping


def from_tokens(u, num_examples, dtype):
  """``Σ_tok u² / M`` over the token axis (``[K, size]``, or ``[L, K, size]``
  per step of a scan)."""
  u = u.astype(dtype)
  return jnp.sum(u * u, axis=-2) / jnp.asarray(num_examples, dtype)


def from_summed_gradient(grad, num_examples, dtype):
  grad = grad.astype(dtype)
  return grad * grad / jnp.asarray(num_examples, dtype)


def precondition(grad, diag, damping):
  return grad / (diag.reshape(grad.shape) + damping)


def layer_diagonal(a, g, has_bias: bool, num_examples, dtype):
  """Diagonal of a dense/conv layer's Fisher without cross-token terms,
  ``Σ_tok ā² g²ᵀ / M`` as a ``[d_in(+1), d_out]`` matrix."""
  a = a.astype(dtype)
  if has_bias:
    a = jnp.concatenate([a, jnp.ones((a.shape[0], 1), dtype)], axis=1)
  return (a * a).T @ jnp.square(g.astype(dtype)) / jnp.asarray(num_examples,
                                                                dtype)


def any_layer_diagonal(layer, a, g, num_examples, dtype):
  """``layer_diagonal`` for any dense/conv/embedding layer, as the canonical
  matrix of ``plan.to_matrix`` (embedding: ``[V, D]``, grouped: per group)."""
  has_bias = layer.bias is not None
  if layer.kind == "tied":   # a: the uses' statistics; sum in the first use's orientation
    parts = [any_layer_diagonal(use, ua, ug, num_examples, dtype)
             for use, (ua, ug) in zip(layer.uses, a)]
    return sum(p.T if flip else p for p, flip in zip(parts, layer.transposed))
  if layer.kind == "embedding":
    g2 = jnp.square(g.astype(dtype))
    return jnp.zeros((layer.d_in, layer.d_out), dtype).at[a].add(
        g2, mode="drop") / jnp.asarray(num_examples, dtype)
  if layer.groups > 1:
    return jax.vmap(lambda x, y: layer_diagonal(x, y, has_bias, num_examples,
                                                dtype))(a, g)
  return layer_diagonal(a, g, has_bias, num_examples, dtype)


def batch_diagonals(plan, traced, cb, fallback: str, dtype,
                    axis_name=None) -> dict:
  """Per parameter leaf, the diagonal Fisher of one statistics batch: the
  scale-and-shift layers always; with ``fallback="diagonal"`` also the
  layers without a block and the leaves no layer owns. With ``axis_name``,
  of the global batch: the token sums are averaged over devices, the summed
  gradients of unowned leaves are summed before squaring."""
  m = traced.num_examples
  out = {}
  for i, layer in plan.diagonal_layers:
    for leaf, u in zip((layer.scale, layer.shift), cb.layers[i]):
      if leaf is not None:
        out[leaf] = from_tokens(u, m, dtype).reshape(traced.param_shapes[leaf])
  if fallback == "diagonal":
    for i, layer, _ in plan.unfactored_layers:
      a, g = plan_lib.layer_ag(cb.layers[i], layer)
      d = any_layer_diagonal(layer, a, g, m, dtype)
      dk, db = plan_lib.from_matrix(layer, d, traced.param_shapes[layer.kernel],
                                    layer.bias is not None)
      for leaf, v in ((layer.kernel, dk), (layer.bias, db)):
        if leaf is not None:
          out[leaf] = v.reshape(traced.param_shapes[leaf])
  out = distributed.mean(out, axis_name)
  if fallback == "diagonal":
    grads = distributed.total(tuple(g.astype(dtype) for g in cb.fallback_grads),
                              axis_name)
    global_m = m * distributed.num_devices(axis_name)
    for leaf, grad in zip(plan.fallback_leaves, grads):
      out[leaf] = from_summed_gradient(grad, global_m, dtype)
  return out


def served_leaves(plan, fallback: str) -> list:
  """The leaves a diagonal serves: scale-and-shift layers', and with
  ``fallback="diagonal"`` those no block owns and unfactored layers'."""
  leaves = [leaf for _, layer in plan.diagonal_layers
            for leaf in (layer.scale, layer.shift) if leaf is not None]
  if fallback == "diagonal":
    leaves += list(plan.fallback_leaves)
    leaves += [leaf for _, layer, _ in plan.unfactored_layers
               for leaf in (layer.kernel, layer.bias) if leaf is not None]
  return leaves


def precondition_leaves(plan, grads, diags, damping, fallback: str, out: list,
                        damping_scale: str = "absolute"):
  """``out[leaf] = ∇ / (diag F + λ)`` for every leaf served by a diagonal
  (``damping_scale="relative"``: ``λ·mean(diag F)``, λ where the diagonal
  is still zero; ``kfac_jax_ext.relative_damping``)."""
  for leaf in served_leaves(plan, fallback):
    g, lam = grads[leaf], damping
    if damping_scale == "relative":
      lam = damping * relative_damping.positive_or_one(jnp.mean(diags[leaf]))
    out[leaf] = precondition(g.astype(damping.dtype), diags[leaf],
                             lam).astype(g.dtype)
  return out
