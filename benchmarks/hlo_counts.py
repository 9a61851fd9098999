"""What XLA compiles for one ``update``: instruction, dot, LAPACK-call and
fusion counts of ``kfe.kfac`` and ``kfe.tengrad`` on an MLP.

A refactor that must not change the computation should leave these counts
equal. Run it at two commits and compare, e.g.::

  python -m benchmarks.hlo_counts
  git worktree add /tmp/before <commit> && \\
      PYTHONPATH=/tmp/before python -m benchmarks.hlo_counts

(the second line runs the library of ``<commit>``; the script itself must
exist there or be copied). Model: MLP 784-256-256-10, tanh, softmax
cross-entropy, batch 512, state laid out from ``example_batch``.
"""

from __future__ import annotations

import collections
import re

import jax
import jax.numpy as jnp

import kfac_jax_ext as kfe


def _mlp(sizes=(784, 256, 256, 10), batch_size=512):
  keys = jax.random.split(jax.random.PRNGKey(0), len(sizes) - 1)
  params = [{"w": jax.random.normal(k, (a, b)) / a ** 0.5, "b": jnp.zeros(b)}
            for k, a, b in zip(keys, sizes[:-1], sizes[1:])]

  def loss(p, b):
    h = b["x"]
    for layer in p[:-1]:
      h = jnp.tanh(h @ layer["w"] + layer["b"])
    return kfe.softmax_cross_entropy(h @ p[-1]["w"] + p[-1]["b"], b["y"])

  batch = {"x": jnp.ones((batch_size, sizes[0])),
           "y": jnp.zeros((batch_size,), jnp.int32)}
  return loss, params, batch


def counts(tx, params, batch) -> dict:
  """Counts of the compiled ``tx.update`` (statistics and refresh due)."""
  step = jax.jit(lambda g, s, p, b, k: tx.update(g, s, p, batch=b, key=k))
  text = step.lower(params, tx.init(params), params, batch,
                    jax.random.PRNGKey(0)).compile().as_text()
  ops = collections.Counter(re.findall(
      r"^\s*(?:ROOT )?\S+ = \S+ (\w[\w-]*)\(", text, re.M))
  return {"instructions": sum(ops.values()), "dots": ops["dot"],
          "custom_calls": ops["custom-call"], "fusions": ops["fusion"]}


def main():
  loss, params, batch = _mlp()
  for name, tx in (("kfac", kfe.kfac(loss, 0.1, damping=0.1,
                                     example_batch=batch)),
                   ("tengrad", kfe.tengrad(loss, 0.1, example_batch=batch))):
    print(name, counts(tx, params, batch))


if __name__ == "__main__":
  main()
