"""Modality-aware and modality-agnostic sparsity for the decoder (specs/mixed_modal.md).

- MoT (Mixture-of-Transformers): `ModalLinear` / `SwiGLU` with groups = number of modalities hold one
  weight per modality; tokens are sorted by modality once per forward pass (`grouped.Routing`) and
  each group is multiplied by its own weight (grouped matmul): the FLOPs of the dense model.
- MoMa: `MoMaFFN`, SwiGLU experts in modality groups with expert-choice routing inside each group.
- `TokenChoiceMoE`: modality-agnostic top-k routing with a load-balance loss and a capacity factor.

Expert weights carry the `expert` logical axis; every expert FFN runs as one grouped matmul over
(token, expert) slots, never as every expert on every token.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mmjax.models import grouped, layers
from mmjax.models.decoder_layers import param
from mmjax.models.grouped import Routing


def _init(scale: float, in_axes: tuple[int, ...], out_axes: tuple[int, ...]):
  return nnx.initializers.variance_scaling(scale, "fan_in", "normal", in_axis=in_axes,
                                           out_axis=out_axes)


def _stacked_init(base, count: int):
  """An init that draws `count` independent copies (one per modality or expert)."""
  return lambda k, s, d: jax.vmap(lambda kk: base(kk, s[1:], d))(jax.random.split(k, count))


class ModalLinear(nnx.Module):
  """x[..., *in] @ W[*in, *out]; with groups > 1 each token uses its modality's W (MoT)."""

  def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], names: tuple, *,
               groups: int, impl: str, chunk: int, dtype, param_dtype, rngs: nnx.Rngs):
    self.groups, self.impl, self.chunk, self.dtype = groups, impl, chunk, dtype
    self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
    n_in = len(in_shape)
    init = _init(1.0, tuple(range(n_in)), tuple(range(n_in, n_in + len(out_shape))))
    shape = (*in_shape, *out_shape)
    if groups > 1:
      init, shape, names = _stacked_init(init, groups), (groups, *shape), (None, *names)
    self.kernel = param(rngs.params(), init, shape, names, param_dtype)

  def __call__(self, x: jax.Array, routing: Routing | None = None) -> jax.Array:
    lead = x.shape[:-len(self.in_shape)]
    k_in, k_out = math.prod(self.in_shape), math.prod(self.out_shape)
    x_NK = x.reshape(-1, k_in)
    if self.groups == 1:
      y = grouped.dot("nk,kf->nf", x_NK, self.kernel[...].reshape(k_in, k_out), self.dtype)
      return y.reshape(*lead, *self.out_shape)
    w_GKF = self.kernel[...].reshape(self.groups, k_in, k_out)

    def per_shard(x_NK, modality_N, w_GKF):  # each batch shard sorts and multiplies its tokens
      local = grouped.make_routing(modality_N, self.groups)
      y = grouped.grouped_matmul(x_NK[local.order_N], w_GKF, local.sizes_G, impl=self.impl,
                                 chunk=self.chunk, dtype=self.dtype)
      return y[local.inverse_N]

    y = layers.over_batch_shards(per_shard, (x_NK, routing.modality_N), (w_GKF,))
    return y.reshape(*lead, *self.out_shape)


class SwiGLU(nnx.Module):
  """down(silu(gate(x)) * up(x)); per modality when groups > 1 (MoT)."""

  def __init__(self, d_model: int, hidden: int, *, groups: int, impl: str, chunk: int, dtype,
               param_dtype, rngs: nnx.Rngs):
    kw = dict(groups=groups, impl=impl, chunk=chunk, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate = ModalLinear((d_model,), (hidden,), ("embed", "mlp"), **kw)
    self.up = ModalLinear((d_model,), (hidden,), ("embed", "mlp"), **kw)
    self.down = ModalLinear((hidden,), (d_model,), ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array, routing: Routing | None = None) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x, routing)) * self.up(x, routing), routing)


