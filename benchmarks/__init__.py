"""Benchmarks and examples for kfac_jax_ext (real data, offline after first fetch)."""
