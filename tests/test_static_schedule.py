"""Static refresh schedules (``kfe.Due``, ``kfe.due_at``, ``update(..., due=)``).

With ``due`` decided in Python the step compiles without conditionals and
must give the same updates and state as the counter-driven ``lax.cond``
schedule (float64, flax model).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_ext as kfe


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(3, (2, 2), padding="VALID")(x)
    x = jnp.tanh(x).reshape(x.shape[0], -1)
    x = jnp.tanh(nn.Dense(5)(x))
    return nn.Dense(3)(x)


def _problem():
  net = _Net()
  # 40 examples: every factor has full rank, so its eigenvectors are unique
  # up to sign (the spectral coarse space takes the smallest one).
  x = jax.random.normal(jax.random.PRNGKey(1), (40, 4, 4, 1), jnp.float64)
  params = jax.tree_util.tree_map(
      lambda t: t.astype(jnp.float64), net.init(jax.random.PRNGKey(0), x))
  loss_fn = lambda p, b: kfe.softmax_cross_entropy(net.apply(p, b["x"]), b["y"])
  batches = [{"x": x + 0.1 * k, "y": (jnp.arange(40) + k) % 3} for k in range(3)]
  return params, loss_fn, batches


METHODS = {
    "kfac": lambda f: kfe.kfac(f, 0.1, damping=1e-2, stats_every=2, inverse_every=3,
                               kl_clip=1e-2),
    "kfac_tikhonov": lambda f: kfe.kfac(f, 0.1, damping=1e-2, stats_every=2,
                                        inverse_every=3, damping_mode="tikhonov"),
    "tkfac": lambda f: kfe.tkfac(f, 0.1, damping=1e-2, stats_every=2, inverse_every=3),
    "tengrad": lambda f: kfe.tengrad(f, 0.1, damping=1e-1, stats_every=3,
                                     inverse_every=3, gram_batch=8),
    "two_level_additive": lambda f: kfe.two_level_kfac(
        f, 0.1, damping=1e-2, stats_every=2, inverse_every=3),
    "two_level_spectral": lambda f: kfe.two_level_kfac(
        f, 0.1, damping=1e-2, stats_every=2, inverse_every=3, coarse_space="spectral"),
    "two_level_multiplicative": lambda f: kfe.two_level_kfac(
        f, 0.1, damping=1e-2, stats_every=2, inverse_every=3,
        combine="multiplicative"),
    "two_level_krylov": lambda f: kfe.two_level_kfac(
        f, 0.1, damping=1e-2, stats_every=2, inverse_every=3,
        coarse_space="krylov_nicolaides", combine="multiplicative"),
    "kfac_relative": lambda f: kfe.kfac(f, 0.1, damping=1e-2, stats_every=2,
                                        inverse_every=3, damping_scale="relative"),
    "kfac_tridiagonal": lambda f: kfe.kfac(
        f, 0.1, damping=1e-2, stats_every=2, inverse_every=3,
        structure="block_tridiagonal", example_batch=_problem()[2][0]),
    "kfac_adaptive": lambda f: kfe.kfac(
        f, "adaptive", momentum="adaptive", damping=1e-1, stats_every=2,
        inverse_every=3, damping_adaptation=True, damping_adaptation_interval=2),
}
PERIODS = {"tengrad": (3, 3)}
DAMPING_EVERY = {"kfac_adaptive": 2}   # λ adapted on these updates


def _steps(opt, loss_fn):
  vg = kfe.value_and_grad(loss_fn)

  def step(carry, batch, key, due):
    params, state = carry
    loss, grads, curv = vg(params, batch, key, opt_state=state, due=due)
    updates, state = opt.update(grads, state, params, batch=batch, key=key,
                                curvature=curv, due=due)
    return (optax.apply_updates(params, updates), state), loss

  counters = jax.jit(lambda c, b, k: step(c, b, k, None))
  # Donating the carry also checks that no buffer appears twice in the state.
  static = jax.jit(step, static_argnames="due", donate_argnums=0)
  return step, counters, static


@pytest.mark.parametrize("method", sorted(METHODS))
def test_static_due_equals_counter_schedule_and_has_no_conditional(method):
  params, loss_fn, batches = _problem()
  opt = METHODS[method](loss_fn)
  stats_every, inverse_every = PERIODS.get(method, (2, 3))
  step, counters, static = _steps(opt, loss_fn)
  a, b = (params, opt.init(params)), (jax.tree_util.tree_map(jnp.copy, params),
                                       opt.init(params))
  for i in range(5):       # steps 0-3: every (statistics, inverses) combination
    key = jax.random.PRNGKey(10 + i)
    due = kfe.due_at(i, stats_every=stats_every, inverse_every=inverse_every,
                     damping_every=DAMPING_EVERY.get(method))
    a, loss_a = counters(a, batches[i % 3], key)
    b, loss_b = static(b, batches[i % 3], key, due=due)
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-12)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(b),
                            jax.tree_util.tree_leaves(a)):
      where = jax.tree_util.keystr(path)
      if "basis" in where:
        # A generalized eigenbasis of the tridiagonal links: not unique where
        # eigenvalues repeat (Ψ Ā Ψᵀ has rank ≤ d_{i+1}); the operator it
        # defines is, and the parameters above agree.
        continue
      if (method == "kfac_tikhonov" and "inverses" in where and
          not where.endswith("_vals")):
        x, y = np.abs(x), np.abs(y)       # eigenvectors: the sign is the solver's
      np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12)
  assert float(jnp.abs(jax.tree_util.tree_leaves(b[0])[0]
                       - jax.tree_util.tree_leaves(params)[0]).max()) > 0
  adapts = None if method not in DAMPING_EVERY else True
  for due in (kfe.Due(True, True, adapts), kfe.Due(False, False,
                                                   adapts and False)):
    jaxpr = str(jax.make_jaxpr(functools.partial(step, due=due))(
        b, batches[0], jax.random.PRNGKey(0)))
    assert " cond[" not in jaxpr and "while[" not in jaxpr, (method, due)
  assert " cond[" in str(jax.make_jaxpr(lambda c, x, k: step(c, x, k, None))(
      b, batches[0], jax.random.PRNGKey(0)))


def test_due_overrides_the_counters():
  params, loss_fn, batches = _problem()
  opt = kfe.scale_by_kfac(loss_fn, damping=1e-2, stats_every=1, inverse_every=1)
  grads = jax.grad(loss_fn)(params, batches[0])
  state = opt.init(params)
  # Step 0 would refresh everything; due says no: nothing is accumulated and
  # the initial (identity) factors and inverses are kept, so the update is the
  # gradient. No key is needed then.
  out, skipped = opt.update(grads, state, params, batch=batches[0],
                            due=kfe.Due(False, False))
  assert int(skipped.count) == 1 and int(skipped.statistics_count) == 0
  for x, y in zip(jax.tree_util.tree_leaves((skipped.factors, skipped.inverses)),
                  jax.tree_util.tree_leaves((state.factors, state.inverses))):
    np.testing.assert_array_equal(x, y)
  jax.tree_util.tree_map(np.testing.assert_allclose, out, grads)
  # Statistics without an inverse refresh: factors move, inverses do not.
  _, stats_only = opt.update(grads, skipped, params, batch=batches[0],
                             key=jax.random.PRNGKey(0), due=kfe.Due(True, False))
  assert int(stats_only.statistics_count) == 1
  assert any(float(jnp.abs(x - y).max()) > 0 for x, y in zip(
      jax.tree_util.tree_leaves(stats_only.factors),
      jax.tree_util.tree_leaves(state.factors)))
  for x, y in zip(jax.tree_util.tree_leaves(stats_only.inverses),
                  jax.tree_util.tree_leaves(state.inverses)):
    np.testing.assert_array_equal(x, y)
  # Back to the counters: count 2 is due (every 1) and refreshes.
  _, refreshed = opt.update(grads, stats_only, params, batch=batches[0],
                            key=jax.random.PRNGKey(1))
  assert int(refreshed.statistics_count) == 2
  assert any(float(jnp.abs(x - y).max()) > 0 for x, y in zip(
      jax.tree_util.tree_leaves(refreshed.inverses),
      jax.tree_util.tree_leaves(state.inverses)))


def test_value_and_grad_without_statistics_is_the_plain_gradient():
  params, loss_fn, batches = _problem()
  aux_loss = lambda p, b: (loss_fn(p, b), {"n": b["x"].shape[0]})
  for fn, has_aux in ((loss_fn, False), (aux_loss, True)):
    value, grads, curv = kfe.value_and_grad(fn, has_aux=has_aux)(
        params, batches[1], due=kfe.Due(False, True))
    ref_value, ref_grads = jax.value_and_grad(fn, has_aux=has_aux)(params, batches[1])
    assert curv is None
    jax.tree_util.tree_map(np.testing.assert_allclose, (value, grads),
                           (ref_value, ref_grads))
    value, grads, curv = kfe.value_and_grad(fn, has_aux=has_aux)(
        params, batches[1], jax.random.PRNGKey(0), due=kfe.Due(True, False))
    assert isinstance(curv, kfe.CurvatureBatch)
    jax.tree_util.tree_map(np.testing.assert_allclose, grads, ref_grads)


def test_bad_due_is_a_clear_error():
  params, loss_fn, batches = _problem()
  grads = jax.grad(loss_fn)(params, batches[0])
  opt = kfe.scale_by_kfac(loss_fn)
  state = opt.init(params)
  for bad in ((True, True), kfe.Due(np.bool_(True), True), kfe.Due(1, 0)):
    with pytest.raises(TypeError, match="due must be kfe.Due"):
      opt.update(grads, state, params, batch=batches[0], key=jax.random.PRNGKey(0),
                 due=bad)
  with pytest.raises(TypeError, match="due must be kfe.Due"):
    kfe.value_and_grad(loss_fn)(params, batches[0], due=(False, False))
  with pytest.raises(ValueError, match="key"):   # statistics due, no key
    opt.update(grads, state, params, batch=batches[0], due=kfe.Due(True, False))
  tengrad = kfe.scale_by_tengrad(loss_fn, gram_batch=8)
  with pytest.raises(ValueError, match="statistics == inverses"):
    tengrad.update(grads, tengrad.init(params), params, batch=batches[0],
                   key=jax.random.PRNGKey(0), due=kfe.Due(True, False))
  with pytest.raises(TypeError, match="Python int"):
    kfe.due_at(jnp.asarray(3), stats_every=2)
  with pytest.raises(ValueError, match="inverse_every must be >= 1"):
    kfe.due_at(3, inverse_every=0)
  with pytest.raises(ValueError, match="step must be >= 0"):
    kfe.due_at(-1)
  assert kfe.due_at(6, stats_every=2, inverse_every=4) == kfe.Due(True, False)
  assert kfe.due_at(8, stats_every=3, inverse_every=4) == kfe.Due(False, True)
  assert kfe.due_at(10, stats_every=2, inverse_every=4,
                    damping_every=5) == kfe.Due(True, False, True)
  with pytest.raises(ValueError, match="damping_every must be >= 1"):
    kfe.due_at(3, damping_every=0)
  # the warm-up: every update before refresh_warmup refreshes both
  assert [kfe.due_at(i, stats_every=10, inverse_every=5, refresh_warmup=3)
          for i in range(6)] == [kfe.Due(True, True)] * 3 + [
              kfe.Due(False, False), kfe.Due(False, False), kfe.Due(False, True)]
  assert kfe.due_at(1, stats_every=2, inverse_every=2, damping_every=2,
                    refresh_warmup=2) == kfe.Due(True, True, False)
  with pytest.raises(ValueError, match="refresh_warmup must be >= 0"):
    kfe.due_at(0, refresh_warmup=-1)
  with pytest.raises(TypeError, match="refresh_warmup must be a Python int"):
    kfe.due_at(0, refresh_warmup=2.0)
  with pytest.raises(TypeError, match="due must be kfe.Due"):
    opt.update(grads, state, params, batch=batches[0], key=jax.random.PRNGKey(0),
               due=kfe.Due(True, True, 1))
