"""Learned inputs: parameters that enter the model broadcast over the batch.

Perceiver latents and DETR-style queries (``broadcast_to(q, [N, L, D])``),
a ViT ``cls`` token broadcast or ``jnp.tile``-d and concatenated with the
patches: the leaf is read, repeated, at every example. Such a leaf is a
shift of zeros: its per-token gradient is the gradient at the broadcast,
so it gets a scale-and-shift layer (a diagonal block) probed there. A
dense layer whose input is such a broadcast (latents fed to a projection)
is a dense layer: the repeated operand can never be its kernel.

Example:
  >>> q = jnp.broadcast_to(self.param("latents", init, (L, D)), (N, L, D))
"""

from __future__ import annotations

import math

from kfac_jax_ext import patterns


def repeated(shapes, use) -> bool:
  """Whether the use reads its leaf broadcast over other axes (each element
  repeated, outside scans): a learned input such as Perceiver latents fed
  to a dense layer, never a kernel, so the other operand is the layer's."""
  return patterns.scan_view(use.view.chain) is None and patterns.simulate(
      shapes[use.leaf], use.view.chain).size > math.prod(shapes[use.leaf])


def layers(ctx, taken: set) -> list:
  """``[(site, LayerMatch)]``: a scale-and-shift layer (shift only) for each
  leaf not ``taken`` every use of which reads one ``broadcast_in_dim`` or
  ``tile`` of it whose extra elements repeat it (outside scans), probed at
  that broadcast; ``ctx``: ``matching``'s indexed uses."""
  found = []
  for leaf, us in ctx.by_leaf.items():
    if leaf in taken or not us or any(u.reason for u in us):
      continue
    path, jaxpr = us[0].path, ctx.jaxprs[us[0].path]
    var = jaxpr.eqns[us[0].eqn].invars[us[0].operand]
    if any(u.path != path or jaxpr.eqns[u.eqn].invars[u.operand] is not var
           or patterns.scan_view(u.view.chain) is not None for u in us):
      continue
    site = next((i for i, e in enumerate(jaxpr.eqns) if any(
        v is var for v in e.outvars)), None)
    shape = tuple(var.aval.shape)
    if site is None or jaxpr.eqns[site].primitive.name not in ("broadcast_in_dim",
                                                               "tile"):
      continue
    axes = patterns.feature_axes(ctx.shapes[leaf], us[0].view.chain, shape)
    if axes is None:
      continue
    found.append(((path, site), patterns.LayerMatch(
        kind="scale_and_shift", name="/".join(map(str, ctx.paths[leaf])),
        shift=leaf,
        probes=((path, site),), inputs_shape=shape, outputs_shape=shape,
        out_axes=axes)))
    taken.add(leaf)
  return found
