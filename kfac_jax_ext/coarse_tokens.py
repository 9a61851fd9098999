r"""Which batch's Fisher two-level K-FAC's per-step correction uses: ``coarse_statistics``.

A per-step correction (multiplicative, balanced, or a per-step space:
residual, Krylov–residual) needs, on every step, products ``F_λx`` and a
coarse matrix ``F_c = R F_λ Rᵀ`` with ``F = (1/n) Σ_k u_k u_kᵀ`` the
Fisher of per-example gradients ``u_k``, which the statistics' tokens
``(ā_k, g_k)`` give without forming them (``coarse_level``). Two sources:

* ``"batch"`` (default): the tokens of each step's own batch. The
  statistics pass (a sampled backward) runs on every step, whatever
  ``stats_every``.
* ``"stored"``: the tokens of the last statistics batch's first ``n``
  examples (``n = min(M, coarse_batch)``), kept in the state and replaced
  whenever the fine level takes statistics, as Koroko et al.'s code does
  (its ``collect_stats`` every ``T_cov``, products from the stored
  ``x``, ``gy`` on the steps between). Between statistics steps no
  statistics pass runs: a per-step correction costs its token passes and
  its extra ``M⁻¹`` applications only. ``F_c`` is still formed every step
  from the stored tokens and the step's basis, so Galerkin orthogonality
  ``R(∇ − F_λΔ) = 0`` holds at every step for the stored ``F``. The tokens'
  shapes are fixed at ``init`` from ``example_batch`` (required; one
  device's batch under ``axis_name``): ``n·T_l·(d_a + d_g)`` numbers per
  coarse layer (``T_l`` positions per example).
* ``"subsample"``: on the fine level's statistics steps the first ``n``
  examples of that step's statistics (``n``: those of the batch's first
  ``coarse_batch`` rows, required); on the other steps a statistics pass of
  its own over those rows only (their forward and sampled backward), so the
  tokens are always the step's own, at ``n/M`` of a full pass's FLOPs
  (Koroko et al.'s Fisher batch is a quarter of the batch). The sampled
  targets are drawn by example index, so with one device the tokens equal
  the first ``n`` of a full pass's (a model whose examples do not interact,
  e.g. no BatchNorm in training mode). Under ``axis_name`` each device
  takes its own first rows (targets by their index among all devices'
  first rows).

Example::

  >>> tx = kfe.two_level_kfac(loss_fn, 0.1, damping=0.3,
  ...                         combine="multiplicative", coarse_space="residual",
  ...                         coarse_statistics="stored", coarse_batch=250,
  ...                         example_batch=batch)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kfac_jax_ext import coarse
from kfac_jax_ext import coarse_level as level
from kfac_jax_ext import linalg
from kfac_jax_ext import plan as plan_lib
from kfac_jax_ext import schedule
from kfac_jax_ext import statistics as stats_lib
from kfac_jax_ext import stats_subsample
from kfac_jax_ext import tracing
from kfac_jax_ext import weight_sharing as sharing_lib

MODES = ("batch", "stored", "subsample")


def per_step(combine: str, coarse_space, fisher_products: str,
             residual_refresh: str = "step") -> bool:
  """Whether ``F_c`` is the step's own (formed and inverted every step)."""
  return coarse_space is not None and fisher_products != "kronecker" and (
      combine != "additive" or fisher_products == "ggn" or (
          coarse_space in coarse.PER_STEP_SPACES and residual_refresh == "step"))


def statistics_every_step(options: dict) -> bool:
  """Whether ``two_level_kfac`` with these options reads the batch's
  statistics on every step (so the fused step's one pass takes them)."""
  products = options.get("fisher_products", "statistics")
  return (products != "ggn"
          and options.get("coarse_statistics", "batch") == "batch"
          and per_step(options.get("combine", "additive"),
                       options.get("coarse_space", "nicolaides"), products,
                       options.get("residual_refresh", "step")))


def check(mode, fisher_products: str, options: dict, coarse_batch=None) -> None:
  """Raises ``ValueError`` for a ``coarse_statistics`` that cannot apply."""
  if mode not in MODES:
    raise ValueError(f"coarse_statistics must be one of {MODES}, got {mode!r}.")
  if mode == "subsample" and coarse_batch is None:
    raise ValueError("coarse_statistics='subsample' takes the statistics of the "
                     "batch's first coarse_batch rows between statistics steps: "
                     "pass coarse_batch=<rows>, e.g. a quarter of the batch.")
  if mode == "stored" and fisher_products == "ggn":
    raise ValueError("coarse_statistics='stored' keeps the statistics' tokens; "
                     "fisher_products='ggn' uses none (its products are the "
                     "batch's exact GGN): pass 'statistics' or 'mixed'.")
  if mode == "stored" and options.get("example_batch") is None:
    raise ValueError("coarse_statistics='stored' keeps the tokens in the state, "
                     "whose shapes come from a batch: pass example_batch=<a batch"
                     ", or jax.ShapeDtypeStructs of its shapes>.")