class ExpertWeights(nnx.Module):
  """E SwiGLU experts, applied to expert-major slots with grouped matmuls."""

  def __init__(self, num_experts: int, d_model: int, hidden: int, *, impl: str, chunk: int, dtype,
               param_dtype, rngs: nnx.Rngs):
    self.impl, self.chunk, self.dtype = impl, chunk, dtype
    inner = _stacked_init(_init(1.0, (0,), (1,)), num_experts)
    self.gate = param(rngs.params(), inner, (num_experts, d_model, hidden),
                      ("expert", "embed", "mlp"), param_dtype)
    self.up = param(rngs.params(), inner, (num_experts, d_model, hidden),
                    ("expert", "embed", "mlp"), param_dtype)
    self.down = param(rngs.params(), inner, (num_experts, hidden, d_model),
                      ("expert", "mlp", "embed"), param_dtype)

  def __call__(self, x_SD: jax.Array, sizes_E: jax.Array) -> jax.Array:
    return self.apply_weights(x_SD, sizes_E, self.gate[...], self.up[...], self.down[...])

  def apply_weights(self, x_SD, sizes_E, gate_EDF, up_EDF, down_EFD) -> jax.Array:
    """The experts with the given weights (these, or their copies inside a shard_map)."""
    mm = lambda x, w: grouped.grouped_matmul(x, w, sizes_E, impl=self.impl, chunk=self.chunk,
                                             dtype=self.dtype)
    h = jax.nn.silu(mm(x_SD, gate_EDF)) * mm(x_SD, up_EDF)
    return mm(h, down_EFD)


def _combine(x_ND: jax.Array, slots: grouped.Slots, gate_S: jax.Array, experts: ExpertWeights
             ) -> jax.Array:
  """Σ over a token's slots of gate · expert(x), back in token order."""
  y_SD = experts(x_ND[slots.token_S], slots.sizes_E)
  y_SD = y_SD * jnp.where(slots.valid_S, gate_S, 0.0)[:, None]
  return jax.ops.segment_sum(y_SD, slots.token_S, num_segments=x_ND.shape[0])


# ---------------------------------------------------------------------------------------------
# MoMa: expert choice inside modality groups.


def expert_choice(scores_NE: jax.Array, modality_N: jax.Array, valid_N: jax.Array,
                  experts_per_group: int) -> tuple[jax.Array, jax.Array]:
  """Expert-choice selection inside modality groups.

  Expert e belongs to group e // experts_per_group; it takes exactly capacity = (valid tokens of its
  modality) // experts_per_group tokens, those of its modality with the highest scores.
  Returns selected[E, N] and capacity[E].
  """
  num_experts = scores_NE.shape[1]
  group_E = jnp.arange(num_experts) // experts_per_group
  eligible_EN = (group_E[:, None] == modality_N[None, :]) & valid_N[None, :]
  counts = jnp.bincount(jnp.where(valid_N, modality_N, num_experts), length=num_experts + 1)
  capacity_E = counts[group_E] // experts_per_group
  masked = jnp.where(eligible_EN, scores_NE.T, -jnp.inf)
  order_EN = jnp.argsort(-masked, axis=1, stable=True)
  rank_EN = jnp.argsort(order_EN, axis=1)
  return (rank_EN < capacity_E[:, None]) & eligible_EN, capacity_E


def expert_choice_by_rows(scores_BLE: jax.Array, modality_BL: jax.Array, valid_BL: jax.Array,
                          experts_per_group: int, rows: int) -> jax.Array:
  """`expert_choice` made separately inside each run of `rows` consecutive rows; selected[E, B*L]
  (tokens in row-major order)."""
  b, l, e = scores_BLE.shape
  if b % rows:
    raise ValueError(f"MoMa routes over groups of {rows} rows (model.moma_routing_rows), but "
                     f"a batch shard holds {b} rows")
  g = b // rows
  choose = jax.vmap(lambda s, m, v: expert_choice(s, m, v, experts_per_group)[0])
  selected_GEN = choose(scores_BLE.reshape(g, rows * l, e), modality_BL.reshape(g, rows * l),
                        valid_BL.reshape(g, rows * l))
  return selected_GEN.transpose(1, 0, 2).reshape(e, b * l)


