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


# Three-way guidance: groups of (conditions, start); one prompt ends in begin-image, one in text.
GROUPS = [([("text", [5, 6, 7]), ("image", [BOI, 21, 22, 23, EOI])], [BOI]),
          ([("image", [BOI, 24, 25, 26, EOI]), ("text", [8, 9])], [])]


def copies_of(groups, copies):
  """Copy-major prompts: every group's copy 0, then every group's copy 1, ..."""
  per_group = [gen.guidance_prompts([BOS], conds, start, copies) for conds, start in groups]
  return [p[c] for c in range(copies) for p in per_group]


def test_guidance_copies_condition_on_full_image_only_and_nothing():
  conditions, start = GROUPS[0]
  full, image_only, uncond = gen.guidance_prompts([BOS], conditions, start, 3)
  assert full == [BOS, 5, 6, 7, BOI, 21, 22, 23, EOI, BOI]
  assert image_only == [BOS, BOI, 21, 22, 23, EOI, BOI]  # the text condition is gone
  assert uncond == [BOS, BOI]
  assert gen.guidance_prompts([BOS], conditions, start, 2) == [full, uncond]
  assert gen.guidance_prompts([BOS], conditions, start, 1) == [full]
  # Every copy leaves the sampler in the same state (one token is sampled for all of them).
  assert len({gen.prompt_state(p, LAYOUT) for p in (full, image_only, uncond)}) == 1
  assert gen.three_way(1.2, 3.0) == pytest.approx((3.0, 1.2 - 3.0, 1.0 - 1.2))
  with pytest.raises(ValueError, match="needs a text and an image condition"):
    gen.guidance_prompts([BOS], [("text", [5])], [BOI], 3)
  with pytest.raises(ValueError, match="different sampler states"):
    gen.generate(None, [full, [BOS]], LAYOUT, new_tokens=2,
                 sample=gen.SampleConfig(guidance=gen.two_way(2.0)))


def test_three_way_guidance_mixes_copies_and_reduces_to_unguided_and_two_way():
  """The mix of the spec, with each copy fed its group's sampled token; scales of 0 and 1 give
  the unguided and two-way results (the weights are traced: one program per copy count)."""
  model = helpers.make_model(helpers.make_cfg())
  new = 6
  three = copies_of(GROUPS, 3)

  def run(prompts, weights):
    sample = gen.SampleConfig(temperature=0.0, guidance=weights)
    return gen.generate(model, prompts, LAYOUT, new_tokens=new, sample=sample, return_logits=True)

  tokens, logits = run(three, gen.three_way(1.2, 3.0))
  # The spec's form against a full recomputation of each copy (right-aligned: the same columns).
  rows = [p + tokens[r % 2].tolist() for r, p in enumerate(three)]
  full = full_logits(model, rows)[:, -new - 1:-1]
  f, i, u = full[0:2], full[2:4], full[4:6]
  finite = np.isfinite(logits)
  np.testing.assert_allclose(logits[finite], (u + 1.2 * (i - u) + 3.0 * (f - i))[finite],
                             rtol=1e-4, atol=1e-3)
  # The copies condition on different things, so their predictions differ.
  assert np.abs(f - i).max() > 1e-2 and np.abs(i - u).max() > 1e-2
  for p, t in zip(three[:2], tokens):
    _check_sequence(p, t.tolist(), len(p) + new)

  def same(a, b):
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], rtol=1e-5, atol=1e-5)

  same(run(three, gen.three_way(1.0, 1.0)), run(three[:2], (1.0,)))  # unguided
  uncond_only = three[:2] + three[4:]
  same(run(three, gen.three_way(2.0, 2.0)), run(uncond_only, gen.two_way(2.0)))  # full vs uncond
  same(run(three, gen.three_way(1.0, 2.0)), run(three[:4], gen.two_way(2.0)))  # full vs image


def test_image_prompt_blocks_match_training_and_images_are_never_sampled():
  import dataclasses

  from mmjax import modalities as mm
  from mmjax.data.sequences.documents import SequenceBuilder
  registry = mm.from_config({"caption": dict(kind="sequence", vocab_size=20, max_length=8),
                             "tok_rgb": dict(kind="image_tokens", source="rgb", vocab_size=16,
                                             grid=(1, 3))})
  sequences = dict(templates=(("tok_rgb", "caption"),), probabilities=(1.0,),
                   image_blocks_bidirectional=True)
  builder = SequenceBuilder(registry, sequences, 32)
  layout = gen.TokenLayout.from_vocab(builder.vocab, registry, "tok_rgb", image_blocks=True)
  assert dataclasses.replace(layout, image_blocks=False, code_ranges=()) == LAYOUT
  record = {"tok_rgb": np.asarray([1, 2, 3]), "caption": np.asarray([5, 6])}
  doc = builder.documents(record, [0.5])[0]
  prompt = doc["tokens"][:6].tolist()  # BOS BOI codes EOI: the image -> caption prompt
  assert prompt == [BOS, BOI, 21, 22, 23, EOI]
  two_images = [BOS, BOI, 24, 25, 26, EOI, 9, BOI, 21, 22, 23, EOI]
  batch = gen.build_prompts([prompt, two_images], layout)
  np.testing.assert_array_equal(batch["block"][0, -6:], doc["block"][:6])  # as in training
  np.testing.assert_array_equal(batch["block"][1], [0, 0, 1, 1, 1, 0, 0, 0, 2, 2, 2, 0])
  assert not batch["block"][0, :-6].any()  # left padding

  model = helpers.make_model(helpers.make_cfg())
  new = 4
  tokens, logits = gen.generate(model, [prompt, two_images], layout, new_tokens=new,
                                sample=gen.SampleConfig(temperature=0.0), return_logits=True)
  assert np.all(np.isneginf(logits[..., BOI]))  # text mode never starts an image it cannot sample
  rows = [p + t.tolist() for p, t in zip([prompt, two_images], tokens)]
  b = gen.build_prompts(rows, layout)
  fields = {k: jnp.asarray(b[k]) for k in ("tokens", "modality", "segment", "block", "position")}
  ref = np.asarray(helpers.forward(model, fields))[:, -new - 1:-1]
  finite = np.isfinite(logits)
  np.testing.assert_allclose(logits[finite], ref[finite], rtol=1e-4, atol=1e-4)
  causal = np.asarray(helpers.forward(model, dict(fields, block=jnp.zeros_like(fields["block"]))))
  assert np.abs(causal[:, -new - 1:-1] - ref).max() > 1e-3  # the blocks do change the caption
  with pytest.raises(ValueError, match="bidirectional image blocks cannot sample image codes"):
    gen.generate(model, [[BOS, 7, BOI]], layout, new_tokens=4)
