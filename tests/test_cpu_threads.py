"""kfe.limit_lapack_threads: OpenBLAS's thread count from inside the process."""

import sys

import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_ext as kfe
from kfac_jax_ext import cpu_threads

linux_openblas = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not kfe.lapack_threads(),
    reason="no OpenBLAS loaded (not Linux, or another LAPACK)")


@linux_openblas
def test_jax_uses_a_library_that_is_found():
  # jaxlib takes its CPU LAPACK from scipy.linalg.cython_lapack; scipy's pip
  # wheels bring their own OpenBLAS (in scipy.libs), which must be among
  # those found (other installs, e.g. conda, share one libopenblas).
  import os
  import scipy
  wheel_libs = os.path.join(os.path.dirname(scipy.__file__), os.pardir, "scipy.libs")
  paths = kfe.lapack_threads()
  if os.path.isdir(wheel_libs):
    assert any(os.path.samefile(os.path.dirname(p), wheel_libs) for p in paths), paths
  assert all(n >= 1 for n in paths.values())


@linux_openblas
def test_limit_then_restore_sets_every_library_and_gives_back_the_counts():
  before = kfe.lapack_threads()
  given = kfe.limit_lapack_threads(1)
  try:
    assert given == before
    assert set(kfe.lapack_threads().values()) == {1}
    # decompositions still run, and right, on one thread
    a = np.array([[4.0, 1.0], [1.0, 3.0]])
    np.testing.assert_allclose(jnp.linalg.inv(a) @ a, np.eye(2), atol=1e-12)
  finally:
    kfe.restore_lapack_threads(given)
  assert kfe.lapack_threads() == before


@linux_openblas
def test_the_context_manager_restores_also_on_error():
  before = kfe.lapack_threads()
  with pytest.raises(RuntimeError, match="inside"):
    with kfe.lapack_thread_limit(1) as given:
      assert given == before and set(kfe.lapack_threads().values()) == {1}
      raise RuntimeError("inside")
  assert kfe.lapack_threads() == before


@linux_openblas
def test_a_limit_above_the_current_count_changes_nothing():
  before = kfe.lapack_threads()
  with kfe.lapack_thread_limit(max(before.values()) + 64):
    assert kfe.lapack_threads() == before


@pytest.mark.parametrize("n", [0, -2, 1.5, True, "1"])
def test_bad_counts_are_named_and_change_nothing(n):
  before = kfe.lapack_threads()
  with pytest.raises(ValueError, match="positive int"):
    kfe.limit_lapack_threads(n)
  with pytest.raises(ValueError, match="positive int"):
    kfe.restore_lapack_threads({"/some/libopenblas.so": n})
  assert kfe.lapack_threads() == before


def test_without_proc_maps_nothing_is_found(monkeypatch):
  monkeypatch.setattr(cpu_threads, "_loaded_openblas_paths", lambda: [])
  assert kfe.lapack_threads() == {}
  assert kfe.limit_lapack_threads(1) == {}
  kfe.restore_lapack_threads({"/gone/libopenblas.so": 2})   # no longer loaded: skipped
