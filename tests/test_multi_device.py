"""Multi-device curvature on 8 fake CPU devices (``tests/conftest.py`` sets
``--xla_force_host_platform_device_count=8`` before jax initialises).

For every method: the update under ``pmap`` / ``shard_map`` (``axis_name``)
and under ``jit`` over a ``Mesh`` (no ``axis_name``) with the batch split 8
ways equals the single-device update on the whole batch, in float32 to 1e-5
relative, over steps that refresh and reuse the inverses; every device ends
with the same state; each block's inverse is computed by its owner only.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import kfac_jax_ext as kfe
from kfac_jax_ext import distributed
from kfac_jax_ext.blocks import kronecker

DEVICES = 8
AXIS = "batch"
STEPS = 3       # inverse_every=2: refresh, reuse, refresh


@pytest.fixture(autouse=True)
def float32():
  if len(jax.devices()) < DEVICES:
    pytest.skip(f"needs {DEVICES} devices (run through tests/conftest.py)")
  with jax.enable_x64(False):
    yield


class SmallCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(4, (3, 3), padding="SAME")(x))
    x = jnp.tanh(nn.Conv(4, (3, 3), strides=2)(x))
    x = nn.LayerNorm()(x.reshape(x.shape[0], -1))
    return nn.Dense(3)(x)


def _cnn_task(batch_size=16):
  model = SmallCNN()
  x = jax.random.normal(jax.random.PRNGKey(1), (batch_size, 6, 6, 2))
  y = jax.random.randint(jax.random.PRNGKey(2), (batch_size,), 0, 3)
  params = model.init(jax.random.PRNGKey(0), x[:1])
  loss = lambda p, b: kfe.softmax_cross_entropy(model.apply(p, b["x"]), b["y"])
  return loss, params, {"x": x, "y": y}


def _mlp_task(batch_size=16):
  model = nn.Sequential([nn.Dense(6), jnp.tanh, nn.Dense(5), jnp.tanh,
                         nn.Dense(3)])
  x = jax.random.normal(jax.random.PRNGKey(3), (batch_size, 4))
  y = jax.random.randint(jax.random.PRNGKey(4), (batch_size,), 0, 3)
  params = model.init(jax.random.PRNGKey(0), x[:1])
  loss = lambda p, b: kfe.softmax_cross_entropy(model.apply(p, b["x"]), b["y"])
  return loss, params, {"x": x, "y": y}


METHODS = {
    "kfac": lambda loss, **kw: kfe.scale_by_kfac(
        loss, damping=0.1, inverse_every=2, fallback="diagonal", **kw),
    "tkfac": lambda loss, **kw: kfe.scale_by_tkfac(
        loss, damping=0.1, inverse_every=2, damping_mode="tikhonov", **kw),
    "tengrad": lambda loss, **kw: kfe.scale_by_tengrad(
        loss, damping=0.1, inverse_every=2, gram_batch=16, **kw),
    "two_level_additive": lambda loss, **kw: kfe.scale_by_two_level_kfac(
        loss, damping=0.1, inverse_every=2, coarse_space="spectral", **kw),
    "two_level_spectral_iterated": lambda loss, **kw: kfe.scale_by_two_level_kfac(
        loss, damping=0.1, inverse_every=2, coarse_space="spectral",
        combine="balanced", spectral_iterations=2, **kw),
    "two_level_krylov_factored": lambda loss, **kw: kfe.scale_by_two_level_kfac(
        loss, damping=0.1, inverse_every=2, coarse_space="krylov_nicolaides",
        combine="multiplicative", **kw),
    "two_level_multiplicative": lambda loss, **kw: kfe.scale_by_two_level_kfac(
        loss, damping=0.1, inverse_every=2, combine="multiplicative",
        coarse_matrix="exact", **kw),
    "two_level_kronecker_products": lambda loss, **kw: kfe.scale_by_two_level_kfac(
        loss, damping=0.1, inverse_every=2, stats_every=2, combine="balanced",
        coarse_space="krylov_nicolaides", fisher_products="kronecker", **kw),
    "two_level_residual_kronecker": lambda loss, **kw: kfe.scale_by_two_level_kfac(
        loss, damping=0.1, inverse_every=2, stats_every=2, combine="multiplicative",
        coarse_space="krylov_residual", residual_refresh="statistics",
        fisher_products="kronecker", **kw),
    "two_level_residual_refreshed": lambda loss, **kw: kfe.scale_by_two_level_kfac(
        loss, damping=0.1, inverse_every=2, stats_every=2, coarse_space="residual",
        residual_refresh="statistics", **kw),
}


def _split(batch):
  return jax.tree_util.tree_map(
      lambda x: x.reshape((DEVICES, -1) + x.shape[1:]), batch)


@functools.lru_cache(maxsize=None)
def _reference(method):
  """One device, the whole batch (computed once per method)."""
  loss, params, batch = _cnn_task()
  return _single_device(METHODS[method](loss), loss, params, batch)


def _single_device(tx, loss, params, batch):
  @jax.jit
  def step(state, key):
    grads = jax.grad(loss)(params, batch)
    return tx.update(grads, state, params, batch=batch, key=key)

  state, out = tx.init(params), []
  for i in range(STEPS):
    updates, state = step(state, jax.random.PRNGKey(10 + i))
    out.append(updates)
  return out, state


def _local_step(tx, loss, params, state, batch, key):
  # Per-device gradients (shard_map would otherwise sum the gradient of the
  # replicated params), then the mean, as a data-parallel user does.
  local = jax.grad(loss)(jax.lax.pcast(params, AXIS, to="varying"), batch)
  grads = jax.lax.pmean(local, AXIS)
  return tx.update(grads, state, params, batch=batch, key=key)


def _pmapped(tx, loss, params, batch):
  step = jax.pmap(functools.partial(_local_step, tx, loss), axis_name=AXIS,
                  in_axes=(None, None, 0, None))
  state, out = tx.init(params), []
  for i in range(STEPS):
    updates, states = step(params, state, _split(batch), jax.random.PRNGKey(10 + i))
    # Copied to the host first: eager jax ops (``x[0]``) on the pmapped
    # outputs aborted an xdist worker about once in five suite runs (inside
    # XLA:CPU's dispatch of a one-op program over the 8 devices), and the
    # test only needs the values.
    updates, states = jax.tree_util.tree_map(np.asarray, (updates, states))
    for leaf in jax.tree_util.tree_leaves((updates, states)):  # identical copies
      np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))
    out.append(jax.tree_util.tree_map(lambda x: x[0], updates))
    state = jax.tree_util.tree_map(lambda x: x[0], states)
  return out, state


def _mesh():
  return Mesh(np.array(jax.devices()[:DEVICES]), (AXIS,))


def _shard_mapped(tx, loss, params, batch):
  mesh = _mesh()
  step = jax.jit(jax.shard_map(
      functools.partial(_local_step, tx, loss), mesh=mesh,
      in_specs=(P(), P(), P(AXIS), P()), out_specs=(P(), P())))
  state, out = tx.init(params), []
  for i in range(STEPS):
    updates, state = step(params, state, batch, jax.random.PRNGKey(10 + i))
    out.append(updates)
  return out, state


def _mesh_jitted(tx, loss, params, batch):
  """Global arrays, batch sharded over the mesh, state replicated through
  ``out_shardings`` (``init``'s signature unchanged); no ``axis_name``."""
  mesh = _mesh()
  replicated = NamedSharding(mesh, P())
  batch = jax.device_put(batch, NamedSharding(mesh, P(AXIS)))
  params = jax.device_put(params, replicated)
  state = jax.jit(tx.init, out_shardings=replicated)(params)

  @functools.partial(jax.jit, out_shardings=(replicated, replicated))
  def step(state, key):
    grads = jax.grad(loss)(params, batch)
    return tx.update(grads, state, params, batch=batch, key=key)

  out = []
  for i in range(STEPS):
    updates, state = step(state, jax.random.PRNGKey(10 + i))
    out.append(updates)
  for leaf in jax.tree_util.tree_leaves(state):
    assert leaf.sharding.is_fully_replicated
  return out, state


def _assert_close(got, want, rtol=1e-5):
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    scale = max(np.max(np.abs(w)), 1e-30)
    assert np.max(np.abs(g - w)) <= rtol * scale, (np.max(np.abs(g - w)), scale)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("runner", ["pmap", "shard_map", "mesh_jit"])
def test_split_batch_equals_single_device(method, runner):
  """A flax CNN (convs, LayerNorm, dense) with a batch of 16, 2 per device."""
  loss, params, batch = _cnn_task()
  with jax.enable_x64(False):
    want, want_state = _reference(method)
  if runner == "mesh_jit":
    got, got_state = _mesh_jitted(METHODS[method](loss), loss, params, batch)
  else:
    run = _pmapped if runner == "pmap" else _shard_mapped
    got, got_state = run(METHODS[method](loss, axis_name=AXIS), loss, params,
                         batch)
  for g, w in zip(got, want):
    _assert_close(g, w)
  _assert_close(_comparable(got_state), _comparable(want_state), rtol=1e-4)


@pytest.mark.parametrize("runner", ["pmap", "shard_map", "mesh_jit"])
def test_adaptive_step_split_batch_equals_single_device_float64(runner):
  """The adaptive mode averages its Fisher forms and the loss at θ+δ over the
  devices. In float64: with the same batch every step, d and δ₀ are nearly
  parallel and the 2×2 solve amplifies float32 rounding of the forms (about
  2e-3 relative on the second update), which would hide a wrong reduction."""
  make = lambda loss, **kw: kfe.kfac(
      loss, "adaptive", momentum="adaptive", damping=0.1, inverse_every=2,
      damping_adaptation=True, damping_adaptation_interval=2, **kw)
  with jax.enable_x64(True):
    loss, params, batch = _cnn_task()
    params, batch = jax.tree_util.tree_map(
        lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x,
        (params, batch))
    want, want_state = _single_device(make(loss), loss, params, batch)
    if runner == "mesh_jit":
      got, got_state = _mesh_jitted(make(loss), loss, params, batch)
    else:
      run = _pmapped if runner == "pmap" else _shard_mapped
      got, got_state = run(make(loss, axis_name=AXIS), loss, params, batch)
  for g, w in zip(got, want):
    _assert_close(g, w, rtol=1e-9)
  _assert_close(got_state, want_state, rtol=1e-9)
  assert float(want_state.damping) != 0.1     # λ was adapted


def _comparable(state):
  """The state without eigenvectors and what depends on their arbitrary
  signs (the spectral coarse space's statistics)."""
  if hasattr(state, "base"):
    state = state._replace(base=_comparable(state.base))
    if all(x is None for x in state.spectral):
      return state
    return state._replace(spectral=None, coarse_a=None, coarse_g=None,
                          coarse_inverse=None)
  return state._replace(inverses=None) if hasattr(state, "inverses") else state


def test_natural_gradient_split_batch_equals_single_device():
  """``scale_by_natural_gradient`` under pmap: on this CNN with n = 16 the
  first conv gets a Kronecker block, the second conv and the dense layer
  Woodbury blocks (both sides reduce their statistics over the devices)."""
  loss, params, batch = _cnn_task()
  make = lambda **kw: kfe.scale_by_natural_gradient(
      loss, example_batch=batch, damping=0.1, inverse_every=2, gram_batch=16,
      **kw)
  table = kfe.describe_layers(loss, params, batch, blocks="auto", gram_batch=16)
  assert table.count("woodbury n=16") == 2 and "kronecker 19x4" in table, table
  want, want_state = _single_device(make(), loss, params, batch)
  got, got_state = _pmapped(make(axis_name=AXIS), loss, params, batch)
  for g, w in zip(got, want):
    _assert_close(g, w)
  _assert_close(got_state._replace(kronecker=_comparable(got_state.kronecker)),
                want_state._replace(kronecker=_comparable(want_state.kronecker)),
                rtol=1e-4)


class CrossDeviceBatchNormCNN(nn.Module):
  """BatchNorm in training mode, its statistics over ``axis_name``'s devices
  (flax's examples/imagenet ResNet writes ``axis_name='batch'``)."""
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), padding="SAME")(x)
    x = nn.BatchNorm(use_running_average=False, axis_name=self.axis_name)(x)
    return nn.Dense(3)(jnp.tanh(x).reshape(x.shape[0], -1))


