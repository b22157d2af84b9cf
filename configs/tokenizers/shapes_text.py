"""The shared text tokenizer of the shapes world: SentencePiece over captions and boxes as text.

Run:
  mmjax tokenizer train --config configs/tokenizers/shapes_text.py --workdir runs/text_tok
Writes <workdir>/text.model and <workdir>/text_tokenizer.json. Expected (measured on 2 CPU cores,
~10 s): vocab_size 729 (the 1024 below is an upper bound; the shapes corpus has few words), round
trip 1.0 on validation captions and det strings, ~20 tokens per caption, 5 per box.
`runlocal` trains on fewer scenes for smoke tests.
"""

import ml_collections

from mmjax import config as mmconfig
from mmjax import defaults
from mmjax.data.shapes import world as shapes


def get_config(arg=None):
  arg = mmconfig.parse_arg(arg, runlocal=False)
  config = ml_collections.ConfigDict()
  config.kind = "text"  # which tokenizer `mmjax tokenizer train` trains
  config.seed = 0
  # Scenes the training sentences come from (each gives its caption and its det string).
  config.data = defaults.shapes_data()
  config.num_train_scenes = 5000    # train-split scenes: 2 sentences each
  config.num_val_scenes = 1000      # validation-split scenes for the round-trip report
  config.tokenizer = ml_collections.ConfigDict(dict(
      vocab_size=1024,              # upper bound; <= the caption modality's vocab_size
      num_sentinels=64,             # [S_0] .. [S_63] (ids 4 .. 67) = fourm masking.num_sentinels
      coord_bins=65,                # image_size + 1: the pixel edges of 64-px boxes are exact bins
      class_names=shapes.SHAPES,    # one token each, after the coordinate tokens
      model_type="bpe",             # "bpe" learns whole words here; "unigram" splits them oddly
      character_coverage=1.0,       # every character seen in training gets a piece
      byte_fallback=True,           # unseen characters -> UTF-8 bytes, so any text round-trips
      max_sentence_length=4192,     # bytes; longer training sentences are skipped
      num_threads=1,
  ))
  if arg.runlocal:
    config.num_train_scenes, config.num_val_scenes = 500, 100
  return config
