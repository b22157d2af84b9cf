"""`mmjax import fourm`: reference-layout checkpoints written here from random tensors, imported,
and the imported model's forward compared with the reference's forward (numpy, float64)."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer

from mmjax import cli
from mmjax import config as mmconfig
from mmjax.convert import common, fourm
from mmjax.train.checkpoint import Checkpointer
from mmjax.train.loop import build, load_model
from tests.convert import fourm_reference as ref
from tests.tokenizers import test_hf_text as hf_text_fixtures

BASE = "configs/fourm/shapes.py:tiny"
TOLERANCE = 2e-5  # fp32 mmjax vs float64 numpy reference, max |difference| of logits (seen 2.4e-6)


def _import(tmp_path, spec: ref.Spec, tensors=None):
  source = str(tmp_path / "ref")
  tensors = ref.write_checkpoint(source, spec, tensors)
  workdir = str(tmp_path / "imported")
  summary = fourm.run_import(source, mmconfig.load(BASE), workdir)
  return tensors, workdir, summary


def _compare(tensors, spec: ref.Spec, workdir: str) -> float:
  config = common.config_from_json(os.path.join(workdir, "config.json"))
  model, step = load_model(config, workdir)  # what `mmjax eval` and `mmjax generate` call
  assert step == 0
  objective, _ = build(config)
  batch = objective.synthetic_batch(2, seed=3)
  graphdef, state = nnx.split(model)
  y = np.asarray(jax.jit(lambda st, b: nnx.merge(graphdef, st)(b))(state, batch))
  names = {fourm._mmjax_name(m[0], [n[0] for n in spec.modalities]): m[0]
           for m in spec.modalities}
  order = [names[n] for n in model.registry.names]
  y_ref = ref.forward(tensors, spec, batch, order)
  worst = 0.0
  valid = batch["dec_valid"]
  for i, name in enumerate(model.registry.names):
    sel = valid & (batch["dec_modality"] == i)
    if not sel.any() or not model.registry[name].can_be_target:
      continue
    got = np.asarray(model.logits(y[sel], name))
    want = ref.logits(tensors, y_ref[sel], names[name])
    worst = max(worst, float(np.max(np.abs(got - want))))
  return worst


@pytest.mark.slow
@pytest.mark.parametrize("spec", [
    ref.Spec(),  # the released SwiGLU, no-bias layout, tied heads
    ref.Spec(gated=False, qkv_bias=True, proj_bias=True, mlp_bias=True, norm_bias=True,
             qk_norm=True, tied=False, learned=("caption", "tok_rgb@32")),
], ids=["swiglu_nobias_tied", "gelu_bias_qknorm_untied_learned"])
def test_import_matches_reference_forward(tmp_path, spec):
  tensors, workdir, summary = _import(tmp_path, spec)
  assert summary["tie_heads"] == spec.tied
  assert summary["modalities"] == ["caption", "rgb", "tok_rgb"]
  config = common.config_from_json(os.path.join(workdir, "config.json"))
  assert config.model.tie_heads == spec.tied and config.model.norm_eps == 1e-6
  assert config.modalities.tok_rgb.grid == (4, 4) and config.modalities.caption.max_length == 12
  assert config.modalities.caption.get("learned_positions", False) == ("caption" in spec.learned)
  worst = _compare(tensors, spec, workdir)
  print(f"max |logits - reference| = {worst:.2e}")
  assert worst < TOLERANCE, worst


def test_cli_import_then_load(tmp_path, capsys):
  spec = ref.Spec()
  source = str(tmp_path / "ref")
  tensors = ref.write_checkpoint(source, spec)
  workdir = str(tmp_path / "wd")
  assert cli.main(["import", "fourm", "--from", os.path.join(source, "model.safetensors"),
                   "--workdir", workdir, "--config", BASE]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["params"] > 0 and os.path.isfile(os.path.join(workdir, "config.py"))
  # The written config file is what `mmjax train/eval/generate --config` take.
  config = mmconfig.load(os.path.join(workdir, "config.py"))
  assert list(config.modalities.keys()) == ["caption", "rgb", "tok_rgb"]
  assert _compare(tensors, spec, workdir) < TOLERANCE
  # `mmjax train` resumes from it: the state restores; the data (no saved iterator) starts afresh.
  _, setup = build(config)
  checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"), keep=1)
  try:
    state, step = checkpointer.restore_latest(setup.abstract_state, iterator=None)
  finally:
    checkpointer.close()
  assert step == 0 and int(state["step"]) == 0
  np.testing.assert_array_equal(np.asarray(state["params"]["mask_token"][...]),
                                tensors["mask_token"][0, 0])
  # A second import into the same workdir is refused.
  assert cli.main(["import", "fourm", "--from", source, "--workdir", workdir,
                   "--config", BASE]) == 2
  assert "already holds checkpoints" in capsys.readouterr().err


def _error(tmp_path, capsys, tensors) -> str:
  spec = ref.Spec()
  source = str(tmp_path / "bad")
  ref.write_checkpoint(source, spec, tensors)
  code = cli.main(["import", "fourm", "--from", source, "--workdir", str(tmp_path / "wd"),
                   "--config", BASE])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1, err
  return err


def test_missing_key(tmp_path, capsys):
  tensors = ref.make_tensors(ref.Spec())
  del tensors["decoder.1.cross_attn.kv.weight"]
  assert "missing key 'decoder.1.cross_attn.kv.weight'" in _error(tmp_path, capsys, tensors)


def test_extra_key(tmp_path, capsys):
  tensors = ref.make_tensors(ref.Spec())
  tensors["encoder.0.attn.extra_gate"] = np.zeros(3, np.float32)
  assert "extra key 'encoder.0.attn.extra_gate'" in _error(tmp_path, capsys, tensors)


def test_wrong_shape(tmp_path, capsys):
  tensors = ref.make_tensors(ref.Spec())
  tensors["encoder.1.mlp.fc2.weight"] = np.zeros((32, 7), np.float32)
  err = _error(tmp_path, capsys, tensors)
  assert "'encoder.1.mlp.fc2.weight' has shape (32, 7), expected (32, 85)" in err


def test_nonzero_bias_without_place(tmp_path, capsys):
  tensors = ref.make_tensors(ref.Spec())  # SwiGLU: mmjax's gated MLP has no biases
  tensors["encoder.0.mlp.fc1.bias"] = np.ones(85, np.float32)
  assert "'encoder.0.mlp.fc1.bias' is not zero" in _error(tmp_path, capsys, tensors)


def test_drop_modality(tmp_path, capsys):
  spec = dataclasses.replace(ref.Spec(), modalities=ref.Spec().modalities + (
      ("det", "seq", 40, 10),))
  source = str(tmp_path / "ref")
  ref.write_checkpoint(source, spec)
  assert cli.main(["import", "fourm", "--from", source, "--workdir", str(tmp_path / "wd"),
                   "--config", BASE, "--drop-modality", "det"]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["modalities"] == ["caption", "rgb", "tok_rgb"] and summary["dropped"] == ["det"]


def test_cli_generate_with_the_reference_text_tokenizer(tmp_path, capsys):
  """`--text-tokenizer` (a WordPiece tokenizer.json in 4M's layout): `mmjax generate` encodes the
  input caption and decodes the sampled title with it."""
  tokenizer = hf_text_fixtures.wordpiece_4m(str(tmp_path / "tokenizer.json"))
  vocab = Tokenizer.from_file(tokenizer).get_vocab_size()
  spec = ref.Spec(modalities=(("caption", "seq", vocab, 12), ("title", "seq", vocab, 8)))
  source = str(tmp_path / "ref")
  ref.write_checkpoint(source, spec)
  workdir = str(tmp_path / "wd")
  assert cli.main(["import", "fourm", "--from", source, "--workdir", workdir, "--config", BASE,
                   "--text-tokenizer", tokenizer]) == 0
  capsys.readouterr()
  out = str(tmp_path / "gen")
  assert cli.main(["generate", "--config", os.path.join(workdir, "config.py"), "--workdir", workdir,
                   "--input", "caption=a small red circle", "--target", "title",
                   "--out", out]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["step"] == 0 and not summary["random_init"]
  with open(os.path.join(out, "title_0.txt")) as f:
    assert f.read().strip() == summary["texts"]["title"][0].strip()


def test_t5_embedding_input_is_named_and_can_be_dropped(tmp_path, capsys):
  spec = ref.Spec()
  tensors = ref.make_tensors(spec)
  tensors.update({"encoder_embeddings.t5_caption.mod_emb": np.zeros((1, 1, 32), np.float32),
                  "encoder_embeddings.t5_caption.pos_emb": np.zeros((1, 12, 32), np.float32),
                  "encoder_embeddings.t5_caption.emb_proj.weight": np.zeros((32, 64), np.float32)})
  config = ref.reference_config(spec)
  config["domains_in"].append("t5_caption")
  source = str(tmp_path / "ref")
  ref.write_checkpoint(source, spec, tensors, config)
  args = ["import", "fourm", "--from", source, "--config", BASE]
  assert cli.main(args + ["--workdir", str(tmp_path / "a")]) == 2
  assert "--drop-modality t5_caption" in capsys.readouterr().err
  assert cli.main(args + ["--workdir", str(tmp_path / "b"), "--drop-modality", "t5_caption"]) == 0
