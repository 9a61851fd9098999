"""optax contract, fused statistics path, dtypes, bad input and failures."""

import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_ext as kfe
from tests import oracles


def _setup(dtype=jnp.float64, n=8):
  params = jax.tree_util.tree_map(lambda t: t.astype(dtype),
                                  oracles.mlp_init(jax.random.PRNGKey(0), [4, 6, 3]))
  batch = {"x": jax.random.normal(jax.random.PRNGKey(1), (n, 4), dtype),
           "y": jnp.arange(n) % 3}
  loss_fn = lambda p, b: kfe.softmax_cross_entropy(oracles.mlp_apply(p, b["x"]), b["y"])
  return params, batch, loss_fn


def test_inside_chain_ignores_unknown_extra_args_and_does_not_retrace():
  params, batch, loss_fn = _setup()
  tx = optax.chain(kfe.scale_by_kfac(loss_fn, damping=1e-2), optax.sgd(0.1, 0.9))
  state = tx.init(params)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state, key):
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch, key=key,
                               something_unknown=3)
    return optax.apply_updates(params, updates), state

  p1, s1 = step(params, state, jax.random.PRNGKey(0))
  p2, s2 = step(p1, s1, jax.random.PRNGKey(1))
  assert int(s2[0].count) == 2
  assert loss_fn(p2, batch) < loss_fn(params, batch)


def test_inject_hyperparams_and_multisteps():
  params, batch, loss_fn = _setup()
  grads = jax.grad(loss_fn)(params, batch)
  key = jax.random.PRNGKey(0)
  opt = optax.inject_hyperparams(kfe.kfac, static_args=("loss_fn",))(
      loss_fn=loss_fn, learning_rate=0.1, damping=1e-2)
  state = opt.init(params)
  u1, state = jax.jit(lambda s: opt.update(grads, s, params, batch=batch, key=key))(state)
  state.hyperparams["learning_rate"] = jnp.asarray(0.2)
  u2, _ = opt.update(grads, state, params, batch=batch, key=key)
  assert np.all(np.isfinite(jax.tree_util.tree_leaves(u2)[0]))
  ref = kfe.kfac(loss_fn, 0.1, damping=1e-2)
  r1, _ = ref.update(grads, ref.init(params), params, batch=batch, key=key)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10), u1, r1)

  multi = optax.MultiSteps(kfe.kfac(loss_fn, 0.1, damping=1e-2), every_k_schedule=2)
  ms = multi.init(params)
  step = jax.jit(lambda s, k: multi.update(grads, s, params, batch=batch, key=k))
  u, ms = step(ms, key)
  assert all(float(jnp.abs(l).max()) == 0 for l in jax.tree_util.tree_leaves(u))
  u, ms = step(ms, key)
  assert any(float(jnp.abs(l).max()) > 0 for l in jax.tree_util.tree_leaves(u))


def test_state_layout_is_stable_under_cond():
  params, batch, loss_fn = _setup()
  tx = kfe.scale_by_kfac(loss_fn, stats_every=2, inverse_every=3)
  state = tx.init(params)
  grads = jax.grad(loss_fn)(params, batch)

  @jax.jit
  def maybe(state, pred, key):
    return jax.lax.cond(pred, lambda s: tx.update(grads, s, params, batch=batch,
                                                  key=key)[1], lambda s: s, state)

  for i in range(4):
    state = maybe(state, i % 2 == 0, jax.random.PRNGKey(i))
  assert int(state.count) == 2
  chex.assert_trees_all_equal_shapes_and_dtypes(state, tx.init(params))


def test_update_dtypes_follow_gradients_bf16():
  params, batch, loss_fn = _setup(jnp.bfloat16)
  tx = kfe.scale_by_kfac(loss_fn, damping=1e-2)
  grads = jax.grad(loss_fn)(params, batch)
  updates, state = jax.jit(lambda g: tx.update(g, tx.init(params), params, batch=batch,
                                               key=jax.random.PRNGKey(0)))(grads)
  assert {l.dtype for l in jax.tree_util.tree_leaves(updates)} == {jnp.dtype(jnp.bfloat16)}
  assert all(np.isfinite(np.asarray(l, np.float32)).all()
             for l in jax.tree_util.tree_leaves(updates))
  # x64 is on in this process: factors are float64 whatever the model dtype.
  assert state.factors[1].rows.dtype == jnp.float64


def test_float32_factors_for_bf16_model_without_x64():
  script = textwrap.dedent("""
      import jax, jax.numpy as jnp, kfac_jax_ext as kfe
      assert not jax.config.jax_enable_x64
      p = {"w": jnp.ones((4, 3), jnp.bfloat16), "b": jnp.zeros(3, jnp.bfloat16)}
      b = {"x": jnp.ones((5, 4), jnp.bfloat16), "y": jnp.zeros(5, jnp.int32)}
      f = lambda p, b: kfe.softmax_cross_entropy(b["x"] @ p["w"] + p["b"], b["y"])
      tx = kfe.scale_by_kfac(f)
      u, s = tx.update(jax.grad(f)(p, b), tx.init(p), p, batch=b, key=jax.random.PRNGKey(0))
      assert s.factors[1].rows.dtype == jnp.float32, s.factors[1].rows.dtype
      assert s.inverses[1].rows.dtype == jnp.float32
      assert u["w"].dtype == jnp.bfloat16
      print("ok")
  """)
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"} |
                       {k: v for k, v in __import__("os").environ.items()
                        if k != "JAX_ENABLE_X64"})
  assert out.stdout.strip() == "ok", out.stderr