class MoMaFFN(nnx.Module):
  """FFN experts in modality groups with expert-choice routing (MoMa).

  Output Σ_j sigmoid(score_j)·FFN_j(x) over the experts that took the token. Expert choice looks at
  the whole batch, so it is not causal; the auxiliary router (a small sigmoid MLP on detached
  inputs, trained with BCE to predict selection) replaces it in `causal` mode (decoding).

  `routing_rows` > 0 makes the choice inside each group of that many consecutive rows instead of
  over the whole batch. The groups do not depend on the mesh (sharded equals unsharded), and each
  batch shard routes and multiplies its own tokens: over the whole batch, the SPMD partitioner has
  no axis to split the sort, the gather and the grouped matmul by, so every chip does them for
  every token (the 1B MoMa decoder compiled for v5p: 2.51x the analytic FLOPs).
  """

  def __init__(self, d_model: int, hidden: int, *, num_modalities: int, experts_per_modality: int,
               aux_router: bool, aux_hidden: int, impl: str, chunk: int, dtype, param_dtype,
               rngs: nnx.Rngs, routing_rows: int = 0):
    self.per_group, self.dtype, self.has_aux = experts_per_modality, dtype, aux_router
    self.routing_rows = routing_rows
    self.num_experts = num = num_modalities * experts_per_modality
    self.router = param(rngs.params(), _init(1.0, (0,), (1,)), (d_model, num), ("embed", "expert"),
                        param_dtype)
    self.experts = ExpertWeights(num, d_model, hidden, impl=impl, chunk=chunk, dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)
    if aux_router:
      self.aux_in = param(rngs.params(), _init(1.0, (0,), (1,)), (d_model, aux_hidden),
                          ("embed", "mlp"), param_dtype)
      self.aux_out = param(rngs.params(), _init(1.0, (0,), (1,)), (aux_hidden, num),
                           ("mlp", "expert"), param_dtype)

  def aux_logits(self, x_ND: jax.Array) -> jax.Array:
    h = jax.nn.silu(grouped.dot("nd,dh->nh", jax.lax.stop_gradient(x_ND), self.aux_in[...],
                                self.dtype))
    return grouped.dot("nh,he->ne", h, self.aux_out[...], self.dtype, jnp.float32)

  def __call__(self, x_BLD: jax.Array, modality_BL: jax.Array, valid_BL: jax.Array, *,
               causal: bool) -> tuple[jax.Array, dict]:
    b, l, d = x_BLD.shape
    n = b * l
    x_ND = x_BLD.reshape(n, d)
    modality_N, valid_N = modality_BL.reshape(n), valid_BL.reshape(n)
    router = self.router[...]
    experts = (self.experts.gate[...], self.experts.up[...], self.experts.down[...])
    if self.routing_rows and not causal:
      y_ND, selected_NE = layers.over_batch_shards(
          self._route_by_rows, (x_BLD, modality_BL, valid_BL), (router, *experts))
      selected_EN = selected_NE.T
    else:
      scores_NE = grouped.dot("nd,de->ne", x_ND, router, self.dtype, jnp.float32)
      if causal:
        if not self.has_aux:
          raise ValueError("MoMa causal routing needs the auxiliary router "
                           "(model.moma_aux_router)")
        selected_EN = (self.aux_logits(x_ND).T > 0.0) & self._eligible(modality_N, valid_N)
        y_ND = self._experts(x_ND, scores_NE, selected_EN, n * self.per_group, *experts)
        return y_ND.reshape(b, l, d), {}
      selected_EN, _ = expert_choice(scores_NE, modality_N, valid_N, self.per_group)
      y_ND = self._experts(x_ND, scores_NE, selected_EN, n, *experts)
    aux = self._aux_router_loss(x_ND, selected_EN, modality_N, valid_N) if self.has_aux else {}
    return y_ND.reshape(b, l, d), aux

  def _eligible(self, modality_N: jax.Array, valid_N: jax.Array) -> jax.Array:
    """[E, N]: token n is valid and of expert e's modality."""
    group_E = jnp.arange(self.num_experts) // self.per_group
    return (group_E[:, None] == modality_N[None, :]) & valid_N[None, :]

  def _experts(self, x_ND, scores_NE, selected_EN, num_slots, gate, up, down) -> jax.Array:
    """Σ over the experts that took each token of sigmoid(score) · expert(x) [N, D]."""
    slots = grouped.slots_from_selection(selected_EN, num_slots)
    gate_S = jnp.where(slots.valid_S, jax.nn.sigmoid(scores_NE[slots.token_S, slots.expert_S]),
                       0.0)
    y_SD = self.experts.apply_weights(x_ND[slots.token_S], slots.sizes_E, gate, up, down)
    return jax.ops.segment_sum(y_SD * gate_S[:, None], slots.token_S,
                               num_segments=x_ND.shape[0])

  def _route_by_rows(self, x_BLD, modality_BL, valid_BL, router_DE, gate, up, down):
    """One batch shard: expert choice inside its groups of rows, then the experts; returns
    (y [N, D], selected [N, E])."""
    b, l, d = x_BLD.shape
    x_ND = x_BLD.reshape(b * l, d)
    scores_NE = grouped.dot("nd,de->ne", x_ND, router_DE, self.dtype, jnp.float32)
    selected_EN = expert_choice_by_rows(scores_NE.reshape(b, l, -1), modality_BL, valid_BL,
                                        self.per_group, self.routing_rows)
    y_ND = self._experts(x_ND, scores_NE, selected_EN, b * l, gate, up, down)
    return y_ND, selected_EN.T

  def _aux_router_loss(self, x_ND, selected_EN, modality_N, valid_N) -> dict:
    """BCE of the auxiliary router against the expert-choice decision, on its group's experts."""
    eligible_EN = self._eligible(modality_N, valid_N)
    logits_EN = self.aux_logits(x_ND).T
    bce = sigmoid_bce(logits_EN, jax.lax.stop_gradient(selected_EN).astype(jnp.float32))
    count = jnp.maximum(jnp.sum(eligible_EN), 1)
    agree = ((logits_EN > 0) == selected_EN) & eligible_EN
    return {"moma_aux_router_bce": jnp.sum(bce * eligible_EN) / count,
            "moma_aux_router_acc": jnp.sum(agree) / count}