def check_key(active: bool, fisher: str, key) -> None:
  """``"subsample"`` (``active``) draws targets between statistics steps."""
  if active and fisher == "sampled" and key is None:
    raise ValueError("coarse_statistics='subsample' runs a statistics pass of its "
                     "own on the steps without statistics, and fisher='sampled' "
                     "draws its targets: pass key=<PRNG key> to update.")


def subsampled(active: bool, loss_fn, params, batch, traced, key, fisher,
               coarse_batch, has_aux, axis_name, layers, dtype):
  """``(tokens_of, n)`` of ``"subsample"`` (``active``): ``tokens_of(cb,
  statistics)`` gives the coarse layers' tokens of the first ``n`` examples,
  from ``cb`` (the step's full statistics) when ``statistics`` else from a
  statistics pass over the batch's first ``coarse_batch`` rows; ``(None,
  None)`` inactive."""
  if not active:
    return None, None
  sub_batch, sub_traced = stats_subsample.statistics_inputs(
      loss_fn, params, batch, traced, coarse_batch, has_aux, "coarse_batch")
  n = sub_traced.num_examples

  def tokens_of(cb, statistics):
    if statistics:
      return level.tokens(layers, traced, cb, dtype, n)
    sub_cb = stats_lib.statistics_pass(sub_traced, params, sub_batch, key, fisher,
                                       axis_name=axis_name)[2]
    return level.tokens(layers, sub_traced, sub_cb, dtype, n)
  return tokens_of, n


def examples(num_examples: int, coarse_batch) -> int:
  """``n = min(M, coarse_batch)``: the coarse level's examples."""
  return num_examples if coarse_batch is None else min(num_examples, coarse_batch)


def scale_examples(num_examples: int, coarse_examples: int, scale_batch) -> int:
  """The examples the model scales α, γ are measured on (``scale_batch``:
  ``"coarse_batch"``: the coarse level's ``coarse_examples``; None: all ``M``;
  ``k``: ``min(M, k)``)."""
  if isinstance(scale_batch, str):
    return coarse_examples
  return examples(num_examples, scale_batch)


def initial(loss_fn, params, example_batch, has_aux, factors, unsupported,
            spectral, coarse_batch, dtype, axis_name=None) -> tuple:
  """Zero tokens ``(ā [n, T, d_a], g [n, T, d_g])`` per coarse layer of the
  plan traced on ``example_batch`` (``factors``: the fine state's, laid out
  from it; ``unsupported``: the base variant's; ``spectral``: the state's)."""
  traced = tracing.trace_loss(loss_fn, params, example_batch, has_aux, axis_name)
  plan = plan_lib.make_plan(traced, factors, unsupported=unsupported)
  n = examples(traced.num_examples, coarse_batch)
  out = []
  for kl in level.coarse_layers(plan, spectral):
    t = sharing_lib.tokens(kl.layer) // traced.num_examples
    out.append((jnp.zeros((n, t, kl.d_a), dtype), jnp.zeros((n, t, kl.d_g), dtype)))
  return tuple(out)


def check_shapes(stored, fresh) -> None:
  """The step's tokens must fit the stored ones (a static check)."""
  shape = lambda toks: [tuple(x.shape) for pair in toks for x in pair]
  if shape(stored) != shape(fresh):
    raise ValueError(
        f"coarse_statistics='stored' keeps tokens of shapes {shape(stored)} "
        f"(from example_batch) but this batch gives {shape(fresh)}: pass "
        "batches of example_batch's shapes (or leave coarse_statistics='batch').")


def kept(active: bool, stored, fresh, period, due, static):
  """``(tokens, ok)``: with ``active`` (``"stored"`` and a per-step
  correction), on a statistics step (``due``; ``static``: its Python value,
  if known) ``refresh(stored, fresh())``; else ``stored`` (``()`` inactive)."""
  if not active:
    return stored, jnp.array(True)
  def take(old):
    new = fresh()
    check_shapes(old, new)
    return refresh(old, new)
  return schedule.maybe(period, due, take, lambda old: (old, jnp.array(True)),
                        stored, static)


def refresh(stored, fresh):
  """``(tokens, ok)``: the fresh tokens, or the stored ones where the fresh
  are not finite (``ok`` False: the caller counts it)."""
  ok = linalg.all_finite(*jax.tree_util.tree_leaves(fresh))
  kept = jax.tree_util.tree_map(lambda new, old: jnp.where(ok, new, old),
                                tuple(tuple(p) for p in fresh), stored)
  return kept, ok
