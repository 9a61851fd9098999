"""The benchmark models, all flax linen.

* ``Autoencoder``: the Martens & Grosse (2015) MNIST deep autoencoder,
  784-1000-500-250-30-250-500-1000-784, tanh between layers (the decoder's
  last layer gives log-odds for a sigmoid cross-entropy).
* ``MLP``: a classifier, 784-256-256-10 with ReLU.
* ``FashionCNN``: conv3×3-16 / pool / conv3×3-32 / pool / dense-128 / 10.
* ``ConvNet3C1F``: TENGraD's Fashion-MNIST ConvNet (Soori et al. 2021, §2.5:
  three conv3×3-128 SAME + ReLU, max-pool 3, dense 10368→500→10). ``width``
  scales the channels (128 in the paper).
* ``ResNet``: a small pre-activation ResNet for 32×32 images: a conv3×3 stem,
  ``stages`` stages of ``blocks`` basic blocks (two conv3×3, GroupNorm) with
  widths ``width·2^s`` and stride 2 from the second stage, 1×1 projection
  shortcuts where the shape changes, global average pool, dense head.
  GroupNorm rather than BatchNorm keeps the loss a pure function of params.
* ``CharTransformer``: a decoder-only, pre-LayerNorm character transformer:
  token and learned position embeddings, ``layers`` blocks of causal
  multi-head self-attention (one dense for q, k, v; one for the output) and a
  GELU MLP (4× wide), a final LayerNorm and a dense head over the vocabulary.
  Attention is written with plain ``nn.Dense`` so every projection is a
  layer the curvature estimators find.

Example:
  >>> model = CharTransformer(vocab=65, context=64)
  >>> params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64), jnp.int32))
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

AUTOENCODER_SIZES = (784, 1000, 500, 250, 30, 250, 500, 1000, 784)


class Autoencoder(nn.Module):
  """M&G's deep autoencoder; returns the reconstruction's log-odds."""
  sizes: Sequence[int] = AUTOENCODER_SIZES

  @nn.compact
  def __call__(self, x):
    for i, width in enumerate(self.sizes[1:]):
      x = nn.Dense(width)(x)
      if i < len(self.sizes) - 2:
        x = jnp.tanh(x)
    return x


class MLP(nn.Module):
  """A ReLU classifier on flattened inputs."""
  widths: Sequence[int] = (256, 256)
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for width in self.widths:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.classes)(x)


class FashionCNN(nn.Module):
  """Two conv/pool stages and a dense hidden layer."""
  @nn.compact
  def __call__(self, x):
    for width in (16, 32):
      x = nn.relu(nn.Conv(width, (3, 3))(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(x)


class ConvNet3C1F(nn.Module):
  """TENGraD's Fashion-MNIST ConvNet (``models/mnist/convnet.py``)."""
  width: int = 128

  @nn.compact
  def __call__(self, x):
    for _ in range(3):
      x = nn.relu(nn.Conv(self.width, (3, 3), padding="SAME")(x))
    x = nn.max_pool(x, (3, 3), (3, 3))
    x = nn.relu(nn.Dense(500)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(x)


class ConvAutoencoder(nn.Module):
  """Strided convs down, transposed convs up (28×28×1 → 7×7×16 → 28×28×1 logits)."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))                    # 14×14
    x = nn.relu(nn.Conv(16, (3, 3), strides=2)(x))                   # 7×7
    x = nn.relu(nn.ConvTranspose(8, (3, 3), strides=(2, 2))(x))      # 14×14
    return nn.ConvTranspose(1, (3, 3), strides=(2, 2))(x)            # 28×28


class _BasicBlock(nn.Module):
  width: int
  stride: int

  @nn.compact
  def __call__(self, x):
    groups = lambda t: min(8, t.shape[-1])
    y = nn.relu(nn.GroupNorm(num_groups=groups(x))(x))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.width:
      shortcut = nn.Conv(self.width, (1, 1), (self.stride, self.stride),
                         use_bias=False)(y)
    y = nn.Conv(self.width, (3, 3), (self.stride, self.stride), use_bias=False)(y)
    y = nn.relu(nn.GroupNorm(num_groups=groups(y))(y))
    y = nn.Conv(self.width, (3, 3), use_bias=False)(y)
    return shortcut + y


class ResNet(nn.Module):
  """A small pre-activation ResNet (ResNet-8 with the defaults)."""
  width: int = 16
  stages: int = 3
  blocks: int = 1
  classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(self.width, (3, 3), use_bias=False)(x)
    for s in range(self.stages):
      for b in range(self.blocks):
        x = _BasicBlock(self.width * 2 ** s, 2 if (s > 0 and b == 0) else 1)(x)
    x = nn.relu(nn.GroupNorm(num_groups=min(8, x.shape[-1]))(x))
    return nn.Dense(self.classes)(x.mean(axis=(1, 2)))


class _CausalSelfAttention(nn.Module):
  heads: int

  @nn.compact
  def __call__(self, x):
    batch, length, dim = x.shape
    head_dim = dim // self.heads
    q, k, v = jnp.split(nn.Dense(3 * dim)(x), 3, axis=-1)
    split = lambda t: t.reshape(batch, length, self.heads, head_dim)
    scores = jnp.einsum("bqhd,bkhd->bhqk", split(q), split(k)) / jnp.sqrt(head_dim)
    causal = jnp.tril(jnp.ones((length, length), bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    attended = jnp.einsum("bhqk,bkhd->bqhd", nn.softmax(scores, axis=-1), split(v))
    return nn.Dense(dim)(attended.reshape(batch, length, dim))


class CharTransformer(nn.Module):
  """Decoder-only character model; returns ``[batch, length, vocab]`` logits."""
  vocab: int
  context: int = 64
  dim: int = 128
  heads: int = 4
  layers: int = 2

  @nn.compact
  def __call__(self, tokens):
    length = tokens.shape[1]
    if length > self.context:
      raise ValueError(f"sequence length {length} exceeds the context {self.context}")
    x = nn.Embed(self.vocab, self.dim)(tokens)
    positions = self.param("positions", nn.initializers.normal(0.02),
                           (self.context, self.dim))
    x = x + positions[:length]
    for _ in range(self.layers):
      x = x + _CausalSelfAttention(self.heads)(nn.LayerNorm()(x))
      h = nn.gelu(nn.Dense(4 * self.dim)(nn.LayerNorm()(x)))
      x = x + nn.Dense(self.dim)(h)
    return nn.Dense(self.vocab)(nn.LayerNorm()(x))
