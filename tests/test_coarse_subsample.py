"""``coarse_statistics="subsample"``: between the fine level's statistics
steps a per-step two-level correction takes its Fisher from a statistics
pass of its own over the batch's first ``coarse_batch`` rows, against the
closed form built by brute force (float64): ``F`` from the *current*
batch's first N per-example gradients (``vmap(grad)``), ``∇`` of the whole
batch, ``M⁻¹`` the fine level of the last statistics batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_ext as kfe
from kfac_jax_ext import train_step
from tests.test_multi_device import AXIS, _mlp_task, _split
from tests.test_two_level import EXACT, _brute, _flat
from tests.test_two_level_spaces import _base_inverse
from tests.test_two_level_stored import (N, _batches, _two_updates,
                                         closed_form_step, next_step_of)


@pytest.mark.parametrize("task,space,combine", [
    ("mlp", "nicolaides", "multiplicative"), ("mlp", "nicolaides", "balanced"),
    ("mlp", "residual", "multiplicative"), ("mlp", "krylov_residual", "multiplicative"),
    ("cnn", "residual", "multiplicative"), ("cnn", "nicolaides", "balanced")])
def test_subsample_gives_the_closed_form_with_the_steps_first_examples(
    task, space, combine):
  loss, params, first, second = _batches(task)
  out1 = next_step_of("subsample", loss, params, first, second, space, combine)
  # the next step (no statistics): F of the second batch's own first N
  grad, u = _brute(loss, params, second)
  minv = _base_inverse(loss, params, first)
  expected = closed_form_step(loss, params, second, grad, minv, space, combine)
  scale = float(jnp.max(jnp.abs(expected)))
  np.testing.assert_allclose(out1, expected, rtol=0, atol=1e-9 * scale)
  # the Fisher of all the batch's examples gives another step: it can fail
  other = closed_form_step(loss, params, second, grad, minv, space, combine,
                           n=u.shape[1])
  assert float(jnp.max(jnp.abs(other - expected))) > 1e-3 * scale


def test_sampled_targets_of_the_subsample_are_those_of_the_full_pass():
  """With the sampled Fisher the own pass draws the first N examples'
  targets as the full pass does (by example index): the step equals the
  per-step ``"batch"`` form's on the same key."""
  loss, params, first, second = _batches()
  options = dict(EXACT, fisher="sampled", combine="multiplicative",
                 coarse_space="residual", coarse_batch=N, inverse_every=2,
                 stats_every=2, fine_scale="none")
  key = jax.random.PRNGKey(5)
  outs = []
  for mode in ("batch", "subsample"):
    tx = kfe.scale_by_two_level_kfac(loss, coarse_statistics=mode, **options)
    state = tx.init(params)
    _, state = tx.update(jax.grad(loss)(params, first), state, params, batch=first,
                         key=key, due=kfe.Due(statistics=True, inverses=True))
    out, _ = tx.update(jax.grad(loss)(params, second), state, params, batch=second,
                       key=jax.random.fold_in(key, 1),
                       due=kfe.Due(statistics=False, inverses=False))
    outs.append(_flat(out))
  np.testing.assert_allclose(outs[1], outs[0], rtol=1e-12, atol=1e-12)


def test_counter_schedule_equals_the_static_one():
  """Without ``due`` the two branches run under ``lax.cond`` (jitted): the
  same two steps as with a static schedule."""
  loss, params, first, second = _batches()
  options = dict(combine="balanced", coarse_space="nicolaides")
  out0, out1, _, _ = _two_updates(loss, params, first, second, "subsample",
                                  **options)
  tx = kfe.scale_by_two_level_kfac(
      loss, **{**EXACT, "inverse_every": 2, "stats_every": 2, "fine_scale": "none",
               "coarse_batch": N, "coarse_statistics": "subsample", **options})
  update = jax.jit(tx.update)
  state = tx.init(params)
  dyn0, state = update(jax.grad(loss)(params, first), state, params, batch=first)
  dyn1, _ = update(jax.grad(loss)(params, second), state, params, batch=second)
  np.testing.assert_allclose(_flat(dyn0), out0, rtol=0, atol=1e-12)
  np.testing.assert_allclose(_flat(dyn1), out1, rtol=0, atol=1e-12)


def test_subsample_needs_the_full_pass_only_on_statistics_steps():
  loss, params, first, _ = _batches()
  options = dict(combine="multiplicative", coarse_space="nicolaides")
  tx = kfe.two_level_kfac(loss, 0.03, coarse_statistics="subsample",
                          coarse_batch=N, stats_every=3, inverse_every=3, **options)
  assert not train_step.schedule_of(tx).statistics_every_step
  step = kfe.make_train_step(loss, tx, donate=False)
  state = tx.init(params)
  losses = []
  for i in range(7):      # sampled Fisher, fused and jitted
    params, state, value = step(params, state, first, jax.random.PRNGKey(i), i)
    losses.append(float(value))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  two_level = next(s for s in state if hasattr(s, "coarse_inverse"))
  assert int(two_level.health.failed_inverses) == 0


def test_subsample_errors_are_named():
  loss, params, first, _ = _batches()
  with pytest.raises(ValueError, match="pass coarse_batch"):
    kfe.scale_by_two_level_kfac(loss, combine="multiplicative",
                                coarse_statistics="subsample")
  tx = kfe.scale_by_two_level_kfac(loss, combine="multiplicative",
                                   coarse_statistics="subsample", coarse_batch=N)
  with pytest.raises(ValueError, match="draws its targets: pass key"):
    tx.update(jax.grad(loss)(params, first), tx.init(params), params, batch=first,
              due=kfe.Due(statistics=False, inverses=False))


def test_under_pmap_each_device_takes_its_own_first_rows():
  """Each device's own pass covers its first ``coarse_batch`` rows (targets
  by global index of the sub-batch): equal to one device whose statistics
  are those rows' (2 of 4 per device), with the whole batch's gradient."""
  loss, params, batch = _mlp_task(batch_size=32)
  options = dict(damping=0.1, combine="multiplicative", coarse_space="nicolaides")
  grads = jax.grad(loss)(params, batch)
  key, due = jax.random.PRNGKey(3), kfe.Due(statistics=False, inverses=False)
  reference = kfe.scale_by_two_level_kfac(loss, **options)

  def one_device(statistics_batch):
    curvature = kfe.value_and_grad(loss)(params, statistics_batch, key)[2]
    return reference.update(grads, reference.init(params), params,
                            batch=statistics_batch, key=key, curvature=curvature,
                            due=due)[0]

  chosen = jax.tree_util.tree_map(
      lambda x: _split(x)[:, :2].reshape((16,) + x.shape[1:]), batch)
  tx = kfe.scale_by_two_level_kfac(loss, coarse_statistics="subsample",
                                   coarse_batch=2, axis_name=AXIS, **options)
  got = jax.pmap(lambda b: tx.update(grads, tx.init(params), params, batch=b,
                                     key=key, due=due)[0], axis_name=AXIS)(
                                         _split(batch))
  got = _flat(jax.tree_util.tree_map(lambda x: np.asarray(x)[0], got))
  want = _flat(one_device(chosen))
  scale = float(jnp.max(jnp.abs(want)))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * scale)
  # all four rows per device give another step: the test can fail
  assert float(jnp.max(jnp.abs(_flat(one_device(batch)) - want))) > 1e-3 * scale
