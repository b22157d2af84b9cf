"""Records -> the 4M batch: layout, disjointness, reconstruction, determinism, bad records."""

import numpy as np
import pytest

from mmjax import modalities
from mmjax.data.fourm import batch as fourm_batch
from mmjax.data.fourm import masking
from mmjax.data.fourm import mixtures
from mmjax.data.fourm.transform import BadRecord, FourMTransform, patchify
from mmjax.data.pipeline.bench import synthetic_records
from mmjax.tokenizers import special

S0 = special.SpecialIds().sentinel(0)

MODS = dict(
    rgb=dict(kind="image_pixels", image_size=16, patch_size=4),
    tok_rgb=dict(kind="image_tokens", source="rgb", vocab_size=64, grid=(4, 4)),
    tok_semseg=dict(kind="image_tokens", source="semseg", vocab_size=16, grid=(4, 4)),
    caption=dict(kind="sequence", vocab_size=300, max_length=12),
)


def _make(mixture="4m7", N=24, M=24, mods=MODS, **kwargs):
  registry = modalities.from_config(mods)
  mix = mixtures.from_config(dict(mixture=mixture, input_alpha=0.5), registry)
  return registry, FourMTransform(registry, mix, N, M, **kwargs)


def test_layout_shapes_and_prefix_order():
  registry, transform = _make()
  records = synthetic_records(registry, 64, seed=0)
  batch, bad = transform(records, np.random.default_rng(0))
  assert not bad.any()
  expected = fourm_batch.shapes(64, 24, 24, 16, 48)
  assert {k: (v.dtype, v.shape) for k, v in batch.items()} == expected
  for side in ("enc", "dec"):
    valid = batch[f"{side}_valid"]
    n = valid.sum(1)
    np.testing.assert_array_equal(valid, np.arange(24)[None, :] < n[:, None])  # a prefix
    mods = np.where(valid, batch[f"{side}_modality"], 99)
    assert (np.diff(mods, axis=1) >= 0).all()  # grouped in modality-id order
    assert (batch[f"{side}_modality"][~valid] == 0).all()
  assert not (batch["dec_loss_mask"] & ~batch["dec_valid"]).any()


def test_images_disjoint_tokens_right_and_pixels_input_only():
  registry, transform = _make("all2all", N=30, M=30)
  records = synthetic_records(registry, 64, seed=1)
  batch, _ = transform(records, np.random.default_rng(1))
  k_pix = registry.index("rgb")
  assert not (batch["dec_valid"] & (batch["dec_modality"] == k_pix)).any()
  for b in range(64):
    for name in ("tok_rgb", "tok_semseg"):
      k = registry.index(name)
      enc = batch["enc_valid"][b] & (batch["enc_modality"][b] == k)
      dec = batch["dec_valid"][b] & (batch["dec_modality"][b] == k)
      cells_in, cells_out = batch["enc_positions"][b, enc], batch["dec_positions"][b, dec]
      assert not set(cells_in) & set(cells_out)
      assert (np.diff(cells_in) > 0).all()  # grid order, no repeats
      np.testing.assert_array_equal(batch["enc_tokens"][b, enc], records[b][name][cells_in])
      np.testing.assert_array_equal(batch["dec_targets"][b, dec], records[b][name][cells_out])
    pix = batch["enc_valid"][b] & (batch["enc_modality"][b] == k_pix)
    np.testing.assert_array_equal(batch["enc_tokens"][b, pix], batch["enc_positions"][b, pix])
  # Patch 5 of image 0 = rows 4..7, cols 4..7, flattened (row, col, channel), normalised.
  img = records[0]["rgb"].astype(np.float32) / 255
  want = ((img[4:8, 4:8] - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]).reshape(-1)
  np.testing.assert_allclose(batch["enc_pixels"][0, 5], want, rtol=1e-5, atol=1e-5)
  assert patchify(records[0]["rgb"][None], 4).shape == (1, 16, 48)


