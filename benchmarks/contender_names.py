"""The names ``benchmarks.run --optimizers`` takes: the fixed ones and the
parametrized families (``tengrad_gramN``, ``tengrad_everyN``,
``kfac_statsN``, ``two_level_COMBINE_SPACE[_ggn|_mixed|_kronecker]``,
``two_level_COMBINE_SPACE_stored[N]``, ``two_level_COMBINE_SPACE_subsampleN``,
``two_level_COMBINE_spectral_iterK``, ``two_level_COMBINE_RESIDUAL_refreshed``,
``two_level_COMBINE_SPACE_kronecker_batchN``, ``…_kronecker[_batchN]_both``,
``…_kronecker[_batchN][_both][_scaleall]_modelperiod``,
``two_level_COMBINE_SPACE_klN`` (also ``…_storedN_klN``, ``…_iterK_klN``,
``…_refreshed_klN``, ``…_subsampleN_klN``),
``kfac_adaptive_relative_modelN``),
parsed without building anything (``contenders`` builds them; its module
docstring says what each one is).
"""

from __future__ import annotations

from kfac_jax_ext import coarse

OPTIMIZERS = ("adam", "sgd", "muon", "shampoo", "kfac", "tkfac", "tengrad", "two_level_kfac", "kfac_jax",
              "kfac_adaptive", "kfac_jax_adaptive", "kfac_tridiagonal",
              "tengrad_adaptive", "natural_gradient", "kfac_relative",
              "kfac_adaptive_relative", "tengrad_relative",
              "tengrad_adaptive_relative", "kfac_adaptive_gamma",
              "kfac_adaptive_relative_gamma")
NATURAL = ("kfac", "tkfac", "tengrad", "two_level_kfac", "kfac_jax",
           "kfac_tridiagonal", "natural_gradient", "kfac_relative",
           "tengrad_relative")
# Two-level K-FAC by combination and coarse space, ``two_level_COMBINE_SPACE``
# (``two_level_kfac`` is additive Nicolaides): swept like the others, the
# coarse matrix at its default (Tselepidis' Kronecker sums for a fixed
# rank-one space with the additive combination, Koroko's exact one
# otherwise), Fisher products from the statistics, the fine step
# model-scaled for multiplicative and balanced; ``…_kronecker``: the
# multiplicative and balanced products from Tselepidis' Kronecker model of
# the whole Fisher (``fisher_products="kronecker"``; on the residual spaces
# with their basis rebuilt on statistics steps, ``residual_refresh=
# "statistics"``, the only schedule the model takes).
TWO_LEVEL_VARIANTS = tuple(
    f"two_level_{c}_{s}{ggn}" for c in ("additive", "multiplicative", "balanced")
    for s in coarse.COARSE_SPACES if s != "parameters"
    for ggn in ("", "_ggn", "_mixed")) + tuple(
        f"two_level_{c}_{s}_kronecker" for c in ("multiplicative", "balanced")
        for s in ("nicolaides", "spectral", "krylov_nicolaides", "residual",
                  "krylov_residual"))


def suffix_count(name: str, prefix: str):
  """N of ``PREFIX + N`` (a positive int), else None: ``tengrad_gramN``
  (TENGraD with ``gram_batch=N``), ``kfac_statsN`` (K-FAC with
  ``stats_batch=N``)."""
  tail = name[len(prefix):] if name.startswith(prefix) else ""
  return int(tail) if tail.isdigit() and int(tail) > 0 else None


# kfac_adaptive_relative_modelN: the quadratic model on the first N examples
ADAPTIVE_MODEL = "kfac_adaptive_relative_model"


def tengrad_gram(name: str):
  return suffix_count(name, "tengrad_gram")


def tengrad_every(name: str):
  return (suffix_count(name, "tengrad_every")
          or suffix_count(name, "tengrad_empirical_every"))


def refresh_period(name: str, period: int) -> int:
  """The refresh period contender ``name`` ran with in a file of ``period``:
  N for ``tengrad_everyN``, else the file's."""
  return tengrad_every(name) or period


def two_level_stored(name: str):
  """``(variant, coarse_batch)`` of ``two_level_COMBINE_SPACE_stored[N]``
  (``coarse_batch`` None: all examples), else None."""
  head, sep, tail = name.rpartition("_stored")
  if not sep or head not in TWO_LEVEL_VARIANTS or head.endswith(("_ggn", "_mixed", "_kronecker")) or (
      tail and suffix_count(tail, "") is None):
    return None
  return head, (int(tail) if tail else None)


def two_level_subsample(name: str):
  """``(variant, coarse_batch)`` of ``two_level_COMBINE_SPACE_subsampleN``
  (statistics' products; between statistics steps a pass over the batch's
  first N rows), else None."""
  head, sep, tail = name.rpartition("_subsample")
  if (not sep or head not in TWO_LEVEL_VARIANTS or head.endswith(("_ggn", "_mixed", "_kronecker"))
      or suffix_count(tail, "") is None):
    return None
  return head, int(tail)


