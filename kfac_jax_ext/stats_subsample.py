"""Curvature statistics from the first examples of the batch (``stats_batch``).

Martens & Grosse (2015, §8) estimate the Fisher from a subset of the
mini-batch while the gradient uses all of it. With ``stats_batch=n`` the
statistics pass (forward, sampled-target backward, the probes) runs on the
first ``n`` of the batch's ``M`` examples, and the factors are that
sub-batch's:

  ``A_n = (1/(n·T)) Σ_{k<n} Σ_t ā_kt ā_ktᵀ``,  ``G_n = (1/n) Σ_{k<n} Σ_t g_kt g_ktᵀ``

(per token, as for a full batch of ``n`` examples): an unbiased estimate of
the same expectations at ``n/M`` of the statistics' cost (the factor
products, ``2·n·T·(d_a² + d_g²)`` FLOPs per layer, and the sampled
backward). The sub-batch is every array leaf of the batch cut to its first
``n`` rows, so every leaf must have the examples (sequences, for a
per-token loss) on its leading axis; scalar leaves are kept.

Example:
  >>> opt = kfe.kfac(loss_fn, learning_rate=0.1, damping=0.1,
  ...                stats_batch=250)        # of a batch of 1000
  >>> step = kfe.make_train_step(loss_fn, opt)   # reads stats_batch
"""

from __future__ import annotations

import jax

from kfac_jax_ext import tracing


def check_examples(value, option: str, name: str) -> None:
  """A clear error unless ``value`` is None or a positive int: an option that
  takes the first ``value`` examples of a batch (``stats_batch``,
  ``coarse_batch``)."""
  if value is not None and (isinstance(value, bool) or not isinstance(
      value, int) or value < 1):
    raise ValueError(f"{name}: {option} must be a positive int (a number of "
                     f"examples) or None, got {value!r}.")


def batch_rows(batch, option: str = "stats_batch") -> int:
  """The batch's size: the common leading axis of its array leaves (scalars
  are shared by the examples and ignored).

  Raises:
    ValueError: the leaves' leading sizes differ, or no leaf has an axis.
  """
  paths = jax.tree_util.tree_flatten_with_path(batch)[0]
  shapes = {jax.tree_util.keystr(p) or "batch": tuple(jax.numpy.shape(x))
            for p, x in paths}
  sizes = {shape[0] for shape in shapes.values() if shape}
  if len(sizes) != 1:
    raise ValueError(
        f"{option} cuts every batch leaf to its first rows (the examples on "
        "the leading axis), but the leaves' leading sizes are "
        + ", ".join(f"{k}: {v}" for k, v in shapes.items())
        + f". Put the examples first in every leaf, or leave {option} unset.")
  return sizes.pop()


def first_examples(batch, n: int):
  """``batch`` with every array leaf cut to its first ``n`` rows (scalars
  kept)."""
  return jax.tree_util.tree_map(
      lambda x: x[:n] if jax.numpy.ndim(x) else x, batch)


def statistics_inputs(loss_fn, params, batch, traced, stats_batch, has_aux,
                      option: str = "stats_batch"):
  """``(batch, traced)`` of the statistics pass: the batch's first
  ``stats_batch`` rows and ``loss_fn`` traced on them, or the inputs
  unchanged when ``stats_batch`` is None or at least the batch's size.
  Rows are the batch's leading axis: with a per-token loss over ``[N, T]``
  sequences, n sequences (``n·T`` of the loss's examples); a time-major
  batch ``[T, N, ...]`` would be cut in time, so put the examples first."""
  if stats_batch is None or stats_batch >= batch_rows(batch, option):
    return batch, traced
  sub = first_examples(batch, stats_batch)
  return sub, tracing.trace_loss(loss_fn, params, sub, has_aux)


def check_curvature_size(curvature, traced, params, batch, statistics_pass,
                         name: str) -> None:
  """Raises unless ``curvature`` has the shapes of the statistics of
  ``batch`` (the sub-batch): it must come from ``kfe.value_and_grad(...,
  stats_batch=)`` with the optimizer's ``stats_batch``."""
  expected = jax.eval_shape(
      lambda p, b: statistics_pass(traced, p, b, None, "empirical")[2],
      params, batch)        # the same shapes as the sampled Fisher's
  shapes = lambda t: jax.tree_util.tree_map(jax.numpy.shape, t)
  if shapes(expected.layers) != shapes(curvature.layers):
    raise ValueError(
        f"{name}: curvature= holds the statistics of another batch size than "
        f"the optimizer's stats_batch ({batch_rows(batch)} rows); "
        "compute it with kfe.value_and_grad(loss_fn, stats_batch=<the same "
        "n>) (kfe.make_train_step does this for you).")
