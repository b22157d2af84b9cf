"""Pre-tokenized records parsed from their bytes equal tfds' decoding of them."""

import numpy as np

from mmjax import modalities
from mmjax.data.pipeline import bench
from mmjax.data.tokens import records as tokens_tfds

MODS = dict(
    rgb=dict(kind="image_pixels", image_size=8, patch_size=4),
    tok_rgb=dict(kind="image_tokens", source="rgb", vocab_size=1024, grid=(2, 2)),
    tok_semseg=dict(kind="image_tokens", source="semseg", vocab_size=16, grid=(2, 2)),
    caption=dict(kind="sequence", vocab_size=70000, max_length=12),
)


def test_record_parser_equals_tfds_decoding(tmp_path):
  registry = modalities.from_config(MODS)
  records = bench.synthetic_records(registry, 6, seed=0)
  records[2] = dict(records[2], caption=None)        # absent: present 0, field None
  records[4] = dict(records[4], caption=np.zeros(0, np.int32))  # present but empty
  bench.write_records(registry, records, str(tmp_path))
  specs = tokens_tfds.modality_specs(registry)
  decoded = tokens_tfds.load_tokens(str(tmp_path), "bench", "train")
  raw = tokens_tfds.load_token_bytes(str(tmp_path), "bench", "train")
  parse, decode = tokens_tfds.RecordParser(specs), tokens_tfds.RecordDecoder(specs)
  for i, data in enumerate(raw.__getitems__(list(range(6)))):
    want, got = decode(decoded[i]), parse(data)
    assert got["id"] == want["id"] == str(i).encode() and got["index"] == want["index"] == i
    np.testing.assert_array_equal(got["present"], want["present"])
    for m in registry:
      if want[m.name] is None:
        assert got[m.name] is None and i == 2 and m.name == "caption"
        continue
      assert got[m.name].dtype == want[m.name].dtype and got[m.name].shape == want[m.name].shape
      np.testing.assert_array_equal(got[m.name], want[m.name])
      np.testing.assert_array_equal(got[m.name], records[i][m.name])
  assert parse(raw[4])["caption"].shape == (0,)
