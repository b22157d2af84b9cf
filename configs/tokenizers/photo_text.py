"""The text tokenizer of your own captions: SentencePiece (BPE) over the captions of a folder of
images with same-stem .txt files, or of a tfds dataset such as coco_captions.

Run:
  mmjax tokenizer train --config configs/tokenizers/photo_text.py --workdir runs/photo/tokenizers/photo_text \
      --config.data.folder=/path/to/photos
  mmjax tokenizer train --config configs/tokenizers/photo_text.py --workdir runs/coco/tokenizers/photo_text \
      --config.data.name=coco_captions --config.data.data_dir=~/tensorflow_datasets
Writes <workdir>/text.model and text_tokenizer.json (round trip and tokens per caption on the
held-out captions). `runlocal`: a 512-id vocabulary for smoke tests on a few captions.
"""

import ml_collections

from mmjax import config as mmconfig
from mmjax import defaults

VOCAB = {False: 4096, True: 512}  # the caption modality's vocab_size in the photo configs


def get_config(arg=None):
  arg = mmconfig.parse_arg(arg, runlocal=False)
  config = ml_collections.ConfigDict()
  config.kind = "text"  # which tokenizer `mmjax tokenizer train` trains
  config.data = defaults.image_text_data()  # images are not read: captions only
  config.num_train_scenes = 200000  # at most this many training samples' captions
  config.num_val_scenes = 1000      # held-out captions for the round-trip report
  config.tokenizer = ml_collections.ConfigDict(dict(
      vocab_size=VOCAB[arg.runlocal],  # upper bound; <= the caption modality's vocab_size
      num_sentinels=64,             # [S_0] .. [S_63] = fourm masking.num_sentinels
      coord_bins=0,                 # no boxes in photos
      class_names=(),
      model_type="bpe",
      character_coverage=0.9995,    # rare characters fall back to UTF-8 bytes
      byte_fallback=True,           # unseen characters -> UTF-8 bytes, so any text round-trips
      max_sentence_length=4192,     # bytes; longer training sentences are skipped
      num_threads=1,
  ))
  if arg.runlocal:
    config.num_val_scenes = 4
  return config
