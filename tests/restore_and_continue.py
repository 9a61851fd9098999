"""Run by ``test_checkpoint_and_nnx.py`` in a fresh Python process: restores
each method's orbax checkpoint into a state built by ``init``, continues the
training and saves the final params and state leaves for the test to compare.

Usage: ``python tests/restore_and_continue.py CHECKPOINT_DIR``.
"""
import pathlib
import sys

import jax

jax.config.update("jax_enable_x64", True)   # as tests/conftest.py

import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from tests import test_checkpoint_and_nnx as t  # noqa: E402


def main(root: pathlib.Path):
  loss, params, batches = t._task()
  for method in sorted(t.METHODS):
    opt = t.METHODS[method](loss)
    target = {"params": params, "opt_state": opt.init(params)}
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
    with ocp.StandardCheckpointer() as ckpt:
      restored = ckpt.restore((root / method).absolute(), abstract)
    p, s = t._train(opt, loss, restored["params"], restored["opt_state"],
                    batches[3:], 3)
    leaves = jax.tree_util.tree_leaves((p, s))
    np.savez(root / f"{method}.npz", *[np.asarray(x) for x in leaves])


if __name__ == "__main__":
  main(pathlib.Path(sys.argv[1]))