def test_fixed_direction_alpha_zero_modalities_get_nothing():
  registry, transform = _make("tok_rgb->tok_semseg", N=24, M=24)
  batch, _ = transform(synthetic_records(registry, 32, seed=2), np.random.default_rng(2))
  k_in, k_out = registry.index("tok_rgb"), registry.index("tok_semseg")
  assert (batch["enc_modality"][batch["enc_valid"]] == k_in).all()
  assert (batch["dec_modality"][batch["dec_valid"]] == k_out).all()
  np.testing.assert_array_equal(batch["enc_valid"].sum(1), 16)  # clamped to the 4x4 grid
  np.testing.assert_array_equal(batch["dec_valid"].sum(1), 16)


def test_sequence_reconstructs_from_input_and_target_and_teacher_forcing():
  mods = dict(caption=MODS["caption"])
  registry, transform = _make("all2all", N=16, M=40, mods=mods)
  # Short captions, so the target (capped at max_length like the reference) is never cut.
  records = [dict(r, caption=r["caption"][:5]) for r in synthetic_records(registry, 128, seed=3)]
  batch, _ = transform(records, np.random.default_rng(3))
  for b in range(128):
    inp = batch["enc_tokens"][b, batch["enc_valid"][b]]
    dec = batch["dec_valid"][b]
    tgt = batch["dec_tokens"][b, dec]
    np.testing.assert_array_equal(batch["enc_positions"][b, batch["enc_valid"][b]],
                                  np.arange(len(inp)))
    np.testing.assert_array_equal(batch["dec_positions"][b, dec], np.arange(len(tgt)))
    # Teacher forcing: label j = input j + 1; the last slot has no label.
    loss = batch["dec_loss_mask"][b, dec]
    assert loss[:-1].all() and not loss[-1]
    np.testing.assert_array_equal(batch["dec_targets"][b, dec][:-1], tgt[1:])
    spans, cur = {}, None
    for t in tgt:
      if S0 <= t < S0 + 100:
        cur = int(t)
        spans[cur] = []
      else:
        spans[cur].append(int(t))
    rebuilt = []
    for t in inp:
      rebuilt.extend(spans[int(t)] if S0 <= t < S0 + 100 else [int(t)])
    want = list(records[b]["caption"]) + [special.EOS]
    assert rebuilt == want


def test_4m7_mixture_is_half_rgb_to_all():
  registry, transform = _make("4m7", N=24, M=24)
  batch, _ = transform(synthetic_records(registry, 2000, seed=9), np.random.default_rng(9))
  k_rgb = registry.index("rgb")
  valid = batch["enc_valid"]
  only_rgb = ((batch["enc_modality"] == k_rgb) | ~valid).all(1)
  # rgb->all: every input is an rgb patch (16 of them: the budget is clamped to the image);
  # all->all at alpha 0.5 rarely gives rgb everything.
  assert 0.46 < only_rgb.mean() < 0.6
  assert (valid[only_rgb].sum(1) == 16).all()
  targets = [(batch["dec_modality"] == registry.index(n)) & batch["dec_valid"]
             for n in ("tok_rgb", "tok_semseg", "caption")]
  assert all(t[only_rgb].any(1).mean() > 0.5 for t in targets)  # targets from every modality