def test_fused_value_and_grad_matches_separate_update():
  params, batch, loss_fn = _setup()
  key = jax.random.PRNGKey(3)
  tx = kfe.scale_by_kfac(loss_fn, damping=1e-2, stats_every=2)
  state = tx.init(params)
  vg = kfe.value_and_grad(loss_fn)
  for i in range(3):
    k = jax.random.fold_in(key, i)
    loss, grads, curv = jax.jit(lambda p, s: vg(p, batch, k, opt_state=s))(params, state)
    np.testing.assert_allclose(loss, loss_fn(params, batch), rtol=1e-12)
    fused, s_fused = tx.update(grads, state, params, batch=batch, key=k, curvature=curv)
    plain, s_plain = tx.update(jax.grad(loss_fn)(params, batch), state, params,
                               batch=batch, key=k)
    chex.assert_trees_all_close(fused, plain, rtol=1e-10)
    chex.assert_trees_all_close(s_fused, s_plain, rtol=1e-10)
    state = s_plain
  assert int(state.statistics_count) == 2


def test_bad_input_errors_name_the_problem():
  params, batch, loss_fn = _setup()
  tx = kfe.scale_by_kfac(loss_fn)
  state = tx.init(params)
  grads = jax.grad(loss_fn)(params, batch)
  with pytest.raises(ValueError, match="batch"):
    tx.update(grads, state, params, key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="params"):
    tx.update(grads, state, batch=batch, key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="key"):
    tx.update(grads, state, params, batch=batch)
  bad = {"x": jnp.ones((8, 5)), "y": batch["y"]}
  with pytest.raises(TypeError, match="batch of shapes"):
    tx.update(grads, state, params, batch=bad, key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="inconsistent with predictions"):
    tx.update(grads, state, params, batch={"x": batch["x"], "y": jnp.zeros((8, 2))},
              key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="damping_mode"):
    kfe.scale_by_kfac(loss_fn, damping_mode="eigen")
  with pytest.raises(ValueError, match="stats_every"):
    kfe.scale_by_kfac(loss_fn, stats_every=0)
  vg = kfe.value_and_grad(loss_fn)
  _, _, curv = vg(params, {"x": jnp.ones((8, 4)), "y": batch["y"]}, jax.random.PRNGKey(0))
  wrong = curv._replace(layers=curv.layers[:1])
  with pytest.raises(ValueError, match="CurvatureBatch"):
    tx.update(grads, state, params, batch=batch, key=jax.random.PRNGKey(0),
              curvature=wrong)


def test_nonfinite_statistics_are_skipped_and_counted():
  params, batch, loss_fn = _setup()
  tx = kfe.scale_by_kfac(loss_fn, damping=1e-2, inverse_every=1)
  grads = jax.grad(loss_fn)(params, batch)
  step = jax.jit(lambda s, b: tx.update(grads, s, params, batch=b,
                                        key=jax.random.PRNGKey(0)))
  _, good = step(tx.init(params), batch)
  bad_batch = {"x": batch["x"].at[0, 0].set(jnp.nan), "y": batch["y"]}
  updates, after = step(good, bad_batch)
  assert int(after.health.nonfinite_statistics) == 1
  assert int(after.statistics_count) == 1
  chex.assert_trees_all_equal((after.factors, after.inverses, after.diagonals),
                              (good.factors, good.inverses, good.diagonals))
  assert all(np.isfinite(l).all() for l in jax.tree_util.tree_leaves(updates))


def test_failed_inverse_refresh_keeps_previous_inverse():
  params, batch, loss_fn = _setup()
  tx = kfe.scale_by_kfac(loss_fn, damping=1e-2, inverse_every=1, stats_every=100,
                         damping_mode="tikhonov")
  grads = jax.grad(loss_fn)(params, batch)
  step = jax.jit(lambda s: tx.update(grads, s, params, batch=batch,
                                     key=jax.random.PRNGKey(0)))
  _, good = step(tx.init(params))
  corrupt = list(good.factors)
  corrupt[1] = corrupt[1]._replace(rows=corrupt[1].rows.at[0, 0].set(jnp.inf))
  updates, after = step(good._replace(factors=tuple(corrupt)))
  assert int(after.health.failed_inverses) == 1
  chex.assert_trees_all_equal(after.inverses[1], good.inverses[1])
  chex.assert_trees_all_close(after.inverses[3], good.inverses[3])
  assert all(np.isfinite(l).all() for l in jax.tree_util.tree_leaves(updates))


