"""4M samplers on a tiny random model: valid tokens, schedules, greedy limit, guidance, the cached
AR decode against full recomputation, chained targets."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.config import ConfigError
from mmjax.generate import fourm as gen
from mmjax.generate import fourm_schedules as sched
from mmjax.generate.fourm_settings import (TargetSettings, chain_order, for_modalities,
                                          target_settings)
from mmjax.tokenizers import special
from tests.models import fourm_fixtures as fx

SENTINELS = 8  # caption vocabulary 40: PAD UNK BOS EOS, [S_0]..[S_7] = 4..11, then text ids
B = 2


@pytest.fixture(scope="module")
def setup():
  model = fx.model()
  sampler = gen.FourMSampler(model, num_sentinels=SENTINELS,
                             vocab_limits={"tok_a": 40, "caption": 36})
  layout = gen.EncoderLayout(model.registry, ("rgb", "tok_a", "caption", "glob"))
  ctx = layout.empty(B)
  rng = np.random.default_rng(0)
  ctx = layout.with_pixels(ctx, "rgb", rng.integers(0, 256, (B, 16, 16, 3), dtype=np.uint8))
  ctx = layout.with_tokens(ctx, "glob", rng.integers(0, 24, (B, 4)))
  return model, sampler, layout, ctx


def test_token_schedules():
  for kind in ("cosine", "linear"):
    counts = sched.token_schedule(kind, np.array([9, 64, 3]), 4)
    np.testing.assert_array_equal(counts.sum(axis=1), [9, 64, 3])
    assert (counts[:2] >= 1).all() and (counts >= 0).all()
  np.testing.assert_array_equal(sched.token_schedule("linear", np.array([8]), 4), [[2, 2, 2, 2]])
  # Cosine fixes few tokens first and many last (MaskGIT): cos(pi/8)=.924 -> 64 - 59 = 5 first.
  np.testing.assert_array_equal(sched.token_schedule("cosine", np.array([64]), 4),
                                [[5, 14, 21, 24]])
  with pytest.raises(ConfigError, match="token_schedule"):
    sched.token_schedule("square", np.array([4]), 2)


def test_temperature_schedules_and_filters():
  np.testing.assert_allclose(sched.temperature_schedule("constant", 0.7, 3), [0.7] * 3)
  np.testing.assert_allclose(sched.temperature_schedule("linear", 1.0, 4), [1, .75, .5, .25])
  onex = sched.temperature_schedule("onex:0.1:0.5", 2.0, 5)
  assert onex[0] == pytest.approx(2.0) and onex[-1] == pytest.approx(0.1)
  assert (np.diff(onex) < 0).all()
  with pytest.raises(ConfigError, match="onex"):
    sched.temperature_schedule("onex:0.1", 1.0, 3)
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = lambda f: np.asarray(f > sched.NEG)[0].tolist()
  assert kept(sched.filter_logits(logits, 2, 1.0)) == [True, True, False, False]
  assert kept(sched.filter_logits(logits, 0, 0.7)) == [True, True, False, False]
  assert kept(sched.filter_logits(logits, 0, 0.5)) == [True, False, False, False]
  assert kept(sched.filter_logits(logits, 0, 0.81)) == [True, True, True, False]


@pytest.mark.parametrize("schedule", ["maskgit", "roar"])
def test_image_sampler_valid_tokens_and_schedule(setup, schedule):
  _, sampler, layout, ctx = setup
  settings = TargetSettings(schedule=schedule, token_schedule="cosine", steps=3)
  out = sampler.image(layout, ctx, "tok_a", settings, jax.random.key(0))
  assert out.tokens.shape == (B, 9) and out.tokens.dtype == np.int32
  assert ((out.tokens >= 0) & (out.tokens < 40)).all()  # the tokenizer's 40 of the head's 48
  assert (out.step_of >= 0).all()  # every cell fixed
  per_step = np.stack([(out.step_of == k).sum(axis=1) for k in range(3)], axis=1)
  np.testing.assert_array_equal(per_step, out.counts)
  np.testing.assert_array_equal(out.counts[0], sched.token_schedule("cosine", np.array([9]), 3)[0])


def test_partly_known_image_keeps_its_tokens(setup):
  _, sampler, layout, ctx = setup
  known = np.zeros((B, 9), bool)
  known[:, :4] = True
  given = np.full((B, 9), 7, np.int32)
  out = sampler.image(layout, ctx, "tok_a", TargetSettings(steps=3, token_schedule="linear"),
                      jax.random.key(1), tokens_BG=given, known_BG=known)
  np.testing.assert_array_equal(out.tokens[:, :4], 7)
  assert (out.step_of[:, :4] == -1).all()
  np.testing.assert_array_equal(out.counts, [[2, 1, 2]] * B)  # round(5/3), round(10/3), 5


def test_temperature_to_zero_is_greedy(setup):
  _, sampler, layout, ctx = setup
  for schedule in ("maskgit", "roar"):
    cold = sampler.image(layout, ctx, "tok_a", TargetSettings(schedule=schedule, steps=3,
                                                              temperature=1e-5),
                         jax.random.key(2))
    greedy = sampler.image(layout, ctx, "tok_a", TargetSettings(schedule=schedule, steps=3,
                                                                temperature=0.0),
                           jax.random.key(3) if schedule == "maskgit" else jax.random.key(2))
    np.testing.assert_array_equal(cold.tokens, greedy.tokens)
  # Autoregressive: every greedy token is the argmax of the logits at its step.
  out = sampler.sequence(layout, ctx, "caption", TargetSettings(temperature=0.0),
                         jax.random.key(4), return_logits=True)
  steps = (out.raw[:, 1:] != special.PAD).sum(axis=1)
  for b in range(B):
    np.testing.assert_array_equal(out.raw[b, 1:1 + steps[b]],
                                  out.logits[b, :steps[b]].argmax(axis=-1))


def test_sequence_tokens_valid_and_cached_logits_equal_full_recompute(setup):
  model, sampler, layout, ctx = setup
  out = sampler.sequence(layout, ctx, "caption", TargetSettings(temperature=1.0),
                         jax.random.key(5), return_logits=True)
  assert out.raw.shape == (B, 11) and (out.raw[:, 0] == 4 + 1).all()  # starts at [S_1]
  emitted = out.raw[:, 1:]
  nonpad = emitted != special.PAD
  assert ((emitted[nonpad] >= 3) & (emitted[nonpad] < 36)).all()
  sentinels = emitted[(emitted >= 4) & (emitted < 12)]
  assert (sentinels == 4 + 2).all()  # only the final [S_2], nothing after it
  for b in range(B):
    if out.finished[b]:
      end = list(emitted[b]).index(4 + 2)
      assert (emitted[b, end + 1:] == special.PAD).all()
  for b in range(B):  # merged text: no sentinels, no EOS, all real ids
    assert all(3 < t < 36 and not 4 <= t < 12 for t in out.ids[b])
  # Full recomputation: the decoder over the whole teacher-forced sequence, no cache.
  slots = int(nonpad.sum(axis=1).min())
  reg = model.registry
  batch = dict({k: jnp.asarray(v) for k, v in ctx.items()},
               dec_tokens=jnp.asarray(out.raw[:, :slots]),
               dec_modality=jnp.full((B, slots), reg.index("caption"), jnp.int32),
               dec_positions=jnp.broadcast_to(jnp.arange(slots, dtype=jnp.int32), (B, slots)),
               dec_valid=jnp.ones((B, slots), bool))
  full = jax.jit(lambda m, b: m.logits(m(b), "caption"))(model, batch)
  allowed = np.asarray(out.logits[0, 0] > sched.NEG)
  np.testing.assert_allclose(out.logits[:, :slots][..., allowed], np.asarray(full)[..., allowed],
                             rtol=1e-4, atol=1e-4)


def test_guidance_scale_zero_is_unconditional_and_one_is_unguided(setup):
  _, sampler, layout, ctx = setup
  unconditional = layout.with_tokens(layout.with_tokens(ctx, "glob", np.zeros((B, 0), np.int32)),
                                    "rgb", np.zeros((B, 0), np.int32))
  key = jax.random.key(6)
  for scale, reference_ctx in ((0.0, unconditional), (1.0, ctx)):
    guided = sampler.image(layout, ctx, "tok_a", TargetSettings(steps=3, cfg_scale=scale), key)
    plain = sampler.image(layout, reference_ctx, "tok_a", TargetSettings(steps=3), key)
    np.testing.assert_array_equal(guided.tokens, plain.tokens)
  with_glob_only = layout.with_tokens(ctx, "glob", np.asarray(ctx["enc_tokens"])[:, -4:])
  visible, weights = gen.guidance(layout, with_glob_only, "tok_a", TargetSettings(cfg_scale=3.0))
  assert visible.shape == (2, layout.size) and weights.tolist() == [3.0, -2.0]


def test_guidance_mixes_logits_single_and_multi_condition(setup):
  """First-step logits: l_u + s (l_c - l_u), and l_u + sum_i w_i (l_i - l_u) per condition."""
  _, sampler, layout, ctx = setup
  key = jax.random.key(7)

  def first_logits(c, settings):
    return sampler.sequence(layout, c, "caption", settings, key, return_logits=True).logits[:, 0]

  hide = lambda c, name: layout.with_tokens(c, name, np.zeros((B, 0), np.int32))
  no_rgb = layout.with_tokens(ctx, "rgb", np.zeros((B, 0), np.int32))
  l_full = first_logits(ctx, TargetSettings())
  l_none = first_logits(hide(no_rgb, "glob"), TargetSettings())
  l_rgb = first_logits(hide(ctx, "glob"), TargetSettings())
  l_glob = first_logits(no_rgb, TargetSettings())
  ok = l_full > sched.NEG / 2
  guided = first_logits(ctx, TargetSettings(cfg_scale=2.5))
  np.testing.assert_allclose(guided[ok], (l_none + 2.5 * (l_full - l_none))[ok], rtol=1e-4,
                             atol=1e-4)
  multi = first_logits(ctx, TargetSettings(cfg_weights=(("glob", 0.5), ("rgb", 2.0))))
  np.testing.assert_allclose(multi[ok], (l_none + 2.0 * (l_rgb - l_none)
                                         + 0.5 * (l_glob - l_none))[ok], rtol=1e-4, atol=1e-4)


def test_chained_generation_feeds_outputs_forward(setup):
  _, sampler, layout, ctx = setup
  plan = [("caption", TargetSettings(temperature=0.0)), ("tok_a", TargetSettings(steps=3))]
  key = jax.random.key(8)
  results, final = sampler.chain(layout, ctx, plan, key)
  caption = results["caption"].ids
  o, _ = layout.window("caption")
  for b in range(B):  # the caption became an input: its tokens + EOS (max_length 10), valid
    expected = caption[b][:9] + [special.EOS]
    n = len(expected)
    np.testing.assert_array_equal(final["enc_tokens"][b, o:o + n], expected)
    assert final["enc_valid"][b, o:o + n].all() and not final["enc_valid"][b, o + n:o + 10].any()
  # The image step saw the caption: rerunning it on the context with the caption reproduces it.
  _, k_image = jax.random.split(jax.random.split(key)[0])
  tokens, valid = sampler.sequence_input("caption", caption)
  with_caption = layout.with_tokens(ctx, "caption", tokens, valid)
  again = sampler.image(layout, with_caption, "tok_a", TargetSettings(steps=3), k_image)
  np.testing.assert_array_equal(again.tokens, results["tok_a"].tokens)
  o, s = layout.window("tok_a")
  np.testing.assert_array_equal(final["enc_tokens"][:, o:o + s], results["tok_a"].tokens)


def test_spans_and_merge():
  ids = special.SpecialIds(num_sentinels=SENTINELS)
  s = lambda k: 4 + k
  generated = gen.spans([s(1), 20, 21, s(2), 22, special.EOS, s(3), 0, 0], ids)
  assert generated == {1: [20, 21], 2: [22, special.EOS], 3: []}
  assert gen.merge_spans([30, s(1), 31, s(2)], generated, ids) == [30, 20, 21, 31, 22]
  assert gen.merge_spans([s(1)], {1: [25, special.EOS, 26]}, ids) == [25]


def test_settings_from_config_section():
  names = ("tok_a", "caption")
  got = target_settings({"steps": 5, "steps_per_modality": "tok_a:3", "cfg_weights": "caption:2",
                         "temperature_schedule": "linear", "temperature": 0.7,
                         "temperature_per_modality": "caption:0"}, names, names)
  assert got["tok_a"].steps == 3 and got["caption"].steps == 5
  assert got["tok_a"].temperature == 0.7 and got["caption"].temperature == 0.0
  assert got["tok_a"].cfg_weights == (("caption", 2.0),)
  assert dataclasses.asdict(got["caption"])["temperature_schedule"] == "linear"
  with pytest.raises(ConfigError, match="steps_per_modality"):
    target_settings({"steps_per_modality": "tok_z:3"}, names, names)
  with pytest.raises(ConfigError, match="cfg_weights"):
    target_settings({"cfg_weights": "caption=2"}, names, names)
  with pytest.raises(ConfigError, match="temperature_per_modality"):
    target_settings({"temperature_per_modality": "det:0"}, names, names)
  kept = for_modalities({"temperature_per_modality": "caption:0,det:0", "cfg_weights": "det:2",
                         "steps": 5}, names)
  assert kept == {"temperature_per_modality": "caption:0", "cfg_weights": "", "steps": 5}
  with pytest.raises(ConfigError, match="image_schedule"):
    target_settings({"image_schedule": "random"}, names, names)
  assert chain_order({"order": "caption,tok_a"}, ["tok_a", "caption"]) == ["caption", "tok_a"]
  with pytest.raises(ConfigError, match="order"):
    chain_order({"order": "caption"}, ["tok_a", "caption"])
