"""TENGraD blocks: the exact damped Fisher block of a batch, by Woodbury.

For one layer and the ``n`` examples of the statistics batch, let
``U = [vec(DW̄_1), …, vec(DW̄_n)]`` hold the per-example gradients of the
*summed* loss (``DW̄_n = Σ_t ā_nt g_ntᵀ``, bias folded in by ``ā = [a; 1]``),
``F = UUᵀ/n`` and ``K = UᵀU`` (``n×n``). Then

    Δ = (F + λI)⁻¹ ∇ = (1/λ) [∇ − U (K/n + λI)⁻¹ Uᵀ∇ / n],

so only the ``n×n`` matrix is inverted and the ``P×P`` block is never formed.

Layouts (fixed per parameter leaf at ``init``; ``N`` = ``gram_batch``):

* **factored** (2-D kernels, one location per example): store ``Ā [N, d_a]``
  and ``G [N, d_g]``; ``K = (ĀĀᵀ)∘(GGᵀ)``, ``Uᵀvec(V) = rowsum((ĀV)∘G)``,
  ``Uw = Āᵀ diag(w) G``.
* **explicit** (conv and other ≥3-D kernels): store the per-example gradients
  ``U [N, d_a, d_g]`` (memory ``N·d_a·d_g``); the per-step products are
  matrix-vector products with it. The Gram is computed by the cheaper of
  the factored conv formula ``K_nm = Σ_{t,t'} (ā_nt·ā_mt')(g_nt·g_mt')``
  (cost ``n²T²(d_a+d_g)``) and ``K = UUᵀ`` (cost ``n²d_a d_g``).

Examples beyond the first ``N`` are not used; fewer than ``N`` examples are
zero-padded, which is exact: zero columns of ``U`` add nothing to ``F`` and
the divisor is the true ``n``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp

from kfac_jax_ext import initial_arrays
from kfac_jax_ext import linalg
from kfac_jax_ext import relative_damping
from kfac_jax_ext.blocks import base
from kfac_jax_ext.blocks import kronecker

CONV_GRAMS = ("exact", "spatial_sum", "same_location")


class WoodburyBlock(NamedTuple):
  """Stored statistics of one leaf and the inverted Gram.

  ``rows [N, r+1]``, ``cols [N, c+1]`` (factored layout; a layer uses one as
  ``Ā`` and the other as ``G``) or ``per_example [N, r+1, c]`` (explicit
  layout; unused fields are None: orbax cannot save zero-size arrays). ``gram_inverse``: ``(K/n + λ_r I)⁻¹``;
  ``examples``: ``n``; ``damping``: ``λ_r`` at the refresh.
  """
  rows: jax.Array | None
  cols: jax.Array | None
  per_example: jax.Array | None
  gram_inverse: jax.Array
  examples: jax.Array
  damping: jax.Array


def layout(shape) -> str | None:
  """``"factored"`` for 2-D leaves, ``"explicit"`` for ≥3-D, None otherwise."""
  if len(shape) == 2:
    return "factored"
  return "explicit" if len(shape) >= 3 else None


def _rows_cols(shape):
  rows, cols = kronecker.slot_sizes(shape)
  return rows - 1, cols - 1


def storage_elements(shape, capacity: int) -> int:
  """Number of stored elements of a leaf's block (0 for ≤1-D leaves)."""
  kind = layout(shape)
  if kind is None:
    return 0
  r, c = _rows_cols(shape)
  body = capacity * (r + c + 2) if kind == "factored" else capacity * (r + 1) * c
  return body + capacity * capacity


_zeros = initial_arrays.zeros


def init_block(shape, capacity: int, dtype, damping) -> WoodburyBlock | None:
  kind = layout(shape)
  if kind is None:
    return None
  r, c = _rows_cols(shape)
  if kind == "factored":
    rows, cols, per = (_zeros((capacity, r + 1), dtype),
                       _zeros((capacity, c + 1), dtype), None)
  else:
    rows, cols, per = None, None, _zeros((capacity, r + 1, c), dtype)
  return WoodburyBlock(rows, cols, per, _zeros((capacity, capacity), dtype),
                       initial_arrays.ones([], dtype), jnp.asarray(damping, dtype))


def init_layer_block(d_a: int, d_g: int, a_side: str, factored: bool,
                     capacity: int, dtype, damping, lead=()) -> WoodburyBlock:
  """An exact-size block for one layer: ``Ā [N, d_a]`` in ``a_side`` and
  ``G [N, d_g]`` in the other (``factored``), else per-example gradients
  ``[N, d_a, d_g]``; every field with the leading axes ``lead`` (one block
  per group or slice)."""
  lead = tuple(lead)
  zeros = lambda *shape: _zeros(lead + shape, dtype)
  if factored:
    sizes = {a_side: d_a, ("cols" if a_side == "rows" else "rows"): d_g}
    rows, cols, per = (zeros(capacity, sizes["rows"]),
                       zeros(capacity, sizes["cols"]), None)
  else:
    rows, cols, per = None, None, zeros(capacity, d_a, d_g)
  return WoodburyBlock(rows, cols, per, zeros(capacity, capacity),
                       initial_arrays.ones(lead, dtype),
                       jnp.full(lead, damping, dtype))