def test_damping_and_learning_rate_schedules():
  params, batch, loss_fn = _setup()
  damping = optax.exponential_decay(1e-1, transition_steps=1, decay_rate=0.5)
  lr = optax.linear_schedule(0.1, 0.0, transition_steps=4)
  opt = kfe.kfac(loss_fn, lr, damping=damping, momentum=0.0, inverse_every=1,
                 damping_mode="tikhonov", fisher="empirical", ema_decay=0.0)
  state = opt.init(params)
  grads = jax.grad(loss_fn)(params, batch)
  step = jax.jit(lambda s: opt.update(grads, s, params, batch=batch))
  for i in range(3):
    updates, state = step(state)
    tx = kfe.scale_by_kfac(loss_fn, damping=float(damping(i)), damping_mode="tikhonov",
                           fisher="empirical", ema_decay=0.0)
    direction, _ = tx.update(grads, tx.init(params), params, batch=batch)
    chex.assert_trees_all_close(
        updates, jax.tree_util.tree_map(lambda d: -float(lr(i)) * d, direction),
        rtol=1e-5, atol=1e-10)   # optax evaluates the schedules in float32;
    # a wrong step would differ by O(1): λ halves and the lr falls each step.


def test_layers_without_a_kronecker_block_fall_back_loudly():
  params, batch, loss_fn = _setup()
  tx = kfe.scale_by_kfac(loss_fn, max_factor_dim=5)   # 4+1 fits, 6+1 does not
  grads = jax.grad(loss_fn)(params, batch)
  with pytest.warns(UserWarning, match="factor larger than max_factor_dim"):
    updates, _ = tx.update(grads, tx.init(params), params, batch=batch,
                           key=jax.random.PRNGKey(0))
  chex.assert_trees_all_equal(updates[1], grads[1])   # identity fallback


_PRECONDITIONERS = {
    "kfac": lambda f, fisher, b: kfe.scale_by_kfac(f, fisher=fisher),
    "tkfac": lambda f, fisher, b: kfe.scale_by_tkfac(f, fisher=fisher),
    "tridiagonal": lambda f, fisher, b: kfe.scale_by_kfac(
        f, fisher=fisher, structure="block_tridiagonal", example_batch=b),
    "tengrad": lambda f, fisher, b: kfe.scale_by_tengrad(
        f, fisher=fisher, example_batch=b),
    "natural_gradient": lambda f, fisher, b: kfe.scale_by_natural_gradient(
        f, fisher=fisher, example_batch=b),
    "two_level": lambda f, fisher, b: kfe.scale_by_two_level_kfac(f, fisher=fisher),
}


@pytest.mark.parametrize("name", sorted(_PRECONDITIONERS))
def test_statistics_of_the_other_fisher_are_refused(name):
  """``value_and_grad``'s ``fisher`` is recorded in the ``CurvatureBatch`` (a
  static field, kept through ``jit``) and every preconditioner refuses
  statistics of the Fisher it was not built with; the matching one is taken
  and gives the update that computing the statistics itself gives."""
  params, batch, loss_fn = _setup()
  key = jax.random.PRNGKey(5)
  tx = _PRECONDITIONERS[name](loss_fn, "empirical", batch)
  state = tx.init(params)
  for fisher in ("sampled", "empirical"):
    vg = jax.jit(kfe.value_and_grad(loss_fn, fisher=fisher))
    _, grads, curv = vg(params, batch, key)
    assert curv.fisher == fisher
    if fisher == "sampled":
      with pytest.raises(ValueError, match=r"sampled Fisher.*fisher='empirical'"):
        tx.update(grads, state, params, batch=batch, key=key, curvature=curv)
      continue
    fused, _ = tx.update(grads, state, params, batch=batch, key=key, curvature=curv)
    plain, _ = tx.update(grads, state, params, batch=batch, key=key)
    chex.assert_trees_all_close(fused, plain, rtol=1e-10)
  with pytest.raises(ValueError, match="fisher must be 'sampled' or 'empirical'"):
    kfe.value_and_grad(loss_fn, fisher="true")


def test_masked_params_from_multi_transform_are_refused_clearly():
  """Inside ``optax.multi_transform`` a transform sees only its own leaves
  (the others ``optax.MaskedNode``): ``loss_fn`` cannot run on them, and the
  error says so instead of failing inside the model."""
  params, batch, loss_fn = _setup()
  labels = jax.tree_util.tree_map(lambda _: "kfac", params)
  labels[0] = jax.tree_util.tree_map(lambda _: "adam", params[0])
  tx = optax.multi_transform(
      {"kfac": kfe.scale_by_kfac(loss_fn, example_batch=batch),
       "adam": optax.adam(1e-3)}, labels)
  with pytest.raises(ValueError, match=r"2 masked leaves .*multi_transform.*"
                     r"loss_fn\(trained, batch\)"):
    tx.init(params)
