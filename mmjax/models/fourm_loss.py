"""The 4M loss: per-modality output heads, applied only to their own target tokens, and fp32 CE.

Heads without wasted compute. The B*M decoder outputs are sorted by modality (loss tokens only), so
each target modality's tokens are contiguous; every token's logits then come only from its own head:

- "chunked" (CPU): each modality's run is padded to a multiple of `head_chunk` tokens, so every chunk
  holds one modality; per modality, a `fori_loop` over its (dynamic) range of chunks runs that head on
  [head_chunk, D] x [D, V_m]. The static chunk budget is ceil(B*M / chunk) + G; the work done is the
  actual tokens plus less than one chunk per modality. A custom_vjp saves only the per-token
  log-sum-exp and recomputes each chunk's logits in the backward pass, so no [tokens, V] array is
  ever kept.
- "ragged" (TPU/GPU): `jax.lax.ragged_dot` over the sorted tokens with the heads padded to the largest
  vocabulary [G, D, V_max] and group sizes = per-modality counts; a grouped matmul whose cost is the
  dense one (tokens x D x V_max). On CPU ragged_dot would compute every group densely (G x). On
  TPU its weight gradient is megablox's grouped kernel (`grouped.ragged_matmul`), which the
  compiler would otherwise lower as G dense matmuls over all tokens.

Per-token loss with label smoothing e and z-loss weight a (z = logits, V = the modality's vocab):
  loss = lse - (1 - e) z_y - e mean(z) + a lse^2;  reported CE is lse - z_y.
"mod" weighting: mean per modality over the batch's target tokens, then the unweighted mean over the
modalities present; "token": mean over all target tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.models import grouped, layers
from mmjax.models.fourm import FourM

F32_MIN = float(np.finfo(np.float32).min)


def _logits(h, w, transposed: bool, dtype):
  dims = ((1,), (1,)) if transposed else ((1,), (0,))
  return jax.lax.dot_general(h.astype(dtype), w, (dims, ((), ())), preferred_element_type=jnp.float32)


def _stats(z_TV, labels_T, smoothing: float, z_loss: float):
  """Per-token (loss, ce, correct, lse) from fp32 logits over the head's full vocabulary."""
  lse = jax.nn.logsumexp(z_TV, axis=-1)
  zy = jnp.take_along_axis(z_TV, labels_T[:, None], axis=-1)[:, 0]
  loss = lse - (1.0 - smoothing) * zy + z_loss * lse * lse
  if smoothing:
    loss = loss - smoothing * jnp.mean(z_TV, axis=-1)
  correct = (zy >= jnp.max(z_TV, axis=-1)).astype(jnp.float32)
  return loss, lse - zy, correct, lse


# ---------------------------------------------------------------------------------------------------
# Chunked heads with a recomputing backward pass.


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def chunked_head_ce(h_SD, labels_S, weights, lo_G, hi_G, opts):
  """Per-slot (loss, ce, correct) for chunk-aligned slots; chunks [lo_G[g], hi_G[g]) use head g.

  `weights` is a tuple of head weights ([D, V] or, where `opts.transposed[g]`, [V, D]); `opts` is
  the static tuple (chunk, transposed, smoothing, z_loss, dtype). Slots outside every range get 0.
  """
  out, _ = _chunked_fwd(h_SD, labels_S, weights, lo_G, hi_G, opts)
  return out


def _chunked_fwd(h_SD, labels_S, weights, lo_G, hi_G, opts):
  chunk, transposed, smoothing, z_loss, dtype = opts
  s, d = h_SD.shape
  init = tuple(jnp.zeros((s,), jnp.float32) for _ in range(4))
  carry = init
  for g, w in enumerate(weights):
    w_c = w.astype(dtype)
    vocab = w.shape[0] if transposed[g] else w.shape[1]

    def body(c, acc, w_c=w_c, g=g, vocab=vocab):
      start = c * chunk
      h = jax.lax.dynamic_slice(h_SD, (start, 0), (chunk, d))
      lab = jnp.clip(jax.lax.dynamic_slice(labels_S, (start,), (chunk,)), 0, vocab - 1)
      stats = _stats(_logits(h, w_c, transposed[g], dtype), lab, smoothing, z_loss)
      return tuple(jax.lax.dynamic_update_slice(a, v, (start,)) for a, v in zip(acc, stats))

    carry = jax.lax.fori_loop(lo_G[g], hi_G[g], body, carry)
  loss, ce, correct, lse = carry
  return (loss, ce, correct), (h_SD, labels_S, weights, lo_G, hi_G, lse)