def sigmoid_bce(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Binary cross-entropy on logits, stable for large |logits|."""
  return jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))


# ---------------------------------------------------------------------------------------------
# Modality-agnostic token-choice MoE.


class TokenChoiceMoE(nnx.Module):
  """Top-k of `num_experts` by softmax router probability, with a Switch load-balance loss.

  Training drops a token's assignment to an expert past that expert's capacity
  ceil(capacity_factor · N · k / E), in token order; `causal` mode (decoding) drops nothing.
  """

  def __init__(self, d_model: int, hidden: int, *, num_experts: int, top_k: int,
               capacity_factor: float, impl: str, chunk: int, dtype, param_dtype, rngs: nnx.Rngs):
    self.num_experts, self.top_k, self.cf, self.dtype = num_experts, top_k, capacity_factor, dtype
    self.router = param(rngs.params(), _init(1.0, (0,), (1,)), (d_model, num_experts),
                        ("embed", "expert"), param_dtype)
    self.experts = ExpertWeights(num_experts, d_model, hidden, impl=impl, chunk=chunk, dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x_BLD: jax.Array, valid_BL: jax.Array, *, causal: bool
               ) -> tuple[jax.Array, dict]:
    b, l, d = x_BLD.shape
    n, e, k = b * l, self.num_experts, self.top_k
    x_ND, valid_N = x_BLD.reshape(n, d), valid_BL.reshape(n)
    probs_NE = jax.nn.softmax(grouped.dot("nd,de->ne", x_ND, self.router[...], self.dtype,
                                          jnp.float32), axis=-1)
    top_p, top_i = jax.lax.top_k(probs_NE, k)
    if k > 1:
      top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
    chosen_NE = jnp.any(jax.nn.one_hot(top_i, e, dtype=jnp.bool_), axis=1) & valid_N[:, None]
    gate_NE = jnp.sum(jax.nn.one_hot(top_i, e) * top_p[..., None], axis=1)
    kept_NE = chosen_NE
    if not causal:
      capacity = math.ceil(self.cf * n * k / e)
      queue_NE = jnp.cumsum(chosen_NE, axis=0) - 1
      kept_NE = chosen_NE & (queue_NE < capacity)
    slots = grouped.slots_from_selection(kept_NE.T, n * k)
    y_ND = _combine(x_ND, slots, gate_NE[slots.token_S, slots.expert_S], self.experts)
    num_valid = jnp.maximum(jnp.sum(valid_N), 1)
    fraction_E = jnp.sum(chosen_NE, axis=0) / (num_valid * k)
    mean_prob_E = jnp.sum(probs_NE * valid_N[:, None], axis=0) / num_valid
    aux = {"moe_balance_loss": e * jnp.sum(fraction_E * mean_prob_E),
           "moe_dropped_fraction": 1.0 - jnp.sum(kept_NE) / jnp.maximum(jnp.sum(chosen_NE), 1)}
    return y_ND.reshape(b, l, d), aux
