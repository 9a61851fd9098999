"""Block-tridiagonal K-FAC (``structure="block_tridiagonal"``) on a 3-layer
MLP in float64: the operator the library applies, assembled column by column,
has a block-tridiagonal inverse that agrees with the damped Kronecker blocks
``Ā_ii ⊗ G_ii`` and the cross blocks ``Ā_{i,i+1} ⊗ G_{i,i+1}`` built here from
the per-example statistics (``oracles``)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_ext as kfe
from kfac_jax_ext import chains, tracing
from tests import oracles

SIZES = [4, 5, 3, 2]
LAMBDA = 0.05


def _task():
  params = oracles.mlp_init(jax.random.PRNGKey(0), SIZES)
  x = jax.random.normal(jax.random.PRNGKey(1), (12, SIZES[0]))
  y = jax.random.randint(jax.random.PRNGKey(2), (12,), 0, SIZES[-1])
  loss = lambda p, b: kfe.softmax_cross_entropy(oracles.mlp_apply(p, b["x"]),
                                                b["y"])
  return params, {"x": x, "y": y}, loss


def _factors(params, batch):
  """Oracle ``Ā_i``, ``G_i`` and cross factors (empirical Fisher)."""
  inputs, _ = oracles.mlp_inputs_and_preacts(params, batch["x"])
  per_example = lambda z, y: -jax.nn.log_softmax(z)[y]
  g = jax.vmap(oracles.mlp_output_grads(params, None, per_example),
               in_axes=(0, 0))(batch["x"], (batch["y"],))
  a = [oracles.homogeneous(x) for x in inputs]
  n = batch["x"].shape[0]
  diag = [(a[i].T @ a[i] / n, g[i].T @ g[i] / n) for i in range(len(a))]
  cross = [(a[i].T @ a[i + 1] / n, g[i].T @ g[i + 1] / n)
           for i in range(len(a) - 1)]
  return diag, cross


def _damped(a, g, lam):
  pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
  return (a + pi * np.sqrt(lam) * np.eye(a.shape[0]),
          g + np.sqrt(lam) / pi * np.eye(g.shape[0]))


def _operator(tx, params, batch):
  """The applied operator in V-space (layer-major, ``V = [w; b]`` row-major)."""
  shapes = [(m + 1, n) for m, n in zip(SIZES, SIZES[1:])]
  sizes = [r * c for r, c in shapes]
  state = tx.init(params)
  update = jax.jit(lambda g: tx.update(g, state, params, batch=batch)[0])
  cols = []
  for k in range(sum(sizes)):
    e = np.zeros(sum(sizes))
    e[k] = 1.0
    grads, start = [], 0
    for (r, c), n in zip(shapes, sizes):
      v = e[start:start + n].reshape(r, c)
      grads.append({"w": jnp.asarray(v[:-1]), "b": jnp.asarray(v[-1])})
      start += n
    out = update(grads)
    cols.append(np.concatenate([np.concatenate([np.asarray(o["w"]),
                                                np.asarray(o["b"])[None]]).ravel()
                                for o in out]))
  return np.stack(cols, axis=1), np.cumsum([0] + sizes)


def _block_diagonal(params, batch, edges):
  """Block-diagonal K-FAC's operator from the oracle factors."""
  want = np.zeros((edges[-1], edges[-1]))
  for i, (a, g) in enumerate(_factors(params, batch)[0]):
    want[edges[i]:edges[i + 1], edges[i]:edges[i + 1]] = np.linalg.inv(
        np.kron(*_damped(a, g, LAMBDA)))
  return want


def _tx(loss, batch, **kw):
  return kfe.scale_by_kfac(loss, damping=LAMBDA, ema_decay=0.0, inverse_every=1,
                           fisher="empirical", example_batch=batch, **kw)


def test_the_chain_is_found_and_described():
  params, batch, loss = _task()
  traced = tracing.trace_loss(loss, params, batch)
  assert chains.find_chains(traced) == ((0, 1, 2),)
  text = kfe.describe_layers(loss, params, batch)
  names = [l.name for l in traced.layers]
  assert "Chains of dense layers" in text
  assert " -> ".join(names) in text


def test_applied_operator_is_the_block_tridiagonal_inverse():
  params, batch, loss = _task()
  op, edges = _operator(_tx(loss, batch, structure="block_tridiagonal"), params,
                        batch)
  block = lambda m, i, j: m[edges[i]:edges[i + 1], edges[j]:edges[j + 1]]
  assert np.abs(block(op, 0, 2)).max() < 1e-12      # tridiagonal inverse
  assert np.abs(block(op, 0, 1)).max() > 1e-3
  approx = np.linalg.inv(op)
  diag, cross = _factors(params, batch)
  for i, (a, g) in enumerate(diag):
    np.testing.assert_allclose(block(approx, i, i), np.kron(*_damped(a, g, LAMBDA)),
                               rtol=1e-8, atol=1e-10)
  for i, (a, g) in enumerate(cross):
    np.testing.assert_allclose(block(approx, i, i + 1), np.kron(a, g), rtol=1e-8,
                               atol=1e-10)


