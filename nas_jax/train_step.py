"""The train state and the ONE jitted NAS training step.

Order inside a step (DESIGN.md): momentum EMA update → momentum forward (ITC targets, MLM soft
labels) → online forward: ITC, visual dictionary, in-batch hard negatives, NVA negatives, FGITM,
MLM → backward → AdamW → VD codebook update (eq. 2, global-batch statistics) → enqueue the global
batch's momentum features. No host round-trip; the state is donated by the caller's `jax.jit`.

Departures from ALBEF's per-GPU PyTorch code, chosen so results do not depend on the device count:
- ITC's in-batch part is the *global* batch (ALBEF: each GPU's local batch + the queue). The queue
  is the same, and the 1-device and 8-device runs compute the same loss.
- In-batch ITM hard negatives are drawn within each of `num_groups` contiguous slices of the batch
  (one slice per device = ALBEF's local sampling), through a [G, b, ...] reshape whose gathers stay
  on-device.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from nas_jax import nva, objectives
from nas_jax.models.nas import MOMENTUM_KEYS, NASModel, l2_normalize


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 []
  params: Any              # NASModel params + 'temp'
  params_m: Any            # momentum copies of MOMENTUM_KEYS
  batch_stats: Any         # {'dictionary': {...}} (the VD codebook), or {}
  opt_state: Any
  queues: Any              # {'image': [Q,E], 'text': [Q,E], 'idx': int32 [Q], 'ptr': int32 []}
  rng: jax.Array           # uint32 [2] raw PRNG key


@flax.struct.dataclass
class TokenIds:
  """Special token ids the MLM masking needs (static)."""
  pad: int = flax.struct.field(pytree_node=False, default=0)
  cls: int = flax.struct.field(pytree_node=False, default=101)
  mask: int = flax.struct.field(pytree_node=False, default=103)


def momentum_params(params) -> dict:
  return {k: params[k] for k in MOMENTUM_KEYS}


def init_state(config: ml_collections.ConfigDict, model: NASModel, tx: optax.GradientTransformation,
               rng: jax.Array) -> TrainState:
  """Creates the full train state (use under `jax.eval_shape` + a jitted init with out-shardings)."""
  c = config
  k_params, k_queue_i, k_queue_t, k_state = jax.random.split(rng, 4)
  res = c.model.vit.image_size
  images = jnp.zeros((1, res, res, 3), jnp.float32)
  ids = jnp.zeros((1, c.data.max_text_len), jnp.int32)
  variables = model.init({"params": k_params}, images, ids, jnp.ones_like(ids), train=False)
  params = dict(variables["params"])
  params["temp"] = jnp.asarray(c.model.temp, jnp.float32)
  batch_stats = dict(variables.get("batch_stats", {}))
  q, e = c.itc.queue_size, c.model.embed_dim
  queues = {
      "image": l2_normalize(jax.random.normal(k_queue_i, (q, e))),
      "text": l2_normalize(jax.random.normal(k_queue_t, (q, e))),
      "idx": jnp.full((q,), -100, jnp.int32),
      "ptr": jnp.zeros((), jnp.int32),
  }
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      params_m=jax.tree.map(jnp.copy, momentum_params(params)), batch_stats=batch_stats,
      opt_state=tx.init(params), queues=queues, rng=k_state)


# ---------------------------------------------------------------------------- helpers
def _grouped(x: jax.Array, groups: int) -> jax.Array:
  """[B, ...] → [G, B/G, ...]: contiguous slices, one per device, so per-group ops stay local."""
  return x.reshape((groups, x.shape[0] // groups) + x.shape[1:])


def _ungrouped(x: jax.Array) -> jax.Array:
  return x.reshape((-1,) + x.shape[2:])


def _take_grouped(x: jax.Array, idx: jax.Array, groups: int) -> jax.Array:
  """x [B, ...], idx [B] of indices local to each group → x[group's idx]."""
  xg, ig = _grouped(x, groups), _grouped(idx, groups)
  return _ungrouped(jax.vmap(lambda a, i: jnp.take(a, i, axis=0))(xg, ig))


def _interleave(*xs: jax.Array) -> jax.Array:
  """k arrays [B, ...] → [B*k, ...] row b*k + j = xs[j][b] (keeps each device's rows local)."""
  return _ungrouped(jnp.stack(xs, axis=1))


# ---------------------------------------------------------------------------- the step
def make_train_step(config: ml_collections.ConfigDict, model: NASModel,
                    tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                    token_ids: TokenIds, num_groups: int, alpha_warmup_steps: int):
  """Returns `train_step(state, batch) -> (state, metrics)` (not yet jitted).

  `batch` follows the data contract: image [B,H,W,3] f32, text_ids/text_mask int32 [B,L],
  image_id int32 [B], and neg_text_ids/neg_text_mask when `config.itm.text_negatives`.
  `num_groups`: how many device-local slices the batch has (hard negatives are drawn per slice).
  """
  c = config
  use_vd = c.model.use_dictionary
  use_nva = c.nva.enabled
  if use_nva and not use_vd:
    raise ValueError("config.nva.enabled=True needs config.model.use_dictionary=True "
                     "(NVA replaces visual-dictionary codes)")
  vocab_size = c.model.bert.vocab_size

  def online_forward(m: NASModel, batch, mlm_ids, mlm_labels, feats_m, logits_m, queues, keys,
                     alpha, temp):
    """Runs inside `model.apply` so every sub-call shares one Flax scope (and dropout stream)."""
    images, ids, mask = batch["image"], batch["text_ids"], batch["text_mask"]
    image_id = batch["image_id"]
    metrics = {}

    # -- ITC (ALBEF eq. 1-3): global batch + queues, momentum distillation.
    img = m.encode_image(images, train=True)
    txt = m.encode_text(ids, mask, train=True)
    loss_itc, itc_aux = objectives.itc_loss(
        img["feat"], txt["feat"], feats_m["image"], feats_m["text"], queues["image"],
        queues["text"], temp, alpha,
        image_id=image_id if c.itc.use_id_queue else None,
        id_queue=queues["idx"] if c.itc.use_id_queue else None)

    # -- Visual dictionary tokens for matching (NAS §3.1); the codebook is updated in place (eq. 2).
    if use_vd:
      codebook_old = m.codebook()
      image_tokens, vd = m.dictionary_tokens(img["embeds"], update=True)
      metrics.update(vd_perplexity=vd["perplexity"], vd_used_codes=vd["used_codes"],
                     vd_commit_dist=vd["commit_dist"])
    else:
      image_tokens = img["embeds"]

    # -- In-batch hard negatives, per device-local slice, ∝ softmax(sim) without the positive.
    g = num_groups
    i_g, t_g = _grouped(img["feat"], g), _grouped(txt["feat"], g)
    tm_g, im_g = _grouped(feats_m["text"], g), _grouped(feats_m["image"], g)
    sim_i2t = jnp.einsum("gie,gje->gij", i_g, tm_g) / temp      # = sim_i2t[:, :bs] of ALBEF
    sim_t2i = jnp.einsum("gie,gje->gij", t_g, im_g) / temp
    neg_keys = jax.random.split(keys["neg"], g)
    neg_img, neg_txt = jax.vmap(objectives.sample_hard_negatives)(
        neg_keys, jax.lax.stop_gradient(sim_i2t), jax.lax.stop_gradient(sim_t2i),
        _grouped(image_id, g))
    neg_img, neg_txt = _ungrouped(neg_img), _ungrouped(neg_txt)
    # Indices are local to each slice.
    img_neg_tokens = _take_grouped(image_tokens, neg_img, g)
    txt_neg_embeds = _take_grouped(txt["embeds"], neg_txt, g)
    txt_neg_mask = _take_grouped(mask, neg_txt, g)

    # Pair groups in a fixed order: (I,T)=1, (I_neg,T)=0, (I,T_neg)=0, [(I_fg,T)=0], [(I,T_fg)=0].
    pair_img = [image_tokens, img_neg_tokens, image_tokens]
    pair_txt = [txt["embeds"], txt["embeds"], txt_neg_embeds]
    pair_mask = [mask, mask, txt_neg_mask]

    if use_nva:
      neg = nva.negative_codes(
          keys["nva"], t_cls=txt["embeds"][:, 0], v_cls=img["embeds"][:, 0],
          patches=img["embeds"][:, 1:], codes=vd["codes"], codebook=codebook_old,
          ratio=c.nva.ratio, lam=c.nva.lam, k=c.nva.k, scope=c.nva.scope,
          norm=c.nva.norm)
      fg_tokens = m.tokens_from_codes(img["embeds"], vd, neg["codes"], neg["replaced"],
                                      codebook_old)
      pair_img.append(fg_tokens)
      pair_txt.append(txt["embeds"])
      pair_mask.append(mask)
      metrics["nva_replaced_frac"] = jnp.mean(neg["replaced"].astype(jnp.float32))

    if c.itm.text_negatives:
      fg_text = m.encode_text(batch["neg_text_ids"], batch["neg_text_mask"], train=True)
      pair_img.append(image_tokens)
      pair_txt.append(fg_text["embeds"])
      pair_mask.append(batch["neg_text_mask"])

    k = len(pair_img)
    fused = m.fuse(_interleave(*pair_txt), _interleave(*pair_mask), _interleave(*pair_img),
                   train=True)
    itm_logits = m.itm_logits(fused)                                       # [B*k, 2]
    itm_labels = _interleave(*([jnp.ones_like(image_id)] + [jnp.zeros_like(image_id)] * (k - 1)))
    loss_itm, itm_acc = objectives.itm_loss(itm_logits, itm_labels)

    # -- MLM on the full BERT with cross-attention to the continuous image embeddings.
    if c.mlm.enabled:
      logits = m.mlm(mlm_ids, mask, img["embeds"], train=True)
      loss_mlm = objectives.mlm_loss(logits, mlm_labels, logits_m, alpha)
    else:
      loss_mlm = jnp.zeros((), jnp.float32)

    w = c.loss_weights
    loss = w.itc * loss_itc + w.mlm * loss_mlm + w.itm * loss_itm
    metrics.update(loss=loss, loss_itc=loss_itc, loss_itm=loss_itm, loss_mlm=loss_mlm,
                   itm_acc=itm_acc)
    return loss, metrics

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng, k_drop, k_drop_m, k_mask, k_neg, k_nva = jax.random.split(state.rng, 6)
    alpha = objectives.alpha_schedule(state.step, c.itc.alpha, alpha_warmup_steps)
    images, ids, mask = batch["image"], batch["text_ids"], batch["text_mask"]

    # 1. Momentum encoders: EMA of the online weights, before this step's forward (ALBEF).
    params_m = optax.incremental_update(momentum_params(state.params), state.params_m,
                                        1.0 - c.itc.momentum)
    # ALBEF clamps the temperature in place (no grad) before using it.
    params = dict(state.params)
    params["temp"] = jnp.clip(params["temp"], c.itc.temp_min, c.itc.temp_max)

    # 2. Momentum forward (train mode, as ALBEF's momentum modules are; no gradient).
    if c.mlm.enabled:
      mlm_ids, mlm_labels = objectives.mask_tokens(
          k_mask, ids, vocab_size=vocab_size, pad_id=token_ids.pad, cls_id=token_ids.cls,
          mask_id=token_ids.mask, prob=c.mlm.prob, mask_prob=c.mlm.mask_prob,
          random_prob=c.mlm.random_prob)
    else:
      mlm_ids, mlm_labels = ids, jnp.full_like(ids, -100)

    def momentum_forward(m: NASModel):
      img_m = m.encode_image(images, train=True)
      txt_m = m.encode_text(ids, mask, train=True)
      logits_m = m.mlm(mlm_ids, mask, img_m["embeds"], train=True) if c.mlm.enabled else None
      return {"image": img_m["feat"], "text": txt_m["feat"]}, logits_m

    feats_m, logits_m = jax.lax.stop_gradient(model.apply(
        {"params": params_m}, method=momentum_forward, rngs={"dropout": k_drop_m}))

    # 3. Online forward + backward.
    alpha_f = jnp.asarray(alpha, jnp.float32)

    def loss_fn(p):
      (loss, metrics), mutated = model.apply(
          {"params": p, "batch_stats": state.batch_stats},
          batch, mlm_ids, mlm_labels, feats_m, logits_m, state.queues,
          {"neg": k_neg, "nva": k_nva}, alpha_f, p["temp"],
          method=online_forward, rngs={"dropout": k_drop}, mutable=["batch_stats"])
      return loss, (metrics, mutated.get("batch_stats", state.batch_stats))

    (loss, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)

    # 4. AdamW.
    updates, opt_state = tx.update(grads, state.opt_state, params)
    new_params = optax.apply_updates(params, updates)

    # 5. Enqueue the global batch's momentum features (after the loss).
    queues = dict(state.queues)
    queues["image"], _ = objectives.enqueue(queues["image"], queues["ptr"], feats_m["image"])
    queues["text"], _ = objectives.enqueue(queues["text"], queues["ptr"], feats_m["text"])
    queues["idx"], queues["ptr"] = objectives.enqueue(queues["idx"], queues["ptr"],
                                                      batch["image_id"].astype(jnp.int32))

    new_state = state.replace(step=state.step + 1, params=new_params, params_m=params_m,
                              batch_stats=batch_stats, opt_state=opt_state, queues=queues, rng=rng)
    finite = jnp.isfinite(loss)
    if c.nonfinite == "skip":
      new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state,
                               state.replace(step=state.step + 1, rng=rng))
    metrics.update(alpha=alpha_f, temp=params["temp"], lr=schedule(state.step),
                   grad_norm=optax.tree.norm(grads), finite=finite)
    return new_state, metrics

  return train_step
