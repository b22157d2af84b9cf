"""The "decoder" objective: the mixed-modal decoder, its loss and its packed-sequence data.

Data: pre-tokenized records (`mmjax prepare tokens`, one dataset or the weighted `data.mixture`,
checked against the config and read with `mmjax.data.pipeline.token_sets`) become documents and
packed rows (`mmjax.data.sequences.documents`, `mmjax.data.sequences.packing`) of
`model.max_length` slots, the layout of `mmjax.data.sequences.batch`, in `data.num_workers`
worker processes. With `data.bad_records="skip"` bad records give no documents and
`iterator.bad_records` counts them
(when a pack window is read: a resume from inside a window counts its bad records again).
"""

from __future__ import annotations

import ml_collections
import numpy as np
from flax import nnx

from mmjax import modalities as mm
from mmjax.config import load
from mmjax.data.pipeline import stream
from mmjax.data.sequences import batch as sequence_batch
from mmjax.data.sequences import documents as sequences
from mmjax.data.sequences import packing
from mmjax.data.sequences.documents import SharedVocab
from mmjax.models.configs import model_config
from mmjax.models.decoder import Decoder
from mmjax.models.decoder_flops import decoder_params, decoder_train_flops_per_token
from mmjax.models.decoder_loss import decoder_loss
from mmjax.train.objective import register_objective

# The trainer's split names -> the split names `mmjax prepare tokens` writes.
_SPLITS = {"train": "train", "val": "validation"}


