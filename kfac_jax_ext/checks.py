"""Argument checks shared by the preconditioners: clear errors that name the
problem and what to do, raised at trace time before any state changes."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp

from kfac_jax_ext import coarse
from kfac_jax_ext import curvature_batch
from kfac_jax_ext import statistics
from kfac_jax_ext import stats_subsample
from kfac_jax_ext import weight_sharing as sharing_lib


def check_options(damping_mode, fisher, fallback, stats_every, inverse_every,
                  ema_decay, damping, weight_sharing="expand"):
  sharing_lib.check_mode(weight_sharing)
  choices = dict(damping_mode=(damping_mode, ("tikhonov", "factored")),
                 fisher=(fisher, ("sampled", "empirical")),
                 fallback=(fallback, ("identity", "diagonal")))
  for name, (value, allowed) in choices.items():
    if value not in allowed:
      raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")
  for name, value in (("stats_every", stats_every), ("inverse_every", inverse_every)):
    if isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jnp.integer):
      continue  # optax.inject_hyperparams passes numeric options as arrays
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}.")
  if isinstance(ema_decay, (int, float)) and not 0.0 <= ema_decay < 1.0:
    raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay!r}.")
  if isinstance(damping, (int, float)) and damping <= 0:
    raise ValueError(f"damping must be positive, got {damping!r}.")


def check_update_args(name, params, batch, curvature, fisher, key, due=None):
  """Clear errors for a missing ``params``, ``batch`` or (sampled Fisher
  without precomputed statistics, on an update that may take statistics)
  ``key``, and for ``curvature`` made with another ``fisher``."""
  if params is None:
    raise ValueError(f"{name} needs params: update(grads, state, params, "
                     "batch=batch, key=key).")
  if batch is None:
    raise ValueError(f"{name} needs the batch loss_fn takes: "
                     "update(grads, state, params, batch=batch, key=key).")
  curvature_batch.check_fisher(curvature, fisher, name)
  if (curvature is None and fisher == "sampled" and key is None
      and (due is None or due.statistics)):
    raise ValueError("fisher='sampled' draws targets from the model: pass "
                     "key=<PRNG key> to update (or use fisher='empirical').")


def check_structure(traced, grads, treedef, state):
  if len(grads) != len(traced.param_shapes) or len(grads) != len(state.diagonals):
    raise ValueError(f"updates have {len(grads)} leaves, params "
                     f"{len(traced.param_shapes)} and the state "
                     f"{len(state.diagonals)}: were they made from the same params?")
  for g, shape, d in zip(grads, traced.param_shapes, state.diagonals):
    if tuple(g.shape) != shape or tuple(d.shape) != shape:
      raise ValueError(f"update leaf of shape {tuple(g.shape)} does not match the "
                       f"param shape {shape} / state shape {tuple(d.shape)}.")


def check_curvature(traced, cb):
  if not isinstance(cb, statistics.CurvatureBatch) or len(cb.layers) != len(
      traced.layers):
    raise ValueError("curvature= must be the CurvatureBatch that "
                     "kfe.value_and_grad(loss_fn) returned for this batch.")
  for stats, layer in zip(cb.layers, traced.layers):
    if layer.kind in ("dense", "conv2d", "embedding"):
      a, g = stats
      lead = (layer.groups,) if layer.groups > 1 else ()
      a_tail = () if layer.kind == "embedding" else (layer.d_in,)
      if (a.shape[:len(lead)] != lead or a.shape[len(lead) + 1:] != a_tail
          or g.shape[:len(lead)] != lead or g.shape[len(lead) + 1:] != (
              layer.d_out,) or a.shape[len(lead)] != g.shape[len(lead)]):
        raise ValueError(
            f"curvature statistics of layer {layer.name} have shapes "
            f"{a.shape}, {g.shape}, inconsistent with the traced layer "
            f"(d_in={layer.d_in}, d_out={layer.d_out}, groups={layer.groups}).")


def check_two_level_options(fine_scale, coarse_batch, fisher_products, options,
                            coarse_space=None, spectral_iterations=None):
  """``scale_by_two_level_kfac``'s own options, and the base options it
  cannot take."""
  if spectral_iterations is not None:
    if coarse_space != "spectral":
      raise ValueError(f"spectral_iterations applies to coarse_space='spectral' "
                       f"(got coarse_space={coarse_space!r}): leave it unset.")
    if isinstance(spectral_iterations, bool) or not isinstance(
        spectral_iterations, int) or spectral_iterations < 1:
      raise ValueError(f"spectral_iterations must be a positive int (steps of "
                       f"inverse iteration per refresh) or None, got "
                       f"{spectral_iterations!r}.")
  if fine_scale not in ("model", "both", "none"):
    raise ValueError(f"fine_scale must be 'model', 'both' or 'none', got "
                     f"{fine_scale!r}.")
  if fine_scale == "both" and fisher_products != "kronecker":
    raise ValueError(f"fine_scale='both' measures the fine and the coarse "
                     f"step's scales on the statistics steps and holds them, "
                     f"which fisher_products='kronecker' does; with "
                     f"fisher_products={fisher_products!r} pass fine_scale="
                     "'model' (the coarse step is then Galerkin-optimal for "
                     "the products used).")
  stats_subsample.check_examples(coarse_batch, "coarse_batch",
                                 "scale_by_two_level_kfac")
  if options.get("stats_batch") is not None:
    raise ValueError("scale_by_two_level_kfac reads the whole batch's statistics"
                     ": leave stats_batch unset (see coarse_batch=).")
  if coarse_batch is not None and fisher_products not in ("statistics", "kronecker"):
    raise ValueError(f"coarse_batch subsamples the statistics' per-example "
                     f"gradients (fisher_products='statistics') or the Kronecker "
                     f"model's tokens ('kronecker'); with "
                     f"fisher_products={fisher_products!r} pass a smaller batch "
                     f"to update, or leave coarse_batch unset.")


def check_two_level_choices(base, coarse_space, coarse_matrix, combine,
                           coarse_damping, omega, fisher_products):
  """Raises ``ValueError`` naming the first of ``scale_by_two_level_kfac``'s
  choices that is not one of its allowed values, or an inconsistent pair."""
  for name, value, allowed in (
      ("base", base, ("kfac", "tkfac")),
      ("coarse_space", coarse_space, coarse.COARSE_SPACES + (None,)),
      ("coarse_matrix", coarse_matrix, coarse.COARSE_MATRICES + (None,)),
      ("combine", combine, coarse.COMBINES),
      ("coarse_damping", coarse_damping, ("consistent", "identity")),
      ("fisher_products", fisher_products,
       ("statistics", "ggn", "mixed", "kronecker"))):
    if value not in allowed:
      raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")
  if coarse_matrix == "kronecker" and fisher_products == "ggn":
    raise ValueError("fisher_products='ggn' computes F_c = R F Rᵀ from the exact "
                     "GGN; coarse_matrix='kronecker' (Tselepidis' approximation "
                     "from the statistics) does not apply: leave coarse_matrix "
                     "unset or pass 'exact'.")
  if (fisher_products == "mixed" and coarse_space is not None and
      combine != "balanced" and coarse_space not in coarse.PER_STEP_SPACES):
    raise ValueError(f"fisher_products='mixed' makes the products used at full "
                     f"size exact; combine={combine!r} with coarse_space="
                     f"{coarse_space!r} uses none (only projections on the "
                     f"coarse space): pass 'statistics' or 'ggn'.")
  if coarse_matrix == "kronecker" and coarse_space not in coarse.RANK_ONE_SPACES:
    raise ValueError(f"coarse_matrix='kronecker' needs rank-one coarse vectors "
                     f"(nicolaides or spectral); use coarse_matrix='exact' with "
                     f"coarse_space={coarse_space!r}.")
  if len(tuple(omega)) != 2:
    raise ValueError(f"omega must be a pair (ω₁, ω₂), got {omega!r}.")


PRODUCT_DTYPES = ("bfloat16", "float16")


def check_product_dtype(product_dtype, name):
  """None, or the numpy dtype of ``"bfloat16"``/``"float16"`` (or the
  dtype itself); anything else is refused with the choices."""
  if product_dtype is None:
    return None
  try:
    dtype = jnp.dtype(product_dtype)
  except TypeError:
    dtype = None
  if dtype is None or dtype.name not in PRODUCT_DTYPES:
    raise ValueError(
        f"{name}: product_dtype must be None (the factors' dtype) or one of "
        f"{PRODUCT_DTYPES} (the GEMM inputs rounded to it, accumulated in the "
        f"factors' dtype), got {product_dtype!r}.")
  return dtype


def warn_unfactored(name, plan, fallback, traced):
  """One warning per layer without a block (at trace time, so once per
  compilation), naming the layer and what to do; one more when over 10 % of
  the parameters get no block, naming the largest."""
  for _, layer, reason in plan.unfactored_layers:
    warnings.warn(f"{name}: layer {layer.name} ({layer.kind}) gets no "
                  f"curvature block ({reason}); it falls back to "
                  f"fallback={fallback!r}.", stacklevel=3)
  sizes = [math.prod(s) for s in traced.param_shapes]
  bare = [leaf for _, layer, _ in plan.unfactored_layers
          for leaf in (layer.kernel, layer.bias) if leaf is not None]
  bare += list(plan.fallback_leaves)
  share = sum(sizes[i] for i in bare) / max(sum(sizes), 1)
  if share > 0.1:
    largest = sorted(bare, key=lambda i: -sizes[i])[:3]
    names = ", ".join("/".join(map(str, traced.param_paths[i])) for i in largest)
    warnings.warn(f"{name}: {100 * share:.0f}% of the parameters get no "
                  f"curvature block (fallback={fallback!r}); the largest: "
                  f"{names}. kfe.describe_layers(loss_fn, params, batch) says "
                  "why.", stacklevel=3)
