"""Tests run in float64 (exact oracles); dtype tests say so explicitly.

Eight fake CPU devices for the multi-device tests: the flag must be set
before jax initialises its backends, hence here, before ``import jax``.
"""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
