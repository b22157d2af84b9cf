"""The "decoder" objective: registry lookup, synthetic batches of the packed layout, a finite loss."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mmjax import config as mmconfig
from mmjax.data.sequences import batch as sequence_batch
from mmjax.train.objective import get_objective


def test_decoder_objective_end_to_end_on_a_synthetic_batch():
  config = mmconfig.load("configs/decoder/shapes.py:tiny,sparsity=mot",
                         ["--config.model.d_model=32", "--config.model.num_layers=1",
                          "--config.model.max_length=96"])
  objective = get_objective(config)
  batch = objective.synthetic_batch(2, seed=0)
  assert set(batch) == set(sequence_batch.FIELDS)
  assert all(batch[k].shape == (2, 96) for k in batch)
  vocab = objective.vocab
  # Each document: BOS, text, BOI, 64 image codes, EOI, EOS; images carry the image modality.
  row = batch["tokens"][0]
  boi = int(np.nonzero(row == vocab.begin_image("tok_rgb"))[0][0])
  assert row[boi + 65] == vocab.end_image("tok_rgb")
  assert np.all(batch["modality"][0, boi:boi + 66] == 1)
  np.testing.assert_array_equal(batch["targets"][0, :boi + 65], row[1:boi + 66])

  abstract = nnx.eval_shape(lambda: objective.create_model(nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  rng = np.random.RandomState(0)
  state = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.02, x.shape), x.dtype), state)
  loss, metrics = jax.jit(lambda s, b: objective.loss(nnx.merge(graphdef, s), b, None))(
      state, {k: jnp.asarray(v) for k, v in batch.items()})
  # Small weights: nearly uniform predictions over the shared vocabulary.
  np.testing.assert_allclose(float(metrics["ce"]), np.log(vocab.size), rtol=0.05)
  assert float(metrics["tokens/tok_rgb"]) > 0 and np.isfinite(float(loss))
  assert objective.train_flops_per_sample() > 0 and objective.tokens_per_sample() == 96