def two_level_spectral_iterations(name: str):
  """``(variant, k)`` of ``two_level_COMBINE_spectral[_kronecker]_iterK``,
  else None."""
  head, sep, tail = name.rpartition("_iter")
  if (not sep or head not in TWO_LEVEL_VARIANTS
      or not head.endswith(("_spectral", "_spectral_kronecker"))
      or suffix_count(tail, "") is None):
    return None
  return head, int(tail)


def two_level_refreshed(name: str):
  """The variant of ``two_level_COMBINE_SPACE_refreshed`` (SPACE a residual
  space, statistics' products), else None."""
  head, sep, tail = name.rpartition("_refreshed")
  ok = (sep and not tail and head in TWO_LEVEL_VARIANTS
        and head.endswith(coarse.PER_STEP_SPACES))
  return head if ok else None


def two_level_model_batch(name: str):
  """``(variant, coarse_batch)`` of ``two_level_COMBINE_SPACE_kronecker_batchN``
  (the Kronecker model's tokens from the statistics' first N examples),
  else None."""
  head, sep, tail = name.rpartition("_batch")
  if (not sep or head not in TWO_LEVEL_VARIANTS or not head.endswith("_kronecker")
      or suffix_count(tail, "") is None):
    return None
  return head, int(tail)


def _kronecker_form(name: str, suffix: str, *inner):
  """``HEAD`` of ``HEAD + suffix`` where ``HEAD`` is a ``…_kronecker``
  variant or a name one of the ``inner`` parsers accepts, else None."""
  head, sep, tail = name.rpartition(suffix)
  ok = sep and not tail and (
      (head in TWO_LEVEL_VARIANTS and head.endswith("_kronecker"))
      or any(parse(head) is not None for parse in inner))
  return head if ok else None


def two_level_both(name: str):
  """The variant of ``two_level_COMBINE_SPACE_kronecker[_batchN]_both``
  (``fine_scale="both"``: the fine and the coarse step each scaled by its
  own quadratic-model ratio with the statistics' Fisher), else None."""
  return _kronecker_form(name, "_both", two_level_model_batch)


def two_level_scale_all(name: str):
  """The variant of ``two_level_COMBINE_SPACE_kronecker[_batchN][_both]_scaleall``
  (``scale_batch=None``: the model scales α, γ from all the statistics'
  examples, not the model's first N), else None."""
  return _kronecker_form(name, "_scaleall", two_level_model_batch, two_level_both)


def two_level_model_period(name: str):
  """The variant of ``two_level_COMBINE_SPACE_kronecker[…]_modelperiod``
  (``model_refresh="period"``: the model rebuilt on the statistics period's
  steps only, not on a refresh warm-up's extra ones), else None."""
  return _kronecker_form(name, "_modelperiod", two_level_model_batch,
                         two_level_both, two_level_scale_all)


def two_level_kl_clip(name: str):
  """``(variant, κ)`` of ``VARIANT_klN``: a two-level variant
  (``two_level_COMBINE_SPACE``, or its ``_stored[N]``, ``_subsampleN``,
  ``_iterK``, ``_refreshed``, ``_kronecker_batchN``, ``…_both``,
  ``…_scaleall`` or ``…_modelperiod`` form)
  with KL-clip κ = N instead of the task's (a positive int, or a decimal
  such as ``0.25``), else None."""
  head, sep, tail = name.rpartition("_kl")
  if not sep or _positive_number(tail) is None or not (
      head in TWO_LEVEL_VARIANTS or two_level_stored(head) is not None
      or two_level_subsample(head) is not None
      or two_level_spectral_iterations(head) is not None
      or two_level_refreshed(head) is not None
      or two_level_model_batch(head) is not None
      or two_level_both(head) is not None
      or two_level_scale_all(head) is not None
      or two_level_model_period(head) is not None):
    return None
  return head, _positive_number(tail)


def _positive_number(tail: str):
  """``tail`` as a positive int (``"1"``) or decimal (``"0.25"``), else None."""
  whole, dot, frac = tail.partition(".")
  if not whole.isdigit() or (dot and not frac.isdigit()):
    return None
  value = float(tail) if dot else int(tail)
  return value if value > 0 else None


def settings_name(name: str) -> str:
  """The contender whose swept setting ``name`` may reuse: a stored-token
  two-level variant's is the variant's (same hyper-parameters, the Fisher
  of the last statistics batch instead of the step's), so is a subsampled
  one's (the Fisher of the step's first rows), and so is a spectral one's
  with ``spectral_iterations`` (the same space, found by inverse
  iteration); else ``name``."""
  found = (two_level_stored(name) or two_level_subsample(name)
           or two_level_spectral_iterations(name))
  return name if found is None else found[0]


def known(name: str) -> bool:
  return (name in OPTIMIZERS or name in TWO_LEVEL_VARIANTS
          or two_level_stored(name) is not None
          or two_level_subsample(name) is not None
          or two_level_spectral_iterations(name) is not None
          or two_level_refreshed(name) is not None
          or two_level_model_batch(name) is not None
          or two_level_both(name) is not None
          or two_level_scale_all(name) is not None
          or two_level_model_period(name) is not None
          or two_level_kl_clip(name) is not None
          or tengrad_gram(name) is not None
          or tengrad_every(name) is not None
          or suffix_count(name, "kfac_stats") is not None
          or suffix_count(name, ADAPTIVE_MODEL) is not None)