def test_cross_device_batchnorm_is_traced_with_the_axis_name():
  """``example_batch`` and ``describe_layers`` trace the loss outside the
  ``pmap``: the axis its BatchNorm averages over is bound then; without it
  the error says what to pass. The update equals one device's, whose
  BatchNorm sees the whole batch."""
  x = jax.random.normal(jax.random.PRNGKey(1), (16, 6, 6, 2))
  batch = {"x": x, "y": jax.random.randint(jax.random.PRNGKey(2), (16,), 0, 3)}
  variables = CrossDeviceBatchNormCNN().init(jax.random.PRNGKey(0), x)
  params, stats = {"params": variables["params"]}, variables["batch_stats"]

  def loss_of(model):
    def loss(p, b):
      logits, _ = model.apply({**p, "batch_stats": stats}, b["x"],
                              mutable=["batch_stats"])
      return kfe.softmax_cross_entropy(logits, b["y"])
    return loss

  local = jax.tree_util.tree_map(lambda a: a[:2], batch)
  loss = loss_of(CrossDeviceBatchNormCNN(axis_name=AXIS))
  with pytest.raises(NameError, match="pass that axis_name= to the optimizer"):
    kfe.describe_layers(loss, params, local)
  table = kfe.describe_layers(loss, params, local, axis_name=AXIS)
  assert "conv2d           kronecker 19x4" in table, table
  assert "dense            kronecker 145x3" in table, table
  make = lambda loss, b, **kw: kfe.scale_by_kfac(
      loss, damping=0.1, inverse_every=2, example_batch=b, **kw)
  single = loss_of(CrossDeviceBatchNormCNN())
  want, _ = _single_device(make(single, batch), single, params, batch)
  got, _ = _pmapped(make(loss, local, axis_name=AXIS), loss, params, batch)
  for g, w in zip(got, want):
    _assert_close(g, w)

