"""`mmjax import chameleon` / `mmjax export chameleon`: HF-layout checkpoints written here from
random tensors, the imported decoder's logits against a numpy forward with HF Chameleon's
semantics, the exact round trip, the CLI, and the named errors."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tokenizers import Tokenizer

from mmjax import cli
from mmjax import config as mmconfig
from mmjax.convert import chameleon, common
from mmjax.tokenizers.hf_text import HFTextTokenizer
from mmjax.train.loop import load_model
from tests.tokenizers import test_hf_text as hf_text_fixtures

BASE = "configs/decoder/shapes.py:tiny"
TOLERANCE = 5e-5  # fp32 mmjax vs float64 numpy reference, max |difference| of logits (seen 8.5e-6)
D, H, G, F, LAYERS, CODES, THETA = 32, 4, 2, 64, 2, 16, 500.0


def hf_config(swin: bool = False, tied: bool = False) -> dict:
  # Chameleon's id layout in miniature: specials first, image codes, begin/end image, then text.
  names = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
  names.update({chameleon._name_of(c): 4 + c for c in range(CODES)})
  names.update({chameleon.END_IMAGE: 4 + CODES, chameleon.BEGIN_IMAGE: 5 + CODES})
  vocab = 6 + CODES + 30
  names.update({f"w{i}": i for i in range(6 + CODES, vocab)})
  return dict(model_type="chameleon", vocab_size=vocab, hidden_size=D, intermediate_size=F,
              num_hidden_layers=LAYERS, num_attention_heads=H, num_key_value_heads=G,
              hidden_act="silu", max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=THETA,
              swin_norm=swin, tie_word_embeddings=tied, bos_token_id=0, eos_token_id=2,
              vocabulary_map=names, vq_config=dict(resolution=64,
                                                   channel_multiplier=[1, 1, 2, 2, 4]))


def hf_tensors(hf: dict, seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  k, v = D // H, hf["vocab_size"]
  n = lambda *shape, s=0.3: rng.normal(0, s, shape).astype(np.float32)  # noqa: E731
  t = {"model.embed_tokens.weight": n(v, D, s=1.0), "model.norm.weight": 1 + n(D, s=0.1)}
  if not hf["tie_word_embeddings"]:
    t["lm_head.weight"] = n(v, D)
  for i in range(LAYERS):
    p, a = f"model.layers.{i}", f"model.layers.{i}.self_attn"
    t.update({f"{p}.input_layernorm.weight": 1 + n(D, s=0.1),
              f"{p}.post_attention_layernorm.weight": 1 + n(D, s=0.1),
              f"{a}.q_proj.weight": n(H * k, D), f"{a}.k_proj.weight": n(G * k, D),
              f"{a}.v_proj.weight": n(G * k, D), f"{a}.o_proj.weight": n(D, H * k),
              f"{a}.q_norm.weight": 1 + n(H, k, s=0.1), f"{a}.q_norm.bias": n(H, k, s=0.1),
              f"{a}.k_norm.weight": 1 + n(G, k, s=0.1), f"{a}.k_norm.bias": n(G, k, s=0.1),
              f"{p}.mlp.gate_proj.weight": n(F, D), f"{p}.mlp.up_proj.weight": n(F, D),
              f"{p}.mlp.down_proj.weight": n(D, F)})
  t["model.vqmodel.quantize.embedding.weight"] = n(CODES, 8)  # the image tokenizer: skipped
  return t


def write_hf_dir(directory: str, hf: dict, tensors: dict) -> None:
  chameleon.write_hf(directory, hf, tensors, max_shard_bytes=20_000)  # several shards


def hf_forward(t: dict[str, np.ndarray], hf: dict, ids: np.ndarray) -> np.ndarray:
  """Logits [B, L, V] with HF Chameleon's semantics (float64)."""
  t = {name: value.astype(np.float64) for name, value in t.items()}
  k = D // H

  def rms(x, w):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + hf["rms_norm_eps"]) * w

  def head_ln(x, w, b):
    mean = x.mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + 1e-5) * w + b

  def rope(x):  # [B, L, heads, K], rotate-half
    inv = THETA ** (-np.arange(0, k, 2) / k)
    ang = np.arange(x.shape[1])[:, None] * inv[None]
    cos = np.concatenate([np.cos(ang)] * 2, -1)[None, :, None]
    sin = np.concatenate([np.sin(ang)] * 2, -1)[None, :, None]
    rot = np.concatenate([-x[..., k // 2:], x[..., :k // 2]], -1)
    return x * cos + rot * sin

  def attn(x, a):
    b, l, _ = x.shape
    q = head_ln((x @ t[f"{a}.q_proj.weight"].T).reshape(b, l, H, k), t[f"{a}.q_norm.weight"],
                t[f"{a}.q_norm.bias"])
    kk = head_ln((x @ t[f"{a}.k_proj.weight"].T).reshape(b, l, G, k), t[f"{a}.k_norm.weight"],
                 t[f"{a}.k_norm.bias"])
    vv = (x @ t[f"{a}.v_proj.weight"].T).reshape(b, l, G, k)
    q, kk = rope(q), rope(kk)
    kk, vv = np.repeat(kk, H // G, axis=2), np.repeat(vv, H // G, axis=2)
    s = np.einsum("bqhk,bshk->bhqs", q, kk) * k ** -0.5
    s = np.where(np.tril(np.ones((l, l), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqs,bshk->bqhk", p, vv).reshape(b, l, D) @ t[f"{a}.o_proj.weight"].T

  def mlp(x, p):
    gate = x @ t[f"{p}.mlp.gate_proj.weight"].T
    return (gate / (1 + np.exp(-gate)) * (x @ t[f"{p}.mlp.up_proj.weight"].T)
            ) @ t[f"{p}.mlp.down_proj.weight"].T

  x = t["model.embed_tokens.weight"][ids]
  for i in range(LAYERS):
    p = f"model.layers.{i}"
    n1, n2 = t[f"{p}.input_layernorm.weight"], t[f"{p}.post_attention_layernorm.weight"]
    if hf["swin_norm"]:
      x = x + rms(attn(x, f"{p}.self_attn"), n1)
      x = x + rms(mlp(x, p), n2)
    else:
      x = x + attn(rms(x, n1), f"{p}.self_attn")
      x = x + mlp(rms(x, n2), p)
  x = rms(x, t["model.norm.weight"])
  head = t["model.embed_tokens.weight"] if hf["tie_word_embeddings"] else t["lm_head.weight"]
  return x @ head.T


def mmjax_logits(workdir: str, tokens: np.ndarray) -> np.ndarray:
  config = common.config_from_json(os.path.join(workdir, "config.json"))
  model, _ = load_model(config, workdir)
  graphdef, state = nnx.split(model)
  b, l = tokens.shape
  batch = dict(tokens=jnp.asarray(tokens), segment=jnp.ones((b, l), jnp.int32),
               block=jnp.zeros((b, l), jnp.int32),
               position=jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l)),
               modality=jnp.zeros((b, l), jnp.int32))
  logits = jax.jit(lambda st, bt: nnx.merge(graphdef, st)(bt)[0])(state, batch)
  return np.asarray(logits)


@pytest.mark.slow
@pytest.mark.parametrize("swin,tied", [(False, False), (True, True)],
                         ids=["7b_layout", "swin_tied"])
def test_import_matches_hf_forward_and_round_trips(tmp_path, swin, tied):
  hf = hf_config(swin=swin, tied=tied)
  tensors = hf_tensors(hf)
  source = str(tmp_path / "hf")
  write_hf_dir(source, hf, tensors)
  workdir = str(tmp_path / "imported")
  summary = chameleon.run_import(source, mmconfig.load(BASE), workdir)
  assert "1 model.vqmodel" in summary["skipped"]
  config = common.config_from_json(os.path.join(workdir, "config.json"))
  assert config.model.norm_order == ("post" if swin else "pre") and config.model.num_kv_heads == G
  assert config.modalities.tok_rgb.vocab_size == CODES and config.modalities.tok_rgb.grid == (4, 4)
  assert config.modalities.caption.vocab_size == hf["vocab_size"] - CODES - 2

  perm, _, _ = chameleon.vocabulary_order(hf, "test")
  hf_ids = np.random.default_rng(1).integers(0, hf["vocab_size"], (2, 10))
  inverse = np.zeros(hf["vocab_size"], np.int64)  # BOS/EOS rows occur twice: take the text one
  inverse[perm[::-1]] = np.arange(len(perm))[::-1]
  got = mmjax_logits(workdir, inverse[hf_ids])
  want = hf_forward(tensors, hf, hf_ids)[..., perm]
  worst = float(np.max(np.abs(got - want)))
  print(f"max |logits - reference| = {worst:.2e}")
  assert worst < TOLERANCE, worst

  # Export, then import again: the same parameters, bit for bit.
  out = str(tmp_path / "exported")
  result = chameleon.run_export(config, workdir, out, max_shard_bytes=20_000)
  assert len(result["shards"]) > 1 and os.path.isfile(
      os.path.join(out, "model.safetensors.index.json"))
  again = str(tmp_path / "again")
  chameleon.run_import(out, mmconfig.load(BASE), again)
  first, _ = common.params_of_workdir(config, workdir)
  second, _ = common.params_of_workdir(config, again)
  assert first.keys() == second.keys()
  for name in first:
    np.testing.assert_array_equal(first[name], second[name], err_msg=name)


def test_cli_import_export_tokenizer_and_interleaved(tmp_path, capsys):
  # The HF directory holds a tokenizer.json (byte-level BPE in Chameleon's id layout) whose
  # vocabulary is the config's vocabulary_map.
  source = str(tmp_path / "hf")
  os.makedirs(source)
  corpus = hf_text_fixtures.captions(40)
  hf_text_fixtures.chameleon_bpe(os.path.join(source, "tokenizer.json"), corpus, codes=CODES)
  vocab = Tokenizer.from_file(os.path.join(source, "tokenizer.json")).get_vocab()
  hf = dict(hf_config(), vocabulary_map=vocab, vocab_size=len(vocab), bos_token_id=vocab["<s>"],
            eos_token_id=vocab["</s>"])
  tensors = hf_tensors(hf)
  write_hf_dir(source, hf, tensors)
  workdir = str(tmp_path / "wd")
  assert cli.main(["import", "chameleon", "--from", source, "--workdir", workdir,
                   "--config", BASE]) == 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["params"] > 0
  config = mmconfig.load(os.path.join(workdir, "config.py"))  # what train/eval/generate take
  assert config.model.rope_layout == "rotate_half"
  # The copied tokenizer's text ids index the imported rows of the same HF tokens.
  assert config.modalities.caption.tokenizer == os.path.join(os.path.abspath(workdir),
                                                             "tokenizer.json")
  tok = HFTextTokenizer.load(config.modalities.caption.tokenizer)
  params, _ = common.params_of_workdir(config, workdir)
  local = tok.encode(corpus[0])
  np.testing.assert_array_equal(params["embed.value"][local],
                                tensors["model.embed_tokens.weight"][tok.hf_ids[local]])
  out = str(tmp_path / "out")
  assert cli.main(["export", "chameleon", "--workdir", workdir, "--out", out]) == 0
  exported = json.load(open(os.path.join(out, "config.json")))
  assert exported["vocab_size"] == hf["vocab_size"] + 2 and exported["num_key_value_heads"] == G

  # An interleaved-RoPE mmjax model exports with its q/k dims permuted into the rotate-half layout:
  # the exported tensors, run by the reference forward, give the mmjax model's logits.
  config = common.config_from_json(os.path.join(workdir, "config.json"))
  params, _ = common.params_of_workdir(config, workdir)
  config.model.rope_layout = "interleaved"
  inter = str(tmp_path / "interleaved")
  common.write_workdir(config, params, inter, "test")
  inter_hf, inter_tensors = chameleon.export(config, params)
  tokens = np.random.default_rng(2).integers(0, inter_hf["vocab_size"], (1, 8))
  worst = float(np.max(np.abs(mmjax_logits(inter, tokens) - hf_forward(inter_tensors, inter_hf,
                                                                          tokens))))
  assert worst < TOLERANCE, worst


@pytest.mark.parametrize("edit,message", [
    (lambda t: t.pop("model.layers.1.self_attn.k_norm.bias"),
     "missing key 'model.layers.1.self_attn.k_norm.bias'"),
    (lambda t: t.update({"model.layers.0.self_attn.rotary.inv_freq": np.ones(4, np.float32)}),
     "extra key 'model.layers.0.self_attn.rotary.inv_freq'"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.ones((3, D), np.float32)}),
     "'model.layers.0.mlp.up_proj.weight' has shape (3, 32), expected (64, 32)"),
], ids=["missing", "extra", "shape"])
def test_named_errors(tmp_path, capsys, edit, message):
  hf = hf_config()
  tensors = hf_tensors(hf)
  edit(tensors)
  source = str(tmp_path / "hf")
  write_hf_dir(source, hf, tensors)
  code = cli.main(["import", "chameleon", "--from", source, "--workdir", str(tmp_path / "wd"),
                   "--config", BASE])
  err = capsys.readouterr().err.strip()
  assert code == 2 and len(err.splitlines()) == 1 and message in err, err
