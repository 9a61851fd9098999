"""Koroko et al.'s per-step coarse spaces, exact GGN products and the
model-scaled fine step, against closed forms built by brute force (float64;
I12, I13 extended): ``F`` from per-example gradients (``vmap(grad)``) or the
exact GGN (``jax.jacobian``/``jax.hessian``), ``M⁻¹`` the base method applied
to vectors, ``R`` built here from its definition, ``Q = Rᵀ(RF_λRᵀ)⁻¹R``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_ext as kfe
from kfac_jax_ext import train_step
from tests import oracles
from tests.test_two_level import (EXACT, LAM, _brute, _cnn, _direction, _flat,
                                  _mlp, _nicolaides_rows)


def _base_inverse(loss, params, batch, **options):
  """``v ↦ M⁻¹v`` on flat vectors: the base method's blocks of this batch
  (``options`` over ``EXACT``'s)."""
  tx = kfe.scale_by_two_level_kfac(loss, coarse_space=None,
                                   **{**EXACT, **options})
  _, unravel = jax.flatten_util.ravel_pytree(params)
  leaves = jax.tree_util.tree_leaves(params)
  sizes = np.cumsum([l.size for l in leaves])[:-1]
  treedef = jax.tree_util.tree_structure(params)

  def unflatten(v):      # _flat's leaf order
    parts = jnp.split(v, sizes)
    return jax.tree_util.tree_unflatten(
        treedef, [p.reshape(l.shape) for p, l in zip(parts, leaves)])

  @jax.jit
  def apply(v):
    out, _ = tx.update(unflatten(v), tx.init(params), params, batch=batch)
    return _flat(out)
  return apply


def _closed_form(combine, r, f, grad, minv, alpha_scaled):
  """The two-level update for rows ``r`` with ``F_λ = f`` and ``M⁻¹ = minv``."""
  q = r.T @ jnp.linalg.solve(r @ f @ r.T, r)
  if combine == "multiplicative":
    b = minv(grad)
    alpha = (b @ grad) / (b @ f @ b) if alpha_scaled else 1.0
    return alpha * b + q @ (grad - alpha * f @ b)
  y = q @ grad
  z = grad - f @ y
  w = minv(z)
  alpha = (w @ z) / (w @ f @ w) if alpha_scaled else 1.0
  return alpha * (w - q @ f @ w) + y


def _space_rows(space, masks, minv, res):
  rows = []
  for mask in masks:
    if space == "residual":
      rows.append(minv(mask * res))
    elif space == "krylov_nicolaides":
      rows += [mask, minv(mask)]
    else:
      rows += [mask * res, minv(mask * res)]
  return jnp.stack(rows)


@pytest.mark.parametrize("space,combine", [
    ("residual", "multiplicative"), ("residual", "balanced"),
    ("krylov_nicolaides", "balanced"), ("krylov_residual", "multiplicative")])
def test_koroko_spaces_equal_their_closed_form(space, combine):
  loss, params, batch = _mlp(squared=True)
  delta, state = _direction(loss, params, batch, combine=combine,
                            coarse_space=space, fine_scale="none")
  grad, u = _brute(loss, params, batch)
  f = u @ u.T / u.shape[1] + LAM * jnp.eye(u.shape[0])
  minv = _base_inverse(loss, params, batch)
  res = grad - f @ minv(grad)                  # Koroko's res = ∇ − F_λM⁻¹∇
  r = _space_rows(space, _nicolaides_rows(params), minv, res)
  expected = _closed_form(combine, r, f, grad, minv, alpha_scaled=False)
  scale = float(jnp.max(jnp.abs(expected)))
  np.testing.assert_allclose(delta, expected, rtol=0, atol=1e-9 * scale)
  # the correction is not negligible: the test could fail
  assert float(jnp.max(jnp.abs(delta - minv(grad)))) > 1e-3 * scale
  assert state.coarse_inverse.shape[0] == r.shape[0]


@pytest.mark.parametrize("task,combine", [(_mlp, "multiplicative"),
                                          (_mlp, "balanced"),
                                          (_cnn, "multiplicative")],
                         ids=["mlp-multiplicative", "mlp-balanced",
                              "cnn-multiplicative"])
def test_model_scaled_fine_step_equals_its_closed_form_and_descends(task,
                                                                    combine):
  loss, params, batch = task(squared=True) if task is _mlp else task()
  delta, _ = _direction(loss, params, batch, combine=combine,
                        coarse_matrix="exact")
  grad, u = _brute(loss, params, batch)
  f = u @ u.T / u.shape[1] + LAM * jnp.eye(u.shape[0])
  minv = _base_inverse(loss, params, batch)
  expected = _closed_form(combine, _nicolaides_rows(params), f, grad, minv,
                          alpha_scaled=True)
  np.testing.assert_allclose(delta, expected, rtol=0,
                             atol=1e-9 * float(jnp.max(jnp.abs(expected))))
  unscaled = _closed_form(combine, _nicolaides_rows(params), f, grad, minv,
                          alpha_scaled=False)
  assert float(jnp.max(jnp.abs(unscaled - expected))) > 1e-3 * float(
      jnp.max(jnp.abs(expected)))              # α ≠ 1 here
  # the model decrease is positive: a descent direction whose quadratic KL
  # is below twice what KL-clipping reads from it
  assert 0 < float(delta @ f @ delta) < 2 * float(grad @ delta)


def test_scaling_keeps_the_exact_limit_and_galerkin_orthogonality():
  loss, params, batch = _mlp()
  grad, u = _brute(loss, params, batch)
  f = u @ u.T / u.shape[1] + LAM * jnp.eye(u.shape[0])
  exact = jnp.linalg.solve(f, grad)
  delta, _ = _direction(loss, params, batch, combine="multiplicative",
                        coarse_space="parameters", coarse_matrix="exact")
  np.testing.assert_allclose(delta, exact, rtol=0,
                             atol=1e-10 * float(jnp.max(jnp.abs(exact))))
  for space in ("residual", "krylov_residual"):
    delta, _ = _direction(loss, params, batch, combine="multiplicative",
                          coarse_space=space)
    minv = _base_inverse(loss, params, batch)
    b = minv(grad)
    alpha = (b @ grad) / (b @ f @ b)
    r = _space_rows(space, _nicolaides_rows(params), minv,
                    grad - alpha * f @ b)   # the scaled step's residual
    np.testing.assert_allclose(r @ (grad - f @ delta), 0.0,
                               atol=1e-10 * float(jnp.max(jnp.abs(r @ grad))))


def _ggn(params, batch):
  """The exact GGN of the squared-error MLP task over its raveled parameters
  (``_flat`` order equals ``ravel_pytree`` order for these dict leaves)."""
  n = batch["y"].shape[0]
  return oracles.exact_fisher(
      lambda p: oracles.mlp_apply(p, batch["x"]), params,
      lambda z: 0.5 * jnp.sum((z - batch["y"]) ** 2) / n)


@pytest.mark.parametrize("combine", ["additive", "multiplicative", "balanced"])
def test_ggn_products_equal_the_closed_form_with_the_exact_fisher(combine):
  loss, params, batch = _mlp(squared=True)
  fisher = _ggn(params, batch)
  f = fisher + LAM * jnp.eye(fisher.shape[0])
  grad, u = _brute(loss, params, batch)
  # (the statistics' empirical Fisher is not the GGN: the test can tell them apart)
  assert float(jnp.max(jnp.abs(u @ u.T / u.shape[1] - fisher))) > 1e-3
  delta, _ = _direction(loss, params, batch, combine=combine,
                        fisher_products="ggn", fine_scale="none")
  minv = _base_inverse(loss, params, batch)
  r = _nicolaides_rows(params)
  if combine == "additive":
    expected = minv(grad) + r.T @ jnp.linalg.solve(r @ f @ r.T, r @ grad)
  else:
    expected = _closed_form(combine, r, f, grad, minv, alpha_scaled=False)
  np.testing.assert_allclose(delta, expected, rtol=0,
                             atol=1e-9 * float(jnp.max(jnp.abs(expected))))
  exact, _ = _direction(loss, params, batch, combine="multiplicative",
                        coarse_space="parameters", fisher_products="ggn")
  np.testing.assert_allclose(exact, jnp.linalg.solve(f, grad), rtol=0,
                             atol=1e-10 * float(jnp.max(jnp.abs(exact))))


@pytest.mark.parametrize("space,combine", [("nicolaides", "balanced"),
                                          ("residual", "balanced"),
                                          ("residual", "multiplicative")])
def test_mixed_products_take_the_full_size_ones_from_the_ggn(space, combine):
  """``fisher_products="mixed"``: the products fed to ``M⁻¹`` or to a basis
  (``F_λQ∇``, the residual ``∇ − F_λM⁻¹∇``) with the exact GGN ``F_g``;
  ``F_c`` and the projected products with the statistics' ``F_s``."""
  loss, params, batch = _mlp(squared=True)
  grad, u = _brute(loss, params, batch)
  f_s = u @ u.T / u.shape[1] + LAM * jnp.eye(u.shape[0])
  f_g = _ggn(params, batch) + LAM * jnp.eye(u.shape[0])
  minv = _base_inverse(loss, params, batch)
  masks = _nicolaides_rows(params)
  r = (masks if space == "nicolaides" else
       _space_rows(space, masks, minv, grad - f_g @ minv(grad)))
  q = r.T @ jnp.linalg.solve(r @ f_s @ r.T, r)
  if combine == "multiplicative":
    b = minv(grad)
    expected = b + q @ (grad - f_g @ b)
  else:
    y = q @ grad
    w = minv(grad - f_g @ y)
    expected = w - q @ f_s @ w + y
  delta, _ = _direction(loss, params, batch, combine=combine, coarse_space=space,
                        fisher_products="mixed", fine_scale="none")
  scale = float(jnp.max(jnp.abs(expected)))
  np.testing.assert_allclose(delta, expected, rtol=0, atol=1e-9 * scale)
  # neither all-statistics nor all-GGN: the test can tell the three apart
  for products in ("statistics", "ggn"):
    other, _ = _direction(loss, params, batch, combine=combine,
                          coarse_space=space, fisher_products=products,
                          fine_scale="none")
    assert float(jnp.max(jnp.abs(other - delta))) > 1e-4 * scale


def test_mixed_products_without_a_full_size_product_are_refused():
  loss, _, _ = _mlp(squared=True)
  for combine, space in (("additive", "nicolaides"),
                         ("multiplicative", "spectral")):
    with pytest.raises(ValueError, match="uses none"):
      kfe.scale_by_two_level_kfac(loss, combine=combine, coarse_space=space,
                                  fisher_products="mixed")
  with pytest.raises(ValueError, match="fisher_products='mixed'"):
    kfe.scale_by_two_level_kfac(loss, combine="balanced",
                                fisher_products="mixed", coarse_batch=8)


def test_ggn_products_need_no_statistics_between_refreshes_and_bad_options_raise():
  loss, params, batch = _mlp(squared=True)
  tx = kfe.scale_by_two_level_kfac(loss, combine="multiplicative",
                                   fisher_products="ggn", damping=LAM,
                                   stats_every=2, inverse_every=2)
  state = tx.init(params)
  grads = jax.grad(loss)(params, batch)
  _, state = tx.update(grads, state, params, batch=batch,
                       key=jax.random.PRNGKey(0))
  assert not bool(state.curvature_due)   # statistics on their own period
  out, _ = tx.update(grads, state, params, batch=batch,
                     due=kfe.Due(statistics=False, inverses=False))
  assert bool(jnp.all(jnp.isfinite(_flat(out))))
  with pytest.raises(ValueError, match="needs the batch"):
    tx.update(grads, state, params, due=kfe.Due(statistics=False,
                                                inverses=False))
  for options, match in (
      ({"fisher_products": "ggn", "coarse_matrix": "kronecker"}, "GGN"),
      ({"coarse_space": "residual", "coarse_matrix": "kronecker"}, "rank-one"),
      ({"fisher_products": "sampled"}, "fisher_products"),
      ({"fine_scale": "alpha"}, "fine_scale")):
    with pytest.raises(ValueError, match=match):
      kfe.scale_by_two_level_kfac(loss, **options)


@pytest.mark.parametrize("combine,space", [
    ("multiplicative", "residual"), ("balanced", "nicolaides")])
def test_non_finite_statistics_drop_the_per_step_correction_and_are_counted(
    combine, space):
  """(balanced computes the fallback ``M⁻¹∇`` only in a failure branch)"""
  loss, params, batch = _mlp(squared=True)
  tx = kfe.scale_by_two_level_kfac(loss, combine=combine,
                                   coarse_space=space, **EXACT)
  base = kfe.scale_by_two_level_kfac(loss, coarse_space=None, **EXACT)
  vg = kfe.value_and_grad(loss, fisher="empirical")
  _, grads, curv = vg(params, batch)
  state = tx.init(params)
  _, state = tx.update(grads, state, params, batch=batch, curvature=curv)
  bad = curv._replace(layers=tuple(
      None if layer is None else (layer[0] * jnp.nan, layer[1])
      for layer in curv.layers))
  out, new = tx.update(grads, state, params, batch=batch, curvature=bad)
  assert bool(jnp.all(jnp.isfinite(_flat(out))))
  assert int(new.base.health.nonfinite_statistics) == 1   # the fine level skipped it
  assert int(new.health.failed_inverses) >= 1             # and it is counted here
  # the fine step alone (no correction, α = 1), from the same fine state
  expected, _ = base.update(grads, state.base, params, batch=batch, curvature=bad)
  np.testing.assert_allclose(_flat(out), _flat(expected), rtol=1e-12)


@pytest.mark.parametrize("space,combine", [
    ("nicolaides", "multiplicative"), ("residual", "balanced"),
    ("krylov_residual", "multiplicative")])
def test_coarse_batch_uses_the_fisher_of_the_first_examples(space, combine):
  """``coarse_batch=n``: the coarse level's F (products and F_c) is the
  Fisher of the first n examples; the fine level keeps all M."""
  loss, params, batch = _mlp(squared=True)
  n = 4                                          # of M = 7
  delta, _ = _direction(loss, params, batch, combine=combine,
                        coarse_space=space, fine_scale="none", coarse_batch=n)
  grad, u = _brute(loss, params, batch)
  f = u[:, :n] @ u[:, :n].T / n + LAM * jnp.eye(u.shape[0])
  minv = _base_inverse(loss, params, batch)      # all M examples
  masks = _nicolaides_rows(params)
  r = (masks if space == "nicolaides" else
       _space_rows(space, masks, minv, grad - f @ minv(grad)))
  expected = _closed_form(combine, r, f, grad, minv, alpha_scaled=False)
  scale = float(jnp.max(jnp.abs(expected)))
  np.testing.assert_allclose(delta, expected, rtol=0, atol=1e-9 * scale)
  # a coarse batch at least M is the full batch; fewer examples differ
  full, _ = _direction(loss, params, batch, combine=combine,
                       coarse_space=space, fine_scale="none")
  same, _ = _direction(loss, params, batch, combine=combine,
                       coarse_space=space, fine_scale="none", coarse_batch=50)
  np.testing.assert_array_equal(same, full)
  assert float(jnp.max(jnp.abs(delta - full))) > 1e-3 * scale


def test_bad_coarse_batch_is_named():
  loss, params, _ = _mlp()
  for bad in (0, -3, 2.5, True, "64"):
    with pytest.raises(ValueError, match="coarse_batch must be a positive int"):
      kfe.scale_by_two_level_kfac(loss, combine="multiplicative",
                                  coarse_batch=bad)
  with pytest.raises(ValueError, match="fisher_products='ggn'"):
    kfe.scale_by_two_level_kfac(loss, combine="multiplicative",
                                fisher_products="ggn", coarse_batch=8)


def test_additive_krylov_nicolaides_equals_its_closed_form():
  """The first update: ``M⁻¹∇ + Q∇`` with rows ``{1_l, M_l⁻¹1_l}`` and
  ``F_c = R F_λ Rᵀ`` of the batch (the running average of one batch)."""
  loss, params, batch = _mlp(squared=True)
  delta, state = _direction(loss, params, batch, combine="additive",
                            coarse_space="krylov_nicolaides")
  grad, u = _brute(loss, params, batch)
  f = u @ u.T / u.shape[1] + LAM * jnp.eye(u.shape[0])
  minv = _base_inverse(loss, params, batch)
  r = _space_rows("krylov_nicolaides", _nicolaides_rows(params), minv, None)
  q = r.T @ jnp.linalg.solve(r @ f @ r.T, r)
  expected = minv(grad) + q @ grad
  scale = float(jnp.max(jnp.abs(expected)))
  np.testing.assert_allclose(delta, expected, rtol=0, atol=1e-9 * scale)
  assert float(jnp.max(jnp.abs(q @ grad))) > 1e-3 * scale
  assert state.coarse_inverse.shape[0] == r.shape[0]


def test_krylov_nicolaides_basis_is_refreshed_with_the_inverses():
  """``M⁻¹1`` is kept between refreshes (inverse_every=2) and recomputed at
  the next; the additive combination then needs statistics only on the
  statistics schedule (not every step)."""
  loss, params, batch = _mlp(squared=True)
  options = dict(EXACT, inverse_every=2, stats_every=2)
  tx = kfe.scale_by_two_level_kfac(loss, coarse_space="krylov_nicolaides",
                                   **options)
  state = tx.init(params)
  seen = []
  p = params
  for i in range(3):
    grads = jax.grad(loss)(p, batch)
    out, state = tx.update(grads, state, p, batch=batch,
                           due=kfe.due_at(i, stats_every=2, inverse_every=2))
    seen.append([np.asarray(k) for k in state.krylov if k is not None])
    p = jax.tree_util.tree_map(lambda x, d: x - 0.5 * d, p, out)
  for a, b, c in zip(*seen):
    np.testing.assert_array_equal(a, b)            # no refresh at update 1
    assert np.abs(c - b).max() > 1e-6 * np.abs(b).max()   # refreshed at 2
  opt = kfe.two_level_kfac(loss, 0.1, coarse_space="krylov_nicolaides",
                           **options)
  assert not train_step.schedule_of(opt).statistics_every_step
  with pytest.raises(ValueError, match="needs rank-one coarse vectors"):
    kfe.scale_by_two_level_kfac(loss, coarse_space="krylov_nicolaides",
                                coarse_matrix="kronecker")


@pytest.mark.parametrize("task,base,combine", [
    (_mlp, "kfac", "additive"), (_mlp, "kfac", "multiplicative"),
    (_mlp, "tkfac", "balanced"), (_cnn, "kfac", "balanced")])
def test_krylov_nicolaides_with_a_factored_base_equals_its_closed_form(
    task, base, combine):
  """With ``damping_mode="factored"`` ``M_l⁻¹1 = (Ā⁻¹1)(Ḡ⁻¹1)ᵀ`` is kept as
  two vectors and the projections go through the rank-one atoms
  (``coarse_krylov``); the update is the closed form with rows
  ``{1_l, M_l⁻¹1_l}``, ``M⁻¹`` applied to the indicator rows by brute force
  (conv layers: tokens summed over positions)."""
  loss, params, batch = task(squared=True) if task is _mlp else task()
  options = dict(base=base, damping_mode="factored")
  delta, state = _direction(loss, params, batch, combine=combine,
                            coarse_space="krylov_nicolaides",
                            fine_scale="none", **options)
  assert all(isinstance(k, tuple) for k in state.krylov if k is not None)
  grad, u = _brute(loss, params, batch)
  f = u @ u.T / u.shape[1] + LAM * jnp.eye(u.shape[0])
  minv = _base_inverse(loss, params, batch, **options)
  r = _space_rows("krylov_nicolaides", _nicolaides_rows(params), minv, None)
  if combine == "additive":
    expected = minv(grad) + r.T @ jnp.linalg.solve(r @ f @ r.T, r @ grad)
  else:
    expected = _closed_form(combine, r, f, grad, minv, alpha_scaled=False)
  scale = float(jnp.max(jnp.abs(expected)))
  np.testing.assert_allclose(delta, expected, rtol=0, atol=1e-9 * scale)
  assert float(jnp.max(jnp.abs(delta - minv(grad)))) > 1e-3 * scale
  # the second row is not in the span of the first: two vectors per layer
  assert np.linalg.matrix_rank(np.asarray(r)) == r.shape[0]


def test_factored_krylov_vectors_are_the_refreshed_inverses_on_the_ones():
  """The factored slots hold ``Ā⁻¹1`` and ``Ḡ⁻¹1`` of the last refresh, in
  the leaf's (rows, cols) orientation: their outer product is ``M⁻¹`` of
  the layer's all-ones kernel and bias (the base's own preconditioner)."""
  loss, params, batch = _mlp(squared=True)
  options = dict(EXACT, damping_mode="factored")
  tx = kfe.scale_by_two_level_kfac(loss, coarse_space="krylov_nicolaides",
                                   **options)
  _, state = tx.update(jax.grad(loss)(params, batch), tx.init(params), params,
                       batch=batch)
  base = kfe.scale_by_two_level_kfac(loss, coarse_space=None, **options)
  ones = jax.tree_util.tree_map(jnp.ones_like, params)
  images, _ = base.update(ones, base.init(params), params, batch=batch)
  kernels = [k for k in state.krylov if k is not None]
  assert len(kernels) == 2
  for (rows, cols), layer in zip(kernels, images):
    image = np.concatenate([layer["w"], layer["b"][None]])   # bias row folded
    outer = np.outer(rows, cols)        # slots padded per leaf: the corner
    np.testing.assert_allclose(outer[:image.shape[0], :image.shape[1]], image,
                               rtol=1e-10)
