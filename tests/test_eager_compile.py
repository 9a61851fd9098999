"""``update`` called outside ``jit`` compiles itself (``kfac_jax_ext.eager``).

On concrete arrays every transform's ``update`` runs ``jax.jit`` of itself:
the same numbers as the unwrapped function, the loss traced once per
argument shapes instead of on every call. Under a trace it adds nothing;
when ``jit`` cannot take the arguments (a string in the batch, a schedule
that branches in Python) it runs eagerly as before.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_ext as kfe


def _problem():
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  params = {"w1": jax.random.normal(k1, (4, 6)) / 2, "b1": jnp.zeros(6),
            "w2": jax.random.normal(k2, (6, 3)) / 2, "b2": jnp.zeros(3)}
  x = jax.random.normal(k3, (16, 4))
  batch = {"x": x, "y": jnp.arange(16) % 3}
  traces = []

  def loss_fn(p, b):
    traces.append(1)                      # counts the Python calls (traces)
    h = jnp.tanh(b["x"] @ p["w1"] + p["b1"])
    logits = (h @ p["w2"] + p["b2"]) / b.get("temperature", 1.0)
    return kfe.softmax_cross_entropy(logits, b["y"])
  return params, batch, loss_fn, traces


TRANSFORMS = {
    "scale_by_kfac": lambda f: kfe.scale_by_kfac(f, damping=1e-2, inverse_every=2),
    "scale_by_tkfac": lambda f: kfe.scale_by_tkfac(f, damping=1e-2, inverse_every=2),
    "scale_by_tengrad": lambda f: kfe.scale_by_tengrad(f, damping=1e-1, gram_batch=8),
    "scale_by_two_level_kfac": lambda f: kfe.scale_by_two_level_kfac(
        f, damping=1e-2, combine="multiplicative"),
    "kfac": lambda f: kfe.kfac(f, 0.1, damping=1e-2, kl_clip=1e-2),
    "kfac_adaptive": lambda f: kfe.kfac(f, "adaptive", momentum="adaptive",
                                        damping=1e-1, damping_adaptation=True),
}


def _three_steps(update, opt, params, batch, traces):
  """Three updates; returns the parameters after each, the last state, and
  how many times each call ran the loss in Python."""
  state, out, per_call = opt.init(params), [], []
  for i in range(3):
    grads = jax.grad(lambda p: kfe.softmax_cross_entropy(
        jnp.tanh(batch["x"] @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"],
        batch["y"]))(params)
    before = len(traces)
    updates, state = update(grads, state, params, batch=batch,
                            key=jax.random.PRNGKey(i))
    per_call.append(len(traces) - before)
    params = optax.apply_updates(params, updates)
    out.append(params)
  return out, state, per_call


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_eager_update_is_compiled_once_and_equals_the_eager_update(name):
  params, batch, loss_fn, traces = _problem()
  opt = TRANSFORMS[name](loss_fn)
  compiled, state_c, _ = _three_steps(opt.update, opt, params, batch, traces)
  # the same three calls again: compiled already, the loss is not traced
  _, _, again = _three_steps(opt.update, opt, params, batch, traces)
  assert again == [0, 0, 0], (name, again)
  # The unwrapped function: operation by operation, tracing the loss on every
  # call. (An alias's unwrapped chain calls its preconditioner's update, which
  # compiles itself: checked on its own by the scale_by_* cases.)
  eager, state_e, per_call = _three_steps(opt.update.eager, opt, params, batch,
                                          traces)
  if name.startswith("scale_by"):
    assert min(per_call) > 0, (name, per_call)
  for x, y in zip(jax.tree_util.tree_leaves((compiled, state_c)),
                  jax.tree_util.tree_leaves((eager, state_e))):
    np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12)


def _jit_names(jaxpr):
  return [e.params.get("name") for e in jaxpr.jaxpr.eqns
          if e.primitive.name in ("pjit", "jit")]


def test_under_a_trace_the_update_is_traced_inline():
  params, batch, loss_fn, _ = _problem()
  opt = kfe.scale_by_kfac(loss_fn, damping=1e-2)
  state, key = opt.init(params), jax.random.PRNGKey(0)
  traced = jax.make_jaxpr(lambda g, s: opt.update(g, s, params, batch=batch,
                                                  key=key))(params, state)
  assert "update_fn" not in _jit_names(traced)   # no nested jit of the wrapper
  # everything closed over is concrete: the wrapper's own jit is called
  closed = jax.make_jaxpr(lambda: opt.update(params, state, params, batch=batch,
                                             key=key))()
  assert "update_fn" in _jit_names(closed)


def test_a_batch_jit_cannot_take_gets_the_librarys_own_error():
  params, batch, loss_fn, _ = _problem()
  opt = kfe.scale_by_kfac(loss_fn, damping=1e-2)
  state = opt.init(params)
  with pytest.raises(TypeError, match=r"tracing loss_fn\(params, batch\) failed"):
    opt.update(params, state, params, batch=dict(batch, mode="train"),
               key=jax.random.PRNGKey(0))


def test_python_numbers_in_the_batch_are_compiled_as_arrays():
  params, batch, loss_fn, traces = _problem()
  opt = kfe.scale_by_kfac(loss_fn, damping=1e-2)
  state = opt.init(params)
  scaled = dict(batch, temperature=2.0)
  out, _ = opt.update(params, state, params, batch=scaled, key=jax.random.PRNGKey(0))
  before = len(traces)
  again, _ = opt.update(params, state, params, batch=dict(batch, temperature=3.0),
                        key=jax.random.PRNGKey(0))
  assert len(traces) == before          # the number is an argument, not a constant
  ref, _ = opt.update.eager(params, state, params, batch=scaled,
                            key=jax.random.PRNGKey(0))
  jax.tree_util.tree_map(np.testing.assert_allclose, out, ref)
  assert not np.allclose(again["w1"], out["w1"])


def test_a_schedule_that_branches_in_python_falls_back_to_eager():
  params, batch, loss_fn, _ = _problem()
  damping = lambda count: 1e-1 if count < 1 else 1e-2    # needs a concrete count
  opt = kfe.scale_by_kfac(loss_fn, damping=damping)
  compiled, _, _ = _three_steps(opt.update, opt, params, batch, [])
  eager, _, _ = _three_steps(opt.update.eager, opt, params, batch, [])
  jax.tree_util.tree_map(np.testing.assert_array_equal, compiled, eager)


def test_a_bad_due_still_gets_the_transforms_own_error():
  params, batch, loss_fn, _ = _problem()
  opt = kfe.scale_by_kfac(loss_fn)
  with pytest.raises(TypeError, match="due must be kfe.Due"):
    opt.update(params, opt.init(params), params, batch=batch,
               key=jax.random.PRNGKey(0), due=[True, True])


INITS = {
    "kfac_laid_out": lambda f, b: kfe.scale_by_kfac(f, example_batch=b),
    "kfac_shapes": lambda f, b: kfe.scale_by_kfac(f, damping_mode="tikhonov"),
    "tengrad": lambda f, b: kfe.scale_by_tengrad(f, gram_batch=8),
    "tengrad_laid_out": lambda f, b: kfe.scale_by_tengrad(f, gram_batch=8,
                                                          example_batch=b),
    "two_level_spectral": lambda f, b: kfe.scale_by_two_level_kfac(
        f, coarse_space="spectral"),
}


@pytest.mark.parametrize("name", sorted(INITS))
def test_init_outside_a_trace_equals_init_under_jit(name):
  """``init`` builds its identities and zeros in numpy outside a trace
  (``initial_arrays``) and with jnp under one: the same state, each array
  its own buffer (the state is donatable)."""
  params, batch, loss_fn, _ = _problem()
  opt = INITS[name](loss_fn, batch)
  host = opt.init(params)
  traced = jax.jit(opt.init)(params)
  for x, y in zip(jax.tree_util.tree_leaves(host), jax.tree_util.tree_leaves(traced),
                  strict=True):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)
  assert any(np.array_equal(x, np.eye(len(x))) for x in jax.tree_util.tree_leaves(host)
             if x.ndim == 2 and x.shape[0] == x.shape[1] and x.shape[0] > 1) or (
      name.startswith("tengrad"))
  pointers = [x.unsafe_buffer_pointer() for x in jax.tree_util.tree_leaves(host)]
  assert len(set(pointers)) == len(pointers)
