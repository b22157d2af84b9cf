"""Mixed-modal documents and packing: shared vocabulary, layout, targets, blocks, packing, resume."""

import collections
import json
import pickle

import grain
import numpy as np
import pytest

from mmjax import config as mmconfig
from mmjax import modalities as mm
from mmjax.config import ConfigError
from mmjax.data.sequences import batch as sequence_batch
from mmjax.data.sequences import documents as sequences
from mmjax.data.sequences import packing
from mmjax.errors import UserError

# text vocabulary 50 (caption and det share it), 2x3 images from a 30-code book
REGISTRY = mm.from_config(dict(
    caption=dict(kind="sequence", vocab_size=50, max_length=20),
    rgb=dict(kind="image_pixels", image_size=16, patch_size=8),
    tok_rgb=dict(kind="image_tokens", vocab_size=30, grid=(2, 3)),
    det=dict(kind="sequence", vocab_size=50, max_length=20),
    tok_depth=dict(kind="image_tokens", vocab_size=7, grid=(1, 2)),
))
TWO_WAY = dict(templates=(("caption", "tok_rgb"), ("tok_rgb", "caption")), probabilities=(0.5, 0.5))


def builder(max_length=32, **overrides):
  section = dict(TWO_WAY)
  section.update(overrides)
  return sequences.SequenceBuilder(REGISTRY, sequences.sequences_config(section, REGISTRY),
                                   max_length)


def u(i, n=1):
  """The uniforms that draw the templates of record i."""
  return sequences.record_uniforms(0, i, n)


def record(i, rng=None):
  rng = rng or np.random.default_rng(i)
  return dict(index=np.int64(i), caption=rng.integers(4, 50, 1 + i % 9),
              tok_rgb=rng.integers(0, 30, (2, 3)), det=rng.integers(4, 50, 3),
              tok_depth=rng.integers(0, 7, (1, 2)))


def test_shared_vocab_layout_and_round_trip():
  vocab = sequences.SharedVocab.from_registry(REGISTRY)
  # text 0..49, tok_rgb 50..79, tok_depth 80..86, then BOI/EOI rgb, BOI/EOI depth, BOS, EOS
  assert (vocab.offset("tok_rgb"), vocab.offset("tok_depth"), vocab.offset("det")) == (50, 80, 0)
  assert (vocab.begin_image("tok_rgb"), vocab.end_image("tok_rgb")) == (87, 88)
  assert (vocab.begin_image("tok_depth"), vocab.end_image("tok_depth")) == (89, 90)
  assert (vocab.bos, vocab.eos, vocab.size) == (91, 92, 93)
  all_ids = np.arange(vocab.size)
  modality, local = vocab.to_local(all_ids)
  expected = np.array([0] * 50 + [2] * 30 + [4] * 7 + [2, 2, 4, 4, 0, 0])
  np.testing.assert_array_equal(modality, expected)
  np.testing.assert_array_equal(vocab.modality_of(all_ids), expected)
  np.testing.assert_array_equal(local[:87], np.r_[np.arange(50), np.arange(30), np.arange(7)])
  assert (local[87:] == -1).all() and vocab.is_special(all_ids).sum() == 6
  for name in ("caption", "tok_rgb", "tok_depth"):
    ids = np.arange(vocab.local_size(name))
    g = vocab.to_global(name, ids)
    m, back = vocab.to_local(g)
    np.testing.assert_array_equal(back, ids)
    assert (m == (0 if name == "caption" else REGISTRY.index(name))).all()
  with pytest.raises(ValueError, match=r"id 30 outside the vocabulary \[0, 30\) of 'tok_rgb'"):
    vocab.to_global("tok_rgb", [1, 30])
  with pytest.raises(ConfigError, match="not an image_tokens"):
    vocab.begin_image("caption")
  with pytest.raises(ValueError, match="outside"):
    vocab.to_local([93])


