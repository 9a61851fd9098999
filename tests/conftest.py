"""Tests run in float64 (exact oracles); dtype tests say so explicitly."""
import jax

jax.config.update("jax_enable_x64", True)
