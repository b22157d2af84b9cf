"""4M model: init loss, invariances, causality and isolation by gradients, padding, embeddings."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mmjax import modalities

from mmjax.models.fourm_loss import fourm_loss
from tests.models import fourm_fixtures as fx


def _loss(m, b, impl=None):
  return jax.jit(lambda s, b: fourm_loss(nnx.merge(*s), b, impl))(nnx.split(m), b)


def test_init_loss_is_about_ln_vocab_per_modality():
  # The spec's sanity (10.31 for V = 30000) holds for V >> D, as in the real models.
  cfg = fx.config(num_target_tokens=48, num_input_tokens=8)
  section = {n: dict(s) for n, s in fx.SECTION.items()}
  for name, vocab in (("tok_a", 3000), ("caption", 2000), ("glob", 1000)):
    section[name]["vocab_size"] = vocab
  reg = modalities.from_config(section)
  _, metrics = _loss(fx.model(cfg, reg), fx.batch(cfg, reg, size=8))
  for m in reg.targets():
    assert metrics[f"tokens/{m.name}"] > 0
    assert abs(float(metrics[f"loss/{m.name}"]) - np.log(m.vocab_size)) < 0.2, (m.name, metrics)


def _reorder_batch(b, old_reg, new_reg):
  """The same samples with modality ids of `new_reg` and slots regrouped in its id order."""
  remap = np.array([new_reg.index(n) for n in old_reg.names])
  out = {k: v.copy() for k, v in b.items()}
  for side, valid in (("enc", "enc_valid"), ("dec", "dec_valid")):
    fields = [k for k in b if k.startswith(side + "_") and k != "enc_pixels"]
    for i in range(b[valid].shape[0]):
      new_id = np.where(b[valid][i], remap[b[f"{side}_modality"][i]], len(new_reg))
      order = np.argsort(new_id, kind="stable")
      for k in fields:
        out[k][i] = b[k][i][order]
      out[f"{side}_modality"][i] = np.where(out[valid][i], remap[b[f"{side}_modality"][i][order]], 0)
  return out


def test_loss_invariant_to_modality_order():
  cfg = fx.config()
  reg_a = fx.registry()
  reg_b = fx.registry(["caption", "glob", "rgb", "tok_a"])
  m_a, m_b = fx.model(cfg, reg_a), fx.model(cfg, reg_b, seed=1)
  # Same parameters by name; mod_emb rows follow the modalities.
  state_a, state_b = nnx.state(m_a), nnx.state(m_b)
  perm = np.array([reg_a.index(n) for n in reg_b.names])
  flat_b = dict(nnx.to_flat_state(state_b))
  for path, var in nnx.to_flat_state(state_a):
    value = var[...]
    if path == ("mod_emb",):
      value = value[perm]
    flat_b[path].set_value(value)
  b_a = fx.batch(cfg, reg_a, size=4, seed=3)
  b_b = _reorder_batch(b_a, reg_a, reg_b)
  loss_a, met_a = _loss(m_a, b_a)
  loss_b, met_b = _loss(m_b, b_b)
  np.testing.assert_allclose(loss_a, loss_b, rtol=2e-5)
  for name in reg_a.names[1:]:
    np.testing.assert_allclose(met_a[f"loss/{name}"], met_b[f"loss/{name}"], rtol=2e-5)


def test_decoder_information_flow_by_gradients():
  """d y[t] / d input[t'] is nonzero only within one modality: any slot of an image modality, and
  only t' <= t within a sequence; never across modalities or from padding."""
  cfg, reg = fx.config(), fx.registry()
  m = fx.model(cfg, reg)
  cap = reg.index("caption")
  seed = next(s for s in range(100)  # a batch whose samples both hold 3+ caption targets
              if (fx.batch(cfg, reg, size=2, seed=s)["dec_modality"] == cap).sum(1).min() >= 3)
  b = jax.tree.map(jnp.asarray, fx.batch(cfg, reg, size=2, seed=seed))
  ctx, mask = m.encode(b)
  x, emb = m.embed_decoder(b)
  r = jax.random.normal(jax.random.key(0), (cfg.d_model,))

  def outputs(h):  # one scalar per decoder slot
    return m.decode_inputs(h, b, ctx, mask) @ r

  jac = jax.jacrev(outputs)(x + emb)  # [B, M, B, M, D]
  mag = np.asarray(jnp.abs(jac).sum(-1))
  mod, valid = np.asarray(b["dec_modality"]), np.asarray(b["dec_valid"])
  seen = {"image": 0, "causal": 0}
  for i in range(2):
    assert mag[i, :, 1 - i].max() == 0  # no flow across samples
    for t in np.flatnonzero(valid[i]):
      for s in range(cfg.num_target_tokens):
        allowed = valid[i, s] and mod[i, s] == mod[i, t] and (reg.modalities[mod[i, t]].is_image
                                                              or s <= t)
        if allowed:
          assert mag[i, t, i, s] > 0, (i, t, s)
          seen["image" if reg.modalities[mod[i, t]].is_image else "causal"] += s != t
        else:
          assert mag[i, t, i, s] == 0, (i, t, s)
  assert seen["image"] > 0 and seen["causal"] > 0


def test_fully_masked_rows_give_finite_loss_and_grads():
  cfg, reg = fx.config(), fx.registry()
  m = fx.model(cfg, reg)
  b = fx.batch(cfg, reg, size=3, seed=2)
  for k in ("enc_valid", "dec_valid", "dec_loss_mask"):
    b[k][0] = False  # sample 0: nothing at all
  b["enc_valid"][1] = False  # sample 1: targets without any input
  graphdef, state = nnx.split(m)
  loss, grads = jax.jit(jax.value_and_grad(
      lambda s: fourm_loss(nnx.merge(graphdef, s), b)[0]))(state)
  assert np.isfinite(loss)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_embeddings_teacher_forcing_and_pixels():
  """Sequence queries read dec_tokens; image queries ignore them; pixels enter through the patch
  their enc_tokens slot points at."""
  cfg, reg = fx.config(), fx.registry()
  m = fx.model(cfg, reg)
  b = fx.batch(cfg, reg, size=2, seed=7)
  x, _ = m.embed_decoder(b)
  mod = b["dec_modality"]
  cap, img = reg.index("caption"), reg.index("tok_a")
  i, t = np.argwhere((mod == cap) & b["dec_valid"])[0]
  np.testing.assert_allclose(x[i, t], m.dec_tokens["caption"][...][b["dec_tokens"][i, t]])
  i, t = np.argwhere((mod == img) & b["dec_valid"])[0]
  np.testing.assert_allclose(x[i, t], m.mask_token[...])
  ex, eemb = m.embed_encoder(b)
  rgb = reg.index("rgb")
  slots = np.argwhere((b["enc_modality"] == rgb) & b["enc_valid"])
  i, n = slots[0]
  patch = b["enc_pixels"][i, b["enc_tokens"][i, n]]
  np.testing.assert_allclose(ex[i, n], patch @ np.asarray(m.enc_patch["rgb"].kernel[...]),
                             rtol=1e-5, atol=1e-6)
  # emb = 2D sin-cos of the patch's cell + rgb's mod_emb.
  from mmjax.models.layers import sincos_2d
  pos = sincos_2d(2, 2, cfg.d_model)[b["enc_positions"][i, n]]
  np.testing.assert_allclose(eemb[i, n], pos + np.asarray(m.mod_emb[...][rgb]), rtol=1e-5, atol=1e-6)


def test_bfloat16_compute_is_close_to_float32():
  cfg, reg = fx.config(), fx.registry()
  b = fx.batch(cfg, reg, size=2)
  # Tied heads: the bf16 backward also contracts the [V, D] table in its stored layout.
  graphdef, state = nnx.split(fx.model(fx.replace(cfg, dtype="bfloat16", tie_heads=True), reg))
  l16, grads = jax.jit(jax.value_and_grad(
      lambda s: fourm_loss(nnx.merge(graphdef, s), b)[0]))(state)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  l32, _ = _loss(fx.model(fx.replace(cfg, tie_heads=True), reg), b)
  assert np.isfinite(l16) and abs(float(l16) - float(l32)) < 0.05 * float(l32)


def test_tiny_model_overfits_one_batch():
  cfg, reg = fx.config(qk_norm=True), fx.registry()
  m = fx.model(cfg, reg)
  b = jax.tree.map(jnp.asarray, fx.batch(cfg, reg, size=2, seed=11))
  graphdef, params = nnx.split(m)
  tx = optax.adam(3e-3)  # 1e-2 oscillates around 0.3 on some CPUs instead of converging

  @jax.jit
  def step(params, opt):
    loss, g = jax.value_and_grad(lambda p: fourm_loss(nnx.merge(graphdef, p), b)[0])(params)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  opt = tx.init(params)
  first = None
  for _ in range(150):
    params, opt, loss = step(params, opt)
    first = first if first is not None else float(loss)
  assert first > 2.5 and float(loss) < 0.05, (first, float(loss))