def test_fused_statistics_under_pmap_equal_single_device():
  loss, params, batch = _cnn_task()
  vg = kfe.value_and_grad(loss)
  vg_axis = kfe.value_and_grad(loss, axis_name=AXIS)
  tx = METHODS["kfac"](loss)
  tx_axis = METHODS["kfac"](loss, axis_name=AXIS)
  key = jax.random.PRNGKey(7)

  _, grads, curv = jax.jit(vg)(params, batch, key)
  want, _ = jax.jit(lambda s: tx.update(grads, s, params, batch=batch,
                                         curvature=curv))(tx.init(params))

  def local(b):
    _, g, c = vg_axis(params, b, key)
    g = jax.lax.pmean(g, AXIS)
    return tx_axis.update(g, tx_axis.init(params), params, batch=b,
                          curvature=c)[0]

  got = jax.pmap(local, axis_name=AXIS)(_split(batch))
  _assert_close(jax.tree_util.tree_map(lambda x: x[0], got), want)


def _sequence_task(batch_size=16, length=4):
  """One loss example per position of sequences whose positions mix (a
  causal running mean): TENGraD's first layer takes the sequences as its
  examples (``tengrad_plan.layer_examples``), its head the positions."""
  ks = jax.random.split(jax.random.PRNGKey(5), 4)
  params = {"w": jax.random.normal(ks[0], (3, 5)) / 2,
            "v": jax.random.normal(ks[1], (5, 3)) / 2}
  batch = {"x": jax.random.normal(ks[2], (batch_size, length, 3)),
           "y": jax.random.randint(ks[3], (batch_size, length), 0, 3)}

  def loss(p, b):
    h = jnp.cumsum(jnp.tanh(b["x"] @ p["w"]), axis=1)
    return kfe.softmax_cross_entropy((h @ p["v"]).reshape(-1, 3),
                                     b["y"].reshape(-1))
  return loss, params, batch


