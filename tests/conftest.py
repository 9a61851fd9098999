"""Tests run in float64 (exact oracles); dtype tests say so explicitly.

Eight fake CPU devices for the multi-device tests: the flag must be set
before jax initialises its backends, hence here, before ``import jax``.

Compile time dominates this suite (the tests call ``update`` eagerly, so
every small op is compiled once per process: 30-37 ms each on this 2-core
CPU, measured by timing 40 first calls of ``jnp.ones((i, 3)) * 2.0 + 1.0``),
so three settings cut it; none changes what a test computes:

* XLA's backend optimization level 0: the programs are the same HLO, only
  less optimised machine code;
* XLA:CPU's older elementwise-fusion emitters
  (``--xla_cpu_use_fusion_emitters=false``): the same HLO passes decide the
  fusions; only their machine code comes from the older emitters instead of
  the MLIR fusion pipeline. A K-FAC step of the static-schedule test
  compiles in 0.32 s instead of 0.97 s (``tests/test_static_schedule.py``
  alone, ``-n 0``: 59 s -> 30 s, on the 2-core CPU, jax 0.10.2);
* one JAX compilation cache per test run, shared by the xdist workers and
  by the subprocesses and notebook kernels the tests start (they inherit
  the environment), so an executable compiled by one is loaded by the
  others. It is a fresh temporary directory, removed at the end of the run;
  set ``KFE_TEST_JAX_CACHE`` to reuse a directory of your own.
"""
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0"
                           " --xla_cpu_use_fusion_emitters=false").strip()

_OWN_CACHE = "KFE_TEST_JAX_CACHE" not in os.environ
if _OWN_CACHE:    # the controller makes it; the workers inherit the variable
  os.environ["KFE_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="kfe-jax-cache-")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["KFE_TEST_JAX_CACHE"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)


def pytest_unconfigure(config):
  """The process that made the cache directory removes it."""
  if _OWN_CACHE and not hasattr(config, "workerinput"):
    shutil.rmtree(os.environ["KFE_TEST_JAX_CACHE"], ignore_errors=True)


# Tests that take 15-45 s each (subprocesses, notebook kernels, benchmark
# runs, 100-step trainings). Collected first, so that pytest-xdist starts
# them early and the short tests fill the workers' tails (``--dist
# worksteal``): started last, one of them would leave the other worker idle.
SLOW_FIRST = ("test_multi_host.py", "test_notebooks.py",
              "test_benchmark_runner.py", "test_tengrad_conv_autoencoder.py",
              "test_benchmarks_smoke.py", "test_guide.py",
              "test_checkpoint_and_nnx.py")


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(SLOW_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))
