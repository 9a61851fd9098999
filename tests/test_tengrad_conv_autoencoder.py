"""TENGraD trains a convolutional autoencoder (strided convs down, transposed
convs up) on real MNIST, every conv with its exact block (the transposed
convs are convs with input dilation): at the library's default λ 0.1 and at
the guide's λ 1, where the loss falls at every step."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_ext as kfe
from kfac_jax_ext import datasets as data
from benchmarks.models import ConvAutoencoder


# This step trains for 2 × 101 steps: XLA's default optimization level for
# it (the suite compiles at level 0, tests/conftest.py).
TRAINING = {"xla_backend_optimization_level": "2"}


@functools.lru_cache(maxsize=2)
def _setup(damping=0.1):
  """TENGraD (lr 0.3, λ ``damping``, κ 1e-3, momentum 0.9) on a fixed batch
  of 64 MNIST images, and one jitted step whose refresh schedule is a
  static ``due`` (so the tests with one λ share its two programs)."""
  try:
    images = data.load_mnist()[0][:64]
  except data.DatasetUnavailable as err:
    pytest.skip(str(err))
  batch = {"x": jnp.asarray(images.reshape(-1, 28, 28, 1), jnp.float32)}
  model = ConvAutoencoder()
  with jax.enable_x64(False):
    params = model.init(jax.random.PRNGKey(0), batch["x"][:1])

    def loss_fn(p, b):
      n = b["x"].shape[0]
      return kfe.sigmoid_cross_entropy(model.apply(p, b["x"]).reshape(n, -1),
                                       b["x"].reshape(n, -1))

    table = kfe.describe_layers(loss_fn, params, batch)
    assert table.count("conv2d") == 4, table
    with warnings.catch_warnings():
      warnings.simplefilter("error")      # no layer falls back
      opt = kfe.tengrad(loss_fn, learning_rate=0.3, damping=damping, kl_clip=1e-3,
                        example_batch=batch)
      opt.init(params)

  @functools.partial(jax.jit, static_argnames="due", compiler_options=TRAINING)
  def step(params, state, key, due):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, state = opt.update(grads, state, params, batch=batch, key=key,
                                due=due)
    return optax.apply_updates(params, updates), state, loss

  return params, opt, step


def _train(inverse_every, steps=101, damping=0.1):
  """The losses of ``steps`` steps refreshing the block every
  ``inverse_every`` steps (``kfe.due_at``: the counters' schedule of an
  optimizer built with that ``inverse_every``, test_static_schedule.py)."""
  params, opt, step = _setup(damping)
  with jax.enable_x64(False):
    state, losses = opt.init(params), []
    for i in range(steps):
      due = kfe.due_at(i, stats_every=inverse_every, inverse_every=inverse_every)
      params, state, loss = step(params, state, jax.random.PRNGKey(i), due=due)
      losses.append(float(loss))
  assert int(state[0].inner.health.failed_inverses) == 0
  return np.asarray(losses)


def test_tengrad_conv_autoencoder_trains_at_the_readme_settings():
  """The default ``inverse_every=5`` reuses a batch's exact block for five
  steps. The loss falls to about a tenth in 100 steps, but not monotonically:
  between steps 20 and 60 it rises for a few steps in 4 of 6 runs whose
  initial weights differ by 1e-6 (relative; one reaches 146 after 127 at
  step 20), and at XLA's optimization level 0 in the unperturbed run too
  (``python -m benchmarks.tengrad_reuse``). So this checks the robust part:
  it never exceeds the start and ends below 0.15× it."""
  losses = _train(inverse_every=5)
  assert losses.max() <= losses[0]
  assert losses[-1] < 0.15 * losses[0], (losses[0], losses[-1])


def test_tengrad_conv_autoencoder_loss_falls_with_fresh_blocks():
  """With the block refreshed on every step the loss falls at every
  10-step checkpoint (in all 6 perturbed runs above, on both optimization
  levels; ``python -m benchmarks.tengrad_reuse --inverse-every 1``): the
  rises come from the reused (stale) block."""
  losses = _train(inverse_every=1)
  checkpoints = losses[::10]                 # steps 0, 10, ..., 100
  assert np.all(np.diff(checkpoints) < 0), checkpoints
  assert losses[-1] < 0.15 * losses[0], (losses[0], losses[-1])


def test_tengrad_conv_autoencoder_loss_falls_at_every_step_at_the_guides_damping():
  """At the guide's TENGraD damping, λ 1 (docs/guide.md §4: what its
  benchmark sweeps chose on the autoencoder and the Fashion CNN), with the
  default ``inverse_every=5``, the loss falls at every one of the 100 steps,
  to about a tenth. ``python -m benchmarks.tengrad_reuse --inverse-every 5
  --trials 6 --damping 1``: every step fell in 6 of 6 perturbed runs, at
  XLA's default level and at level 0 (λ 0.1: in 0 of 6)."""
  losses = _train(inverse_every=5, damping=1.0)
  assert np.all(np.diff(losses) < 0), np.flatnonzero(np.diff(losses) >= 0)
  assert losses[-1] < 0.15 * losses[0], (losses[0], losses[-1])
