"""Decoder sampling: KV-cache logits equal full recomputation, guidance mixing, the state machine."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.generate import decoder as gen

_spec = importlib.util.spec_from_file_location(
    "decoder_test_helpers", pathlib.Path(__file__).parents[1] / "models" / "test_decoder.py")
helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(helpers)

# V = 40 ids: text 0..19 (0..3 the tokenizer's reserved), image codes 20..35, BOI 36, EOI 37,
# BOS 38, EOS 39; 3 codes per image.
BOI, EOI, BOS, EOS = 36, 37, 38, 39
LAYOUT = gen.TokenLayout(vocab_size=40, text_first=4, text_end=20, image_first=20, image_end=36,
                         begin_image=BOI, end_image=EOI, eos=EOS, image_tokens=3,
                         modality_table=tuple([0] * 20 + [1] * 18 + [0, 0]))


def full_logits(model, rows):
  batch = gen.build_prompts(rows, LAYOUT)
  fields = {k: jnp.asarray(batch[k]) for k in ("tokens", "modality", "segment", "block", "position")}
  return np.asarray(helpers.forward(model, fields))


@pytest.mark.parametrize("sparsity", ["dense", "moma"])
def test_cached_decode_logits_equal_full_recomputation(sparsity):
  model = helpers.make_model(helpers.make_cfg(sparsity=sparsity))
  prompts = [[BOS, 5, 6, 7], [BOS, 9, 10, BOI]]
  tokens, logits = gen.generate(model, prompts, LAYOUT, new_tokens=6,
                                sample=gen.SampleConfig(temperature=0.0), return_logits=True)
  full = full_logits(model, [p + t.tolist() for p, t in zip(prompts, tokens)])
  for i in range(6):
    ref = full[:, 3 + i]
    finite = np.isfinite(logits[:, i])
    np.testing.assert_allclose(logits[:, i][finite], ref[finite], rtol=1e-4, atol=1e-4)
    assert np.all(tokens[:, i] == np.argmax(logits[:, i], -1))


def test_guidance_mixes_copies_and_feeds_the_first_copys_token():
  model = helpers.make_model(helpers.make_cfg())
  cond, uncond = [BOS, 5, 6, 7, BOI], [BOS, BOI]
  sample = gen.SampleConfig(temperature=0.0, guidance=gen.two_way(3.0))
  tokens, logits = gen.generate(model, [cond, uncond], LAYOUT, new_tokens=4, sample=sample,
                                return_logits=True)
  gen_ids = tokens[0].tolist()
  full_c = full_logits(model, [cond + gen_ids])[0, len(cond) - 1:-1]
  full_u = full_logits(model, [uncond + gen_ids])[0, len(uncond) - 1:-1]
  mixed = full_u + 3.0 * (full_c - full_u)
  finite = np.isfinite(logits[0])
  np.testing.assert_allclose(logits[0][finite], mixed[finite], rtol=1e-4, atol=1e-3)
  assert gen.three_way(1.2, 3.0) == pytest.approx((3.0, 1.2 - 3.0, 1.0 - 1.2))


def test_allowed_tokens_by_state_and_remaining_slots():
  state = jnp.asarray([gen.TEXT, gen.TEXT, gen.IMAGE, gen.IMAGE, gen.DONE])
  count = jnp.asarray([0, 0, 1, 3, 0])
  remaining = jnp.asarray([5, 4, 9, 9, 9])
  allowed = np.asarray(gen.allowed_tokens(state, count, remaining, LAYOUT))
  ids = np.arange(40)
  text = (ids >= 4) & (ids < 20)
  np.testing.assert_array_equal(allowed[0], text | (ids == EOS) | (ids == BOI))
  np.testing.assert_array_equal(allowed[1], text | (ids == EOS))  # 4 < 3 + 2 slots: no image
  np.testing.assert_array_equal(allowed[2], (ids >= 20) & (ids < 36))
  np.testing.assert_array_equal(allowed[3], ids == EOI)  # 3 codes done: end-image forced
  np.testing.assert_array_equal(allowed[4], ids == EOS)


def _check_sequence(prompt, generated, total):
  state, count = gen.prompt_state(prompt, LAYOUT)
  for j, t in enumerate(generated):
    slot = len(prompt) + j
    if state == gen.TEXT:
      assert (4 <= t < 20) or t == EOS or t == BOI, (prompt, generated)
      assert t != BOI or total - slot >= 5
    elif state == gen.IMAGE:
      assert (20 <= t < 36) if count < 3 else t == EOI, (prompt, generated)
    else:
      assert t == EOS
    state, count = gen.next_state(jnp.asarray([state]), jnp.asarray([count]), jnp.asarray([t]),
                                  LAYOUT)
    state, count = int(state[0]), int(count[0])


def test_state_machine_never_mixes_modalities_when_sampling():
  model = helpers.make_model(helpers.make_cfg(), seed=4)
  prompts = [[BOS, 5], [BOS, BOI], [BOS, 7, BOI, 21], [BOS, 8, 9]] * 3
  new = 9
  tokens = gen.generate(model, prompts, LAYOUT, new_tokens=new,
                        sample=gen.SampleConfig(temperature=3.0, top_p=0.99), seed=1)
  for p, t in zip(prompts, tokens):
    _check_sequence(p, t.tolist(), len(prompts[2]) + new)
  # Prompts that end inside an image start with codes and close the image on time.
  assert all(20 <= t < 36 for t in tokens[1, :3]) and tokens[1, 3] == EOI
  assert all(20 <= t < 36 for t in tokens[2, :2]) and tokens[2, 2] == EOI


def test_sampling_filters():
  logits = jnp.asarray([[0.0, 3.0, 1.0, 2.9, -1.0]] * 64)
  keys = jax.random.split(jax.random.key(0), 3)
  top1 = gen.sample_logits(keys[0], logits, gen.SampleConfig(top_k=1))
  assert np.all(np.asarray(top1) == 1)
  top2 = np.asarray(gen.sample_logits(keys[1], logits, gen.SampleConfig(top_k=2)))
  assert set(top2.tolist()) == {1, 3}
  # p = 0.5: the top id alone holds < 0.5 of the mass, so the nucleus is {1, 3}.
  nucleus = np.asarray(gen.sample_logits(keys[2], logits, gen.SampleConfig(top_p=0.5)))
  assert set(nucleus.tolist()) == {1, 3}
  greedy = gen.sample_logits(keys[0], logits, gen.SampleConfig(temperature=0.0))
  assert np.all(np.asarray(greedy) == 1)
