"""``kfe.make_train_step``: the one-pass, static-schedule, donated step.

It must give the same parameters and state as the plain optax usage
(``jax.grad`` then ``update(..., batch=, key=)`` with the counters'
schedule), float64, and it must read the schedule from the alias.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_ext as kfe


# The float64 flax problem of the static-schedule tests (conv + dense layers).
from test_static_schedule import _problem  # noqa: E402


METHODS = {
    "kfac": lambda f, b: kfe.kfac(f, 0.1, damping=1e-2, stats_every=2,
                                  inverse_every=3, kl_clip=1e-2, example_batch=b),
    "tengrad": lambda f, b: kfe.tengrad(f, 0.1, damping=1e-1, stats_every=2,
                                        inverse_every=2, gram_batch=8),
    # reads the batch statistics on every step, whatever stats_every
    "two_level_multiplicative": lambda f, b: kfe.two_level_kfac(
        f, 0.1, damping=1e-2, stats_every=2, inverse_every=3,
        combine="multiplicative"),
    "kfac_adaptive": lambda f, b: kfe.kfac(
        f, "adaptive", momentum="adaptive", damping=1e-1, stats_every=2,
        inverse_every=3, damping_adaptation=True, damping_adaptation_interval=2),
}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_train_step_equals_the_plain_optax_usage(method):
  params, loss_fn, batches = _problem()
  opt = METHODS[method](loss_fn, batches[0])
  step = kfe.make_train_step(loss_fn, opt)
  plain_update = jax.jit(opt.update)
  key = jax.random.PRNGKey(7)
  fused = (jax.tree_util.tree_map(jnp.copy, params), opt.init(params))
  plain = (params, opt.init(params))
  for i in range(4):
    batch = batches[i % 3]
    p, s, loss = step(*fused, batch, key, i)
    fused = (p, s)
    plain_loss, grads = jax.value_and_grad(loss_fn)(plain[0], batch)
    updates, state = plain_update(grads, plain[1], plain[0], batch=batch,
                                  key=jax.random.fold_in(key, i))
    plain = (optax.apply_updates(plain[0], updates), state)
    np.testing.assert_allclose(loss, plain_loss, rtol=1e-12)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(fused),
                            jax.tree_util.tree_leaves(plain)):
      np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12,
                                 err_msg=f"{method} step {i} {jax.tree_util.keystr(path)}")
  moved = jax.tree_util.tree_leaves(fused[0])[0] - jax.tree_util.tree_leaves(params)[0]
  assert float(jnp.abs(moved).max()) > 1e-3


def test_train_step_reads_the_schedule_and_donates():
  params, loss_fn, batches = _problem()
  opt = kfe.kfac(loss_fn, 0.1, damping=1e-2, stats_every=3, inverse_every=6)
  step = kfe.make_train_step(loss_fn, opt)
  assert step.schedule.stats_every == 3 and step.schedule.inverse_every == 6
  adaptive = kfe.kfac(loss_fn, "adaptive", damping=1.0, damping_adaptation=True,
                      damping_adaptation_interval=4)
  assert kfe.make_train_step(loss_fn, adaptive).schedule.damping_every == 4
  state = opt.init(params)
  first = jax.tree_util.tree_leaves(params)[0]
  new_params, state, loss = step(params, state, batches[0], jax.random.PRNGKey(0), 0)
  assert first.is_deleted()          # donated: the caller keeps the returned arrays
  assert np.isfinite(float(loss)) and int(state[0].count) == 1
  # TENGraD takes statistics only with its refreshes: stats_every=1 (its
  # default) means "with every refresh", so the schedule follows inverse_every.
  tengrad = kfe.tengrad(loss_fn, 0.1, damping=0.1, inverse_every=3, gram_batch=8)
  tengrad_step = kfe.make_train_step(loss_fn, tengrad)
  assert tengrad_step.schedule.stats_every == 3
  t_params, t_state = jax.tree_util.tree_map(jnp.copy, new_params), tengrad.init(
      new_params)
  for i in range(4):
    t_params, t_state, _ = tengrad_step(t_params, t_state, batches[i % 3],
                                        jax.random.PRNGKey(0), i)
  kept = kfe.make_train_step(loss_fn, opt, donate=False)
  before = jax.tree_util.tree_leaves(new_params)[0]
  kept(new_params, state, batches[1], jax.random.PRNGKey(0), 1)
  assert not before.is_deleted()


def test_train_step_refresh_warmup_refreshes_every_early_step():
  """``refresh_warmup=3``: updates 0, 1, 2 take statistics and refresh the
  inverses (periods 2 and 3 alone would skip update 1), and the step equals
  ``update(..., due=kfe.due_at(i, ..., refresh_warmup=3))``."""
  params, loss_fn, batches = _problem()
  opt = kfe.kfac(loss_fn, 0.1, damping=1e-2, stats_every=2, inverse_every=3)
  key = jax.random.PRNGKey(3)
  runs = {}
  for warmup in (0, 3):
    step = kfe.make_train_step(loss_fn, opt, refresh_warmup=warmup, donate=False)
    assert step.refresh_warmup == warmup
    fused, plain, inverses = (params, opt.init(params)), (params, opt.init(params)), []
    for i in range(4):
      p, s, _ = step(*fused, batches[i % 3], key, i)
      fused = (p, s)
      inverses.append(jax.tree_util.tree_leaves(s[0].inverses))
      due = kfe.due_at(i, stats_every=2, inverse_every=3, refresh_warmup=warmup)
      grads = jax.grad(loss_fn)(plain[0], batches[i % 3])
      updates, state = opt.update(grads, plain[1], plain[0], batch=batches[i % 3],
                                  key=jax.random.fold_in(key, i), due=due)
      plain = (optax.apply_updates(plain[0], updates), state)
    for x, y in zip(jax.tree_util.tree_leaves(fused), jax.tree_util.tree_leaves(plain)):
      np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12)
    runs[warmup] = (int(fused[1][0].statistics_count), inverses)
  assert runs[0][0] == 2 and runs[3][0] == 3     # statistics at 0, 2 / 0, 1, 2
  moved = lambda inv, a, b: max(float(jnp.abs(x - y).max())
                                for x, y in zip(inv[a], inv[b]))
  assert moved(runs[0][1], 0, 1) == 0.0          # update 1 keeps update 0's inverses
  assert moved(runs[3][1], 0, 1) > 1e-6          # the warm-up refreshed them
  with pytest.raises(ValueError, match="refresh_warmup must be >= 0"):
    kfe.make_train_step(loss_fn, opt, refresh_warmup=-2)


def test_train_step_with_a_hand_built_chain_needs_the_schedule():
  params, loss_fn, batches = _problem()
  chain = optax.chain(kfe.scale_by_kfac(loss_fn, damping=1e-2, stats_every=2,
                                        inverse_every=2), optax.sgd(0.1))
  with pytest.raises(ValueError, match="pass stats_every= and inverse_every="):
    kfe.make_train_step(loss_fn, chain)
  step = kfe.make_train_step(loss_fn, chain, stats_every=2, inverse_every=2)
  state = chain.init(params)
  for i in range(3):
    params, state, loss = step(params, state, batches[i], jax.random.PRNGKey(0), i)
  assert np.isfinite(float(loss)) and int(state[0].statistics_count) == 2


def test_train_step_bad_input_is_a_clear_error():
  params, loss_fn, batches = _problem()
  opt = kfe.kfac(loss_fn, 0.1, stats_every=2)
  with pytest.raises(ValueError, match=r"contradicts the optimizer's stats_every=5"):
    kfe.make_train_step(loss_fn, opt, stats_every=5)
  pmapped = kfe.kfac(loss_fn, 0.1, axis_name="data")
  with pytest.raises(ValueError, match="axis_name='data'"):
    kfe.make_train_step(loss_fn, pmapped)
  step = kfe.make_train_step(loss_fn, opt)
  with pytest.raises(TypeError, match="Python int"):
    step(params, opt.init(params), batches[0], jax.random.PRNGKey(0), jnp.asarray(0))
