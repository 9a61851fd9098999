"""Brute-force references, independent of the library's statistics code.

Per-example quantities come from ``jax.vmap(jax.grad(...))`` on hand-written
models with the pre-activations as explicit inputs; conv patches are cut out
with explicit slicing loops.
"""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

import kfac_jax_ext as kfe


def mlp_init(key, sizes, dtype=jnp.float64):
  params = []
  for k, (m, n) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes, sizes[1:])):
    kw, kb = jax.random.split(k)
    params.append({"w": jax.random.normal(kw, (m, n), dtype) / np.sqrt(m),
                   "b": 0.1 * jax.random.normal(kb, (n,), dtype)})
  return params


def mlp_apply(params, x, act=jnp.tanh):
  for i, p in enumerate(params):
    x = x @ p["w"] + p["b"]
    if i < len(params) - 1:
      x = act(x)
  return x


def mlp_inputs_and_preacts(params, x, act=jnp.tanh):
  """Per-layer inputs a_l and pre-activations s_l of the MLP (forward by hand)."""
  inputs, pre = [], []
  for i, p in enumerate(params):
    inputs.append(x)
    x = x @ p["w"] + p["b"]
    pre.append(x)
    if i < len(params) - 1:
      x = act(x)
  return inputs, pre


def mlp_output_grads(params, x, per_example_loss, act=jnp.tanh):
  """g_{n,l} = d l_n / d s_{n,l} (per-example loss, not divided by N)."""

  def one(xn, yn_loss_args):
    def from_preacts(perturb):
      h = xn
      for i, p in enumerate(params):
        h = h @ p["w"] + p["b"] + perturb[i]
        if i < len(params) - 1:
          h = act(h)
      return per_example_loss(h, *yn_loss_args)
    zeros = [jnp.zeros(p["b"].shape, xn.dtype) for p in params]
    return jax.grad(from_preacts)(zeros)

  return one


def mlp_empirical_factors(params, batch, weights=None):
  """Per layer, ``(A, G)`` of a softmax cross-entropy MLP's empirical Fisher:
  ``Ā = [a, 1]``, ``g`` from ``vmap(grad)`` of each example's loss,
  ``A = ĀᵀĀ/N``, ``G = gᵀ diag(w) g/N`` (``w``: per-example ``weights`` of
  the loss ``mean_n w_n l_n``, 1 by default: they enter the Fisher
  linearly)."""
  per_example = lambda logits, label: -jax.nn.log_softmax(logits)[label]
  g_fn = mlp_output_grads(params, batch["x"], per_example)
  gs = jax.vmap(lambda xn, yn: g_fn(xn, (yn,)))(batch["x"], batch["y"])
  inputs, _ = mlp_inputs_and_preacts(params, batch["x"])
  n = batch["x"].shape[0]
  out = []
  w = jnp.ones((n,), gs[0].dtype) if weights is None else jnp.asarray(weights, gs[0].dtype)
  for a, g in zip(inputs, gs):
    abar = homogeneous(a)
    out.append((abar.T @ abar / n, (g.T * w) @ g / n))
  return out


def homogeneous(a):
  return jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)


def kron_solve(a, g, v, damping):
  """solve(A⊗G + λI, vec_r(V)) with an explicit Kronecker product."""
  big = jnp.kron(a, g) + damping * jnp.eye(a.shape[0] * g.shape[0], dtype=a.dtype)
  return jnp.linalg.solve(big, v.reshape(-1)).reshape(v.shape)


def patches_by_loops(x, kh, kw, stride, padding, dilation):
  """im2col of an NHWC input, feature order (C, kh, kw); explicit slicing."""
  n, h, w, c = x.shape
  (pt, pb), (pl, pr) = padding
  xp = np.pad(np.asarray(x), ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  eh, ew = (kh - 1) * dilation + 1, (kw - 1) * dilation + 1
  ho = (xp.shape[1] - eh) // stride + 1
  wo = (xp.shape[2] - ew) // stride + 1
  out = np.zeros((n, ho, wo, c, kh, kw), xp.dtype)
  for i in range(ho):
    for j in range(wo):
      for u in range(kh):
        for v in range(kw):
          out[:, i, j, :, u, v] = xp[:, i * stride + u * dilation,
                                     j * stride + v * dilation, :]
  return out.reshape(n, ho, wo, c * kh * kw)


def kfac_block_by_vjp(layer_fn, layer_params, inputs, out_grads, groups=None):
  """K-FAC's ``A ⊗ G`` of one layer as a dense matrix over its flattened
  parameters, independent of the library's layout and orientation.

  With ``x_n`` the inputs and ``g_m`` the output gradients of N examples (one
  location each), ``A ⊗ G = (1/N²) Σ_{n,m} w_nm w_nmᵀ`` where ``w_nm =
  vec(vjp of θ ↦ layer_fn(θ, x_n) at g_m) = ā_n ⊗ g_m``. ``groups``: per
  flattened parameter its group; entries across groups are zeroed (one
  block per group).
  """
  flat, unravel = jax.flatten_util.ravel_pytree(layer_params)
  out = jax.eval_shape(lambda x: layer_fn(layer_params, x), inputs[0])
  out_grads = out_grads.reshape((out_grads.shape[0],) + out.shape)

  def w(x, g):
    _, vjp = jax.vjp(lambda f: layer_fn(unravel(f), x), flat)
    return vjp(g)[0]

  ws = jax.vmap(lambda x: jax.vmap(lambda g: w(x, g))(out_grads))(inputs)
  ws = ws.reshape(-1, flat.shape[0])
  n = inputs.shape[0]
  block = ws.T @ ws / n ** 2
  if groups is not None:
    block = jnp.where(groups[:, None] == groups[None, :], block, 0.0)
  return block, flat, unravel


def exact_fisher(predict, params, loss_of_predictions):
  """The exact Fisher = GGN ``Jᵀ (∂²L/∂z²) J`` of a loss ``L(z)`` of the
  predictions ``z = predict(params)``, as a dense matrix over the raveled
  parameters (``jax.flatten_util.ravel_pytree`` order), from ``jax.jacobian``
  and ``jax.hessian``. For softmax/sigmoid cross-entropy and squared error
  the Hessian in ``z`` is the Fisher of the predictive distribution."""
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  z = predict(params)
  jac = jax.jacobian(lambda f: predict(unravel(f)))(flat).reshape(z.size, -1)
  hess = jax.hessian(loss_of_predictions)(z).reshape(z.size, z.size)
  return jac.T @ hess @ jac


def mlp_classifier_task():
  """A 4-6-3 tanh MLP, a batch of 10 and its softmax cross-entropy:
  ``(params, batch, predict(p, b), loss(p, b), loss_of_predictions(z, b))``
  (float64; ``loss`` calls ``kfe.softmax_cross_entropy``)."""
  params = mlp_init(jax.random.PRNGKey(0), [4, 6, 3])
  batch = {"x": jax.random.normal(jax.random.PRNGKey(1), (10, 4)),
           "y": jax.random.randint(jax.random.PRNGKey(2), (10,), 0, 3)}
  predict = lambda p, b: mlp_apply(p, b["x"])
  loss = lambda p, b: kfe.softmax_cross_entropy(predict(p, b), b["y"])

  def loss_of_predictions(z, b):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), b["y"][:, None],
                                         axis=1))
  return params, batch, predict, loss, loss_of_predictions