def available_memory_bytes() -> int | None:
  """Free memory of the default device (accelerator limit, or host RAM)."""
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001 - backends without memory stats
    stats = None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  try:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (ValueError, OSError, AttributeError):
    return None


def check_fits(num_bytes: int, what: str, hint: str):
  """Raises ``MemoryError`` before allocating more than the free memory."""
  free = available_memory_bytes()
  if free is not None and num_bytes > free:
    raise MemoryError(f"{what} needs an estimated {num_bytes / 2**30:.2f} GiB but "
                      f"only {free / 2**30:.2f} GiB is free; {hint}")


def per_example_tokens(a, g, has_bias: bool, num_examples: int, n: int):
  """``ā [n, T, d_a]``, ``g [n, T, d_g]`` of the first ``n`` examples
  (tokens are grouped example-major)."""
  k = a.shape[0]
  if k % num_examples:
    raise ValueError(f"the {k} tokens of a layer do not split evenly over the "
                     f"{num_examples} loss examples.")
  t = k // num_examples
  a, g = a[:n * t], g[:n * t]
  if has_bias:
    a = jnp.concatenate([a, jnp.ones((n * t, 1), a.dtype)], axis=1)
  return a.reshape(n, t, a.shape[-1]), g.reshape(n, t, g.shape[-1])


def factored_conv_gram_is_cheaper(t: int, d_a: int, d_g: int) -> bool:
  """TENGraD's rule (§2.2): ``T²(d_a+d_g) < d_a·d_g``."""
  return t * t * (d_a + d_g) < d_a * d_g


def dense_gram(a, g):
  """``K = (ĀĀᵀ)∘(GGᵀ)`` for ``a [n, d_a]``, ``g [n, d_g]``."""
  return (a @ a.T) * (g @ g.T)


def conv_gram(a, g, kind: str = "exact"):
  """Gram of the per-example gradients from the tokens ``a [n,T,d_a]``,
  ``g [n,T,d_g]``.

  * ``"exact"``: ``Σ_{t,t'} (ā_nt·ā_mt')(g_nt·g_mt')`` (memory ``n²T²``);
  * ``"spatial_sum"``: ``((Σ_t ā_nt)·(Σ_t ā_mt)) ((Σ_t g_nt)·(Σ_t g_mt))`` —
    the Gram of the rank-one surrogates ``(Σ_t g)(Σ_t ā)ᵀ``; exact only when
    ``T = 1``;
  * ``"same_location"`` (ASDL): ``(Σ_t ā_nt·ā_mt)(Σ_t g_nt·g_mt)/T`` — drops
    the cross-location terms; exact only when ``T = 1``.

  On Gaussian random tokens with ``T = 9`` both differ from the exact Gram by
  more than 0.2 in relative Frobenius norm (asserted by
  ``tests/test_tengrad.py::test_approximate_conv_grams_are_wrong_with_several_locations``).
  """
  if kind == "exact":
    aa = jnp.einsum("ntd,msd->nmts", a, a)
    gg = jnp.einsum("nte,mse->nmts", g, g)
    return jnp.sum(aa * gg, axis=(2, 3))
  if kind == "spatial_sum":
    return dense_gram(jnp.sum(a, axis=1), jnp.sum(g, axis=1))
  if kind == "same_location":
    aa = jnp.einsum("ntd,mtd->nm", a, a)
    gg = jnp.einsum("nte,mte->nm", g, g)
    return aa * gg / a.shape[1]
  raise ValueError(f"conv_gram must be one of {CONV_GRAMS}, got {kind!r}.")


def per_example_gradients(a, g):
  """``U_n = Σ_t ā_nt g_ntᵀ``: ``[n, d_a, d_g]``."""
  return jnp.einsum("ntd,nte->nde", a, g)


def explicit_gram(u):
  flat = u.reshape(u.shape[0], -1)
  return flat @ flat.T


def pad_examples(x, capacity: int):
  """Zero-pads the leading (example) axis to ``capacity``."""
  return jnp.pad(x, [(0, capacity - x.shape[0])] + [(0, 0)] * (x.ndim - 1))


def invert_gram(gram, n, damping):
  """``(K/n + λI)⁻¹`` and whether it is finite."""
  return linalg.damped_inverse(gram / n, damping)


