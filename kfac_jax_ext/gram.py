"""Symmetric Gram products ``xᵀ y`` (``y = x`` or ``x`` scaled per row) from
the upper triangle of column blocks: a K-FAC factor product in fewer FLOPs.

A factor ``A = āᵀā / K`` or a weighted one ``āᵀ(w ⊙ ā)`` is symmetric, but a
GEMM computes all ``n²`` entries (``2Kn²`` FLOPs). Split the columns into
``k`` blocks ``x = [x₁ … x_k]``; only the blocks ``xᵢᵀ y_j`` with ``i ≤ j``
are computed and the lower ones are their transposes:

    (xᵀy)ᵢⱼ = xᵢᵀ y_j  (i ≤ j),   (xᵀy)ⱼᵢ = (xᵢᵀ y_j)ᵀ,

``k(k+1)/2`` of the ``k²`` block products, ``(k+1)/2k`` of the FLOPs (2/3
for k = 3). BLAS has this as
``syrk``; XLA emits no ``syrk``, so the blocks are separate GEMMs, and small
GEMMs run below the large ones' rate: a block is worth it only when it is
large. On this repository's 2-core CPU (2026-12-02, ``OPENBLAS_NUM_THREADS=1``)
blocks of about ``BLOCK = 330`` columns (``round(n / 330)`` blocks: 1001 → 3,
785 → 2, 500 → 2, 250 → 1) took the autoencoder's 16 factor products from
68.2 to 57.4 ms (``python -m benchmarks.cpu_facts symmetric_products``), and
the README's step at (statistics, inverses) every (1, 5) from 306.9 to 291.0
and 297.5 to 289.5 ms amortized in two paired runs (``python -m
benchmarks.paired_setting kfac_jax_ext.gram.BLOCK 0,330 [--reverse]``;
kfac-jax 350.5 and 338.5 ms in the same runs); the MLP's 785-row factor gained nothing
measurable (21.7 → 21.5 ms, the same command with ``--models mlp``, LU
refreshes then). Only on CPU, the one backend it was measured on: on
accelerators one large GEMM may run at a rate small blocks do not reach
(not measured; no GPU or TPU was available), and TPUs pad blocks to 128
lanes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Columns per block: n columns make round(n / BLOCK) blocks. 0 turns the
# splitting off.
BLOCK = 330
# More blocks would only add small GEMMs (k(k+1)/2 of them) for a FLOP share
# that tends to 1/2.
MAX_BLOCKS = 8


def num_blocks(n: int, block: int | None = None, backend: str | None = None) -> int:
  """How many column blocks a Gram product of ``n`` columns is split into:
  ``round(n / block)`` (at most ``MAX_BLOCKS``) on CPU, 1 elsewhere or when
  ``block`` is 0."""
  block = BLOCK if block is None else block
  backend = backend or jax.default_backend()
  if block <= 0 or backend != "cpu":
    return 1
  return max(1, min(MAX_BLOCKS, round(n / block)))


def symmetric_gram(x, y=None, *, matmul=None, blocks: int | None = None):
  """``xᵀ y`` for a symmetric result, from its upper block triangle.

  Args:
    x: ``[K, n]``.
    y: ``[K, n]`` with ``xᵀy`` symmetric (``x`` itself, or ``x`` with each
      row scaled); None means ``x``.
    matmul: ``(p, q) -> p @ q`` (e.g. ``blocks.kronecker.matmul`` with a
      product dtype); plain ``@`` if None.
    blocks: the number of column blocks; ``num_blocks(n)`` if None.

  Returns:
    ``[n, n]``, equal to ``xᵀ y`` up to the GEMMs' rounding (the blocks
    below the diagonal are exact transposes of those above).

  Example:
    >>> a = jnp.ones((1000, 785))
    >>> gram = symmetric_gram(a)      # = a.T @ a, 2 blocks on CPU
  """
  y = x if y is None else y
  mm = matmul or (lambda p, q: p @ q)
  n = x.shape[-1]
  k = num_blocks(n) if blocks is None else max(1, min(int(blocks), n))
  if k == 1:
    return mm(x.T, y)
  edges = [round(i * n / k) for i in range(k + 1)]
  cols = lambda z, i: z[:, edges[i]:edges[i + 1]]
  upper = {(i, j): mm(cols(x, i).T, cols(y, j)) for i in range(k) for j in range(i, k)}
  rows = [jnp.concatenate([upper[i, j] if j >= i else upper[j, i].T for j in range(k)],
                          axis=1) for i in range(k)]
  return jnp.concatenate(rows, axis=0)