@pytest.mark.parametrize("runner", ["pmap", "shard_map"])
def test_tengrad_sequence_blocks_split_batch_equals_single_device(runner):
  loss, params, batch = _sequence_task()
  make = lambda **kw: kfe.scale_by_tengrad(
      loss, damping=0.1, inverse_every=2, gram_batch=64, example_batch=batch,
      **kw)
  want = _single_device(make(), loss, params, batch)
  run = {"pmap": _pmapped, "shard_map": _shard_mapped}[runner]
  got = run(make(axis_name=AXIS), loss, params, batch)
  assert got[1].blocks[1].per_example.shape[0] == 64   # laid out per sequence
  _assert_close(got[0], want[0])


def test_tengrad_gram_batch_subsamples_each_shard():
  """With gram_batch < M, each device contributes its first gram_batch // D
  examples: equal to one device on those examples."""
  loss, params, batch = _mlp_task(batch_size=32)
  make = lambda **kw: kfe.scale_by_tengrad(loss, damping=0.1, gram_batch=16, **kw)
  tx, tx_axis = make(), make(axis_name=AXIS)
  grads = jax.grad(loss)(params, batch)
  chosen = jax.tree_util.tree_map(
      lambda x: _split(x)[:, :2].reshape((16,) + x.shape[1:]), batch)
  key = jax.random.PRNGKey(3)
  # Targets are drawn by global example index: the reference takes the
  # whole batch's statistics restricted to the chosen examples.
  want = tx.update(grads, tx.init(params), params, batch=chosen,
                   curvature=_chosen_curvature(loss, params, batch, key))[0]

  def local(b):
    return tx_axis.update(grads, tx_axis.init(params), params, batch=b, key=key)[0]

  got = jax.pmap(local, axis_name=AXIS)(_split(batch))
  _assert_close(jax.tree_util.tree_map(lambda x: x[0], got), want)


