"""Curvature blocks: per-layer statistics, refresh and preconditioning."""
