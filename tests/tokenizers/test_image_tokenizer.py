"""Image tokenizer: shapes and dtypes per modality, bad input, metrics, and a tiny overfit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mmjax.config import ConfigError
from mmjax.data.shapes import world as shapes
from mmjax.errors import UserError
from mmjax.tokenizers import image_metrics
from mmjax.tokenizers.image import (ImageTokenizerConfig, create_tokenizer, patchify,
                                   semseg_pixel_weights, unpatchify)

TINY = dict(image_size=16, patch_size=4, width=32, num_heads=2, encoder_layers=1,
            decoder_layers=1, codebook_size=32, code_dim=8)


def _scenes(n, size=16):
  scenes = [shapes.generate_scene(i, image_size=size) for i in range(n)]
  return {k: np.stack([s[k] for s in scenes]) for k in ("rgb", "depth", "semseg")}


@pytest.mark.parametrize("modality,quantizer", [("rgb", "vq"), ("depth", "fsq"), ("semseg", "vq")])
def test_tokenize_detokenize_shapes_and_dtypes(modality, quantizer):
  cfg = ImageTokenizerConfig(modality=modality, quantizer=quantizer, fsq_levels=(4, 3, 3), **TINY)
  model = create_tokenizer(cfg)
  images = _scenes(3)[modality]
  ids = model.tokenize(images)
  assert ids.shape == (3, 16) and ids.dtype == jnp.int32
  assert int(ids.min()) >= 0 and int(ids.max()) < model.codebook_size
  out = np.asarray(model.detokenize(ids))
  want = {"rgb": ((3, 16, 16, 3), np.uint8), "depth": ((3, 16, 16), np.float32),
          "semseg": ((3, 16, 16), np.uint8)}[modality]
  assert (out.shape, out.dtype) == want
  if modality == "semseg":
    assert out.max() < cfg.num_classes
  if modality == "depth":
    assert out.min() >= cfg.depth_min and out.max() <= cfg.depth_max
  ids2, recon = model.reconstruct(images)
  np.testing.assert_array_equal(ids2, ids)
  np.testing.assert_array_equal(recon, out)
  # Tokens of an image do not depend on the other images of the batch.
  np.testing.assert_array_equal(model.tokenize(images[1:2]), ids[1:2])


def test_local_codes_depend_on_the_patch_alone():
  # The same 4x4 patch content, placed in every cell of a grid over different surroundings,
  # gets one code with local_codes; the ViT encoder (positions, attention) gives it several.
  rng = np.random.default_rng(0)
  patch = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
  images = rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
  for k in range(16):  # image k holds the patch in cell k
    r, c = divmod(k, 4)
    images[k, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = patch
  for local in (True, False):
    model = create_tokenizer(ImageTokenizerConfig(modality="rgb", local_codes=local,
                                                  **dict(TINY, codebook_size=256)))
    z = np.asarray(model.encoder(jnp.asarray(images, jnp.float32) / 255.0)).reshape(16, 16, -1)
    cell = z[np.arange(16), np.arange(16)]  # [16, code_dim]: the patch's latent in each image
    spread = float(np.abs(cell - cell[0]).max())
    assert spread < 1e-5 if local else spread > 1e-2, (local, spread)
    if local:
      ids = np.asarray(model.tokenize(images))
      assert len(set(ids[np.arange(16), np.arange(16)].tolist())) == 1


def test_code_norm_makes_the_decoder_blind_to_the_code_embedding_scale():
  # With the norm, the code embedding enters the decoder at unit scale, however small the
  # embedding's weights are; without it, shrinking them changes the output.
  codes = jax.random.normal(jax.random.key(0), (2, 4, 4, 8))
  for code_norm in (True, False):
    model = create_tokenizer(ImageTokenizerConfig(modality="rgb", code_norm=code_norm, **TINY))
    before = model.decoder(codes)
    model.decoder.embed.kernel[...] *= 0.1
    model.decoder.embed.bias[...] = model.decoder.embed.bias[...] * 0.1
    after = model.decoder(codes)
    change = float(jnp.max(jnp.abs(after - before)))  # outputs are of order 1
    assert change < 1e-2 if code_norm else change > 0.3, (code_norm, change)


def test_semseg_class_balance_weights_pixels_by_class_frequency():
  labels = jnp.asarray([[[0, 0], [0, 2]]])  # class 0: 3/4 of the pixels, class 2: 1/4
  np.testing.assert_array_equal(semseg_pixel_weights(labels, 3, 0.0), np.ones((1, 2, 2)))
  np.testing.assert_allclose(semseg_pixel_weights(labels, 3, 0.5),
                             [[[0.75 ** -0.5] * 2, [0.75 ** -0.5, 2.0]]], rtol=1e-6)
  # The loss is the weighted mean of the pixels' negative log-likelihoods.
  logits = jax.random.normal(jax.random.key(1), (1, 2, 2, 3))
  nll = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), np.asarray(labels)[..., None],
                            axis=-1)[..., 0]
  for balance in (0.0, 0.5):
    cfg = ImageTokenizerConfig(modality="semseg", num_classes=3, class_balance=balance,
                               **{**TINY, "image_size": 8})
    w = np.asarray(semseg_pixel_weights(labels, 3, balance))
    got = create_tokenizer(cfg).reconstruction_loss(logits, labels.astype(jnp.uint8))
    np.testing.assert_allclose(got, np.sum(w * nll) / np.sum(w), rtol=1e-5)


def test_fsq_codebook_size_follows_levels():
  cfg = ImageTokenizerConfig(quantizer="fsq", fsq_levels=(8, 5, 5, 5))
  assert (cfg.codebook_size, cfg.code_dim) == (1000, 4)


def test_depth_normalisation_round_trips():
  model = create_tokenizer(ImageTokenizerConfig(modality="depth", **TINY))
  depth = jnp.asarray([[1.0, 2.5, 9.9, 16.0]])
  x = model.normalize_depth(depth)
  np.testing.assert_allclose(x[0, [0, -1]], [2 * np.log(2) / np.log(32) - 1, 1.0], rtol=1e-6)
  np.testing.assert_allclose(model.denormalize_depth(x), depth, rtol=1e-5)


def test_patchify_inverts():
  x = jnp.arange(2 * 8 * 12 * 3, dtype=jnp.float32).reshape(2, 8, 12, 3)
  p = patchify(x, 4)
  assert p.shape == (2, 6, 48)
  np.testing.assert_array_equal(p[0, 1, :3], x[0, 0, 4])  # patch (0, 1) starts at pixel (0, 4)
  np.testing.assert_array_equal(unpatchify(p, 2, 3, 4), x)


def test_bad_input_is_a_clear_error():
  model = create_tokenizer(ImageTokenizerConfig(modality="rgb", **TINY))
  with pytest.raises(UserError, match=r"shape \[batch, 16, 16, 3\], got \[2, 16, 16\]"):
    model.tokenize(np.zeros((2, 16, 16), np.uint8))
  with pytest.raises(UserError, match="uint8"):
    model.tokenize(np.zeros((2, 16, 16, 3), np.float32))
  with pytest.raises(UserError, match=r"\[0, 32\)"):
    model.detokenize(np.full((1, 16), 32))
  with pytest.raises(UserError, match=r"shape \[batch, 16\]"):
    model.detokenize(np.zeros((1, 15), np.int32))
  with pytest.raises(ConfigError, match="patch_size"):
    ImageTokenizerConfig(image_size=64, patch_size=6)
  with pytest.raises(ConfigError, match="modality"):
    ImageTokenizerConfig(modality="normals")


def test_metrics_against_hand_computed_values():
  true = np.zeros((2, 2, 2, 3), np.uint8)
  pred = true.copy()
  pred[0, 0, 0, 0] = 12  # image 0: MSE 144 / 12 = 12; image 1 exact (floored)
  expected = (10 * np.log10(255 ** 2 / 12) + 10 * np.log10(255 ** 2 / image_metrics.MIN_MSE)) / 2
  np.testing.assert_allclose(image_metrics.psnr(pred, true), expected)
  abs_rel = image_metrics.depth_abs_rel(np.array([1.1, 4.0]), np.array([1.0, 2.0]))
  np.testing.assert_allclose(abs_rel, (0.1 + 1.0) / 2)
  conf = image_metrics.confusion_matrix(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), 4)
  scores = image_metrics.semseg_scores(conf)
  assert scores["pixel_acc"] == 0.75
  np.testing.assert_allclose(scores["miou"], (1 + 1 / 2 + 1 / 2) / 3)  # class 3 absent: skipped
  usage = image_metrics.codebook_usage(np.array([0, 0, 1, 1]), 4)
  assert usage["codes_used"] == 0.5
  np.testing.assert_allclose(usage["perplexity"], 2.0)


def test_evaluate_image_tokenizer_keys_and_ranges():
  model = create_tokenizer(ImageTokenizerConfig(modality="semseg", **TINY))
  metrics = image_metrics.evaluate_image_tokenizer(model, _scenes(5)["semseg"], batch_size=2)
  assert metrics["num_images"] == 5
  assert 0 <= metrics["miou"] <= 1 and 0 <= metrics["pixel_acc"] <= 1
  assert 0 < metrics["codes_used"] <= 1 and 1 <= metrics["perplexity"] <= 32


def test_tiny_tokenizer_overfits_two_images():
  cfg = ImageTokenizerConfig(modality="rgb", ema_decay=0.8, **TINY)  # a fast codebook for few steps
  model = create_tokenizer(cfg)
  images = jnp.asarray(_scenes(2)["rgb"])
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))

  @jax.jit
  def step(state, rng):
    model, optimizer = nnx.merge(graphdef, state)
    (loss, metrics), grads = nnx.value_and_grad(
        lambda m: m.loss(images, train=True, rng=rng), has_aux=True)(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), metrics["recon_rgb"]

  losses = []
  for i in range(150):
    state, recon = step(state, jax.random.key(i))
    losses.append(float(recon))
  assert losses[-1] < losses[0] / 8, losses[::10]


def _tiny_objective_config(**train):
  from mmjax.objectives.tokenizer import image_tokenizer_config

  config = image_tokenizer_config("rgb", "runlocal")
  config.data.image_size = 16
  config.model.update(image_size=16, **{k: v for k, v in TINY.items() if k != "image_size"})
  config.train.update({"batch_size": 8, **train})
  return config


# 2 micro-batches thread the state through a scan; 1 is the path the training runs exercise.
@pytest.mark.parametrize("microbatches", [2])
def test_trainer_step_carries_the_codebook_state(microbatches):
  from mmjax import sharding as mmsharding
  from mmjax.train import loop, step as trainstep, state as trainstate

  config = _tiny_objective_config(microbatches=microbatches, batch_size=8 * microbatches)
  config.model.dead_threshold = 0.0  # no restarts: the EMA alone, checkable by hand
  objective, setup = loop.build(config)
  state = trainstate.init_state(config, setup)
  np.testing.assert_array_equal(state["rest"]["quantizer"]["ema_count"][...], 0.0)
  step = trainstep.jit_step(setup, config.train)
  it = objective.make_iterator("train", 0, 1)
  counts = []
  with setup.context():
    for _ in range(2):
      state, metrics = step(state, mmsharding.global_batch(next(it), setup.batch_shardings))
      counts.append(np.asarray(state["rest"]["quantizer"]["ema_count"][...]))
  # Each micro-batch (8 images x 16 tokens) is one EMA update, in order: the sum of the counts
  # goes 0 -> d s + (1 - d) * 128 per micro-batch.
  d = config.model.ema_decay
  expected, sums = 0.0, []
  for _ in range(2):
    for _ in range(microbatches):
      expected = d * expected + (1 - d) * 128
    sums.append(expected)
  np.testing.assert_allclose([c.sum() for c in counts], sums, rtol=1e-5)
  if microbatches == 1:  # after one update: (1 - d) x the uses of each code
    uses = counts[0] / (1 - d)
    np.testing.assert_allclose(uses, np.round(uses), atol=1e-3)
  codes = np.asarray(state["rest"]["quantizer"]["codebook"][...])
  np.testing.assert_allclose(np.linalg.norm(codes, axis=1), 1.0, rtol=1e-5)


def test_tokenizer_iterator_is_deterministic_and_resumable():
  from mmjax.objectives.tokenizer import TokenizerObjective

  objective = TokenizerObjective(_tiny_objective_config())
  it = objective.make_iterator("train", 0, 1)
  next(it)
  saved = it.get_state()
  expected = next(it)["image"]
  again = objective.make_iterator("train", 0, 1)
  again.set_state(saved)
  np.testing.assert_array_equal(next(again)["image"], expected)
  assert expected.shape == (8, 16, 16, 3) and expected.dtype == np.uint8