def _chunked_bwd(opts, residuals, cotangents):
  chunk, transposed, smoothing, z_loss, dtype = opts
  h_SD, labels_S, weights, lo_G, hi_G, lse_S = residuals
  g_S = cotangents[0]  # ce and correct are for reporting: their cotangents are ignored
  s, d = h_SD.shape
  dh = jnp.zeros((s, d), jnp.float32)
  dws = []
  for g, w in enumerate(weights):
    w_c = w.astype(dtype)
    vocab = w.shape[0] if transposed[g] else w.shape[1]

    def body(c, carry, w_c=w_c, g=g, vocab=vocab):
      dh, dw = carry
      start = c * chunk
      h = jax.lax.dynamic_slice(h_SD, (start, 0), (chunk, d))
      lab = jnp.clip(jax.lax.dynamic_slice(labels_S, (start,), (chunk,)), 0, vocab - 1)
      lse = jax.lax.dynamic_slice(lse_S, (start,), (chunk,))[:, None]
      gs = jax.lax.dynamic_slice(g_S, (start,), (chunk,))[:, None]
      p = jnp.exp(_logits(h, w_c, transposed[g], dtype) - lse)
      dz = p * (1.0 + 2.0 * z_loss * lse) - smoothing / vocab
      dz = dz - (1.0 - smoothing) * jax.nn.one_hot(lab, vocab, dtype=jnp.float32)
      dz = (gs * dz).astype(dtype)
      if transposed[g]:  # w [V, D]
        dh_c = jax.lax.dot_general(dz, w_c, (((1,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32)
        dw = dw + jax.lax.dot_general(dz, h.astype(dtype), (((0,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32)
      else:  # w [D, V]
        dh_c = jax.lax.dot_general(dz, w_c, (((1,), (1,)), ((), ())),
                                   preferred_element_type=jnp.float32)
        dw = dw + jax.lax.dot_general(h.astype(dtype), dz, (((0,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32)
      return jax.lax.dynamic_update_slice(dh, dh_c, (start, 0)), dw

    dh, dw = jax.lax.fori_loop(lo_G[g], hi_G[g], body, (dh, jnp.zeros(w.shape, jnp.float32)))
    dws.append(dw.astype(w.dtype))
  return dh.astype(h_SD.dtype), None, tuple(dws), None, None


chunked_head_ce.defvjp(_chunked_fwd, _chunked_bwd)


# ---------------------------------------------------------------------------------------------------
# Token routing.


def _target_table(model: FourM) -> tuple[np.ndarray, list]:
  """modality id -> target index (G for modalities that cannot be targets, and for id K = 'none')."""
  targets = [i for i, m in enumerate(model.registry) if m.can_be_target]
  table = np.full(len(model.registry) + 1, len(targets), np.int32)
  for g, i in enumerate(targets):
    table[i] = g
  return table, targets


def _chunked(model: FourM, y_TD, group_T, labels_T, counts_G, opts_base):
  """Per-target-group sums (loss, ce, correct) through modality-aligned chunks."""
  cfg, names = model.cfg, [m.name for m in model.registry.targets()]
  chunk, num_groups = cfg.head_chunk, len(names)
  tokens, d = y_TD.shape
  num_chunks = -(-tokens // chunk) + num_groups
  order = jnp.argsort(group_T, stable=True)
  sorted_group = group_T[order]
  padded = (counts_G + chunk - 1) // chunk * chunk
  pad_start = jnp.cumsum(padded) - padded
  start = jnp.cumsum(counts_G) - counts_G
  g_safe = jnp.minimum(sorted_group, num_groups - 1)
  dst = jnp.where(sorted_group < num_groups,
                  pad_start[g_safe] + jnp.arange(tokens) - start[g_safe], num_chunks * chunk)
  src = jnp.full((num_chunks * chunk,), tokens, jnp.int32).at[dst].set(order.astype(jnp.int32),
                                                                       mode="drop")
  h = jnp.concatenate([y_TD, jnp.zeros((1, d), y_TD.dtype)])[src]
  labels = jnp.concatenate([labels_T, jnp.zeros((1,), labels_T.dtype)])[src]
  weights, transposed = zip(*(model.head_weight(n) for n in names))
  opts = (chunk, tuple(transposed), *opts_base)
  loss, ce, correct = chunked_head_ce(h, labels, tuple(weights), pad_start // chunk,
                                      (pad_start + padded) // chunk, opts)
  slot_group = jnp.searchsorted(pad_start + padded, jnp.arange(num_chunks * chunk), side="right")
  slot_group = jnp.where(src < tokens, slot_group, num_groups)
  return tuple(jax.ops.segment_sum(v, slot_group, num_groups + 1)[:num_groups]
               for v in (loss, ce, correct))


def _ragged(model: FourM, y_BMD, group_BM, labels_BM, opts_base):
  """Per-target-group sums (loss, ce, correct) through one ragged_dot over padded-vocab heads per
  shard of the batch (each chip sorts and multiplies only its own tokens)."""
  smoothing, z_loss, dtype = opts_base
  names = [m.name for m in model.registry.targets()]
  num_groups = len(names)
  vocabs = []
  stacked = []
  v_max = max(m.vocab_size for m in model.registry.targets())
  for n in names:
    w, transposed = model.head_weight(n)
    w = w.T if transposed else w
    vocabs.append(w.shape[1])
    stacked.append(jnp.pad(w, ((0, 0), (0, v_max - w.shape[1]))))
  vocab_G = np.array(vocabs + [1], np.int32)

  def shard_sums(y_BMD, group_BM, labels_BM, w_GDV):
    group_T = group_BM.reshape(-1)
    counts_G = jax.ops.segment_sum(jnp.ones_like(group_T), group_T, num_groups + 1)[:num_groups]
    order = jnp.argsort(group_T, stable=True)
    sorted_group = group_T[order]
    h = y_BMD.reshape(group_T.shape[0], -1)[order]
    with layers.target(model.cfg.platform):  # the loss runs outside the model call's target
      z = grouped.ragged_matmul(h, w_GDV, counts_G.astype(jnp.int32), dtype)
    vocab_T = jnp.asarray(vocab_G)[sorted_group]
    in_vocab = jnp.arange(v_max)[None, :] < vocab_T[:, None]
    z = jnp.where(in_vocab, z, F32_MIN)
    lse = jax.nn.logsumexp(z, axis=-1)
    labels = jnp.clip(labels_BM.reshape(-1)[order], 0, vocab_T - 1)
    zy = jnp.take_along_axis(z, labels[:, None], axis=-1)[:, 0]
    loss = lse - (1.0 - smoothing) * zy + z_loss * lse * lse
    if smoothing:
      loss = loss - smoothing * jnp.sum(jnp.where(in_vocab, z, 0.0), axis=-1) / vocab_T
    correct = (zy >= jnp.max(z, axis=-1)).astype(jnp.float32)
    return tuple(jax.ops.segment_sum(v, sorted_group, num_groups + 1)[:num_groups]
                 for v in (loss, lse - zy, correct))

  return layers.over_batch_shards(shard_sums, (y_BMD, group_BM, labels_BM), (jnp.stack(stacked),),
                                  summed=True)


def head_sums(model: FourM, y_BMD: jax.Array, batch, impl: str | None = None):
  """Per target modality (registry.targets() order): summed loss, CE and correct counts, and token
  counts over the batch's loss tokens."""
  cfg = model.cfg
  impl = impl or cfg.heads_impl
  if impl == "auto":  # ragged_dot is a grouped matmul on TPU/GPU, G dense matmuls on CPU
    impl = "chunked" if cfg.platform == "cpu" else "ragged"
  table, targets = _target_table(model)
  b, m, d = y_BMD.shape
  y_TD = y_BMD.reshape(b * m, d)
  modality = jnp.where(batch["dec_loss_mask"], batch["dec_modality"], len(model.registry))
  group_T = jnp.asarray(table)[modality.reshape(-1)]
  labels_T = batch["dec_targets"].reshape(-1)
  counts = jax.ops.segment_sum(jnp.ones_like(group_T), group_T, len(targets) + 1)[:len(targets)]
  opts = (float(cfg.label_smoothing), float(cfg.z_loss), model.dtype)
  if impl == "ragged":
    loss, ce, correct = _ragged(model, y_BMD, group_T.reshape(b, m),
                                batch["dec_targets"].reshape(b, m), opts)
  elif impl == "chunked":
    loss, ce, correct = _chunked(model, y_TD, group_T, labels_T, counts, opts)
  else:
    raise ValueError(f"heads impl must be auto, chunked or ragged, got {impl!r}")
  return loss, ce, correct, counts.astype(jnp.float32)


def combine(loss_G, ce_G, correct_G, counts_G, names, weighting: str):
  """The objective and the logged metrics from per-modality sums."""
  present = counts_G > 0
  safe = jnp.maximum(counts_G, 1.0)
  if weighting == "mod":
    total = jnp.sum(jnp.where(present, loss_G / safe, 0.0)) / jnp.maximum(jnp.sum(present), 1)
  elif weighting == "token":
    total = jnp.sum(loss_G) / jnp.maximum(jnp.sum(counts_G), 1.0)
  else:
    raise ValueError(f"unknown loss weighting {weighting!r}")
  metrics = {"loss": total, "ce": jnp.sum(ce_G) / jnp.maximum(jnp.sum(counts_G), 1.0)}
  for g, name in enumerate(names):
    metrics[f"loss/{name}"] = ce_G[g] / safe[g]
    metrics[f"acc/{name}"] = correct_G[g] / safe[g]
    metrics[f"tokens/{name}"] = counts_G[g]
  return total, metrics


def fourm_loss(model: FourM, batch, impl: str | None = None) -> tuple[jax.Array, dict]:
  """(objective, metrics) of one batch. Metrics: loss, ce (token mean), and per target modality
  loss/<name> (mean CE; 0 when absent), acc/<name> and tokens/<name>."""
  y = model(batch)
  sums = head_sums(model, y, batch, impl)
  names = [m.name for m in model.registry.targets()]
  return combine(*sums, names, model.cfg.loss_weighting)
