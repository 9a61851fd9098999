"""Which block serves a layer: the table from layer kinds to block kinds.

A traced layer's ``kind`` (``patterns.LayerMatch.kind``) selects the
Kronecker-family block; TENGraD's Woodbury block (``blocks/woodbury.py``)
serves the layers it supports whatever their kind. A new block kind is a
file with a ``base.CurvatureBlock`` subclass and a line here.
"""

from __future__ import annotations

from kfac_jax_ext.blocks import base
from kfac_jax_ext.blocks import embedding
from kfac_jax_ext.blocks import kronecker
from kfac_jax_ext.blocks import tied

KRONECKER_BLOCKS = {
    "dense": kronecker.Kronecker,       # also grouped convs and stacked slices
    "conv2d": kronecker.Kronecker,
    "embedding": embedding.Embedding,   # diagonal A
    "tied": tied.Tied,                  # one block over several uses
}


def kronecker_block(layer, mode: str = "tikhonov",
                    product_dtype=None) -> base.CurvatureBlock:
  """The Kronecker-family block of a dense, conv, embedding or tied layer.

  Args:
    layer: the traced layer.
    mode: ``"tikhonov"`` or ``"factored"`` damping.
    product_dtype: None or the GEMM input dtype (``kronecker.Kronecker``).

  Raises:
    ValueError: for a layer kind with no Kronecker block (scale-and-shift
      layers have diagonal blocks, ``blocks/diagonal.py``).
  """
  try:
    kind = KRONECKER_BLOCKS[layer.kind]
  except KeyError:
    raise ValueError(f"layer {layer.name} of kind {layer.kind!r} has no "
                     "Kronecker block (kinds with one: "
                     f"{sorted(KRONECKER_BLOCKS)}).") from None
  return kind(layer, mode, product_dtype)
