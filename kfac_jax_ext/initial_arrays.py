"""The constant arrays of a fresh optimizer state: identities, zeros, ones.

``init`` builds one identity or zero array per factor and parameter leaf.
Made with ``jnp`` outside ``jit``, each distinct shape is a small XLA program
compiled on first use (30-37 ms each on a 2-core CPU, measured as
``tests/conftest.py`` says): hundreds of them for a large model. Outside a
trace these helpers build the array in numpy and transfer it (no
compilation); under a trace (``jax.jit(opt.init)``, ``jax.eval_shape``)
they use ``jnp``, so no large constant is embedded in the program.

Example::

  eye = identity((3, 4, 4), jnp.float32)   # three 4×4 identities
  z = zeros((5,), jnp.float32)
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from kfac_jax_ext import _jax_internals as jxi


def identity(shape, dtype) -> jnp.ndarray:
  """Identity matrices of ``shape`` (``[..., d, d]``); ones for a 1-D shape
  (a diagonal factor stored as a vector).

  Args:
    shape: ``[..., d, d]`` or ``[d]``.
    dtype: the array's dtype.

  Returns:
    A new array (its own buffer: the state can be donated).
  """
  shape = tuple(shape)
  if len(shape) == 1:
    return ones(shape, dtype)
  if jxi.tracing_now():
    return jnp.broadcast_to(jnp.eye(shape[-1], dtype=dtype), shape) + jnp.zeros(
        shape, dtype)
  eye = np.eye(shape[-1], dtype=np.dtype(dtype))
  return jnp.asarray(np.ascontiguousarray(np.broadcast_to(eye, shape)))


def zeros(shape, dtype) -> jnp.ndarray:
  """``jnp.zeros(shape, dtype)``, in numpy outside a trace."""
  if jxi.tracing_now():
    return jnp.zeros(shape, dtype)
  return jnp.asarray(np.zeros(tuple(shape), np.dtype(dtype)))


def ones(shape, dtype) -> jnp.ndarray:
  """``jnp.ones(shape, dtype)``, in numpy outside a trace."""
  if jxi.tracing_now():
    return jnp.ones(shape, dtype)
  return jnp.asarray(np.ones(tuple(shape), np.dtype(dtype)))