def test_document_layout_targets_and_weights_by_hand():
  b = builder(templates=(("caption", "tok_rgb"),), probabilities=(1.0,),
              loss_weights=dict(caption=2.0, tok_rgb=0.5))
  rec = dict(caption=np.array([7, 8, 3, 0, 0]), tok_rgb=np.array([[0, 1, 2], [3, 4, 29]]))
  (doc,) = b.documents(rec, u(0), record_id=5)
  # BOS, caption (its EOS and PADs dropped), BOI, 6 codes at offset 50, EOI, EOS
  tokens = [91, 7, 8, 87, 50, 51, 52, 53, 54, 79, 88, 92]
  assert doc["tokens"].tolist() == tokens
  assert doc["targets"].tolist() == tokens[1:] + [0]
  assert doc["position"].tolist() == list(range(12))
  assert doc["modality"].tolist() == [0, 0, 0] + [2] * 8 + [0]
  # weight of the target's modality: caption 2.0, tok_rgb 0.5 (BOI..EOI), EOS text 2.0; last 0
  assert doc["loss_weight"].tolist() == [2.0, 2.0] + [0.5] * 8 + [2.0, 0.0]
  assert doc["block"].tolist() == [0] * 12


def test_bidirectional_blocks_hide_visible_targets():
  b = builder(templates=(("tok_rgb", "caption", "tok_depth"),), probabilities=(1.0,),
              image_blocks_bidirectional=True)
  (doc,) = b.documents(record(3), u(0))
  block, w = doc["block"], doc["loss_weight"]
  # BOS BOI [6 codes] EOI caption(4) BOI [2 codes] EOI EOS
  assert block.tolist() == [0, 0] + [1] * 6 + [0] * 6 + [2] * 2 + [0, 0]
  inside = np.flatnonzero(block == 1)
  assert (w[inside[:-1]] == 0).all() and w[inside[-1]] == 1.0  # the last code predicts EOI
  assert w[1] == 1.0  # BOI predicts the first code causally