def apply_factored(v, a, g, gram_inverse, n, damping):
  """``(UUᵀ/n + λI)⁻¹ vec(V)`` with ``U`` given by ``Ā [N, d_a]``, ``G [N, d_g]``;
  ``v`` is the ``[d_a, d_g]`` gradient matrix."""
  s = jnp.sum((a @ v) * g, axis=1)               # Uᵀ vec(V)
  w = gram_inverse @ s / n
  return (v - a.T @ (w[:, None] * g)) / damping  # (V − U w)/λ


def apply_explicit(v, u, gram_inverse, n, damping):
  """As ``apply_factored`` with the per-example gradients ``u [N, d_a, d_g]``."""
  flat = u.reshape(u.shape[0], -1)
  w = gram_inverse @ (flat @ v.reshape(-1)) / n
  return (v - (w @ flat).reshape(v.shape)) / damping


class WoodburyInverseData(NamedTuple):
  """What a Woodbury refresh yields, exact size (``Woodbury.store`` writes
  ``a`` and ``g`` into the sides of a ``WoodburyBlock``): ``Ā [N, d_a]``,
  ``G [N, d_g]`` (factored; ``per_example`` None) or ``U [N, d_a, d_g]``
  (explicit; ``a``, ``g`` None), ``(K/n + λI)⁻¹ [N, N]``, ``n`` and ``λ``."""
  a: jax.Array | None
  g: jax.Array | None
  per_example: jax.Array | None
  gram_inverse: jax.Array
  examples: jax.Array
  damping: jax.Array


