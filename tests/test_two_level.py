"""Two-level K-FAC against brute force (I12, I13): base limit, Galerkin
orthogonality, R = I, coarse matrices, additive descent."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kfac_jax_ext as kfe
from tests import oracles
from tests.test_tengrad import SmallCNN

LAM = 0.05
EXACT = dict(damping=LAM, fisher="empirical", ema_decay=0.0, inverse_every=1,
             damping_mode="tikhonov")


def _mlp(n=7, sizes=(3, 4, 2), squared=False):
  """An MLP task; ``squared``: Gaussian regression instead of softmax (whose
  last layer has ``1ᵀg = 0``, a vanishing Nicolaides projection)."""
  params = oracles.mlp_init(jax.random.PRNGKey(3), list(sizes))
  x = jax.random.normal(jax.random.PRNGKey(0), (n, sizes[0]), jnp.float64)
  if squared:
    batch = {"x": x, "y": jax.random.normal(jax.random.PRNGKey(1), (n, sizes[-1]),
                                            jnp.float64)}
    loss = lambda p, b: kfe.squared_error(oracles.mlp_apply(p, b["x"]), b["y"])
  else:
    batch = {"x": x, "y": jax.random.randint(jax.random.PRNGKey(1), (n,), 0,
                                             sizes[-1])}
    loss = lambda p, b: kfe.softmax_cross_entropy(oracles.mlp_apply(p, b["x"]),
                                                  b["y"])
  return loss, params, batch


def _cnn(n=5):
  model = SmallCNN()
  x = jax.random.normal(jax.random.PRNGKey(0), (n, 9, 9, 2), jnp.float64)
  params = jax.tree_util.tree_map(lambda p: p.astype(jnp.float64),
                                  model.init(jax.random.PRNGKey(1), x))
  batch = {"x": x, "y": jax.random.randint(jax.random.PRNGKey(2), (n,), 0, 3)}
  loss = lambda p, b: kfe.softmax_cross_entropy(model.apply(p, b["x"]), b["y"])
  return loss, params, batch


def _flat(tree):
  return jnp.concatenate([l.reshape(-1) for l in jax.tree_util.tree_leaves(tree)])


def _brute(loss, params, batch):
  """``(∇, U)``: flat gradient and per-example gradients ``[P, N]``."""
  n = batch["y"].shape[0]
  one = lambda p, b: loss(p, jax.tree_util.tree_map(lambda t: t[None], b))
  per = jax.vmap(jax.grad(one), (None, 0))(params, batch)
  u = jax.vmap(lambda i: _flat(jax.tree_util.tree_map(lambda t: t[i], per)))(
      jnp.arange(n)).T
  return _flat(jax.grad(loss)(params, batch)), u


def _nicolaides_rows(params):
  """``R``: one indicator row per layer (kernel + bias leaves of one module)."""
  paths = [jax.tree_util.keystr(k)
           for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  sizes = [l.size for l in jax.tree_util.tree_leaves(params)]
  owners = [p.rsplit("[", 1)[0] for p in paths]
  start = 0
  layers = list(dict.fromkeys(owners))
  r = np.zeros((len(layers), sum(sizes)))
  for owner, size in zip(owners, sizes):
    r[layers.index(owner), start:start + size] = 1.0
    start += size
  return jnp.asarray(r)


def _direction(loss, params, batch, **options):
  tx = kfe.scale_by_two_level_kfac(loss, **{**EXACT, **options})
  grads = jax.grad(loss)(params, batch)
  out, state = jax.jit(lambda g: tx.update(g, tx.init(params), params,
                                           batch=batch))(grads)
  return _flat(out), state


@pytest.mark.parametrize("base", ["kfac", "tkfac"])
def test_no_coarse_space_is_exactly_the_base_method(base):
  loss, params, batch = _mlp()
  two = kfe.scale_by_two_level_kfac(loss, base=base, coarse_space=None,
                                    damping=LAM, inverse_every=2)
  ref = (kfe.scale_by_kfac if base == "kfac" else kfe.scale_by_tkfac)(
      loss, damping=LAM, inverse_every=2)
  s_two, s_ref = two.init(params), ref.init(params)
  grads = jax.grad(loss)(params, batch)
  for i in range(3):
    key = jax.random.PRNGKey(i)
    u_two, s_two = two.update(grads, s_two, params, batch=batch, key=key)
    u_ref, s_ref = ref.update(grads, s_ref, params, batch=batch, key=key)
    chex.assert_trees_all_equal(u_two, u_ref)
  chex.assert_trees_all_equal(s_two, s_ref)


@pytest.mark.parametrize("task,base", [(_mlp, "kfac"), (_cnn, "kfac"),
                                       (_mlp, "tkfac")],
                         ids=["mlp", "cnn", "mlp-tkfac"])
@pytest.mark.parametrize("combine", ["multiplicative", "balanced"])
def test_galerkin_orthogonality_with_the_exact_coarse_matrix(task, base, combine):
  loss, params, batch = task(squared=True) if task is _mlp else task()
  delta, _ = _direction(loss, params, batch, coarse_matrix="exact",
                        combine=combine, base=base)
  grad, u = _brute(loss, params, batch)
  residual = grad - (u @ u.T / u.shape[1] + LAM * jnp.eye(u.shape[0])) @ delta
  r = _nicolaides_rows(params)
  scale = float(jnp.max(jnp.abs(r @ grad)))
  np.testing.assert_allclose(r @ residual, 0.0, atol=1e-10 * scale)
  assert float(jnp.max(jnp.abs(residual))) > 1e-4 * scale   # not trivially exact


@pytest.mark.parametrize("iterated", [{}, {"spectral_iterations": 1,
                                           "damping_mode": "factored"}],
                         ids=["eigh", "inverse-iteration"])
@pytest.mark.parametrize("combine", ["multiplicative", "balanced"])
def test_galerkin_orthogonality_in_the_spectral_space(combine, iterated):
  """(also with the space from one step of inverse iteration on the
  factored-damped inverses, ``spectral_iterations``)"""
  loss, params, batch = _mlp()
  delta, state = _direction(loss, params, batch, coarse_matrix="exact",
                            combine=combine, coarse_space="spectral", **iterated)
  grad, u = _brute(loss, params, batch)
  residual = grad - (u @ u.T / u.shape[1] + LAM * jnp.eye(u.shape[0])) @ delta
  offset = 0
  for i, layer in enumerate(params):            # flat order: b, w per layer
    rows, cols = state.spectral[2 * i + 1]
    d_in, d_out = layer["w"].shape
    r_mat = jnp.outer(rows[:d_in + 1], cols[:d_out])   # canonical [w; b]
    assert float(jnp.max(jnp.abs(r_mat - 1.0))) > 1e-3  # not Nicolaides
    r_vec = jnp.concatenate([r_mat[d_in], r_mat[:d_in].reshape(-1)])
    seg = residual[offset:offset + r_vec.size]
    assert abs(float(r_vec @ seg)) < 1e-10 * float(jnp.max(jnp.abs(grad)))
    offset += r_vec.size


@pytest.mark.parametrize("combine", ["multiplicative", "balanced"])
def test_one_vector_per_parameter_gives_the_exact_natural_gradient(combine):
  loss, params, batch = _mlp()
  delta, _ = _direction(loss, params, batch, coarse_matrix="exact",
                        combine=combine, coarse_space="parameters")
  grad, u = _brute(loss, params, batch)
  exact = jnp.linalg.solve(u @ u.T / u.shape[1] + LAM * jnp.eye(u.shape[0]), grad)
  np.testing.assert_allclose(delta, exact, rtol=0,
                             atol=1e-10 * float(jnp.max(jnp.abs(exact))))


@pytest.mark.parametrize("task", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_exact_coarse_matrix_equals_brute_force(task):
  loss, params, batch = task(squared=True) if task is _mlp else task()
  _, state = _direction(loss, params, batch, coarse_matrix="exact")
  _, u = _brute(loss, params, batch)
  r = _nicolaides_rows(params)
  expected = r @ (u @ u.T / u.shape[1]) @ r.T
  layers = r.shape[0]
  # (softmax outputs: 1ᵀg = 0, so the last layer's entries vanish)
  np.testing.assert_allclose((state.coarse_a * state.coarse_g)[:layers, :layers],
                             expected, rtol=1e-10,
                             atol=1e-12 * float(jnp.max(jnp.abs(expected))))


def test_kronecker_coarse_matrix_single_example_and_diagonal():
  loss, params, batch = _mlp(n=1, sizes=(3, 4, 4, 2), squared=True)
  _, state = _direction(loss, params, batch, coarse_matrix="kronecker")
  _, u = _brute(loss, params, batch)
  r = _nicolaides_rows(params)
  expected = r @ (u @ u.T) @ r.T                # N = 1: 1ᵀF_ij1 exactly
  np.testing.assert_allclose((state.coarse_a * state.coarse_g)[:3, :3], expected,
                             rtol=1e-10)
  loss, params, batch = _mlp(n=9, squared=True)  # diagonal: sum(A_i)·sum(G_i)
  _, state = _direction(loss, params, batch, coarse_matrix="kronecker")
  fc = state.coarse_a * state.coarse_g
  for i, leaf in enumerate((1, 3)):
    factors = state.base.factors[leaf]
    d_in, d_out = jax.tree_util.tree_leaves(params)[leaf].shape
    a = factors.rows[:d_in + 1, :d_in + 1]
    g = factors.cols[:d_out, :d_out]
    np.testing.assert_allclose(fc[i, i], jnp.sum(a) * jnp.sum(g), rtol=1e-10)


@pytest.mark.parametrize("matrix", ["kronecker", "exact"])
@pytest.mark.parametrize("task", [_mlp, _cnn], ids=["mlp", "cnn"])
def test_additive_direction_is_a_descent_direction(task, matrix):
  loss, params, batch = task()
  tx = kfe.scale_by_two_level_kfac(loss, coarse_matrix=matrix, damping=LAM)
  grads = jax.grad(loss)(params, batch)
  for seed in range(3):
    out, _ = tx.update(grads, tx.init(params), params, batch=batch,
                       key=jax.random.PRNGKey(seed))
    assert float(_flat(out) @ _flat(grads)) > 0


def test_optimizer_trains_and_rejects_bad_options():
  loss, params, batch = _mlp(n=16)
  opt = kfe.two_level_kfac(loss, 0.1, damping=0.05, combine="balanced",
                           coarse_matrix="exact", kl_clip=1e-2)
  state = opt.init(params)

  @jax.jit
  def step(p, s, k):
    updates, s = opt.update(jax.grad(loss)(p, batch), s, p, batch=batch, key=k)
    return optax.apply_updates(p, updates), s

  start = loss(params, batch)
  for i in range(10):
    params, state = step(params, state, jax.random.PRNGKey(i))
  assert loss(params, batch) < 0.9 * start
  assert bool(kfe.curvature_due(state))
  for options, match in (({"combine": "both"}, "combine"),
                         ({"coarse_space": "krylov"}, "coarse_space"),
                         ({"coarse_space": "parameters",
                           "coarse_matrix": "kronecker"}, "rank-one"),
                         ({"base": "ekfac"}, "base")):
    with pytest.raises(ValueError, match=match):
      kfe.scale_by_two_level_kfac(loss, **options)
  big = oracles.mlp_init(jax.random.PRNGKey(0), [64, 80, 2])
  with pytest.raises(ValueError, match="coarse vectors"):
    kfe.scale_by_two_level_kfac(loss, coarse_space="parameters",
                                coarse_matrix="exact").init(big)
