"""What the Kronecker model's products on residual bases cost, by piece.

``fisher_products="kronecker"`` with a refreshed residual space holds the
model's products ``B_kj = A_jl Z_k G_lj`` (``S × P`` numbers) and forms them
on statistics steps (``coarse_model_bases.batch_products``); ordinary steps
read them twice (lift ``Σ_k β_k B_k``, project ``⟨B_k, W⟩``). This times,
on random factors of a model's dense-layer shapes (jit, median of
``--repeats`` after compilation):

* ``form B``: ``batch_products`` itself (``S·N·P`` multiply-adds);
* ``lift B``, ``project B``: the ordinary step's two reads;
* the per-example alternative (not in the library): forming every
  ``C_k = P_al Z_k P_glᵀ`` ``[N, N]``, and lift / project through
  ``P_ajᵀ (Σ_k β_k C_k) P_gj`` and ``⟨C_k, Σ_j P_aj W_j P_gjᵀ⟩``.

Run: ``python -m benchmarks.coarse_model_cost [--model autoencoder|mlp]
[--examples 125] [--per-layer 2] [--repeats 9]`` (``--per-layer 2``:
Krylov-residual's two basis vectors per layer).
"""

from __future__ import annotations

import argparse
from typing import NamedTuple

import jax
import jax.numpy as jnp

from benchmarks import cpu_facts
from kfac_jax_ext import coarse_level
from kfac_jax_ext import coarse_model_bases

SHAPES = {   # (d_a with the bias row, d_g) per dense layer
    "autoencoder": [(785, 1000), (1001, 500), (501, 250), (251, 30),
                    (31, 250), (251, 500), (501, 1000), (1001, 784)],
    "mlp": [(9, 16), (17, 4)],
}


class _Layer(NamedTuple):
  d_a: int
  d_g: int


def measure(shapes, examples, per_layer, repeats, seed=0):
  """``{piece: median ms}`` for the pieces in the module docstring."""
  _median_ms = lambda fn, *args, repeats: cpu_facts._median_ms(
      jax.jit(fn), *args, repeats=repeats)
  keys = iter(jax.random.split(jax.random.PRNGKey(seed), 5 * len(shapes) + 2))
  normal = lambda shape: jax.random.normal(next(keys), shape)
  size = per_layer * len(shapes)
  toks = [(normal((examples, 1, d_a)), normal((examples, 1, d_g)))
          for d_a, d_g in shapes]
  bases = [normal((per_layer, d_a, d_g)) for d_a, d_g in shapes]
  layers = [coarse_level.CoarseLayer(
      _Layer(d_a, d_g), jnp.arange(per_layer * i, per_layer * (i + 1)), None, None)
            for i, (d_a, d_g) in enumerate(shapes)]
  form = lambda toks, bases: coarse_model_bases.batch_products(
      [l._replace(basis=b) for l, b in zip(layers, bases)], toks, size,
      jnp.float32)
  products = jax.jit(form)(toks, bases)
  beta, w = normal((size,)), [normal(s) for s in shapes]
  p_a = [a[:, 0] for a, _ in toks]
  p_g = [g[:, 0] for _, g in toks]
  c = normal((size, examples, examples))
  return {
      "form B": _median_ms(form, toks, bases, repeats=repeats),
      "lift B": _median_ms(lambda p, beta: [jnp.einsum("k,kde->de", beta, b)
                                            for b in p], products, beta,
                           repeats=repeats),
      "project B": _median_ms(lambda p, w: sum(
          jnp.einsum("kde,de->k", b, x) for b, x in zip(p, w)), products, w,
                              repeats=repeats),
      "form C (per-example)": _median_ms(lambda pa, pg, bs: jnp.concatenate([
          jnp.einsum("nd,kde,me->knm", a, b, g) for a, b, g in zip(pa, bs, pg)]),
                                         p_a, p_g, bases, repeats=repeats),
      "lift (per-example)": _median_ms(lambda pa, pg, c, beta: [
          a.T @ (jnp.einsum("k,knm->nm", beta, c) @ g) for a, g in zip(pa, pg)],
                                       p_a, p_g, c, beta, repeats=repeats),
      "project (per-example)": _median_ms(lambda pa, pg, c, w: jnp.einsum(
          "knm,nm->k", c, sum(a @ x @ g.T for a, g, x in zip(pa, pg, w))),
                                          p_a, p_g, c, w, repeats=repeats),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", choices=sorted(SHAPES), default="autoencoder")
  parser.add_argument("--examples", type=int, default=125,
                      help="N: the model's statistics examples (coarse_batch)")
  parser.add_argument("--per-layer", type=int, default=2,
                      help="basis vectors per layer (residual 1, Krylov-residual 2)")
  parser.add_argument("--repeats", type=int, default=9)
  args = parser.parse_args(argv)
  shapes = SHAPES[args.model]
  params = sum(a * g for a, g in shapes)
  print(f"{args.model}: {len(shapes)} layers, P = {params}, S = "
        f"{args.per_layer * len(shapes)}, N = {args.examples}, "
        f"{jax.devices()[0].device_kind}")
  for piece, ms in measure(shapes, args.examples, args.per_layer,
                           args.repeats).items():
    print(f"{piece:>24}: {ms:8.1f} ms")


if __name__ == "__main__":
  main()