def test_packing_keeps_every_token_once_with_right_segments():
  b = builder(max_length=24, image_blocks_bidirectional=True,
              templates=(("caption", "tok_rgb"), ("tok_rgb", "caption"), ("det", "tok_depth")),
              probabilities=(0.4, 0.4, 0.2), documents_per_record=2)
  docs = [d for i in range(40) for d in b.documents(record(i), u(i, 2), i)]
  rows = packing.pack_documents(docs, 24)
  seen = []
  for row in rows:
    assert set(row) == set(sequence_batch.FIELDS)
    assert all(row[k].dtype == dt and row[k].shape == (24,) for k, dt in sequence_batch.FIELDS.items())
    seg = row["segment"]
    used = int((seg > 0).sum())
    assert (seg[used:] == 0).all() and (np.diff(seg[:used]) >= 0).all() and seg[0] == 1
    assert (np.diff(seg[:used]) <= 1).all()  # 1, 2, ... without gaps
    for name in sequence_batch.FIELDS:
      assert (row[name][used:] == 0).all()  # padding: token 0, weight 0, segment 0
    blocks = row["block"][row["block"] > 0]
    for s in range(1, seg.max() + 1):
      idx = np.flatnonzero(seg == s)
      assert (row["position"][idx] == np.arange(len(idx))).all()
      # the target of a slot is the next token of the same document; the last has weight 0
      np.testing.assert_array_equal(row["targets"][idx[:-1]], row["tokens"][idx[1:]])
      assert row["loss_weight"][idx[-1]] == 0 and row["tokens"][idx[-1]] == 92
      seen.append(tuple(row["tokens"][idx]))
    for blk in np.unique(blocks):  # one image per block: contiguous, 6 rgb or 2 depth codes
      idx = np.flatnonzero(row["block"] == blk)
      assert (np.diff(idx) == 1).all() and len(idx) in (6, 2)
      assert len(np.unique(seg[idx])) == 1
  assert collections.Counter(seen) == collections.Counter(tuple(d["tokens"]) for d in docs)
  # first-fit decreasing uses at most 11/9 OPT + 6/9 rows, and OPT >= total / 24
  lower = -(-sum(len(d["tokens"]) for d in docs) // 24)
  assert lower <= len(rows) <= 11 / 9 * lower + 6 / 9


def test_first_fit_decreasing_by_hand():
  assert packing.first_fit_decreasing([3, 5, 2, 4, 1], 6) == [[1, 4], [2, 3], [0]]
  assert packing.first_fit_decreasing([], 6) == []


def pipeline(records, b, seed, batch=2):
  ds = grain.MapDataset.source(records).to_iter_dataset()
  return packing.PackedSequencesIterDataset(ds, b, seed=seed, window=7).batch(batch, drop_remainder=True)


def test_grain_pipeline_is_deterministic_by_seed_and_resumes_exactly():
  b = builder(max_length=24)
  records = [record(i) for i in range(50)]
  run = lambda seed: [x["tokens"] for x in pipeline(records, b, seed)]  # noqa: E731
  first, again, other = run(3), run(3), run(4)
  assert len(first) > 5 and all(x.shape == (2, 24) for x in first)
  assert all((x == y).all() for x, y in zip(first, again)) and len(first) == len(again)
  assert any(x.shape != y.shape or (x != y).any() for x, y in zip(first, other))
  for stop in (0, 1, 3, len(first) - 1):
    it = iter(pipeline(records, b, 3))
    for _ in range(stop):
      next(it)
    state = json.loads(json.dumps(it.get_state()))  # Grain checkpoints states as JSON
    rest = [x["tokens"] for x in it]
    resumed = iter(pipeline(records, b, 3))
    resumed.set_state(state)
    again = [x["tokens"] for x in resumed]
    assert len(again) == len(rest) and all((x == y).all() for x, y in zip(rest, again))


def test_builder_pickles_for_grain_workers():
  b = builder(image_blocks_bidirectional=True)
  clone = pickle.loads(pickle.dumps(b))
  for one, two in zip(b.documents(record(4), u(4)), clone.documents(record(4), u(4))):
    assert all((one[k] == two[k]).all() for k in one)


def test_record_uniforms_are_a_pure_function_of_seed_and_record():
  assert sequences.record_uniforms(3, 10, 4) == sequences.record_uniforms(3, 10, 4)
  assert sequences.record_uniforms(3, 10, 2) != sequences.record_uniforms(4, 10, 2)
  assert sequences.record_uniforms(3, 10, 2) != sequences.record_uniforms(3, 11, 2)
  values = np.array([sequences.record_uniforms(0, i, 2) for i in range(4000)]).reshape(-1)
  assert values.min() >= 0 and values.max() < 1
  counts = np.histogram(values, bins=10, range=(0, 1))[0]  # chi-square, 9 dof: p(> 27.9) = 0.001
  assert ((counts - 800) ** 2 / 800).sum() < 27.9


def test_template_probabilities_are_respected():
  b = builder(templates=(("caption", "tok_rgb"), ("tok_rgb", "caption"), ("det",)),
              probabilities=(6.0, 3.0, 1.0), documents_per_record=2)
  counts = collections.Counter()
  for i in range(1500):
    for doc in b.documents(record(i), u(i, 2), i):
      second = int(doc["tokens"][1])
      counts["image" if second == 87 else ("det" if len(doc["tokens"]) == 5 else "caption")] += 1
  n = sum(counts.values())
  for key, p in (("caption", 0.6), ("image", 0.3), ("det", 0.1)):
    assert abs(counts[key] / n - p) < 4 * np.sqrt(p * (1 - p) / n), (key, counts)


def test_missing_modalities_and_long_documents():
  b = builder(templates=(("caption", "tok_rgb"), ("det",)), probabilities=(0.99, 0.01))
  rec = record(2)
  del rec["tok_rgb"]
  docs = [b.documents(rec, u(s))[0] for s in range(20)]
  assert all(len(d["tokens"]) == 5 for d in docs)  # only the det template applies
  with pytest.raises(UserError, match=r"record 9: no template applies; it has \['caption'\]"):
    b.documents(dict(index=9, caption=np.array([5])), u(0))
  long = dict(caption=np.arange(4, 40), tok_rgb=np.zeros((2, 3), np.int32))
  (doc,) = builder(max_length=16).documents(long, u(0))
  assert len(doc["tokens"]) == 16 and doc["loss_weight"][-1] == 0
  with pytest.raises(UserError, match="has 46 tokens, more than the sequence length 16"):
    builder(max_length=16, long_documents="error").documents(long, u(0), 4)


def test_bad_records_name_record_and_field():
  b = builder()
  rec = record(7)
  rec["caption"] = np.array([5, 60, 3])
  with pytest.raises(UserError, match=r"record 7, field 'caption': token 1 has id 60, outside "
                                      r"the modality's vocabulary \[0, 50\)"):
    b.documents(rec, u(0))
  rec = record(8)
  rec["tok_rgb"] = np.zeros((3, 3), np.int32)
  with pytest.raises(UserError, match=r"record 8, field 'tok_rgb': 9 image tokens .* 2x3 = 6"):
    b.documents(rec, u(0))
  rec = record(9)
  rec["tok_rgb"] = np.full((2, 3), -1)
  with pytest.raises(UserError, match=r"record 9, field 'tok_rgb': token 0 has id -1"):
    b.documents(rec, u(0))
  rec = record(10)
  rec["caption"] = np.array([1.5])
  with pytest.raises(UserError, match="record 10, field 'caption': token ids must be integers"):
    b.documents(rec, u(0))
  # without an index field, the stream position names the record
  rec = record(11)
  del rec["index"]
  rec["caption"] = np.array([99])
  ds = grain.MapDataset.source([record(0), rec]).to_iter_dataset()
  with pytest.raises(UserError, match="record 1, field 'caption'"):
    list(packing.PackedSequencesIterDataset(ds, b))


def test_bad_records_skipped_and_counted():
  b = sequences.SequenceBuilder(REGISTRY, sequences.sequences_config(TWO_WAY, REGISTRY), 32,
                                bad_records="skip")
  records = [record(i) for i in range(12)]
  records[3] = dict(records[3], caption=np.array([5, 60]))        # id outside the vocabulary
  records[8] = dict(records[8], tok_rgb=np.zeros(5, np.int32))    # wrong grid
  records[10] = dict(index=10, det=np.array([5]))                 # no template applies
  good = builder()
  for i, r in enumerate(records):
    docs = b.documents(r, u(i), i)
    if i in (3, 8, 10):
      assert docs == []
    else:
      want = good.documents(r, u(i), i)
      assert all((x[k] == y[k]).all() for x, y in zip(docs, want, strict=True) for k in x)
  assert b.skipped == 3
  # Through packing: the rows hold the good records' documents only.
  ds = grain.MapDataset.source(records).to_iter_dataset()
  rows = list(packing.PackedSequencesIterDataset(ds, b, window=4))
  assert sum(len(np.unique(r["segment"][r["segment"] > 0])) for r in rows) == 9
  assert b.skipped == 6
  with pytest.raises(ConfigError, match="data.bad_records must be one of"):
    sequences.SequenceBuilder(REGISTRY, TWO_WAY, 32, bad_records="ignore")


def test_config_validation_and_shipped_decoder_config():
  with pytest.raises(ConfigError, match="unknown modality 'depth'"):
    builder(templates=(("depth",),), probabilities=(1.0,))
  with pytest.raises(ConfigError, match="modality 'rgb' is image_pixels"):
    builder(templates=(("rgb",),), probabilities=(1.0,))
  with pytest.raises(ConfigError, match="2 entries for 1 templates"):
    builder(templates=(("caption",),))
  with pytest.raises(ConfigError, match="long_documents"):
    builder(long_documents="wrap")
  config = mmconfig.load("configs/decoder/shapes.py:tiny")
  b = sequences.builder_from_config(config)
  assert b.vocab.size == 1024 + 1024 + 4 and b.max_length == config.model.max_length
  assert b.config.templates == (("caption", "tok_rgb"), ("tok_rgb", "caption"))