def test_4m21_mixture_components_shares_and_budgets(monkeypatch):
  registry, transform = _make("4m21", N=24, M=24)
  mix = transform.mixture
  assert mix.names == ("all2all_a0.01", "all2all_a0.1", "all2all_a1", "all2all_a10", "rgb2all",
                       "caption_bias")
  np.testing.assert_allclose(mix.weights, np.array([1, 1, 1, 1, 1, 0.5]) / 5.5)
  with_t5 = dict(MODS, t5_caption=dict(kind="sequence", vocab_size=300, max_length=12))
  assert mixtures.from_config(dict(mixture="4m21"), modalities.from_config(with_t5)).names[-2:] \
      == ("caption_bias", "t5_caption_bias")
  # Each row's input alphas (the first Dirichlet draw) name the component it drew.
  draws = []
  original = masking.dirichlet_budgets

  def spy(rng, alpha_BK, total, cap_BK):
    budget = original(rng, alpha_BK, total, cap_BK)
    draws.append((np.asarray(alpha_BK), total, np.asarray(cap_BK), budget))
    return budget

  monkeypatch.setattr(masking, "dirichlet_budgets", spy)
  records = synthetic_records(registry, 4000, seed=3)
  batch, bad = transform(records, np.random.default_rng(3))
  assert not bad.any() and len(draws) == 2
  (alpha_in, _, cap_in, in_BK), (alpha_tgt, _, cap_tgt, tgt_BK) = draws
  comp_B = np.array([np.flatnonzero((mix.input_alpha == a).all(1))[0] for a in alpha_in])
  share = np.bincount(comp_B, minlength=6) / len(comp_B)
  np.testing.assert_allclose(share, mix.weights, atol=0.02)
  # Every component draws valid budgets: within N / M and the caps, nothing where alpha is 0.
  for alpha, cap, budget in ((alpha_in, cap_in, in_BK), (alpha_tgt, cap_tgt, tgt_BK)):
    assert (budget >= 0).all() and (budget <= cap).all() and (budget.sum(1) <= 24).all()
    assert (budget[alpha == 0] == 0).all()
  G = registry["tok_rgb"].num_tokens
  for name in ("tok_rgb", "tok_semseg"):
    k = registry.index(name)
    assert (in_BK[:, k] + tgt_BK[:, k] <= G).all()  # disjoint cells of one grid
  # Every row has inputs; only near-one-hot alphas (0.01, 0.1) can aim the targets at the cells
  # the inputs took (the excess is not redistributed), leaving a few rows without targets.
  assert batch["enc_valid"].any(1).all()
  has_target = batch["dec_valid"].any(1)
  assert has_target[comp_B >= 2].all() and has_target[comp_B < 2].mean() > 0.8
  k_rgb, k_cap = registry.index("rgb"), registry.index("caption")
  enc = batch["enc_valid"], batch["enc_modality"]
  dec = batch["dec_valid"], batch["dec_modality"]
  # rgb->all: the input is the 16 rgb patches only.
  rgb2all = comp_B == 4
  assert ((enc[1] == k_rgb) | ~enc[0])[rgb2all].all() and (enc[0][rgb2all].sum(1) == 16).all()
  # Caption-biased: caption is never a target and is kept whole (keep "all") as the main input.
  biased = comp_B == 5
  assert not (dec[0] & (dec[1] == k_cap))[biased].any()
  caption_in = (enc[0] & (enc[1] == k_cap)).sum(1)
  full = np.array([len(r["caption"]) + 1 for r in records])  # + EOS
  assert (caption_in[biased] == full[biased]).mean() > 0.95
  assert (caption_in[~biased] == full[~biased]).mean() < 0.5


def test_budgets_fill_n_for_images_with_room():
  mods = {f"m{i}": dict(kind="image_tokens", vocab_size=32, grid=(8, 8)) for i in range(3)}
  registry, transform = _make("all2all", N=32, M=32, mods=mods)
  batch, _ = transform(synthetic_records(registry, 256, seed=4), np.random.default_rng(4))
  assert (batch["enc_valid"].sum(1) == 32).all()
  assert (batch["dec_valid"].sum(1) <= 32).all() and batch["dec_valid"].sum(1).mean() > 31


def test_same_rng_same_batch():
  registry, transform = _make()
  records = synthetic_records(registry, 16, seed=5)
  a, _ = transform(records, np.random.default_rng(7))
  b, _ = transform(records, np.random.default_rng(7))
  c, _ = transform(records, np.random.default_rng(8))
  assert all(np.array_equal(a[k], b[k]) for k in a)
  assert not np.array_equal(a["enc_tokens"], c["enc_tokens"])


@pytest.mark.parametrize("field,value,message", [
    ("tok_rgb", None, "missing"),
    ("tok_rgb", np.zeros(15, np.int32), "has 15 tokens"),
    ("tok_semseg", np.full(16, 16, np.int32), "id 16 outside"),
    ("caption", np.array([5, 300]), "id 300 outside"),
    ("rgb", np.zeros((8, 8, 3), np.uint8), "expected uint8"),
])
def test_bad_records_error_names_record_and_field(field, value, message):
  registry, transform = _make()
  records = synthetic_records(registry, 8, seed=6)
  records[5] = dict(records[5], **{field: value})
  if value is None:
    del records[5][field]
  with pytest.raises(BadRecord, match=rf"record 'ds' index 42: field '{field}': {message}"):
    transform(records, np.random.default_rng(0),
              where_B=["'ds' index 42" if b == 5 else f"x{b}" for b in range(8)])


