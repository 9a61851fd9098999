"""How good is each method's step, against the exact damped natural gradient?

Trains K-FAC (the benchmark's contender settings) on a task and, at a few
steps, compares the directions of the methods built on the same curvature
state with ``d* = (F + λI)⁻¹∇``, F the exact Fisher (= GGN) of the step's
batch, or of it and ``--fisher-batches - 1`` fresh ones (conjugate gradients
on ``kfe.fisher_vector_product``). Rows: ``kfac`` (the running state, no
refresh), ``kfac refreshed`` and the additive two-level rows (statistics and
inverses refreshed on the step's batch: the additive coarse matrix is a
running average that starts there), the per-step two-level corrections on
the running state, and with ``--tengrad`` TENGraD's exact blocks from the
step's batch or from another one (its reuse between refreshes), with
``gram_batch`` = the batch (≤ 1000) and 128. For a direction d:

* ``cosF``: the cosine with d* in the ``F_λ`` inner product,
  ``∇ᵀd / (‖d‖_{F_λ} ‖d*‖_{F_λ})``; its square is the share of the best
  quadratic-model decrease ``½∇ᵀd*`` that d reaches at its best scale.
* ``m(d)/m(d*)``: the model decrease at the scale the method proposes
  (``m(d) = ∇ᵀd − ½dᵀF_λd``); negative: the step overshoots the model.
* ``cos``: the Euclidean cosine with d*.
* ``dFd/∇d``: ``dᵀF_λd / ∇ᵀd``, the step's quadratic KL over what KL-clipping
  takes it to be (``∇ᵀd``, right for ``d = M⁻¹∇`` with ``M ≈ F_λ``): above 1,
  the clip lets through a step that much larger than it means to.

With ``--methods`` naming rows of ``RESIDUAL_KRON`` (e.g. ``"2L mult
residual kron other batch"``): the Kronecker model's residual forms
(``fisher_products="kronecker"``, ``residual_refresh="statistics"``,
``coarse_batch=250``), their basis, ``B`` and α built on the step's batch
or on another one (as between statistics steps); the running K-FAC state
then takes that batch's statistics too (its inverses are not refreshed).

Run: ``python -m benchmarks.direction_quality [--task autoencoder]
[--steps 0,20,60] [--lr 0.1] [--damping 0.3] [--methods a,b,...]``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import kfac_jax_ext as kfe
from benchmarks import tasks
from kfac_jax_ext import optimizers

METHODS = {
    "kfac": dict(coarse_space=None),
    "kfac refreshed": dict(coarse_space=None),
    "2L add nicolaides": dict(coarse_space="nicolaides"),
    "2L mult nicolaides stats": dict(combine="multiplicative",
                                     coarse_matrix="exact"),
    "2L bal nicolaides stats": dict(combine="balanced", coarse_matrix="exact"),
    "2L mult nicolaides ggn": dict(combine="multiplicative",
                                   fisher_products="ggn"),
    "2L bal nicolaides ggn": dict(combine="balanced", fisher_products="ggn"),
    "2L mult residual ggn": dict(combine="multiplicative",
                                 coarse_space="residual", fisher_products="ggn"),
    "2L mult krylov_res ggn": dict(combine="multiplicative",
                                   coarse_space="krylov_residual",
                                   fisher_products="ggn"),
}
# The Kronecker model's residual forms (basis, B and α from a statistics
# batch, held until the next): built on the step's batch, and on another
# one (as on the steps between statistics steps). Rows named in RESIDUAL_KRON
# are run with ``--methods`` only (not by default).
_KRON = dict(fisher_products="kronecker", residual_refresh="statistics",
             coarse_batch=250)
RESIDUAL_KRON = {
    f"2L {dict(multiplicative='mult', balanced='bal')[c]} {space} kron{' other batch' if other else ''}": (
        dict(combine=c, coarse_space=space, **_KRON), other)
    for c in ("multiplicative", "balanced")
    for space in ("residual", "krylov_residual") for other in (False, True)}


def _dot(x, y):
  return sum(jnp.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(x),
                                            jax.tree_util.tree_leaves(y)))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--task", default="autoencoder")
  parser.add_argument("--steps", default="0,20,60")
  parser.add_argument("--lr", type=float, default=0.1)
  parser.add_argument("--damping", type=float, default=0.3)
  parser.add_argument("--cg-iterations", type=int, default=300)
  parser.add_argument("--fisher-batches", type=int, default=1,
                      help="F of d* averaged over the step's batch and this "
                      "many minus one fresh ones (1: the step's batch, which "
                      "favours methods that fit it, such as TENGraD)")
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--tengrad", action="store_true",
                      help="also TENGraD at gram_batch = batch and = 128")
  args = parser.parse_args(argv)
  checkpoints = sorted(int(s) for s in args.steps.split(","))
  task = tasks.make_task(args.task)
  lam, lr = args.damping, args.lr
  rng = np.random.default_rng(0)
  example = task.sample_batch(np.random.default_rng(0))
  common = dict(damping=lam, stats_every=task.period, inverse_every=task.period,
                ema_decay=task.ema_decay, example_batch=example)
  pre = kfe.scale_by_two_level_kfac(task.loss_fn, coarse_space=None, **common)
  opt = optimizers.with_optimizer_steps(pre, lr, momentum=0.9, kl_clip=task.kl_clip)
  params = task.params
  state = opt.init(params)

  @jax.jit
  def train_step(params, state, batch, key):
    grads = jax.grad(task.loss_fn)(params, batch)
    upd, state = opt.update(grads, state, params, batch=batch, key=key)
    return jax.tree_util.tree_map(lambda p, u: p + u, params, upd), state

  def directions(params, base_state, batch, extra, stale, key):
    grads = jax.grad(task.loss_fn)(params, batch)
    batches = [batch] + extra
    fvp = lambda v: jax.tree_util.tree_map(
        lambda *fs: sum(fs[:-1]) / len(batches) + lam * fs[-1],
        *[kfe.fisher_vector_product(task.loss_fn, params, b, v)
          for b in batches], v)
    exact, _ = jax.scipy.sparse.linalg.cg(fvp, grads,
                                          maxiter=args.cg_iterations, tol=1e-6)
    residual = _dot(jax.tree_util.tree_map(lambda a, b: a - b, fvp(exact), grads),
                    jax.tree_util.tree_map(lambda a, b: a - b, fvp(exact), grads))
    out = {"d*": (exact, jnp.sqrt(residual / _dot(grads, grads)))}
    for name in args.methods.split(","):
      if name in RESIDUAL_KRON:
        options, other = RESIDUAL_KRON[name]
        tx = kfe.scale_by_two_level_kfac(task.loss_fn, **common, **options)
        st = tx.init(params)._replace(base=base_state)
        built = kfe.Due(statistics=True, inverses=False)
        if other:   # basis, B, α from the other batch; this step between refreshes
          _, st = tx.update(jax.grad(task.loss_fn)(params, stale), st, params,
                            batch=stale, key=key, due=built)
          st = st._replace(base=base_state)
          built = kfe.Due(statistics=False, inverses=False)
        d, _ = tx.update(grads, st, params, batch=batch, key=key, due=built)
        out[name] = (d, None)
        continue
      options = METHODS[name]
      # the additive correction's running coarse matrix starts from this
      # batch: its K-FAC row is refreshed on this batch too
      refresh = options.get("combine", "additive") == "additive" and (
          options.get("coarse_space") is not None or "refreshed" in name)
      due = kfe.Due(statistics=refresh, inverses=refresh)
      tx = kfe.scale_by_two_level_kfac(task.loss_fn, **common, **options)
      st = tx.init(params)
      st = base_state if options.get("coarse_space", 1) is None else (
          st._replace(base=base_state))
      d, _ = tx.update(grads, st, params, batch=batch, key=key, due=due)
      out[name] = (d, None)
    if args.tengrad:
      n = jax.tree_util.tree_leaves(batch)[0].shape[0]
      for gram in (min(n, 1000), 128):
        tx = kfe.scale_by_tengrad(task.loss_fn, damping=lam, gram_batch=gram,
                                  inverse_every=1, example_batch=example)
        d, _ = tx.update(grads, tx.init(params), params, batch=batch, key=key)
        out[f"tengrad n={gram}"] = (d, None)
        # blocks from another batch, as between TENGraD's refreshes
        d, _ = tx.update(grads, tx.init(params), params, batch=stale, key=key)
        out[f"tengrad n={gram} other batch"] = (d, None)
    rows = {}
    gfg = _dot(grads, exact)       # ∇ᵀd* = ‖d*‖²_{F_λ}
    for name, (d, extra) in out.items():
      gd = _dot(grads, d)
      dfd = _dot(d, fvp(d))
      cos_f = gd / jnp.sqrt(dfd * gfg)
      model = (gd - 0.5 * dfd) / (0.5 * gfg)
      cos = _dot(d, exact) / jnp.sqrt(_dot(d, d) * _dot(exact, exact))
      rows[name] = (cos_f, model, cos, dfd / gd, extra)
    return rows

  directions = jax.jit(directions)
  key = jax.random.PRNGKey(0)
  step = 0
  print(f"{task.description}; λ {lam}, lr {lr}, K-FAC driver "
        f"(period {task.period}, EMA {task.ema_decay}); F of d* over "
        f"{args.fisher_batches} batch(es)")
  for target in checkpoints:
    while step < target:
      key, sub = jax.random.split(key)
      params, state = train_step(params, state,
                                 jax.tree_util.tree_map(jnp.asarray,
                                                        task.sample_batch(rng)),
                                 sub)
      step += 1
    key, sub = jax.random.split(key)
    batch = jax.tree_util.tree_map(jnp.asarray, task.sample_batch(rng))
    start = time.perf_counter()
    extra = [jax.tree_util.tree_map(jnp.asarray, task.sample_batch(rng))
             for _ in range(args.fisher_batches - 1)]
    stale = jax.tree_util.tree_map(jnp.asarray, task.sample_batch(rng))
    rows = directions(params, state[0].inner, batch, extra, stale, sub)
    loss = float(task.loss_fn(params, batch))
    print(f"\nstep {step} (loss {loss:.2f}; {time.perf_counter() - start:.0f} s)")
    print(f"{'direction':28s} {'cosF':>8s} {'m(d)/m(d*)':>11s} {'cos':>8s} "
          f"{'dFd/∇d':>9s}")
    for name, (cos_f, model, cos, ratio, extra) in rows.items():
      note = "" if extra is None else f"  (CG relative residual {float(extra):.1e})"
      print(f"{name:28s} {float(cos_f):8.3f} {float(model):11.3f} "
            f"{float(cos):8.3f} {float(ratio):9.3g}{note}")


if __name__ == "__main__":
  main()