def _chosen_curvature(loss, params, batch, key):
  """Statistics of the whole batch (global-index targets), restricted to the
  first 2 examples of each of the 8 shards."""
  _, _, curv = kfe.value_and_grad(loss)(params, batch, key)
  pick = lambda x: _split(x)[:, :2].reshape((16,) + x.shape[1:])
  layers = tuple(None if s is None else tuple(
      None if x is None else pick(x) for x in s) for s in curv.layers)
  return curv._replace(layers=layers, num_examples=jnp.asarray(16.0))


def test_each_device_computes_only_its_own_blocks(monkeypatch):
  loss, params, batch = _cnn_task()
  calls = []
  original = kronecker.refresh

  def recording_refresh(a, g, damping, mode):
    jax.debug.callback(lambda d, n: calls.append((int(d), int(n))),
                       jax.lax.axis_index(AXIS), a.shape[0] * 1000 + g.shape[0])
    return original(a, g, damping, mode)

  monkeypatch.setattr(kronecker, "refresh", recording_refresh)
  tx = METHODS["kfac"](loss, axis_name=AXIS)
  step = jax.pmap(functools.partial(_local_step, tx, loss), axis_name=AXIS,
                  in_axes=(None, None, 0, None))
  out = step(params, tx.init(params), _split(batch), jax.random.PRNGKey(0))
  jax.block_until_ready(out)
  jax.effects_barrier()

  layers = kfe.find_layers(loss, params, batch)
  dims = [(4 * 3 * 3 + 1, 4) if i else (2 * 3 * 3 + 1, 4) for i in range(2)]
  dims.append((layers[-1].inputs_shape[-1] + 1, 3))
  costs = [a ** 3 + g ** 3 for a, g in dims]
  owners = distributed.assign_owners(costs, DEVICES)
  expected = sorted((o, a * 1000 + g) for o, (a, g) in zip(owners, dims))
  assert sorted(calls) == expected              # once each, on its owner
  assert len({d for d, _ in calls}) == 3        # three devices shared the work


