"""The train state and the ONE jitted NAS training step.

Order inside a step (DESIGN.md): momentum EMA update → momentum forward (ITC targets, MLM soft
labels) → online forward: ITC, visual dictionary, in-batch hard negatives, NVA negatives, FGITM,
MLM → backward → AdamW → VD codebook update (eq. 2, global-batch statistics) → enqueue the global
batch's momentum features. No host round-trip; the state is donated by the caller's `jax.jit`.
The fusion encoder runs once for FGITM and MLM together: each sample's k ITM pairs and its MLM row
(masked text × continuous image tokens) are k + 1 adjacent rows of one batch (docs/PERF.md).

Departures from ALBEF's per-GPU PyTorch code, chosen so results do not depend on the device count:
- ITC's in-batch part is the *global* batch (ALBEF: each GPU's local batch + the queue). The queue
  is the same, and the 1-device and 8-device runs compute the same loss.
- In-batch ITM hard negatives are drawn within each of `num_groups` contiguous slices of the batch
  (one slice per device = ALBEF's local sampling), through a [G, b, ...] reshape whose gathers stay
  on-device.

Gradient accumulation (`config.accum_steps = K > 1`; docs/SCALING.md). `data.batch_size` B stays the
global (optimiser) batch; it is cut into K micro-batches of B/K, each device keeping its own rows:
x.reshape(G, K, m, ...) with m = B/(G K), micro-batch k = x[:, k] → [G m, ...]. A `lax.scan` over
k runs forward + backward per micro-batch and sums float32 gradients and metrics. What happens once
per optimiser step, from the whole batch B (so K micro-batches = one batch K times larger):
- the momentum EMA (before), the MLM masking, and the momentum ITC features of all B rows (a first,
  gradient-free scan); micro-batch k's ITC uses its own momentum features as the in-batch part and
  [the other micro-batches' momentum features ; queue] as the queue (and the ids likewise with
  `itc.use_id_queue`). Softmax and targets are invariant to the column order, so every row sees the
  same B + Q columns as the big-batch ITC: the loss is exactly the big-batch loss;
- one AdamW update with the mean of the K gradients; one VD codebook update (eq. 2) from per-code
  sums and counts accumulated over the micro-batches (`quantize(update=False)` inside, the codebook
  does not move between micro-batches); with `dictionary.init='data'` the first step builds the
  codebook from micro-batch 0's features (B/K rows, where K = 1 uses all B);
- one enqueue of the whole batch's momentum features (ids).
Per micro-batch: ITM hard negatives (within each device's m rows; the key of group g, micro k is
split(k_neg, G K)[g K + k], so K micro-batches with G groups draw exactly what K=1 with G K groups
draws), NVA negatives (key folded with k) and dropout (keys folded with k). The MLM loss of micro
k is scaled by K · masked(k) / masked(B) so the mean over k is the big batch's mean over masked
tokens. K = 1 is the plain step (no scan).
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
from nas_jax.models import dictionary
from nas_jax.models.nas import MOMENTUM_KEYS, NASModel, compute_dtype as dtype_of, l2_normalize


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


def _code_stats(f: jax.Array, codes: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
  """Eq. 2 statistics of one micro-batch: per-code feature sums [m, C] and counts [m] (float32)."""
  flat = jax.lax.stop_gradient(f).astype(jnp.float32).reshape(-1, f.shape[-1])
  codes = codes.reshape(-1)
  counts = jax.ops.segment_sum(jnp.ones(codes.shape, jnp.float32), codes, num_segments=size)
  return jax.ops.segment_sum(flat, codes, num_segments=size), counts


def _ema_from_stats(codebook: jax.Array, sums: jax.Array, counts: jax.Array,
                    momentum: float) -> jax.Array:
  """Eq. 2 from accumulated statistics: d_j ← γ d_j + (1−γ) sums_j / n_j where n_j > 0
  (= `dictionary.ema_update` on the concatenated micro-batches)."""
  mean = sums / jnp.maximum(counts, 1.0)[:, None]
  updated = momentum * codebook + (1.0 - momentum) * mean
  return jnp.where((counts > 0)[:, None], updated, codebook)


def _usage_from_counts(counts: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(perplexity, used codes) of the whole batch from its code counts (as `dictionary.code_usage`)."""
  p = counts / jnp.maximum(counts.sum(), 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return jnp.exp(entropy), jnp.sum(counts > 0).astype(jnp.int32)


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
  update_vd = use_vd and not c.model.dictionary.frozen   # eq. 2 runs (False: codebook frozen)
  use_nva = c.nva.enabled
  compute_dtype = dtype_of(c.model.dtype)
  if use_nva and not use_vd:
    raise ValueError("config.nva.enabled=True needs config.model.use_dictionary=True "
                     "(NVA replaces visual-dictionary codes)")
  vocab_size = c.model.bert.vocab_size
  accum = int(c.accum_steps)
  if accum < 1:
    raise ValueError(f"config.accum_steps={c.accum_steps} must be >= 1 (1 = no accumulation)")

  def online_forward(m: NASModel, batch, mlm_ids, mlm_labels, feats_m, logits_m, queues, keys,
                     alpha, temp, vd_update=True):
    """Runs inside `model.apply` so every sub-call shares one Flax scope (and dropout stream).

    keys: {'neg': [G, 2] one key per hard-negative group, 'nva': key}. vd_update=False (micro-batches
    of gradient accumulation): the codebook is not updated here; extras['vd_sums'] [m, C] and
    extras['vd_counts'] [m] carry this batch's eq. 2 statistics instead.
    Returns (loss, metrics, extras).
    """
    images, ids, mask = batch["image"], batch["text_ids"], batch["text_mask"]
    image_id = batch["image_id"]
    metrics, extras = {}, {}

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
      image_tokens, vd = m.dictionary_tokens(img["embeds"], update=vd_update and update_vd)
      metrics.update(vd_perplexity=vd["perplexity"], vd_used_codes=vd["used_codes"],
                     vd_commit_dist=vd["commit_dist"])
      if not vd_update and update_vd:
        extras["vd_sums"], extras["vd_counts"] = _code_stats(vd["f"], vd["codes"],
                                                             vd["codebook"].shape[0])
    else:
      image_tokens = img["embeds"]

    # -- In-batch hard negatives, per device-local slice, ∝ softmax(sim) without the positive.
    g = num_groups
    i_g, t_g = _grouped(img["feat"], g), _grouped(txt["feat"], g)
    tm_g, im_g = _grouped(feats_m["text"], g), _grouped(feats_m["image"], g)
    sim_i2t = jnp.einsum("gie,gje->gij", i_g, tm_g) / temp      # = sim_i2t[:, :bs] of ALBEF
    sim_t2i = jnp.einsum("gie,gje->gij", t_g, im_g) / temp
    neg_img, neg_txt = jax.vmap(objectives.sample_hard_negatives)(
        keys["neg"], jax.lax.stop_gradient(sim_i2t), jax.lax.stop_gradient(sim_t2i),
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
          patches=img["embeds"][:, 1:], codes=vd["codes"], codebook=vd["codebook"],
          ratio=c.nva.ratio, lam=c.nva.lam, k=c.nva.k, scope=c.nva.scope,
          norm=c.nva.norm)
      fg_tokens = m.tokens_from_codes(img["embeds"], vd, neg["codes"], neg["replaced"],
                                      vd["codebook"])
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
    # -- MLM on the full BERT (masked text, cross-attention to the continuous image embeddings).
    # Its fusion pass joins the ITM pairs as one more row group, so that each fusion layer runs
    # one set of [B·(k+1)] matmuls: as two calls, XLA merges their matmuls anyway, copying both
    # inputs together in every layer (docs/PERF.md). Row groups stay device-local (_interleave).
    if c.mlm.enabled:
      pair_img.append(img["embeds"])
      pair_txt.append(m.bert.text(mlm_ids, mask, train=True))
      pair_mask.append(mask)
    # The image tokens in the compute dtype before they are copied into pair order.
    pair_img = [t.astype(compute_dtype) for t in pair_img]
    fused = m.fuse(_interleave(*pair_txt), _interleave(*pair_mask), _interleave(*pair_img),
                   train=True)
    fused = fused.reshape((-1, len(pair_img)) + fused.shape[1:])           # [B, groups, L, D]
    itm_logits = m.itm_logits(fused[:, :k].reshape((-1,) + fused.shape[2:]))  # [B*k, 2]
    itm_labels = _interleave(*([jnp.ones_like(image_id)] + [jnp.zeros_like(image_id)] * (k - 1)))
    loss_itm, itm_acc = objectives.itm_loss(itm_logits, itm_labels)
    # Accuracy per pair group: which negatives the matching head already rejects.
    correct = (jnp.argmax(itm_logits, -1) == itm_labels).astype(jnp.float32).reshape(-1, k)
    groups = ["pos", "neg_img", "neg_txt"] + ["nva"] * use_nva + ["nta"] * c.itm.text_negatives
    metrics.update({f"itm_acc_{name}": acc for name, acc in zip(groups, correct.mean(0))})

    if c.mlm.enabled:
      loss_mlm = objectives.mlm_loss(m.mlm_logits(fused[:, k]), mlm_labels, logits_m, alpha)
    else:
      loss_mlm = jnp.zeros((), jnp.float32)

    w = c.loss_weights
    loss = w.itc * loss_itc + w.mlm * loss_mlm + w.itm * loss_itm
    metrics.update(loss=loss, loss_itc=loss_itc, loss_itm=loss_itm, loss_mlm=loss_mlm,
                   itm_acc=itm_acc)
    return loss, metrics, extras

  def micro_split(x: jax.Array) -> jax.Array:
    """[B, ...] → [K, G*m, ...]: micro-batch k = rows k*m..(k+1)*m-1 of each of the G slices."""
    g, b = num_groups, x.shape[0]
    x = x.reshape((g, accum, b // (g * accum)) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape((accum, b // accum) + x.shape[3:])

  def micro_merge(x: jax.Array) -> jax.Array:
    """Inverse of `micro_split`: [K, G*m, ...] → [B, ...] in the batch's row order."""
    g, k, gm = num_groups, x.shape[0], x.shape[1]
    x = x.reshape((k, g, gm // g) + x.shape[2:])
    return jnp.swapaxes(x, 0, 1).reshape((k * gm,) + x.shape[3:])

  def data_init_codebook(params, batch_stats, images, key):
    """`dictionary.init='data'` under accumulation: while the codebook is not initialised (the first
    step), it is made from micro-batch 0's features (images [G*m, H, W, 3]; K=1 uses all B rows).
    `lax.cond`: later steps skip the extra forward."""
    d = c.model.dictionary
    dic = dict(batch_stats["dictionary"])

    def fresh():
      def feats(m: NASModel):
        return m.dictionary.project(m.encode_image(images, train=True)["embeds"][:, 1:])

      f = jax.lax.stop_gradient(model.apply({"params": params, "batch_stats": batch_stats},
                                            method=feats, rngs={"dropout": key}))
      return dictionary._data_init(f.reshape(-1, f.shape[-1]), d.size, d.init_std)

    dic["codebook"] = jax.lax.cond(dic["initialized"], lambda: dic["codebook"], fresh)
    dic["initialized"] = jnp.ones((), jnp.bool_)
    return dict(batch_stats, dictionary=dic)

  def accumulated(state, params, params_m, batch, mlm_ids, mlm_labels, alpha_f, keys):
    """Steps 2-3 of the step over K micro-batches. Returns (loss, metrics, batch_stats, mean
    float32 grads, the whole batch's momentum features {'image','text'} [B, E])."""
    b, g = batch["image"].shape[0], num_groups
    if b % (g * accum) or b // (g * accum) < 2:
      raise ValueError(
          f"config.accum_steps={accum}: the global batch {b} (config.data.batch_size) must split "
          f"into {accum} micro-batches of at least 2 rows in each of the {g} device slices (hard-"
          f"negative groups), i.e. be a multiple of {2 * g * accum}")
    micro = jax.tree.map(micro_split, batch)
    ids_k, labels_k = micro_split(mlm_ids), micro_split(mlm_labels)
    steps = jnp.arange(accum)
    neg_keys = jnp.swapaxes(jax.random.split(keys["neg"], g * accum).reshape(g, accum, -1), 0, 1)

    # 2. Momentum features of the whole batch first (no gradient), one micro-batch at a time.
    def momentum_feats(_, xs):
      mb, k = xs

      def fwd(m: NASModel):
        img_m = m.encode_image(mb["image"], train=True)
        txt_m = m.encode_text(mb["text_ids"], mb["text_mask"], train=True)
        return img_m["feat"], txt_m["feat"], (img_m["embeds"] if c.mlm.enabled else None)

      return None, jax.lax.stop_gradient(model.apply(
          {"params": params_m}, method=fwd, rngs={"dropout": jax.random.fold_in(keys["drop_m"], k)}))

    _, (img_fm, txt_fm, img_em) = jax.lax.scan(momentum_feats, None, (micro, steps))
    ids_fm = micro_split(batch["image_id"].astype(jnp.int32))
    masked_total = jnp.maximum(jnp.sum(mlm_labels != objectives.IGNORE), 1).astype(jnp.float32)
    batch_stats = state.batch_stats
    if update_vd and c.model.dictionary.init == "data":
      batch_stats = data_init_codebook(params, batch_stats, micro["image"][0],
                                       jax.random.fold_in(keys["drop"], 0))

    # 3. Forward + backward per micro-batch.
    def micro_step(p, xs):
      mb, ids_mlm, lab_mlm, neg_k, k = xs
      others = (k + 1 + jnp.arange(accum - 1)) % accum
      flat = lambda x: x.reshape((-1,) + x.shape[2:])
      # In-batch columns: this micro-batch's momentum features; "queue": the other micro-batches'
      # then the real queue — the same B + Q columns as the big batch, permuted.
      queues = {"image": jnp.concatenate([flat(img_fm[others]), state.queues["image"]], 0),
                "text": jnp.concatenate([flat(txt_fm[others]), state.queues["text"]], 0),
                "idx": jnp.concatenate([flat(ids_fm[others]), state.queues["idx"]], 0)}
      logits_m = None
      if c.mlm.enabled:
        logits_m = jax.lax.stop_gradient(model.apply(
            {"params": params_m}, ids_mlm, mb["text_mask"], img_em[k], train=True,
            method=NASModel.mlm, rngs={"dropout": jax.random.fold_in(keys["drop_m"], accum + k)}))
      scale = jnp.sum(lab_mlm != objectives.IGNORE) / masked_total * accum

      def loss_fn(p):
        loss, metrics, extras = model.apply(
            {"params": p, "batch_stats": batch_stats},
            mb, ids_mlm, lab_mlm, {"image": img_fm[k], "text": txt_fm[k]}, logits_m, queues,
            {"neg": neg_k, "nva": jax.random.fold_in(keys["nva"], k)}, alpha_f, p["temp"], False,
            method=online_forward, rngs={"dropout": jax.random.fold_in(keys["drop"], k)})
        loss = loss + c.loss_weights.mlm * (scale - 1.0) * metrics["loss_mlm"]
        metrics = dict(metrics, loss=loss, loss_mlm=scale * metrics["loss_mlm"])
        return loss, (metrics, extras)

      (_, (metrics, extras)), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
      f32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
      return f32(grads), f32(metrics), extras

    xs = (micro, ids_k, labels_k, neg_keys, steps)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(micro_step, params, jax.tree.map(lambda x: x[0], xs)))

    def body(carry, xs):
      return jax.tree.map(jnp.add, carry, micro_step(params, xs)), None

    (grads, metrics, extras), _ = jax.lax.scan(body, zeros, xs)
    grads = jax.tree.map(lambda x: x / accum, grads)
    metrics = {k: v / accum for k, v in metrics.items()}
    if update_vd:
      # One eq. 2 update from the whole batch's statistics.
      counts = extras["vd_counts"]
      dic = dict(batch_stats["dictionary"])
      dic["codebook"] = _ema_from_stats(dic["codebook"], extras["vd_sums"], counts,
                                        c.model.dictionary.momentum)
      batch_stats = dict(batch_stats, dictionary=dic)
      metrics["vd_perplexity"], metrics["vd_used_codes"] = _usage_from_counts(counts)
    feats_m = {"image": micro_merge(img_fm), "text": micro_merge(txt_fm)}
    return metrics["loss"], metrics, batch_stats, grads, feats_m

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

    alpha_f = jnp.asarray(alpha, jnp.float32)
    if accum > 1:
      # 2-3 over K micro-batches (module docstring); the rest of the step is shared.
      loss, metrics, batch_stats, grads, feats_m = accumulated(
          state, params, params_m, batch, mlm_ids, mlm_labels, alpha_f,
          dict(drop=k_drop, drop_m=k_drop_m, neg=k_neg, nva=k_nva))
    else:
      def momentum_forward(m: NASModel):
        img_m = m.encode_image(images, train=True)
        txt_m = m.encode_text(ids, mask, train=True)
        logits_m = m.mlm(mlm_ids, mask, img_m["embeds"], train=True) if c.mlm.enabled else None
        return {"image": img_m["feat"], "text": txt_m["feat"]}, logits_m

      feats_m, logits_m = jax.lax.stop_gradient(model.apply(
          {"params": params_m}, method=momentum_forward, rngs={"dropout": k_drop_m}))

      # 3. Online forward + backward.
      def loss_fn(p):
        (loss, metrics, _), mutated = model.apply(
            {"params": p, "batch_stats": state.batch_stats},
            batch, mlm_ids, mlm_labels, feats_m, logits_m, state.queues,
            {"neg": jax.random.split(k_neg, num_groups), "nva": k_nva}, alpha_f, p["temp"],
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
