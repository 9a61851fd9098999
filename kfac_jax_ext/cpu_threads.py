"""The threads of the OpenBLAS behind jax's CPU decompositions.

On CPU, jax runs its decompositions (``jnp.linalg.inv``, ``eigh``,
``cholesky``: a K-FAC refresh) through LAPACK from scipy's OpenBLAS. After
each call OpenBLAS's worker threads keep spinning until its thread timeout;
on a machine with few cores they take cores from XLA in the steps that
follow a refresh. Measured (``python -m benchmarks.thread_spin``, 2-core
CPU, MLP 784-256-256-10, refresh every 5 steps): the steps between refreshes
took 24.5 ms against 13.5 ms with no refresh run, and 13.8 ms with
OpenBLAS limited to one thread (``docs/performance.md``).

``OPENBLAS_NUM_THREADS=1`` set before Python starts does the same for the
whole process; :func:`limit_lapack_threads` does it from inside a running
program (a notebook), and gives back what to restore. OpenBLAS offers no
way to change its thread timeout once loaded.

Which libraries: every OpenBLAS loaded in this process that exports
OpenBLAS's thread-count functions (scipy's, which jax uses, and numpy's
if it has its own), as ``threadpoolctl.threadpool_limits(n,
user_api="blas")`` does. Where none is found (macOS Accelerate, MKL,
another OS) nothing changes and the result is empty. Linux only.

Example::

  >>> import kfac_jax_ext as kfe
  >>> before = kfe.limit_lapack_threads(1)    # {path: previous count}
  >>> ...                                      # train
  >>> kfe.restore_lapack_threads(before)
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from typing import Iterator

# (set, get) symbol pairs, tried in order: scipy's and numpy's wheels prefix
# OpenBLAS's names (64-bit-integer builds add a suffix); plain builds do not.
_SYMBOLS = (("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
            ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
            ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
            ("openblas_set_num_threads", "openblas_get_num_threads"))


def _loaded_openblas_paths() -> list[str]:
  """Paths of the loaded shared libraries whose file name says OpenBLAS."""
  try:
    import scipy.linalg.cython_lapack  # noqa: F401  (loads jax's LAPACK)
  except ImportError:
    pass
  try:
    with open("/proc/self/maps") as f:
      lines = f.read().splitlines()
  except OSError:
    return []
  paths = []
  for line in lines:
    path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
    name = os.path.basename(path).lower()
    if "openblas" in name and ".so" in name and path not in paths:
      paths.append(path)
  return paths


def _thread_functions() -> dict[str, tuple]:
  """``{path: (set_num_threads, get_num_threads)}`` of each OpenBLAS loaded."""
  found = {}
  for path in _loaded_openblas_paths():
    try:
      lib = ctypes.CDLL(path)        # already loaded: the same handle
    except OSError:
      continue
    for set_name, get_name in _SYMBOLS:
      if hasattr(lib, set_name) and hasattr(lib, get_name):
        setter, getter = getattr(lib, set_name), getattr(lib, get_name)
        setter.argtypes, setter.restype = [ctypes.c_int], None
        getter.argtypes, getter.restype = [], ctypes.c_int
        found[path] = (setter, getter)
        break
  return found


def lapack_threads() -> dict[str, int]:
  """The thread count of each OpenBLAS loaded in this process.

  Returns:
    ``{library path: threads}``; empty where no OpenBLAS is found.
  """
  return {path: int(get()) for path, (_, get) in _thread_functions().items()}


def _check_count(n, what):
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ValueError(f"{what} must be a positive int (threads), got {n!r}.")


def limit_lapack_threads(n: int = 1) -> dict[str, int]:
  """Runs every loaded OpenBLAS on at most ``n`` threads.

  Args:
    n: threads per OpenBLAS call (1: on the calling thread, no workers to
      spin after a refresh).

  Returns:
    The previous counts, ``{library path: threads}``, for
    :func:`restore_lapack_threads`; empty where no OpenBLAS is found.

  Raises:
    ValueError: ``n`` is not a positive int.
  """
  _check_count(n, "limit_lapack_threads(n)")
  functions = _thread_functions()
  before = {path: int(get()) for path, (_, get) in functions.items()}
  for path, (setter, _) in functions.items():
    setter(min(n, before[path]))
  return before


def restore_lapack_threads(counts: dict[str, int]) -> None:
  """Sets each library's thread count back (the result of
  :func:`limit_lapack_threads`); libraries no longer loaded are skipped.

  Raises:
    ValueError: a count is not a positive int.
  """
  for path, n in counts.items():
    _check_count(n, f"the thread count of {path}")
  functions = _thread_functions()
  for path, n in counts.items():
    if path in functions:
      functions[path][0](n)


@contextlib.contextmanager
def lapack_thread_limit(n: int = 1) -> Iterator[dict[str, int]]:
  """``with kfe.lapack_thread_limit(1): ...``: :func:`limit_lapack_threads`
  for the block, the previous counts restored after it (also on error).
  Yields the previous counts."""
  before = limit_lapack_threads(n)
  try:
    yield before
  finally:
    restore_lapack_threads(before)