def test_assign_owners_balances_costs():
  assert distributed.assign_owners([8, 1, 1, 6], 2) == (0, 1, 1, 1)
  owners = distributed.assign_owners([5, 5, 5, 5], 4)
  assert sorted(owners) == [0, 1, 2, 3]
  assert distributed.assign_owners([3, 2], 1) == (0, 0)


def test_unbound_axis_name_is_a_clear_error():
  loss, params, batch = _mlp_task()
  tx = METHODS["kfac"](loss, axis_name="nope")
  with pytest.raises(ValueError, match="axis_name='nope' is not bound"):
    tx.update(jax.grad(loss)(params, batch), tx.init(params), params,
              batch=batch, key=jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="axis_name must be a str"):
    kfe.scale_by_kfac(loss, axis_name=3)


def test_tengrad_gram_batch_smaller_than_devices_is_rejected():
  loss, params, batch = _mlp_task()
  tx = kfe.scale_by_tengrad(loss, gram_batch=4, axis_name=AXIS)
  grads = jax.grad(loss)(params, batch)
  with pytest.raises(ValueError, match="gram_batch=4 is smaller than the 8"):
    jax.pmap(lambda b: tx.update(grads, tx.init(params), params, batch=b,
                                 key=jax.random.PRNGKey(0))[0],
             axis_name=AXIS)(_split(batch))


@pytest.mark.parametrize("method,kind", [("kfac", "gpt"), ("tengrad", "gpt"),
                                         ("kfac", "position_mlp")])
def test_embeddings_and_position_tables_under_shard_map(method, kind):
  """A token embedding and a GPT position embedding (``nn.Embed(T, D)`` at
  ``arange(T)``, read per example where it meets the batch), or a position
  MLP on a constant grid, under ``shard_map`` equal one device. Before,
  inside ``shard_map`` the table reached its gather through ``pvary`` and
  fell back, and a table gathered at constant indices failed the statistics
  pass's type check."""
  from tests import test_batch_free_layers as positions   # the same model
  loss, params, batch = positions._task(kind, False)
  batch = jax.tree_util.tree_map(lambda x: jnp.concatenate([x] * 4), batch)
  params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params)
  make = {"kfac": kfe.scale_by_kfac, "tengrad": kfe.scale_by_tengrad}[method]
  tx = lambda **kw: make(loss, damping=0.1, inverse_every=2, **kw)
  local = jax.tree_util.tree_map(lambda x: x[:x.shape[0] // DEVICES], batch)
  want, _ = _single_device(tx(example_batch=batch), loss, params, batch)
  got, _ = _shard_mapped(tx(axis_name=AXIS, example_batch=local), loss, params,
                         batch)
  for g, w in zip(got, want):
    _assert_close(g, w)


def test_a_batch_free_layer_without_per_example_gradients_falls_back_under_shard_map():
  """A position kernel that meets the batch through a product has no
  per-example reading: under ``shard_map`` too its leaf falls back, with
  the reason (before, the statistics pass failed the type check, and with
  that fixed the repeated-output check could not run there and the layer
  kept a block from the gradient summed over the examples)."""
  grid = jnp.linspace(-1.0, 1.0, 5)[:, None]

  def loss(p, b):
    h = b["x"] * (grid @ p["w"])
    return kfe.softmax_cross_entropy(h.mean(1) @ p["head"], b["y"])

  params = {"w": jnp.ones((1, 6)), "head": jnp.ones((6, 3))}
  batch = {"x": jax.random.normal(jax.random.PRNGKey(0), (16, 5, 6)),
           "y": jnp.zeros((16,), jnp.int32)}
  tx = kfe.scale_by_kfac(loss, damping=0.1, axis_name=AXIS)
  with pytest.warns(UserWarning, match="get no curvature block.*the largest: w"):
    _shard_mapped(tx, loss, params, batch)
