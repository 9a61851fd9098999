"""``CurvatureBatch``: one batch's curvature statistics, as passed to
``update(curvature=...)``.

The arrays are the pytree's children; which Fisher made them (``"sampled"``:
targets drawn from the model, the true Fisher; ``"empirical"``: the data's
targets) is its static metadata, so it survives ``jax.jit``, ``lax.cond`` and
``jax.eval_shape`` and lets an optimizer refuse statistics of the other kind
at trace time instead of silently preconditioning with them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax


class CurvatureBatch(NamedTuple):
  """Statistics of one batch (pass to ``update(curvature=...)``).

  Attributes:
    layers: per traced layer, ``(a, g)`` for dense/conv and ``(u_scale,
      u_shift)`` per-token gradients for scale-and-shift (None where absent).
    fallback_grads: per parameter leaf no layer owns, the gradient of the
      Fisher objective (its square / M estimates the diagonal Fisher).
    num_examples: M, the number of per-example losses.
    fisher: ``"sampled"`` or ``"empirical"``, the Fisher the statistics
      estimate (static: not a leaf of the pytree).

  Example:
    >>> vg = kfe.value_and_grad(loss_fn, fisher="empirical")
    >>> loss, grads, curv = vg(params, batch, opt_state=state)
    >>> curv.fisher
    'empirical'
  """
  layers: tuple
  fallback_grads: tuple
  num_examples: jax.Array
  fisher: str = "sampled"


jax.tree_util.register_pytree_node(
    CurvatureBatch,
    lambda cb: ((cb.layers, cb.fallback_grads, cb.num_examples), cb.fisher),
    lambda fisher, children: CurvatureBatch(*children, fisher))


def check_fisher(curvature, fisher: str, name: str) -> None:
  """Raises unless ``curvature`` (a ``CurvatureBatch`` or None) estimates the
  optimizer's ``fisher``."""
  made_with = getattr(curvature, "fisher", fisher)
  if made_with != fisher:
    raise ValueError(
        f"{name}: curvature= holds statistics of the {made_with} Fisher "
        f"(kfe.value_and_grad(loss_fn, fisher={made_with!r})) but the optimizer "
        f"was built with fisher={fisher!r}: pass fisher={fisher!r} to "
        "kfe.value_and_grad (kfe.make_train_step does this for you).")