class DecoderObjective:
  """Implements `mmjax.train.objective.Objective` for `mmjax.models.decoder.Decoder`."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.cfg = model_config(config)
    self.registry = mm.from_config(config.modalities)
    self.vocab = SharedVocab.from_registry(self.registry)

  def create_model(self, rngs: nnx.Rngs) -> Decoder:
    return Decoder(self.cfg, vocab_size=self.vocab.size, num_modalities=len(self.registry),
                   rngs=rngs)

  def loss(self, model: Decoder, batch, rng):
    fields = {k: batch[k] for k in ("tokens", "modality", "segment", "block", "position")}
    key = rng if self.cfg.residual_dropout > 0 else None
    logits, aux, _ = model(fields, dropout_key=key)
    return decoder_loss(logits, batch, aux, self.cfg, self.registry.names)

  def batch_axes(self):
    return {name: ("batch", "length") for name in sequence_batch.FIELDS}

  def make_iterator(self, split: str, process_index: int, process_count: int):
    # Late: token sets are read with tensorflow_datasets, seconds to import, and every command
    # that builds an objective (bench, aot, tokenizer training) imports this module.
    from mmjax.data.pipeline import token_sets  # noqa: PLC0415
    if split not in _SPLITS:
      raise ValueError(f"decoder objective: unknown split {split!r}; use 'train' or 'val'")
    data = self.config.data
    needed = list(dict.fromkeys(n for t in self.config.sequences.templates for n in t))
    # Serialized records parsed straight from the proto: tfds' Python decoding is ~5x slower.
    specs = token_sets.token_datasets(self.config, _SPLITS[split], self.registry, needed)
    ds = stream.record_dataset(specs, seed=int(data.shuffle_seed), process_index=process_index,
                               process_count=process_count,
                               num_epochs=None if split == "train" else 1)
    ds = ds.map(stream.untag).to_iter_dataset()
    builder = sequences.builder_from_config(self.config)
    ds = packing.PackedSequencesIterDataset(ds, builder, self.cfg.max_length,
                                            seed=int(data.shuffle_seed) + process_index)
    ds = ds.batch(self.config.train.batch_size // process_count, drop_remainder=True)
    ds = ds.map(_CountSkipped(builder, [s.name for s in specs]))
    return stream.BatchIterator(stream.in_workers(ds, data.get("num_workers", 0)),
                                max_bad_fraction=stream.max_bad_fraction(data))

  def synthetic_batch(self, batch_size: int, seed: int) -> dict[str, np.ndarray]:
    """Rows of packed random documents: text, then an image wrapped in its specials."""
    rng = np.random.default_rng(seed)
    length = self.cfg.max_length
    out = sequence_batch.empty(batch_size, length)
    table = self.vocab.modality_table
    images = [self.registry.names[m] for m in self.vocab.image_modalities]
    for b in range(batch_size):
      tokens, segments, pos = [], [], []
      segment = 1
      while True:
        doc = [self.vocab.bos] + list(rng.integers(4, max(self.vocab.text_size, 5),
                                                   rng.integers(4, 24)))
        if images:
          name = images[0]
          codes = rng.integers(0, self.vocab.local_size(name), self.registry[name].num_tokens)
          doc += ([self.vocab.begin_image(name)] + list(self.vocab.to_global(name, codes))
                  + [self.vocab.end_image(name)])
        doc.append(self.vocab.eos)
        if len(tokens) + len(doc) > length + 1:
          break
        tokens += doc
        segments += [segment] * len(doc)
        pos += list(range(len(doc)))
        segment += 1
      if not tokens:  # one document longer than the row: truncate it
        tokens, segments, pos = doc[:length + 1], [1] * (length + 1), list(range(length + 1))
      n = min(len(tokens), length)
      t = np.asarray(tokens, np.int32)
      out["tokens"][b, :n] = t[:n]
      nxt = np.concatenate([t[1:], [self.vocab.eos]])[:n]
      same = np.concatenate([np.asarray(segments[1:]) == np.asarray(segments[:-1]), [False]])[:n]
      out["targets"][b, :n] = nxt
      out["modality"][b, :n] = table[t[:n]]
      out["segment"][b, :n] = segments[:n]
      out["position"][b, :n] = pos[:n]
      out["loss_weight"][b, :n] = same.astype(np.float32)
    return out

  def train_flops_per_sample(self) -> float:
    per_token = decoder_train_flops_per_token(self.cfg, vocab_size=self.vocab.size,
                                              num_modalities=len(self.registry))["total"]
    return per_token * self.cfg.max_length

  def tokens_per_sample(self) -> int:
    return self.cfg.max_length


class _CountSkipped:
  """A batch -> (batch, `stream.RecordCounts` of the records the builder read and skipped since
  the previous batch, per dataset). It runs where the packing does (a worker process's own copy
  of the builder), so the counts travel with the batch to `stream.BatchIterator`."""

  def __init__(self, builder, names):
    self.builder, self.names = builder, list(names)
    self.reported = (np.zeros(len(self.names), np.int64), np.zeros(len(self.names), np.int64))

  def __call__(self, batch):
    seen, bad = (self.builder.counts(self.builder.read_by_dataset, len(self.names)),
                 self.builder.counts(self.builder.skipped_by_dataset, len(self.names)))
    delta = stream.RecordCounts(dict(zip(self.names, (seen - self.reported[0]).tolist())),
                                dict(zip(self.names, (bad - self.reported[1]).tolist())))
    self.reported = (seen, bad)
    return batch, delta


@register_objective("decoder")
def make_decoder_objective(config: ml_collections.ConfigDict) -> DecoderObjective:
  return DecoderObjective(config)


def main() -> None:
  """Prints training FLOPs per token and parameters of configs/decoder/shapes.py:1B by sparsity,
  at the config's length and vocabulary and at Chameleon's (4096 tokens, 65,536 ids)."""
  for sparsity in ("dense", "mot", "moma", "moe"):
    objective = DecoderObjective(load(f"configs/decoder/shapes.py:1B,sparsity={sparsity}"))
    cfg, modalities = objective.cfg, len(objective.registry)
    own = decoder_train_flops_per_token(cfg, vocab_size=objective.vocab.size,
                                        num_modalities=modalities)["total"]
    chameleon = decoder_train_flops_per_token(cfg, vocab_size=65536, num_modalities=modalities,
                                              seq_len=4096)["total"]
    params = decoder_params(cfg, vocab_size=objective.vocab.size, num_modalities=modalities)
    print(f"{sparsity:5s} train GFLOP/token {own / 1e9:.2f} (L={cfg.max_length}, "
          f"V={objective.vocab.size}), {chameleon / 1e9:.2f} (L=4096, V=65536); params "
          f"{params['total'] / 1e9:.2f}B, active {params['active'] / 1e9:.2f}B")


if __name__ == "__main__":
  main()