def test_block_diagonal_structure_is_the_default_and_differs():
  params, batch, loss = _task()
  op, edges = _operator(_tx(loss, batch), params, batch)
  np.testing.assert_allclose(op, _block_diagonal(params, batch, edges),
                             rtol=1e-8, atol=1e-10)


class _Flax(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(6)(x))
    x = nn.gelu(nn.Dense(5)(x))       # gelu uses x twice: still elementwise
    return nn.Dense(3)(nn.LayerNorm()(x))   # LayerNorm breaks the chain


def test_flax_chains_stop_at_non_elementwise_ops_and_train():
  model = _Flax()
  x = jax.random.normal(jax.random.PRNGKey(3), (16, 4))
  params = model.init(jax.random.PRNGKey(4), x)
  batch = {"x": x, "y": jnp.arange(16) % 3}
  loss = lambda p, b: kfe.softmax_cross_entropy(model.apply(p, b["x"]), b["y"])
  traced = tracing.trace_loss(loss, params, batch)
  names = [l.name for l in traced.layers]
  found = chains.find_chains(traced)
  assert len(found) == 1 and len(found[0]) == 2, (found, names)
  tx = kfe.kfac(loss, 0.1, damping=0.1, structure="block_tridiagonal",
                example_batch=batch)
  state, p = tx.init(params), params
  step = jax.jit(lambda p, s, k: tx.update(jax.grad(loss)(p, batch), s, p,
                                           batch=batch, key=k))
  for i in range(5):
    u, state = step(p, state, jax.random.PRNGKey(i))
    p = jax.tree_util.tree_map(lambda a, b: a + b, p, u)
  assert loss(p, batch) < loss(params, batch)
  assert int(state[0].health.failed_inverses) == 0


@pytest.mark.parametrize("kwargs,match", [
    ({"damping_mode": "tikhonov"}, "damping_mode='factored'"),
    ({"example_batch": None}, "example_batch"),
    ({"structure": "full"}, "block_diagonal"),
])
def test_bad_structure_options_are_named(kwargs, match):
  _, batch, loss = _task()
  options = {"structure": "block_tridiagonal", "example_batch": batch, **kwargs}
  with pytest.raises(ValueError, match=match):
    kfe.scale_by_kfac(loss, **options)


@pytest.mark.parametrize("runner", ["pmap"])
def test_split_batch_equals_single_device(runner):
  """The cross factors are averaged over the devices like the diagonal ones:
  8 fake devices, float32, a 3-layer flax MLP (one chain)."""
  from tests import test_multi_device as t
  if len(jax.devices()) < t.DEVICES:
    pytest.skip(f"needs {t.DEVICES} devices (run through tests/conftest.py)")
  with jax.enable_x64(False):
    loss, params, batch = t._mlp_task()
    make = lambda **kw: kfe.scale_by_kfac(
        loss, damping=0.1, inverse_every=2, structure="block_tridiagonal",
        example_batch=batch, **kw)
    want, want_state = t._single_device(make(), loss, params, batch)
    run = t._pmapped if runner == "pmap" else t._shard_mapped
    got, got_state = run(make(axis_name=t.AXIS), loss, params, batch)
  assert want_state.links, "no chain found"
  for g, w in zip(got, want):
    t._assert_close(g, w)
  t._assert_close(got_state.cross, want_state.cross, rtol=1e-4)


def test_failed_link_refresh_is_counted_and_falls_back_to_block_diagonal(
    monkeypatch):
  from kfac_jax_ext.blocks import tridiagonal
  real = tridiagonal.link_inverse
  monkeypatch.setattr(tridiagonal, "link_inverse",
                      lambda *args: (real(*args)[0], jnp.array(False)))
  params, batch, loss = _task()
  tx = _tx(loss, batch, structure="block_tridiagonal")
  op, edges = _operator(tx, params, batch)
  np.testing.assert_allclose(op, _block_diagonal(params, batch, edges),
                             rtol=1e-8, atol=1e-10)
  grads = jax.grad(loss)(params, batch)
  _, state = tx.update(grads, tx.init(params), params, batch=batch)
  assert int(state.health.failed_inverses) == 2      # two links


def test_orbax_round_trip_continues_bit_exactly(tmp_path):
  """Cross factors, links and last-layer inverses are arrays in the state:
  saved after 2 steps and restored into a fresh ``init``, training goes on
  exactly as without the interruption."""
  import optax
  import orbax.checkpoint as ocp
  params, batch, loss = _task()
  tx = kfe.kfac(loss, 0.1, damping=0.1, inverse_every=2,
                structure="block_tridiagonal", example_batch=batch)
  step = jax.jit(lambda p, s, k: tx.update(jax.grad(loss)(p, batch), s, p,
                                           batch=batch, key=k))

  def run(p, s, steps):
    for i in steps:
      u, s = step(p, s, jax.random.PRNGKey(i))
      p = optax.apply_updates(p, u)
    return p, s

  want = run(params, tx.init(params), range(4))
  mid = run(params, tx.init(params), range(2))
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save((tmp_path / "c").absolute(), mid)
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, mid)
    restored = ckpt.restore((tmp_path / "c").absolute(), abstract)
  got = run(*restored, range(2, 4))
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(g, w)
