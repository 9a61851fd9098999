"""Measured facts behind design choices (``python -m benchmarks.cpu_facts``).

1. XLA CPU runs convolutions inside ``lax.cond`` branches several times slower
   than outside: why ``statistics_pass`` keeps the forward and the gradient
   outside its conditional.
2. Ways to get a damped inverse of SPD factors of the autoencoder's sizes
   (time and float32 residual), and the per-step cost of applying one: why
   refreshes use block elimination (``linalg.spd_inverse``: GEMMs, LU only
   on blocks of ≤ 128 rows) and steps multiply by the explicit inverse.
3. The cost of drawing sampled targets with one key per example (the global
   index, so draws do not depend on how a batch is split over devices)
   against one draw for the whole array.
4. What an untaken ``lax.cond`` branch costs when it passes the autoencoder's
   16 factor inverses through (a copy, even with the arguments donated),
   against no conditional: why ``kfe.due_at`` / ``due=`` exist
   (``kfac_jax_ext/schedule.py``).
5. Writing the EMA of the 16 autoencoder factors into their state slots
   with ``.at[:n, :n].set`` (a scatter) against ``linalg.set_leading``
   (the value itself, or a dynamic update slice). They cost about the same
   (2-4 ms): refreshes use ``set_leading`` for its shape check, not speed.
6. ``product_dtype="bfloat16"`` (``blocks/kronecker.matmul``): the
   autoencoder's preconditioning GEMMs and factor products in float32 and
   with bfloat16 inputs, and one 1000x1000 Gram ``xᵀx`` against ``x @ y``:
   XLA CPU's fast bfloat16 path takes the plain ``x @ y`` layout, not the
   transposed contraction of a factor product.
7. The autoencoder's 16 factor products as one GEMM each against the upper
   triangle of ~330-column blocks (``gram.symmetric_gram``, a ``syrk`` from
   GEMMs: 2/3 of the FLOPs for a 1001-column factor), interleaved in 5
   rounds: why large factors are split on CPU (68.2 → 57.4 ms, 2026-12-02,
   ``OPENBLAS_NUM_THREADS=1``; in the whole step 3–5 %, ``gram.py``).

``python -m benchmarks.cpu_facts [SECTION ...]`` runs the named sections only
(the function names below, e.g. ``symmetric_products``).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from kfac_jax_ext import linalg
from kfac_jax_ext import losses


# Sizes of the 16 damped factors of the MNIST autoencoder (with the bias row).
AE_FACTOR_DIMS = (785, 1000, 1001, 500, 501, 250, 251, 30, 31, 250, 251, 500,
                  501, 1000, 1001, 784)


def _median_ms(fn, *args, repeats=5):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def conv_in_cond():
  from benchmarks import models
  model = models.FashionCNN()
  x = jax.random.uniform(jax.random.PRNGKey(0), (128, 28, 28, 1))
  y = jnp.zeros(128, jnp.int32)
  params = model.init(jax.random.PRNGKey(1), x[:1])
  loss = lambda p: jnp.mean(jax.nn.logsumexp(model.apply(p, x), -1) -
                            model.apply(p, x)[jnp.arange(128), y])
  grad = jax.grad(loss)
  in_cond = jax.jit(lambda p, c: jax.lax.cond(
      c, lambda: grad(p), lambda: jax.tree_util.tree_map(jnp.zeros_like, p)))
  print("Fashion-MNIST CNN (batch 128), jax.grad:")
  print(f"  outside lax.cond {_median_ms(jax.jit(grad), params):8.1f} ms")
  print(f"  inside lax.cond  {_median_ms(in_cond, params, True):8.1f} ms")


def inverse_options():
  dims = AE_FACTOR_DIMS
  mats = []
  for i, n in enumerate(dims):    # columns of unequal scale: a spread spectrum
    x = jax.random.normal(jax.random.PRNGKey(i), (1000, n)) * jax.random.uniform(
        jax.random.PRNGKey(100 + i), (n,), minval=0.01, maxval=3.0)
    mats.append(x.T @ x / 1000)
  lam = 1e-3
  damp = lambda m: m + lam * jnp.eye(m.shape[0])

  def tri_inverse(m):
    chol = jnp.linalg.cholesky(damp(m))
    li = jax.lax.linalg.triangular_solve(chol, jnp.eye(m.shape[0]), left_side=True,
                                         lower=True)
    return li.T @ li

  options = {
      "linalg.damped_inverse (used: blocks, LU at 128)": lambda ms: [
          linalg.damped_inverse(m, lam)[0] for m in ms],
      "LU of the whole matrix (jnp.linalg.inv)": lambda ms: [
          jnp.linalg.inv(damp(m)) for m in ms],
      "cholesky + cho_solve": lambda ms: [jax.scipy.linalg.cho_solve(
          (jnp.linalg.cholesky(damp(m)), True), jnp.eye(m.shape[0])) for m in ms],
      "cholesky + triangular inverse + GEMM": lambda ms: [tri_inverse(m) for m in ms],
  }
  print("refresh: damped inverses (λ = 1e-3) of the 16 autoencoder factors, "
        "float32; residual max|X (M + λI) - I|:")
  for name, fn in options.items():
    fn = jax.jit(fn)
    residual = max(float(jnp.max(jnp.abs(x @ damp(m) - jnp.eye(m.shape[0]))))
                   for x, m in zip(fn(mats), mats))
    print(f"  {name:<48}{_median_ms(fn, mats):8.1f} ms   residual {residual:.1e}")
  chol_only = jax.jit(lambda ms: [jnp.linalg.cholesky(damp(m)) for m in ms])
  print(f"  {'cholesky only (apply by solves)':<48}{_median_ms(chol_only, mats):8.1f} ms")
  a = mats[2] + lam * jnp.eye(1001)
  chol = jnp.linalg.cholesky(a)
  inv = jnp.linalg.inv(a)
  v = jax.random.normal(jax.random.PRNGKey(99), (1001, 1000))
  solve = lambda c, v: jax.lax.linalg.triangular_solve(
      c, jax.lax.linalg.triangular_solve(c, v, left_side=True, lower=True),
      left_side=True, lower=True, transpose_a=True)
  print("per step, one 1001x1001 factor applied to a 1001x1000 gradient:")
  print(f"  {'GEMM with the inverse (used)':<38}"
        f"{_median_ms(jax.jit(lambda i, v: i @ v), inv, v):8.1f} ms")
  print(f"  {'two triangular solves':<38}{_median_ms(jax.jit(solve), chol, v):8.1f} ms")


def cond_pass_through():
  dims = AE_FACTOR_DIMS
  fresh = lambda: [jnp.eye(n) * 2.0 for n in dims]
  refresh = lambda ms: [jnp.linalg.inv(m) for m in ms]
  in_cond = jax.jit(lambda ms, due: jax.lax.cond(due, refresh, lambda ms: ms, ms),
                    donate_argnums=0)
  static = jax.jit(lambda ms: ms, donate_argnums=0)

  def median_ms(fn, *extra):
    ms, times = fresh(), []
    for _ in range(6):
      start = time.perf_counter()
      ms = jax.block_until_ready(fn(ms, *extra))
      times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times[1:]))
  print("a step that does not refresh the 16 autoencoder inverses (donated):")
  print(f"  lax.cond, untaken refresh branch {median_ms(in_cond, False):8.1f} ms")
  print(f"  static schedule, no conditional  {median_ms(static):8.1f} ms")


def slot_writes():
  dims = AE_FACTOR_DIMS
  fresh = lambda: [jnp.eye(n) for n in dims]
  news = [jnp.full((n, n), 0.5) for n in dims]
  ema = lambda s, n: 0.8 * s[:n.shape[0], :n.shape[1]] + 0.2 * n
  scatter = jax.jit(lambda ss, ns: [s.at[:n.shape[0], :n.shape[1]].set(ema(s, n))
                                    for s, n in zip(ss, ns)], donate_argnums=0)
  leading = jax.jit(lambda ss, ns: [linalg.set_leading(s, ema(s, n))
                                    for s, n in zip(ss, ns)], donate_argnums=0)

  def median_ms(fn):
    ss, times = fresh(), []
    for _ in range(8):
      start = time.perf_counter()
      ss = jax.block_until_ready(fn(ss, news))
      times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times[1:]))
  print("EMA of the 16 autoencoder factors written into their slots (donated):")
  print(f"  .at[:n, :n].set (scatter)         {median_ms(scatter):8.1f} ms")
  print(f"  linalg.set_leading (used)         {median_ms(leading):8.1f} ms")


def sampling_keys():
  print("sampled targets, batch 1000 (autoencoder outputs; 10 classes):")
  for kind, width in (("sigmoid_cross_entropy", 784), ("softmax_cross_entropy", 10)):
    p = jax.random.normal(jax.random.PRNGKey(0), (1000, width))
    key = jax.random.PRNGKey(1)
    whole = jax.jit(lambda k, p, kind=kind: losses._sample(kind, p, k))
    per_example = jax.jit(lambda k, p, kind=kind: losses.sample_targets(kind, p, k))
    print(f"  {kind:<22} whole array {_median_ms(whole, key, p, repeats=30):6.2f} ms"
          f", per-example keys (used) "
          f"{_median_ms(per_example, key, p, repeats=30):6.2f} ms")


def bfloat16_products():
  from kfac_jax_ext.blocks import kronecker
  sizes = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
  key = jax.random.PRNGKey(0)
  normal = lambda i, shape: jax.random.normal(jax.random.fold_in(key, i), shape)
  layers = [(normal(3 * i, (m + 1, n)), normal(3 * i + 1, (m + 1, m + 1)),
             normal(3 * i + 2, (n, n)))
            for i, (m, n) in enumerate(zip(sizes, sizes[1:]))]
  acts = [normal(100 + i, (1000, m)) for i, m in enumerate(sizes)]
  bf16 = jnp.bfloat16
  print("autoencoder, float32 against bfloat16 GEMM inputs:")
  for dtype in (None, bf16):
    pre = jax.jit(lambda ls, d=dtype: [kronecker.precondition(
        v, ia, ig, None, None, 0.1, "factored", d) for v, ia, ig in ls])
    fac = jax.jit(lambda xs, d=dtype: [kronecker.batch_factors(
        xs[i], xs[i + 1], True, 1000, jnp.float32, d) for i in range(8)])
    name = "bfloat16" if dtype else "float32"
    print(f"  precondition, {name:<9}{_median_ms(pre, layers):8.1f} ms")
    print(f"  factor products, {name:<6}{_median_ms(fac, acts):8.1f} ms")
  x = normal(200, (1000, 1000))
  mm = lambda a, b: jnp.matmul(a.astype(bf16), b.astype(bf16),
                               preferred_element_type=jnp.float32)
  print("one 1000x1000x1000 GEMM:")
  print(f"  float32 x.T @ x              {_median_ms(jax.jit(lambda x: x.T @ x), x):8.1f} ms")
  print(f"  bfloat16 x.T @ x             {_median_ms(jax.jit(lambda x: mm(x.T, x)), x):8.1f} ms")
  print(f"  bfloat16 x @ x               {_median_ms(jax.jit(lambda x: mm(x, x)), x):8.1f} ms")


def symmetric_products(rounds=5):
  sizes = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)
  key = jax.random.PRNGKey(0)
  # inputs (with the bias column) and output gradients drawn apart (as one
  # array, XLA would share a layer's G with the next layer's A)
  xs = []
  for i, (m, n) in enumerate(zip(sizes, sizes[1:])):
    xs.append(jax.random.normal(jax.random.fold_in(key, 2 * i), (1000, m + 1)))
    xs.append(jax.random.normal(jax.random.fold_in(key, 2 * i + 1), (1000, n)))
  from kfac_jax_ext import gram
  programs = {"one GEMM each": jax.jit(lambda xs: [x.T @ x for x in xs]),
              f"upper block triangle (used), {gram.BLOCK}-column blocks":
                  jax.jit(lambda xs: [gram.symmetric_gram(x, blocks=gram.num_blocks(
                      x.shape[1], backend="cpu")) for x in xs])}
  err = max(float(jnp.max(jnp.abs(p - q)) / jnp.max(jnp.abs(q))) for p, q in zip(
      *[fn(xs) for fn in programs.values()]))
  times = {name: [] for name in programs}
  for _ in range(rounds):
    for name, fn in programs.items():
      times[name].append(_median_ms(fn, xs))
  print("the autoencoder's 16 factor products (batch 1000), median of "
        f"{rounds} interleaved rounds:")
  for name, t in times.items():
    print(f"  {name:<50}{np.median(t):8.1f} ms")
  print(f"  largest relative difference {err:.1e}")


SECTIONS = (conv_in_cond, inverse_options, sampling_keys, cond_pass_through,
            slot_writes, bfloat16_products, symmetric_products)


if __name__ == "__main__":
  import sys
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}")
  chosen = sys.argv[1:]
  unknown = set(chosen) - {f.__name__ for f in SECTIONS}
  if unknown:
    raise SystemExit(f"unknown section(s) {sorted(unknown)}; choose from "
                     f"{[f.__name__ for f in SECTIONS]}")
  for section in SECTIONS:
    if not chosen or section.__name__ in chosen:
      section()
