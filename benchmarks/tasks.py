"""Benchmark tasks: a dataset, a model, a loss and the hyper-parameter grids.

Every task is built by ``make_task(name, quick=False, data_dir=None)`` and
returns a ``Task``. Its ``loss_fn`` registers the loss for kfac_jax_ext; its
``kfac_jax_loss_fn`` is the same function registering the loss for kfac-jax
(whose layers are found by kfac-jax's own automatic registration).

Tasks (``TASKS``):
* ``autoencoder``: MNIST, M&G deep autoencoder, sigmoid cross-entropy, batch 1000.
* ``mlp``: MNIST, MLP 784-256-256-10, softmax cross-entropy, batch 512.
* ``fashion_cnn``: Fashion-MNIST, ``models.FashionCNN``, batch 128.
* ``fashion_3c1f``: Fashion-MNIST, TENGraD's 3C1F ConvNet (width 128), batch 128.
* ``cifar10_resnet``: CIFAR-10 from ``--data-dir``, ResNet-8 (GroupNorm),
  per-channel standardized inputs, batch 128.
* ``shakespeare``: character transformer (2 layers, width 128, context 64) on
  Shakespeare, hamlet/macbeth/tempest held out as the test text, batch 32
  windows; the loss is per character.

``quick=True`` shrinks the models, the evaluation sets and the grids
(``quick_grids``: two settings per optimizer) so a run takes seconds; it
exists to keep the runner tested.

Hyper-parameter grids (``Task.grids``): Adam and SGD (momentum 0.9) sweep the
learning rate over three values, Muon over Adam's three and the next one up,
Shampoo from a decade below Adam's grid to its top; every natural-gradient method, kfac-jax
included, sweeps the same learning rate × damping grid (2 × 2), with
momentum 0.9, KL-clip (kfac-jax: ``norm_constraint``) ``kl_clip`` and
curvature statistics and inverses refreshed every ``period`` steps.
TENGraD (family ``"woodbury"``) sweeps the same learning rates and the
damping grid continued up the 1-3-10 ladder to ten times its largest value
(``woodbury_dampings``): its λ damps the exact block of ``n`` sampled
gradients, so every direction outside their span is scaled by ``1/λ``, and
its optimum lies above K-FAC's (``docs/methods.md``, TENGraD). The runner
extends every grid while the best setting sits at its edge
(``benchmarks/sweep.py``).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import kfac_jax_ext as kfe
from benchmarks import models
from benchmarks import sweep
from kfac_jax_ext import datasets as data


class Task(NamedTuple):
  name: str
  description: str
  loss_fn: Callable          # (params, batch) -> scalar, registered for kfe
  kfac_jax_loss_fn: Callable  # the same loss, registered for kfac-jax
  metrics_fn: Callable       # (params, batch) -> {"loss": ..., ["accuracy": ...]}
  params: Any
  sample_batch: Callable     # numpy Generator -> batch of numpy arrays
  train_eval: Any            # a fixed training subset, for the train loss
  test_eval: Any             # held-out data
  grids: dict                # optimizer family -> {"lr": [...], "damping": [...]}
  kl_clip: float
  period: int                # curvature refresh period (statistics, inverses)
  ema_decay: float = 0.95    # running-average decay of the curvature statistics
  refresh_warmup: int = 0    # kfac_jax_ext contenders: refresh on each of the first N steps
  nesterov: bool = False     # kfac_jax_ext contenders: Nesterov's momentum (nesterov=True)


def _losses(apply, kind):
  """kfe- and kfac-jax-registered losses and the metrics of one model."""
  def logits_and_target(params, batch):
    out = apply(params, batch["x"])
    target = batch["x"] if kind == "sigmoid" else batch["y"]
    if out.ndim == 3:       # sequences: every position is an example
      out, target = out.reshape(-1, out.shape[-1]), target.reshape(-1)
    return out, target

  def loss_fn(params, batch):
    out, target = logits_and_target(params, batch)
    if kind == "sigmoid":
      return kfe.sigmoid_cross_entropy(out, target)
    return kfe.softmax_cross_entropy(out, target)

  def kfac_jax_loss_fn(params, batch):
    # kfac-jax's curvature is that of ``weight * sum / batch_size`` with the
    # batch size read off the batch (N windows for a sequence model), so the
    # mean over N·T positions is registered with weight 1/T: both libraries
    # then estimate the curvature of the same loss and share λ's units.
    import kfac_jax
    out, target = logits_and_target(params, batch)
    positions = out.shape[0] // jax.tree_util.tree_leaves(batch)[0].shape[0]
    if kind == "sigmoid":
      kfac_jax.register_sigmoid_cross_entropy_loss(out, target,
                                                   weight=1.0 / positions)
      return optax.sigmoid_binary_cross_entropy(out, target).sum(-1).mean()
    kfac_jax.register_softmax_cross_entropy_loss(out, target,
                                                 weight=1.0 / positions)
    return optax.softmax_cross_entropy_with_integer_labels(out, target).mean()

  def metrics_fn(params, batch):
    out, target = logits_and_target(params, batch)
    if kind == "sigmoid":
      return {"loss": optax.sigmoid_binary_cross_entropy(out, target).sum(-1).mean()}
    return {"loss": optax.softmax_cross_entropy_with_integer_labels(out, target).mean(),
            "accuracy": jnp.mean(jnp.argmax(out, -1) == target)}

  return loss_fn, kfac_jax_loss_fn, metrics_fn


def _classifier(name, description, model, x_train, y_train, x_test, y_test,
                batch_size, eval_size, grids, kl_clip, period, quick):
  sample_rng = np.random.default_rng(12345)
  if quick:
    eval_size = min(eval_size, 256)
  eval_size = min(eval_size, len(x_train), len(x_test))
  init = model.init(jax.random.PRNGKey(0), jnp.asarray(x_train[:1]))
  loss_fn, kfac_jax_loss_fn, metrics_fn = _losses(model.apply, "softmax")

  def sample_batch(rng):
    idx = rng.integers(0, len(x_train), batch_size)
    return {"x": x_train[idx], "y": y_train[idx]}
  train_idx = sample_rng.choice(len(x_train), eval_size, replace=False)
  return Task(name, description, loss_fn, kfac_jax_loss_fn, metrics_fn, init,
              sample_batch, {"x": x_train[train_idx], "y": y_train[train_idx]},
              {"x": x_test[:eval_size], "y": y_test[:eval_size]}, grids, kl_clip,
              period)


_ladder_up = sweep.ladder_up


RELATIVE_DAMPINGS = (1e-2, 1e-1, 1.0)


def woodbury_dampings(damping) -> list:
  """The natural grid's dampings, continued up the 1-3-10 ladder to ten
  times the largest (``(0.1, 0.3)`` → ``[0.1, 0.3, 1, 3]``, ``(0.01, 0.1)``
  → ``[0.01, 0.1, 0.3, 1]``)."""
  out = [float(d) for d in damping]
  top = 10 * out[-1]
  while _ladder_up(out[-1]) <= top * (1 + 1e-9):
    out.append(_ladder_up(out[-1]))
  return out


def _grids(adam, sgd, lr, damping):
  # Muon with consistent_rms=0.2 takes AdamW's learning rates (Liu et al.
  # 2025): Adam's grid and the next value of its 1-3-10 ladder up, so that
  # the grid also covers an optimum above Adam's.
  up = _ladder_up(adam[-1])
  return {"adam": {"lr": list(adam)}, "sgd": {"lr": list(sgd)},
          "muon": {"lr": list(adam) + [up]},
          # Shampoo grafted to normalized RMSProp: with Adam's grid (extended
          # twice down) its best sat at the edge on the autoencoder (3e-5;
          # it diverged at Adam's rates) and the transformer (1e-4) on
          # 2026-12-03, so its grid starts a decade below Adam's
          "shampoo": {"lr": sorted({float(f"{a / 10:.1g}") for a in adam} | set(adam))},
          "natural": {"lr": list(lr), "damping": list(damping)},
          "woodbury": {"lr": list(lr), "damping": woodbury_dampings(damping)},
          # damping_scale="relative": λ in units of each block's mean
          # eigenvalue, so one grid for every task (no per-task scale)
          "relative": {"lr": list(lr), "damping": list(RELATIVE_DAMPINGS)}}


def autoencoder(quick, batch_size=None):
  x_train, _, x_test, _ = data.load_mnist()
  sizes = (784, 64, 16, 64, 784) if quick else models.AUTOENCODER_SIZES
  model = models.Autoencoder(sizes)
  loss_fn, kfac_jax_loss_fn, metrics_fn = _losses(model.apply, "sigmoid")
  eval_size = 500 if quick else 5000
  batch = batch_size or (250 if quick else 1000)
  train_idx = np.random.default_rng(12345).choice(len(x_train), eval_size, replace=False)
  return Task(
      "autoencoder", f"MNIST deep autoencoder {'-'.join(map(str, sizes))}, tanh, "
      f"sigmoid cross-entropy (summed over pixels), batch {batch}",
      loss_fn, kfac_jax_loss_fn, metrics_fn,
      model.init(jax.random.PRNGKey(0), jnp.zeros((1, 784))),
      lambda rng: {"x": x_train[rng.integers(0, len(x_train), batch)]},
      {"x": x_train[train_idx]}, {"x": x_test[:eval_size]},
      _grids((3e-4, 1e-3, 3e-3), (0.01, 0.03, 0.1), (0.1, 0.3), (0.1, 0.3)),
      kl_clip=1e-2, period=10, ema_decay=0.8)


def mlp(quick, batch_size=None):
  x_train, y_train, x_test, y_test = data.load_mnist()
  widths = (32,) if quick else (256, 256)
  model = models.MLP(widths)
  batch = batch_size or 512
  return _classifier("mlp", f"MNIST MLP 784-{'-'.join(map(str, widths))}-10, ReLU, "
                     f"softmax cross-entropy, batch {batch}", model, x_train, y_train,
                     x_test, y_test, batch, 5000,
                     _grids((3e-4, 1e-3, 3e-3), (0.03, 0.1, 0.3), (0.1, 0.3),
                            (0.01, 0.1)), 1e-2, 10, quick)


def fashion(model_name, quick, batch_size=None):
  batch = batch_size or 128
  x_train, y_train, x_test, y_test = data.load_fashion_mnist()
  if model_name == "fashion_3c1f":
    model = models.ConvNet3C1F(8 if quick else 128)
    description = (f"Fashion-MNIST, TENGraD 3C1F ConvNet (3×conv3×3-{model.width}, "
                   f"pool 3, dense 500), batch {batch}")
  else:
    model = models.FashionCNN()
    description = f"Fashion-MNIST CNN conv16/pool/conv32/pool/dense128, batch {batch}"
  return _classifier(model_name, description, model, x_train, y_train, x_test,
                     y_test, batch, 5000,
                     _grids((3e-4, 1e-3, 3e-3), (0.01, 0.03, 0.1), (0.03, 0.1),
                            (0.01, 0.1)), 1e-2,
                     # Period 10 on the CNN: measured against 5 on two seeds
                     # (benchmarks/README.md, `fashion_cnn_period10`).
                     10 if model_name == "fashion_cnn" else 5, quick)


def cifar10_resnet(quick, data_dir=None, batch_size=None):
  batch = batch_size or 128
  x_train, y_train, x_test, y_test = data.load_cifar10(data_dir)
  mean = x_train.mean(axis=(0, 1, 2))
  std = x_train.std(axis=(0, 1, 2))
  standardize = lambda x: ((x - mean) / std).astype(np.float32)
  model = models.ResNet(width=4 if quick else 16)
  widths = "-".join(str(model.width * 2 ** s) for s in range(model.stages))
  return _classifier("cifar10_resnet", "CIFAR-10, ResNet-8 (pre-activation, "
                     f"GroupNorm, widths {widths}), batch {batch}", model,
                     standardize(x_train), y_train, standardize(x_test), y_test,
                     batch, 5000,
                     _grids((3e-4, 1e-3, 3e-3), (0.01, 0.03, 0.1), (0.03, 0.1),
                            (0.01, 0.1)), 1e-2, 5, quick)


def shakespeare(quick, batch_size=None):
  train, valid, vocab = data.load_shakespeare()
  context = 16 if quick else 64
  model = models.CharTransformer(len(vocab), context=context,
                                 dim=32 if quick else 128, layers=1 if quick else 2)
  loss_fn, kfac_jax_loss_fn, metrics_fn = _losses(model.apply, "softmax")
  batch, eval_windows = batch_size or 32, 64 if quick else 256

  def windows(text, starts):
    idx = starts[:, None] + np.arange(context + 1)
    chunk = text[idx].astype(np.int32)
    return {"x": chunk[:, :-1], "y": chunk[:, 1:]}
  fixed = np.random.default_rng(12345)
  return Task(
      "shakespeare", f"Shakespeare characters ({len(vocab)} symbols), transformer "
      f"{model.layers} layers × width {model.dim}, 4 heads, context {context}; "
      f"test = hamlet, macbeth, tempest; batch {batch} windows",
      loss_fn, kfac_jax_loss_fn, metrics_fn,
      model.init(jax.random.PRNGKey(0), jnp.zeros((1, context), jnp.int32)),
      lambda rng: windows(train, rng.integers(0, len(train) - context - 1, batch)),
      windows(train, fixed.integers(0, len(train) - context - 1, eval_windows)),
      windows(valid, fixed.integers(0, len(valid) - context - 1, eval_windows)),
      # λ and κ at the per-token curvature's scale: with the mean over the
      # 64 positions of a window, λ = 0.1 left 0.03–1 % of each block's
      # eigenvalues above it (K-FAC was mostly damping), as issue #17 reports.
      _grids((1e-3, 3e-3, 1e-2), (0.03, 0.1, 0.3), (0.03, 0.1),
             (1.5e-3, 1.5e-2)),
      # Period 10: measured against 5 on two seeds (`shakespeare_period10`).
      kl_clip=1.5e-4, period=10)


TASKS = ("autoencoder", "mlp", "fashion_cnn", "fashion_3c1f", "cifar10_resnet",
         "shakespeare")


def make_task(name: str, quick: bool = False, data_dir=None,
              batch_size: int | None = None) -> Task:
  """Builds a task (loads its data); ``batch_size`` replaces its batch size.

  Raises:
    ValueError: unknown task.
    data.DatasetUnavailable: its dataset is not on this machine.
  """
  if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(
      batch_size, int) or batch_size < 1):
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
  builders = {"autoencoder": lambda: autoencoder(quick, batch_size),
              "mlp": lambda: mlp(quick, batch_size),
              "fashion_cnn": lambda: fashion(name, quick, batch_size),
              "fashion_3c1f": lambda: fashion(name, quick, batch_size),
              "cifar10_resnet": lambda: cifar10_resnet(quick, data_dir, batch_size),
              "shakespeare": lambda: shakespeare(quick, batch_size)}
  if name not in builders:
    raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
  task = builders[name]()
  return task._replace(grids=quick_grids(task.grids)) if quick else task


def quick_grids(grids: dict) -> dict:
  """The ``--quick`` sweep: each grid's smallest and largest learning rate,
  at its smallest damping (two settings per optimizer: the sweep's
  mechanics, in seconds)."""
  return {family: {key: ([values[0], values[-1]] if key == "lr" else values[:1])
                   for key, values in grid.items()}
          for family, grid in grids.items()}