@dataclasses.dataclass(frozen=True)
class Woodbury(base.CurvatureBlock):
  """TENGraD's exact damped block ``(UUᵀ/n + λI)⁻¹`` of a dense or conv layer.

  Attributes:
    capacity: ``N`` (``gram_batch``), the Gram's fixed size.
    gram_size: ``n ≤ N``, the examples in the Gram (over all devices).
    examples: ``n_d``, the examples of this device's batch that enter the
      Gram (``batch_statistics``).
    positions: ``T``, the layer's positions (tokens) per loss example.
    factored: store ``Ā``, ``G`` (one position per loss example) rather than
      the per-example gradients ``U``.
    conv_gram: how an explicit layer's Gram is computed (``CONV_GRAMS``).
    initial_damping: ``λ`` of the block before its first refresh.
    damping_scale: ``"absolute"`` (a refresh damps by λ) or ``"relative"``
      (by λ times the block's mean nonzero eigenvalue, ``invert_padded``).
    loss_examples: R, the loss examples per example of the block: 1, or for
      a layer whose sequences are its examples
      (``position_mixing.sequence_examples``) the losses per sequence; the
      output gradients enter the Gram as ``g/√R``, so ``F = UUᵀ/(nR)``
      estimates the per-loss-example Fisher.
  """
  capacity: int = 128
  gram_size: int = 128
  examples: int = 128
  positions: int = 1
  factored: bool = True
  conv_gram: str = "exact"
  initial_damping: float = 1.0
  damping_scale: str = "absolute"
  loss_examples: int = 1

  def output_gradients(self, g):
    """``g/√R`` (``loss_examples``): what the Gram is built from."""
    if self.loss_examples == 1:
      return g
    return g * jnp.asarray(self.loss_examples, g.dtype) ** -0.5

  def invert_padded(self, gram, n: int, size: int, damping):
    """``((K/n + λ_r I)⁻¹, ok, λ_r)`` with ``K`` zero-padded to ``capacity``
    (zero rows add nothing; the divisor is the true ``n``). ``λ_r`` is λ,
    or with ``damping_scale="relative"`` λ times the mean nonzero
    eigenvalue of ``F = UUᵀ/n``, ``λ·tr(K)/(n·min(n, P))`` (``P = size``
    parameters; ``relative_damping.exact_block_damping``)."""
    if self.damping_scale != "absolute":
      damping = relative_damping.exact_block_damping(damping, gram, n, size)
    full = linalg.set_leading(jnp.zeros((self.capacity,) * 2, gram.dtype), gram)
    inverse, ok = invert_gram(full, jnp.asarray(n, gram.dtype), damping)
    return inverse, ok, damping

  @staticmethod
  def unsupported(layer) -> str | None:
    """Why the layer kind has no Woodbury block (None: it has one, possibly
    batched over groups or slices, ``woodbury_batched.py``, for a table,
    ``woodbury_embedding.py``, or for a tied kernel, ``woodbury_tied.py``)."""
    if layer.kind in ("dense", "conv2d", "embedding", "tied",
                      "scale_and_shift"):
      return None
    return f"TENGraD has no Woodbury block for {layer.kind} layers yet"

  def init(self, a_side: str, dtype) -> WoodburyBlock:
    return init_layer_block(self.layer.d_a, self.layer.d_out, a_side,
                            self.factored, self.capacity, dtype,
                            self.initial_damping)

  def batch_statistics(self, stats, num_examples, dtype):
    """The tokens ``ā [n_d, T, d_a]``, ``g [n_d, T, d_g]`` of the first
    ``examples`` loss examples (a transform gathers them over devices)."""
    a, g = stats
    return per_example_tokens(a.astype(dtype),
                              self.output_gradients(g.astype(dtype)),
                              self.has_bias, num_examples, self.examples)

  def _gram(self, a, g):
    """``(K, stored)``: the Gram of the tokens and what the block stores."""
    if self.factored:
      a, g = a[:, 0], g[:, 0]
      return dense_gram(a, g), (a, g, None)
    t = a.shape[1]
    if self.conv_gram == "spatial_sum":
      a, g = jnp.sum(a, axis=1, keepdims=True), jnp.sum(g, axis=1, keepdims=True)
    u = per_example_gradients(a, g)
    if self.conv_gram == "same_location":
      return conv_gram(a, g, "same_location"), (None, None, u)
    if self.conv_gram == "exact" and factored_conv_gram_is_cheaper(
        t, self.layer.d_a, self.layer.d_out):
      return conv_gram(a, g, "exact"), (None, None, u)
    return explicit_gram(u), (None, None, u)

  def refresh(self, estimate, damping):
    """The stored batch and ``(K/n + λI)⁻¹``, padded to ``capacity``; ``ok``
    is False if anything is non-finite."""
    a, g = estimate
    n = a.shape[0]
    dtype = a.dtype
    gram, (sa, sg, u) = self._gram(a, g)
    inverse, ok, damping = self.invert_padded(gram, n, a.shape[-1] * g.shape[-1],
                                              damping)
    pad = lambda x: None if x is None else pad_examples(x, self.capacity)
    data = WoodburyInverseData(pad(sa), pad(sg), pad(u), inverse,
                               jnp.asarray(n, dtype),
                               jnp.asarray(damping, dtype))
    return data, ok & linalg.all_finite(*jax.tree_util.tree_leaves(data))

  def apply(self, inverse, v, damping):
    """``(UUᵀ/n + λ_r I)⁻¹ vec(V)`` with the refresh's ``λ_r`` (``damping``
    is unused: the block is the exact inverse of the refresh)."""
    del damping
    if inverse.per_example is None:
      return apply_factored(v, inverse.a, inverse.g, inverse.gram_inverse,
                            inverse.examples, inverse.damping)
    return apply_explicit(v, inverse.per_example, inverse.gram_inverse,
                          inverse.examples, inverse.damping)

  def refresh_cost(self) -> float:
    """``n²(d_a + d_g) + n³``; with ``T > 1`` positions per example
    ``n²·min(T²(d_a + d_g), d_a d_g) + n³`` (the cheaper Gram path)."""
    n, t = self.gram_size, self.positions
    d_a, d_g = self.layer.d_a, self.layer.d_out
    body = d_a + d_g if t == 1 else min(t * t * (d_a + d_g), d_a * d_g)
    return n * n * body + n ** 3

  def label(self, kind: str = "") -> str:
    """``woodbury n=N [per sequence] [kind] d_a×d_g``."""
    per = " per sequence" if self.loss_examples > 1 else ""
    kind = f" {kind}" if kind else ""
    return (f"woodbury n={self.capacity}{per}{kind} "
            f"{self.layer.d_a}x{self.layer.d_out}")

  def store(self, entry: WoodburyBlock, data: WoodburyInverseData,
            a_side: str) -> WoodburyBlock:
    """The state entry holding a refresh's exact-size ``data`` (A in
    ``a_side``; zero-padded where the entry was laid out larger)."""
    fill = lambda slot, x: linalg.set_leading(jnp.zeros_like(slot), x)
    g_side = "cols" if a_side == "rows" else "rows"
    if data.per_example is None:
      stored = {a_side: fill(getattr(entry, a_side), data.a),
                g_side: fill(getattr(entry, g_side), data.g)}
    else:
      stored = {"per_example": fill(entry.per_example, data.per_example)}
    return entry._replace(gram_inverse=data.gram_inverse,
                          examples=data.examples, damping=data.damping, **stored)

  def load(self, entry: WoodburyBlock, a_side: str) -> WoodburyInverseData:
    """The exact-size data ``apply`` takes, read from the state entry."""
    d_a, d_g = self.layer.d_a, self.layer.d_out
    g_side = "cols" if a_side == "rows" else "rows"
    a = g = per_example = None
    if entry.per_example is None:
      a, g = getattr(entry, a_side)[..., :d_a], getattr(entry, g_side)[..., :d_g]
    else:
      per_example = entry.per_example[..., :d_a, :d_g]
    return WoodburyInverseData(a, g, per_example, entry.gram_inverse,
                               entry.examples, entry.damping)
