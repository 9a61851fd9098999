"""K-FAC / KFC Kronecker blocks: ``F_l ≈ A ⊗ G``.

With ``ā = [a; 1]`` (the homogeneous coordinate folds the bias in), K tokens
and M loss examples (dense: K = M; conv: K = M·|T|; sequences: K = M·T):

    A = (1/K) Σ_tok ā āᵀ,     G = (1/M) Σ_tok g gᵀ,

which equals KFC's ``Ω ⊗ Γ`` for conv layers (and kfac-jax's ``|T|``-scaled
factors). The canonical gradient matrix ``V`` is ``[d_in(+1), d_out]`` (flax
orientation, bias as last row); in row-major vec ``(A ⊗ G) vec(V) = vec(A V G)``.

Grouped/depthwise convs have one block per feature group, and a stacked
kernel (scanned over) one per slice, stored batched (``[groups, d, d]``).
Embeddings (``blocks/embedding.py``) and kernels with several uses
(``blocks/tied.py``) are Kronecker blocks with their own statistics.

Damping (``damping_mode``):
* ``"tikhonov"``: exact ``(A⊗G + λI)⁻¹ vec(V) = Q_A [(Q_Aᵀ V Q_G) ⊘ (α γᵀ + λ)] Q_Gᵀ``;
* ``"factored"``: ``(A + π√λ I)⁻¹ V (G + √λ/π I)⁻¹``, π = sqrt((trA/dA)/(trG/dG)).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kfac_jax_ext import gram as gram_lib
from kfac_jax_ext import initial_arrays
from kfac_jax_ext import linalg
from kfac_jax_ext.blocks import base


class KroneckerFactors(NamedTuple):
  """Running factors of a ≥2-D parameter leaf, padded to its slot sizes.

  ``rows``: ``(prod(shape[:-1]) + 1)²``; ``cols``: ``(shape[-1] + 1)²``.
  A layer uses one side as A and the other as G, sliced to its dimensions.
  """
  rows: jax.Array
  cols: jax.Array


class KroneckerInverse(NamedTuple):
  """Refreshed inverse data: damped inverses (factored mode) or eigenvectors
  and eigenvalues (tikhonov mode; ``*_vals`` are None in factored mode, so the
  state holds no zero-size arrays, which orbax cannot save)."""
  rows: jax.Array
  cols: jax.Array
  rows_vals: jax.Array | None
  cols_vals: jax.Array | None


def slot_sizes(shape) -> tuple[int, int]:
  rows = 1
  for n in shape[:-1]:
    rows *= n
  return rows + 1, shape[-1] + 1


def init_factors(shape, dtype) -> KroneckerFactors:
  r, c = slot_sizes(shape)
  return KroneckerFactors(initial_arrays.identity((r, r), dtype),
                          initial_arrays.identity((c, c), dtype))


def init_inverse(shape, dtype, mode: str) -> KroneckerInverse:
  r, c = slot_sizes(shape)
  vals = (lambda n: initial_arrays.ones((n,), dtype)) if mode == "tikhonov" else (
      lambda n: None)
  return KroneckerInverse(initial_arrays.identity((r, r), dtype),
                          initial_arrays.identity((c, c), dtype),
                          vals(r), vals(c))


def matmul(x, y, product_dtype=None):
  """``x @ y`` in ``x``'s dtype; with ``product_dtype`` (e.g. bfloat16) the
  inputs are rounded to it and the products accumulated in ``x``'s dtype
  (``preferred_element_type``): per entry ``|error| ≤ (2u + u²)(|x||y|)``
  plus the accumulation's rounding, u the unit roundoff of
  ``product_dtype`` (2⁻⁸ for bfloat16)."""
  if product_dtype is None:
    return x @ y
  return jnp.matmul(x.astype(product_dtype), y.astype(product_dtype),
                    preferred_element_type=x.dtype)


def homogeneous_gram(a, has_bias: bool, weights=None, product_dtype=None):
  """``Σ_tok w ā āᵀ`` (unnormalised) with ``ā = [a; 1]`` when ``has_bias``,
  without materialising the ones column."""
  aw = a if weights is None else a * weights[:, None]
  gram = gram_lib.symmetric_gram(a, aw, matmul=lambda x, y: matmul(x, y, product_dtype))
  if not has_bias:
    return gram
  s = jnp.sum(aw, axis=0)
  total = jnp.sum(weights) if weights is not None else jnp.asarray(a.shape[0], a.dtype)
  top = jnp.concatenate([gram, s[:, None]], axis=1)
  bottom = jnp.concatenate([s, total[None].astype(a.dtype)])[None, :]
  return jnp.concatenate([top, bottom], axis=0)


def batch_factors(a, g, has_bias: bool, num_examples, dtype,
                  product_dtype=None):
  """``(A_b, G_b)`` of one batch from ``a [K, d_in]`` and ``g [K, d_out]``
  (the products' inputs in ``product_dtype`` if given: ``matmul``; large
  factors from their upper block triangle on CPU: ``gram.symmetric_gram``)."""
  a = a.astype(dtype)
  g = g.astype(dtype)
  mm = lambda x, y: matmul(x, y, product_dtype)
  return (homogeneous_gram(a, has_bias, product_dtype=product_dtype) / a.shape[0],
          gram_lib.symmetric_gram(g, matmul=mm) / jnp.asarray(num_examples, dtype))


def refresh(a, g, damping, mode: str):
  """Inverse data for one layer's factors.

  Returns:
    ``(inverse_a, inverse_g, vals_a, vals_g, ok)``.
  """
  if mode == "tikhonov":
    va, qa, ok_a = linalg.eigh(a)
    vg, qg, ok_g = linalg.eigh(g)
    return qa, qg, va, vg, ok_a & ok_g
  pi = linalg.pi_adjustment(a, g)
  root = jnp.sqrt(damping)
  inv_a, ok_a = linalg.damped_inverse(a, pi * root)
  inv_g, ok_g = linalg.damped_inverse(g, root / pi)
  return inv_a, inv_g, None, None, ok_a & ok_g


def precondition(v, inv_a, inv_g, vals_a, vals_g, damping, mode: str,
                 product_dtype=None):
  """Applies the damped block inverse to the canonical gradient matrix ``v``
  (the GEMMs' inputs in ``product_dtype`` if given: ``matmul``; the
  eigenvalue division stays in the factors' dtype)."""
  mm = lambda x, y: matmul(x, y, product_dtype)
  if mode == "tikhonov":
    rotated = mm(mm(inv_a.T, v), inv_g)
    rotated = rotated / (vals_a[:, None] * vals_g[None, :] + damping)
    return mm(mm(inv_a, rotated), inv_g.T)
  return mm(mm(inv_a, v), inv_g)


def init_layer_entry(a_shape, g_shape, a_side: str, dtype, mode: str):
  """Exact-size ``(KroneckerFactors, KroneckerInverse)`` of one layer with A
  in ``a_side``: identities (ones for a diagonal A)."""
  sides = {a_side: a_shape, ("cols" if a_side == "rows" else "rows"): g_shape}
  factors = KroneckerFactors(initial_arrays.identity(sides["rows"], dtype),
                             initial_arrays.identity(sides["cols"], dtype))
  vals = (lambda s: None) if mode != "tikhonov" else (
      lambda s: initial_arrays.ones(s if len(s) == 1 else s[:-1], dtype))
  inverse = KroneckerInverse(initial_arrays.identity(sides["rows"], dtype),
                             initial_arrays.identity(sides["cols"], dtype),
                             vals(sides["rows"]), vals(sides["cols"]))
  return factors, inverse


class KroneckerInverseData(NamedTuple):
  """What a Kronecker refresh yields: damped inverses of A and G (factored
  mode; ``vals_*`` None) or their eigenvectors and eigenvalues (tikhonov)."""
  inv_a: jax.Array
  inv_g: jax.Array
  vals_a: jax.Array | None
  vals_g: jax.Array | None


@dataclasses.dataclass(frozen=True)
class Kronecker(base.CurvatureBlock):
  """``F_l ≈ A ⊗ G`` of a dense or conv layer (see the module doc); a grouped
  conv or the slices of a stacked kernel have one block per group or slice,
  stored batched (``[groups, d, d]``) and refreshed and applied with
  ``vmap``.

  Attributes:
    mode: ``"tikhonov"`` or ``"factored"`` damping.
    product_dtype: None, or the dtype the factor products' and the
      preconditioning GEMMs' inputs are rounded to (accumulated in the
      factors' dtype; ``matmul``). Dense and conv blocks; embedding and tied
      blocks ignore it.
  """
  mode: str = "tikhonov"
  product_dtype: Any = None

  @property
  def batched(self) -> bool:
    return self.layer.groups > 1

  def factor_shapes(self) -> tuple[tuple, tuple]:
    """Shapes of ``(A, G)``: ``[d_a, d_a]``, ``[d_g, d_g]`` (per group)."""
    lead = (self.layer.groups,) if self.batched else ()
    return (lead + (self.layer.d_a, self.layer.d_a),
            lead + (self.layer.d_out, self.layer.d_out))

  def init(self, a_side: str, dtype):
    """``(KroneckerFactors, KroneckerInverse)``: identities, A in ``a_side``."""
    a_shape, g_shape = self.factor_shapes()
    return init_layer_entry(a_shape, g_shape, a_side, dtype, self.mode)

  def batch_statistics(self, stats, num_examples, dtype):
    """``(A_b, G_b)`` from the tokens ``stats = (a [K, d_in], g [K, d_out])``."""
    a, g = stats
    one = lambda x, y: batch_factors(x, y, self.has_bias, num_examples, dtype,
                                     self.product_dtype)
    return jax.vmap(one)(a, g) if self.batched else one(a, g)

  def refresh(self, estimate, damping):
    """Inverse data of ``(A, G)``; a per-group damping has shape ``[groups]``."""
    a, g = estimate
    one = lambda x, y, lam: refresh(x, y, lam, self.mode)
    if self.batched:
      *out, ok = linalg.map_blocks(one, a, g, jnp.broadcast_to(damping, a.shape[:1]))
      return KroneckerInverseData(*out), jnp.all(ok)
    *out, ok = one(a, g, damping)
    return KroneckerInverseData(*out), ok

  def apply(self, inverse, v, damping):
    one = lambda x, ia, ig, va, vg, lam: precondition(x, ia, ig, va, vg, lam,
                                                      self.mode, self.product_dtype)
    if self.batched:
      return jax.vmap(one)(v, *inverse, jnp.broadcast_to(damping, v.shape[:1]))
    return one(v, *inverse, damping)

  def refresh_cost(self) -> float:
    """``d_a³ + d_g³`` per group or slice."""
    a_shape, g_shape = self.factor_shapes()
    return math.prod(g_shape[:-2]) * (a_shape[-1] ** 3 + g_shape[-1] ** 3)

  def label(self) -> str:
    """``kronecker d_a×d_g``, with ``G× `` in front for G groups or slices."""
    prefix = f"{self.layer.groups}x " if self.batched else ""
    return f"{prefix}kronecker {self.layer.d_a}x{self.layer.d_out}"
