"""Loss helpers that register the model's predictive distribution.

Each helper returns the batch-mean loss, ``mean_n w_n * l_n``, and tags its
inputs so that the curvature machinery can find the predictive distribution by
tracing the user's ``loss_fn`` and draw targets from it (true Fisher) or reuse
the data targets (empirical Fisher).

The leading axes of ``predictions`` are examples (``[N, C]``, or ``[N, T, C]``
for a sequence model: N*T examples); the last axis holds the outputs.

Example:
  >>> def loss_fn(params, batch):
  ...   logits = model.apply(params, batch["x"])
  ...   return kfe.softmax_cross_entropy(logits, batch["y"])
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kfac_jax_ext import _jax_internals

_tag = _jax_internals.make_identity_primitive("kfe_loss_tag")
LOSS_TAG_PRIMITIVE = _tag.primitive
# marks a helper's returned value, so that the factor loss_fn puts on it can
# be read off the jaxpr (kfac_jax_ext.loss_scales)
_value_tag = _jax_internals.make_identity_primitive("kfe_loss_value")
LOSS_VALUE_PRIMITIVE = _value_tag.primitive


def _prepare(predictions, targets, weights, kind):
  predictions = jnp.asarray(predictions)
  targets = jnp.asarray(targets)
  if predictions.ndim == 0:
    raise ValueError(f"{kind}: predictions must have a batch axis, got a scalar.")
  if predictions.ndim == 1 and kind != "softmax_cross_entropy":
    predictions = predictions[:, None]   # [N] -> N examples with one output
    if targets.ndim == 1:
      targets = targets[:, None]
  batch_shape = predictions.shape[:-1]
  if kind == "softmax_cross_entropy" and targets.shape == batch_shape:
    if not jnp.issubdtype(targets.dtype, jnp.integer):
      raise ValueError(f"{kind}: labels of shape {targets.shape} must be integer "
                       f"class ids (or one-hot/probabilities of shape "
                       f"{predictions.shape}), got dtype {targets.dtype}.")
  elif targets.shape != predictions.shape:
    raise ValueError(
        f"{kind}: targets of shape {targets.shape} are inconsistent with "
        f"predictions of shape {predictions.shape} (expected {predictions.shape}"
        + (f" or integer labels of shape {batch_shape}" if kind ==
           "softmax_cross_entropy" else "") + ").")
  if weights is None:
    weights = jnp.ones(batch_shape, predictions.dtype)
  weights = jnp.asarray(weights)
  per_output = kind != "softmax_cross_entropy" and weights.shape == predictions.shape
  if weights.shape != batch_shape and not per_output:
    raise ValueError(
        f"{kind}: weights of shape {weights.shape} must have the examples' "
        f"shape {batch_shape}" + ("" if kind == "softmax_cross_entropy" else
                                  f" or, one per output, {predictions.shape}")
        + ".")
  return predictions, targets, weights


def per_output_weights(kind: str, predictions, weights) -> bool:
  """Whether ``weights`` weigh each output (``[..., D]``, sigmoid and squared
  error: independent outputs, e.g. a multi-label mask) rather than each
  example (``[...]``)."""
  return (kind != "softmax_cross_entropy"
          and jnp.ndim(weights) == jnp.ndim(predictions) and jnp.ndim(weights) > 0)


def weighted_example_loss(kind: str, predictions, targets, weights):
  """``w_n l_n`` per example, or ``Σ_d w_nd l_nd`` with per-output weights."""
  if per_output_weights(kind, predictions, weights):
    terms = per_output_loss(kind, predictions, targets)
    return jnp.sum(weights.astype(terms.dtype) * terms, axis=-1)
  losses = per_example_loss(kind, predictions, targets)
  return weights.astype(losses.dtype) * losses


def per_output_loss(kind: str, predictions, targets):
  """The independent outputs' terms ``l_nd`` of a sigmoid or squared-error
  loss (shape ``predictions.shape``), whose sum over d is ``l_n``."""
  if kind == "sigmoid_cross_entropy":
    log_p = jax.nn.log_sigmoid(predictions)
    log_not_p = jax.nn.log_sigmoid(-predictions)
    return -(targets * log_p + (1 - targets) * log_not_p)
  if kind == "squared_error":
    return 0.5 * jnp.square(predictions - targets)
  raise ValueError(f"{kind} has no independent per-output terms")


def per_example_loss(kind: str, predictions, targets):
  """Unweighted per-example loss ``l_n`` (shape ``predictions.shape[:-1]``)."""
  if kind == "softmax_cross_entropy":
    logp = jax.nn.log_softmax(predictions, axis=-1)
    if targets.shape == predictions.shape[:-1]:
      return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return -jnp.sum(targets * logp, axis=-1)
  if kind in ("sigmoid_cross_entropy", "squared_error"):
    return jnp.sum(per_output_loss(kind, predictions, targets), axis=-1)
  raise ValueError(f"unknown loss kind {kind!r}")


def _sample(kind: str, predictions, key):
  if kind == "softmax_cross_entropy":
    labels = jax.random.categorical(key, predictions.astype(jnp.float32), axis=-1)
    return jax.nn.one_hot(labels, predictions.shape[-1], dtype=predictions.dtype)
  if kind == "sigmoid_cross_entropy":
    p = jax.nn.sigmoid(predictions.astype(jnp.float32))
    return jax.random.bernoulli(key, p).astype(predictions.dtype)
  if kind == "squared_error":
    noise = jax.random.normal(key, predictions.shape, jnp.float32)
    return predictions + noise.astype(predictions.dtype)
  raise ValueError(f"unknown loss kind {kind!r}")


def sample_targets(kind: str, predictions, key, offset=0):
  """Draws one target per example from the model's predictive distribution.

  Row ``i`` of the leading axis draws with ``fold_in(key, offset + i)``, so
  the draws of an example depend on its global index only, not on how the
  batch is split across devices (``offset``: the index of the first row).
  Against one draw for the whole array the cost difference is within the
  timing noise: 2.9–5.2 ms against 3.2–5.8 ms for ``[1000, 784]`` Bernoulli
  targets, 0.5–0.7 ms against 0.4–0.5 ms for 10 classes, over three runs of
  ``python -m benchmarks.cpu_facts`` (``sampling_keys``).
  """
  predictions = jax.lax.stop_gradient(predictions)
  if predictions.ndim < 2:   # one example (softmax over a [C] vector)
    return _sample(kind, predictions, jax.random.fold_in(key, offset))
  rows = (offset + jnp.arange(predictions.shape[0])).astype(jnp.uint32)
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, rows)
  return jax.vmap(lambda k, p: _sample(kind, p, k))(keys, predictions)


class RegisteredLoss(NamedTuple):
  """A loss found in a traced ``loss_fn``: its kind and its tagged inputs."""
  kind: str
  predictions: jax.Array
  targets: jax.Array
  weights: jax.Array

  @property
  def num_examples(self) -> int:
    return int(np.prod(jnp.shape(self.predictions)[:-1]))

  def fisher_objective(self, key, fisher: str, scale: float = 1.0, offset=0):
    """``scale * sum_n sqrt(w_n) l_n(y_n)`` with sampled or data targets
    (``offset``: global index of the first example row, see
    ``sample_targets``).

    Its gradient with respect to a pre-activation is the per-example output
    gradient ``g_n`` of the *summed* loss (no 1/N), weighted so that
    ``g_n g_nᵀ`` carries ``w_n``: the statistics of every method follow.
    Per-output weights enter as ``Σ_d sqrt(w_nd) l_nd`` (the outputs are
    independent, so the expected ``g_n g_nᵀ`` carries ``diag(w_n) H_n``).
    """
    if fisher == "sampled":
      targets = sample_targets(self.kind, self.predictions, key, offset)
    elif fisher == "empirical":
      targets = jax.lax.stop_gradient(self.targets)
    else:
      raise ValueError(f"fisher must be 'sampled' or 'empirical', got {fisher!r}")
    root_w = jnp.sqrt(jnp.maximum(jax.lax.stop_gradient(self.weights), 0))
    return scale * jnp.sum(weighted_example_loss(
        self.kind, self.predictions, targets, root_w))

  def hessian_product(self, u):
    """``∂²L/∂z² u`` of this helper's mean loss ``L = mean_n w_n l_n`` in its
    predictions ``z``: ``(w_n / M) H_n u_n`` per example (M examples);
    with per-output weights ``(diag(w_n) / M) H_n u_n``."""
    z = jax.lax.stop_gradient(self.predictions)
    w = jax.lax.stop_gradient(self.weights)
    h = fisher_hessian_product(self.kind, z.astype(u.dtype), u)
    w = w.astype(u.dtype) / self.num_examples
    # per-output weights scale each independent output's (diagonal) Hessian
    return (w if per_output_weights(self.kind, z, w) else w[..., None]) * h


def fisher_hessian_product(kind: str, predictions, u):
  """``H_n u_n`` per example: the Fisher of the predictive distribution in
  the space of its inputs, equal to the Hessian of ``l_n`` for these
  (canonical-link) losses and independent of the targets.

  softmax: ``diag(p) − ppᵀ``; sigmoid: ``diag(p(1−p))``; Gaussian: ``I``.
  ``predictions`` and ``u`` share the shape ``[..., C]``.
  """
  if kind == "softmax_cross_entropy":
    p = jax.nn.softmax(predictions, axis=-1)
    return p * u - p * jnp.sum(p * u, axis=-1, keepdims=True)
  if kind == "sigmoid_cross_entropy":
    p = jax.nn.sigmoid(predictions)
    return p * (1 - p) * u
  if kind == "squared_error":
    return u
  raise ValueError(f"unknown loss kind {kind!r}")


def _register_and_mean(kind, predictions, targets, weights):
  predictions, targets, weights = _prepare(predictions, targets, weights, kind)
  predictions, targets, weights = _tag(predictions, targets, weights, kind=kind)
  return _value_tag(jnp.mean(weighted_example_loss(kind, predictions, targets,
                                                   weights)))[0]


def softmax_cross_entropy(logits, labels, weights=None):
  """Categorical loss ``-log softmax(logits)[label]``, batch-mean; registers it.

  Args:
    logits: ``[..., C]`` unnormalised log-probabilities.
    labels: integer class ids ``[...]`` or one-hot/probabilities ``[..., C]``.
    weights: optional per-example weights ``[...]`` (non-negative).

  Returns:
    The scalar ``mean_n w_n * l_n``.
  """
  return _register_and_mean("softmax_cross_entropy", logits, labels, weights)


def sigmoid_cross_entropy(logits, targets, weights=None):
  """Independent-Bernoulli loss summed over outputs, batch-mean; registers it.

  Args:
    logits: ``[..., D]`` log-odds. targets: ``[..., D]`` in ``[0, 1]``.
    weights: optional per-example weights ``[...]``, or per-output weights
      ``[..., D]`` (a multi-label task's mask of the labels it has: the
      curvature of a masked label is zero).

  Returns:
    The scalar ``mean_n w_n * sum_d BCE(logits_nd, targets_nd)`` (per-output:
    ``mean_n sum_d w_nd BCE(logits_nd, targets_nd)``).

  Example:
    >>> mask = ~jnp.isnan(labels)
    >>> loss = kfe.sigmoid_cross_entropy(
    ...     logits, jnp.where(mask, labels, 0.0), weights=mask)
  """
  return _register_and_mean("sigmoid_cross_entropy", logits, targets, weights)


def squared_error(predictions, targets, weights=None):
  """Unit-variance Gaussian loss ``0.5 ||pred - target||²``, batch-mean.

  Args:
    predictions, targets: ``[..., D]`` (a ``[N]`` vector is N scalar outputs).
    weights: optional per-example weights ``[...]``, or per-output weights
      ``[..., D]`` (regression targets some examples lack).

  Returns:
    The scalar ``mean_n w_n * 0.5 * ||pred_n - target_n||²`` (per-output:
    ``mean_n sum_d w_nd * 0.5 * (pred_nd - target_nd)²``).
  """
  return _register_and_mean("squared_error", predictions, targets, weights)
