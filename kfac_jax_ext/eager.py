"""``update`` called outside ``jit`` runs as one compiled program.

Every transform's ``update`` traces the user's loss, builds its plan and runs
many small array operations. Called eagerly (in a notebook, a plain Python
loop, a test), JAX would dispatch and compile each of those operations one by
one, and redo the loss tracing on every call. ``compile_when_eager`` wraps an
``update`` so that a call on concrete arrays goes through ``jax.jit`` of the
same function instead (as kfac-jax's optimizer jits its own step): the result
is the same computation, compiled once per argument shapes and ``due``.

Calls under a trace (the user's ``jit``, ``pmap``, ``shard_map``, ``grad``,
``optax.inject_hyperparams``) are passed through unchanged, so nothing is
compiled twice. So is a call whose arguments ``jit`` cannot take as they are
(a string in ``batch``, an unhashable ``due``), so that the function raises
its own error. A function that only works on concrete values (e.g. a damping
or learning-rate schedule that branches in Python on the step count) falls
back to the eager call at its first call, and stays eager from then on.

Example::

  tx = kfe.scale_by_kfac(loss_fn)
  state = tx.init(params)
  updates, state = tx.update(grads, state, params, batch=batch, key=key)
  # one compiled step; the same call inside jax.jit is traced as before
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import numpy as np

from kfac_jax_ext import _jax_internals as jxi

# Keyword arguments of ``update`` that select code paths, not values: ``due``
# (a Due of Python bools, kfe.due_at) and ``share`` (which layers a
# sub-transform owns, natural_gradient).
STATIC_KEYWORDS = ("due", "share")


# Leaves ``jit`` takes as traced arguments; a Python number becomes a
# (weakly typed) scalar, as it does when the loss is traced.
_JIT_ARGUMENTS = (jax.Array, np.ndarray, np.generic, bool, int, float, complex)


def _jit_ready(args, kwargs) -> bool:
  """True when every leaf is a concrete array or number and every static
  keyword is hashable: then ``jit`` computes what the eager call computes."""
  dynamic = (args, {k: v for k, v in kwargs.items() if k not in STATIC_KEYWORDS})
  for leaf in jax.tree_util.tree_leaves(dynamic):
    if jxi.is_tracer(leaf) or not isinstance(leaf, _JIT_ARGUMENTS):
      return False
  try:
    hash(tuple(kwargs.get(k) for k in STATIC_KEYWORDS))
  except TypeError:
    return False
  return True


def compile_when_eager(update_fn: Callable) -> Callable:
  """``update_fn`` that compiles itself when called on concrete arrays.

  Args:
    update_fn: an optax ``update(updates, state, params=None, **extra_args)``
      that is traceable (every transform of this library is).

  Returns:
    A function with the same signature and results: ``jax.jit(update_fn)``
    (``due`` and ``share`` static) on concrete inputs, ``update_fn`` itself
    under a trace or when ``jit`` cannot take the arguments.
  """
  jitted = jax.jit(update_fn, static_argnames=STATIC_KEYWORDS)
  needs_eager = []     # set once a call needed concrete values

  @functools.wraps(update_fn)
  def update(updates, state, params=None, **extra_args):
    if needs_eager or not _jit_ready((updates, state, params), extra_args):
      return update_fn(updates, state, params, **extra_args)
    try:
      return jitted(updates, state, params, **extra_args)
    except (jax.errors.ConcretizationTypeError,
            jax.errors.TracerBoolConversionError,
            jax.errors.TracerIntegerConversionError,
            jax.errors.TracerArrayConversionError):
      needs_eager.append(True)
      return update_fn(updates, state, params, **extra_args)

  update.eager = update_fn       # the unwrapped function, for tests
  return update
