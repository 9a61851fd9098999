"""flax examples/gemma (see each file's header)."""