def test_bad_records_skip_counts_and_pads_the_row():
  registry, transform = _make(bad_records="skip")
  records = synthetic_records(registry, 8, seed=7)
  records[2] = dict(records[2], tok_rgb=np.full(16, 999, np.int32))
  records[6] = {k: v for k, v in records[6].items() if k != "caption"}
  batch, bad = transform(records, np.random.default_rng(0))
  assert bad.sum() == 2
  for b in (2, 6):
    assert not batch["enc_valid"][b].any() and not batch["dec_valid"][b].any()
  assert batch["enc_valid"][[0, 1, 3, 4, 5, 7]].any(1).all()


def test_declared_missing_modality_is_empty():
  registry, transform = _make("all2all", optional=[(), ("caption",)])
  records = synthetic_records(registry, 8, seed=8)
  records = [{k: v for k, v in r.items() if k != "caption"} if b % 2 else r
             for b, r in enumerate(records)]
  batch, bad = transform(records, np.random.default_rng(0), dataset_B=[b % 2 for b in range(8)])
  k = registry.index("caption")
  assert not bad.any()
  has_caption = ((batch["enc_modality"] == k) & batch["enc_valid"]).any(1) | (
      (batch["dec_modality"] == k) & batch["dec_valid"]).any(1)
  assert not has_caption[1::2].any() and has_caption[0::2].all()
  with pytest.raises(BadRecord, match="missing"):
    transform(records, np.random.default_rng(0))  # all from dataset 0, which requires it


def test_too_few_sentinels_is_a_config_error():
  from mmjax.config import ConfigError
  with pytest.raises(ConfigError, match="num_sentinels"):
    _make(num_sentinels=4)


def test_bench_data_reports_rates():
  import ml_collections
  from mmjax.data.pipeline.bench import run_bench_data
  config = ml_collections.ConfigDict()
  config.modalities = ml_collections.ConfigDict(MODS, sort_keys=False)
  config.masking = dict(mixture="4m7", input_alpha=0.5, keep_scheme="random", num_sentinels=100)
  config.model = dict(num_input_tokens=24, num_target_tokens=24)
  config.data = dict(shuffle_seed=0, bad_records="error", missing="")
  config.train = dict(batch_size=8)
  result = run_bench_data(config, batch_size=16, num_records=64, min_seconds=0.05,
                          pipeline_batches=2)
  assert result["bench"] == "data"
  for key in ("samples_per_s", "samples_per_s_per_core", "pipeline_samples_per_s",
              "pipeline_samples_per_s_per_core", "disk_pipeline_samples_per_s",
              "disk_pipeline_samples_per_s_per_core", "read_decode_records_per_s_per_core",
              "tfds_read_decode_records_per_s_per_core"):
    assert result[key] > 0, key
  assert result["modalities"] == ["tok_rgb", "tok_semseg", "caption"]  # pixels left out


def test_mixture_of_parts_adds_a_direction_to_the_any_to_any_components():
  registry, transform = _make("all2all+rgb2all+caption->tok_rgb", N=24, M=24)
  mix = transform.mixture
  assert mix.names == ("all2all_a0.5", "rgb2all", "caption->tok_rgb")
  np.testing.assert_allclose(mix.weights, [1 / 3] * 3)
  weighted = mixtures.from_config(dict(mixture="all2all+caption->tok_rgb",
                                       mixture_weights=(3, 1)), registry)
  np.testing.assert_allclose(weighted.weights, [0.75, 0.25])
  batch, bad = transform(synthetic_records(registry, 3000, seed=4), np.random.default_rng(4))
  k_cap, k_tok = registry.index("caption"), registry.index("tok_rgb")
  enc_only_caption = ((batch["enc_modality"] == k_cap) | ~batch["enc_valid"]).all(1)
  dec_only_tokens = ((batch["dec_modality"] == k_tok) | ~batch["dec_valid"]).all(1)
  direction = enc_only_caption & dec_only_tokens & batch["dec_valid"].any(1)
  # The direction's rows (a third) see only the caption and predict only rgb tokens; the
  # any-to-any components rarely draw such a row.
  assert not bad.any() and 0.3 < direction.mean() < 0.4
  assert (batch["dec_valid"][direction].sum(1) == 16).all()  # the whole 4x4 grid
