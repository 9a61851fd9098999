"""Third-party example code, vendored unchanged in ``tests/third_party``:
discovery gives every kernel a block, and K-FAC trains it.

* flax's ``examples/seq2seq`` model: an ``nn.RNN(nn.LSTMCell)`` encoder and
  an ``nn.RNN`` decoder over a custom cell (LSTM, a Dense readout and
  sampling with its own ``'lstm'`` RNG stream), with ``seq_lengths``
  masking; a per-token softmax cross-entropy.
* flax's ``examples/sst2`` text classifier: an embedding with word dropout
  and dropout, a bidirectional LSTM of ``nn.OptimizedLSTMCell`` under
  ``nn.scan`` (the four gate kernels concatenated before one matmul,
  ``kfac_jax_ext/concatenated.py``), MLP attention and a sigmoid loss.
* flax's ``examples/lm1b`` decoder-only transformer (``nn.Embed``, learned
  positions, ``MultiHeadDotProductAttention``, dropout), with and without
  logits through the embedding table (``logits_via_embedding``, tied).
* flax's ``examples/gemma`` nnx transformer (Gemma 3's layout, shrunk): a
  scaled embedding tied to the logits, ``nnx.Einsum`` projections whose
  kernels put their own axes before the batch's (``'BTD,CKDH->CBTKH'``,
  ``'BTD,SNDH->SBTNH'``), grouped-query or multi-head attention with RoPE,
  query/key RMSNorm, local sliding-window and global layers, a gated MLP,
  and the example's padding mask, as its ``train.py`` builds them. (Its
  imports are made package-relative; ``tests/third_party/flax_gemma``.)
* flax's ``examples/imagenet`` ResNet: convs without bias, BatchNorm in
  training mode whose statistics average over the devices
  (``axis_name='batch'``, as the example trains under ``pmap``), max
  pooling, projection shortcuts; its running statistics come back as aux.
* flax's ``examples/vae``: its loss adds a KL term on the encoder's mean
  and log-variance to the reconstruction loss (a term outside the
  registered loss), and samples the latent with a key from the batch.
* flax's ``examples/wmt`` encoder-decoder transformer: cross-attention, and
  one embedding table shared by the encoder's inputs, the decoder's inputs
  and the logits (three uses, one tied block), with dropout and the
  example's padding weights and its normalisation by their sum (a factor
  read at run time, ``kfac_jax_ext/loss_scales.py``).
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kfac_jax_ext as kfe
from tests.third_party import flax_imagenet_models as imagenet
from tests.third_party import flax_vae_models as vae
from tests.third_party import flax_wmt_models as wmt
from tests.third_party.flax_gemma import transformer as gemma
from tests.third_party.flax_gemma import transformer_cfg as gemma_cfg
from tests.third_party.flax_lm1b_models import TransformerConfig, TransformerLM
from tests.third_party.flax_seq2seq_models import Seq2seq
from tests.third_party.flax_sst2_models import TextClassifier

VOCAB, N, T_IN, T_OUT, HIDDEN = 14, 16, 7, 5, 32


def _covered_and_trained(loss_fn, params, batch, dense_layers, steps=20,
                         fresh_key=None, kronecker_share=100.0):
  """Every parameter has a block (Kronecker blocks for at least
  ``kronecker_share`` % of them, the rest norms' diagonal blocks;
  ``dense_layers`` layers dense), and ``steps`` K-FAC steps
  (``make_train_step``) on ``batch`` return the losses; ``fresh_key``: a
  batch entry given a new PRNG key every step (dropout)."""
  text = kfe.describe_layers(loss_fn, params, batch)
  assert "Every parameter belongs to a layer." in text, text
  share = text.splitlines()[-1]
  assert "fallback 0.0%" in share, text
  assert float(share.split("kronecker ")[1].split("%")[0]) >= kronecker_share, text
  assert sum(r.split()[1:2] == ["dense"] for r in text.splitlines()) == (
      dense_layers), text
  opt = kfe.kfac(loss_fn, 0.3, damping=0.1, kl_clip=1e-2, example_batch=batch)
  step = kfe.make_train_step(loss_fn, opt)
  state, losses = opt.init(params), []
  for i in range(steps):
    b = batch if fresh_key is None else dict(
        batch, **{fresh_key: jax.random.PRNGKey(10 + i)})
    params, state, loss = step(params, state, b, jax.random.PRNGKey(3), i)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  return np.asarray(losses)


def _seq2seq():
  rng = np.random.default_rng(0)
  one_hot = lambda shape: jax.nn.one_hot(rng.integers(2, VOCAB, shape), VOCAB)
  enc, dec = one_hot((N, T_IN)), one_hot((N, T_OUT))
  model = Seq2seq(teacher_force=True, hidden_size=HIDDEN, vocab_size=VOCAB)
  params = model.init({"params": jax.random.PRNGKey(0),
                       "lstm": jax.random.PRNGKey(1)}, enc, dec)
  batch = {"enc": enc, "dec": dec, "rng": jax.random.PRNGKey(2)}

  def loss_fn(p, b):     # the example's loss: cross-entropy on teacher-forced logits
    logits, _ = model.apply(p, b["enc"], b["dec"], rngs={"lstm": b["rng"]})
    labels = jnp.argmax(b["dec"][:, 1:], -1)
    return kfe.softmax_cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))

  return loss_fn, params, batch


def test_flax_seq2seq_example_every_kernel_has_a_block_and_trains():
  with jax.enable_x64(False):
    # encoder: 8 gate kernels; decoder: 8 gate kernels and the readout
    losses = _covered_and_trained(*_seq2seq(), dense_layers=17)
  assert losses[-1] < 0.6 * losses[0], losses


def test_flax_sst2_example_every_kernel_has_a_block_and_trains():
  rng = np.random.default_rng(0)
  n, t, vocab = 16, 9, 50
  batch = {"ids": jnp.asarray(rng.integers(2, vocab, (n, t))),
           "lengths": jnp.asarray(rng.integers(3, t + 1, (n,))),
           "y": jnp.asarray(rng.integers(0, 2, (n, 1)), jnp.float32),
           "dropout": jax.random.PRNGKey(3)}
  model = TextClassifier(embedding_size=16, hidden_size=12, vocab_size=vocab,
                         output_size=1, dropout_rate=0.1, word_dropout_rate=0.1)

  def loss_fn(p, b):     # dropout on: its key travels in the batch
    logits = model.apply(p, b["ids"], b["lengths"], deterministic=False,
                         rngs={"dropout": b["dropout"]})
    return kfe.sigmoid_cross_entropy(logits, b["y"])

  with jax.enable_x64(False):
    params = model.init({"params": jax.random.PRNGKey(0)}, batch["ids"],
                        batch["lengths"], deterministic=True)
    # the embedding; 2 directions × 8 gate kernels; attention 2, MLP 2 (dense)
    losses = _covered_and_trained(loss_fn, params, batch, dense_layers=20,
                                  fresh_key="dropout")
  assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses


@pytest.mark.parametrize("tied", [False, True])
def test_flax_lm1b_transformer_every_parameter_has_a_block(tied):
  config = TransformerConfig(
      vocab_size=40, output_vocab_size=40, emb_dim=16, num_heads=2,
      num_layers=2, qkv_dim=16, mlp_dim=32, max_len=16,
      logits_via_embedding=tied)
  model = TransformerLM(config)
  ids = jnp.asarray(np.random.default_rng(0).integers(1, 40, (4, 12)))
  batch = {"ids": ids, "dropout": jax.random.PRNGKey(2)}

  def loss_fn(p, b):    # next-token loss (the model shifts its inputs right)
    logits = model.apply(p, b["ids"], rngs={"dropout": b["dropout"]})
    return kfe.softmax_cross_entropy(logits.reshape(-1, 40), b["ids"].reshape(-1))

  with jax.enable_x64(False):
    params = model.init({"params": jax.random.PRNGKey(0),
                         "dropout": jax.random.PRNGKey(1)}, ids)
    text = kfe.describe_layers(loss_fn, params, batch)
  assert "Every parameter belongs to a layer." in text, text
  share = text.splitlines()[-1]
  assert "fallback 0.0%" in share, share
  kron = float(share.split("kronecker ")[1].split("%")[0])
  assert kron > 96.0, share          # the rest: LayerNorm scales and shifts
  table = next(r.split() for r in text.splitlines() if r.startswith(
      "params/decoder/Embed_0"))
  # tied: one block for the lookup and the output projection (K-FAC-expand
  # over both uses); untied: the embedding block with its diagonal A
  assert table[1:4] == (["tied", "kronecker", "40x16"] if tied else
                        ["embedding", "kronecker", "diag(40)x16"]), table


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["grouped_query", "multi_head"])
def test_flax_gemma_nnx_transformer_every_kernel_has_a_block_and_trains(kv_heads):
  """Four query heads over two key/value heads (``kv_einsum``) or four
  (``qkv_einsum``); one local and one global layer."""
  from flax import nnx
  vocab, n, t = 40, 8, 12
  config = gemma_cfg.TransformerConfig.gemma3_270m(
      num_layers=2, num_embed=vocab, embed_dim=16, hidden_dim=32, num_heads=4,
      head_dim=8, num_kv_heads=kv_heads, sliding_window_size=4,
      attention_types=(gemma_cfg.AttentionType.LOCAL_SLIDING,
                       gemma_cfg.AttentionType.GLOBAL))
  rng = np.random.default_rng(0)
  ids = rng.integers(1, vocab, (n, t + 1)).astype(np.int32)
  ids[:2, -3:] = 0                        # padding, masked as the example does
  batch = {"inputs": jnp.asarray(ids[:, :-1]), "targets": jnp.asarray(ids[:, 1:])}

  with jax.enable_x64(False):
    graphdef, params = nnx.split(gemma.Transformer(config, rngs=nnx.Rngs(0)),
                                 nnx.Param)

    def loss_fn(p, b):   # examples/gemma/train.py's step, with kfe's loss
      input_mask = b["inputs"] > 0
      logits, _ = nnx.merge(graphdef, p)(
          b["inputs"], positions=gemma.build_positions_from_mask(input_mask),
          cache=None, attention_mask=gemma.make_causal_attn_mask(input_mask))
      return kfe.softmax_cross_entropy(logits, b["targets"],
                                       weights=(b["targets"] > 0) & input_mask)

    # per layer: q and kv (or qkv), the attention output, gate, up and down
    losses = _covered_and_trained(loss_fn, params, batch,
                                  dense_layers=2 * (6 if kv_heads == 2 else 5),
                                  kronecker_share=95.0)
    text = kfe.describe_layers(loss_fn, params, batch)
  embedder = next(r.split() for r in text.splitlines() if r.startswith("embedder"))
  assert embedder[1:4] == ["tied", "kronecker", "40x16"], embedder
  assert losses[-1] < 0.6 * losses[0], losses


def test_flax_imagenet_resnet_under_pmap_every_parameter_has_a_block_and_trains():
  """Two stages of one block each (a strided one with a projection), 8
  devices of 2 examples; the optimizer and ``describe_layers`` get the axis
  its BatchNorm averages over."""
  import functools
  import optax
  devices, per_device = 8, 2
  if len(jax.devices()) < devices:
    pytest.skip(f"needs {devices} devices (run through tests/conftest.py)")
  model = functools.partial(imagenet.ResNet, block_cls=imagenet.ResNetBlock)(
      stage_sizes=[1, 1], num_classes=4, num_filters=4)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(devices * per_device, 16, 16, 3)).astype(np.float32)
  y = (x[..., 0].mean((1, 2)) > 0).astype(np.int32) + 2 * (
      x[..., 1].mean((1, 2)) > 0).astype(np.int32)

  def loss_fn(p, b):     # the example's train step, with kfe's loss
    logits, new = model.apply({"params": p, "batch_stats": b["batch_stats"]},
                              b["x"], mutable=["batch_stats"])
    return kfe.softmax_cross_entropy(logits, b["y"]), new["batch_stats"]

  with jax.enable_x64(False):
    variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), x[:2],
                                           train=False))()
    params, stats = variables["params"], variables["batch_stats"]
    local = {"x": x[:per_device], "y": y[:per_device], "batch_stats": stats}
    text = kfe.describe_layers(loss_fn, params, local, has_aux=True,
                               axis_name="batch")
    assert "Every parameter belongs to a layer." in text, text
    assert "fallback 0.0%" in text.splitlines()[-1], text
    # the stem, two convs per block, the projection; BatchNorm scale and bias
    assert sum(r.split()[1:2] == ["conv2d"] for r in text.splitlines()) == 6, text
    assert sum(r.split()[1:2] == ["scale_and_shift"] for r in text.splitlines()) == 6
    opt = kfe.kfac(loss_fn, 0.3, damping=0.1, kl_clip=1e-2, has_aux=True,
                   axis_name="batch", example_batch=local)
    vg = kfe.value_and_grad(loss_fn, has_aux=True, axis_name="batch")

    def step(p, s, b, key):
      (loss, new_stats), g, curv = vg(p, b, key, opt_state=s)
      u, s = opt.update(jax.lax.pmean(g, "batch"), s, p, batch=b, key=key,
                        curvature=curv)
      return optax.apply_updates(p, u), s, jax.lax.pmean(loss, "batch"), new_stats

    step = jax.pmap(step, axis_name="batch", in_axes=(0, 0, 0, None))
    copies = lambda t: jax.tree_util.tree_map(lambda a: np.stack([a] * devices), t)
    p, s, stats = copies(params), copies(opt.init(params)), copies(stats)
    shard = lambda a: a.reshape((devices, per_device) + a.shape[1:])
    losses = []
    for i in range(12):
      p, s, loss, stats = step(p, s, {"x": shard(x), "y": shard(y),
                                      "batch_stats": stats}, jax.random.PRNGKey(i))
      losses.append(float(np.asarray(loss)[0]))
  assert np.all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0], losses


def test_flax_vae_every_kernel_has_a_block_and_trains():
  """The example's loss (``train.py``): summed binary cross-entropy per
  image (``kfe.sigmoid_cross_entropy`` registers it) plus the mean KL term,
  whose curvature is not modelled; its gradient is preconditioned."""
  rng = np.random.default_rng(0)
  images = (rng.random((32, 784)) < 0.3).astype(np.float32)   # its decoder: 784
  model = vae.model(latents=4)

  def kl_divergence(mean, logvar):    # examples/vae/train.py's, per image
    return -0.5 * jnp.sum(1 + logvar - jnp.square(mean) - jnp.exp(logvar), -1)

  def loss_fn(p, b):
    recon, mean, logvar = model.apply({"params": p}, b["x"], b["z_rng"])
    return (kfe.sigmoid_cross_entropy(recon, b["x"])
            + kl_divergence(mean, logvar).mean())

  with jax.enable_x64(False):
    batch = {"x": jnp.asarray(images), "z_rng": jax.random.PRNGKey(1)}
    params = model.init(jax.random.PRNGKey(0), batch["x"], batch["z_rng"])["params"]
    # encoder fc1, fc2_mean, fc2_logvar; decoder fc1, fc2
    losses = _covered_and_trained(loss_fn, params, batch, dense_layers=5,
                                  fresh_key="z_rng")
  assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_flax_wmt_encoder_decoder_every_parameter_has_a_block_and_trains():
  config = wmt.TransformerConfig(
      vocab_size=30, output_vocab_size=30, emb_dim=16, num_heads=2,
      num_layers=2, qkv_dim=16, mlp_dim=32, max_len=16, dropout_rate=0.1,
      attention_dropout_rate=0.1, deterministic=False, share_embeddings=True,
      logits_via_embedding=True)
  model = wmt.Transformer(config)
  rng = np.random.default_rng(0)
  inputs = rng.integers(1, 30, (8, 10)).astype(np.int32)
  targets = rng.integers(1, 30, (8, 9)).astype(np.int32)
  targets[:2, -2:] = 0                      # padding: weight 0, as in train.py

  def loss_fn(p, b):   # train.py's loss / weight_sum: Σ w·l / Σ w
    logits = model.apply({"params": p}, b["inputs"], b["targets"],
                         rngs={"dropout": b["dropout"]})
    weights = b["targets"] > 0
    return kfe.softmax_cross_entropy(logits, b["targets"], weights=weights) * (
        weights.size / jnp.sum(weights))

  with jax.enable_x64(False):
    batch = {"inputs": jnp.asarray(inputs), "targets": jnp.asarray(targets),
             "dropout": jax.random.PRNGKey(2)}
    params = model.init({"params": jax.random.PRNGKey(0),
                         "dropout": jax.random.PRNGKey(1)},
                        batch["inputs"], batch["targets"])["params"]
    with warnings.catch_warnings():   # its normaliser is read at run time
      warnings.filterwarnings("error", message="loss_fn: the value of loss helper")
      text = kfe.describe_layers(loss_fn, params, batch)
    shared = next(r.split() for r in text.splitlines()
                  if r.startswith("shared_embedding"))
    assert shared[1:4] == ["tied", "kronecker", "30x16"], shared
    # TENGraD: the encoder, the table and the layers before the decoder's
    # last attention take the 8 sequences as examples (their positions
    # reach other positions' losses); the last MLP stays per target token
    rows = {r.split()[0]: " ".join(r.split()[2:6]) for r in kfe.describe_layers(
        loss_fn, params, batch, blocks="woodbury").splitlines() if r.strip()}
    assert rows["shared_embedding"] == "woodbury n=8 per sequence", rows
    assert rows["encoder/encoderblock_0/MlpBlock_0/Dense_0"].startswith(
        "woodbury n=8 per sequence"), rows
    assert rows["decoder/encoderdecoderblock_1/MlpBlock_0/Dense_0"].startswith(
        "woodbury n=72 17x32"), rows
    # encoder: 2 × (q, k, v, out, 2 MLP) = 12; decoder: 2 × (self- and
    # cross-attention q, k, v, out, 2 MLP) = 20
    losses = _covered_and_trained(loss_fn, params, batch, dense_layers=32,
                                  fresh_key="dropout", kronecker_share=95.0)
  assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
