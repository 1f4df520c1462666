"""The train state and the ONE jitted NAS training step.

One step, in order (each a function below):
  1. `momentum_params`: EMA of the online encoders into the momentum ones (ALBEF, before the
     forward), the temperature clamped to [temp_min, temp_max];
  2. `mask_for_mlm`, `momentum_targets`: the momentum model's ITC features and MLM soft labels
     (no gradient);
  3. `online_losses` under `jax.value_and_grad`: ITC (ALBEF eq. 1-3, queues, distillation), the
     visual dictionary's tokens (NAS eq. 1, straight-through), in-batch hard negatives, the NVA
     negative (NAS §3.2), FGITM over the pair groups of `objectives.itm_group_names`, MLM;
  4. `apply_updates`: AdamW; the VD codebook's EMA (NAS eq. 2) from the whole batch's statistics;
     the global batch's momentum features enqueued (after the loss).
No host round-trip; the caller jits `train_step` with the state donated. The fusion encoder runs
once for FGITM and MLM together: each sample's k ITM pairs and its MLM row (masked text ×
continuous image tokens) are k + 1 adjacent rows of one batch (docs/PERF.md).

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
  sums and counts accumulated over the micro-batches (the codebook does not move between
  micro-batches); with `dictionary.init='data'` the first step builds the codebook from
  micro-batch 0's features (B/K rows, where K = 1 uses all B);
- one enqueue of the whole batch's momentum features (ids).
Per micro-batch: ITM hard negatives (within each device's m rows; the key of group g, micro k is
split(k_neg, G K)[g K + k], so K micro-batches with G groups draw exactly what K=1 with G K groups
draws), NVA negatives (key folded with k) and dropout (keys folded with k). The MLM loss of micro
k is scaled by K · masked(k) / masked(B) so the mean over k is the big batch's mean over masked
tokens. K = 1 is the plain step (no scan), where the codebook's eq. 2 runs inside the forward.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from nas_jax import nva, objectives
from nas_jax.models import dictionary, layer_stack
from nas_jax.models.nas import MOMENTUM_KEYS, NASModel, compute_dtype, take_positions


@flax.struct.dataclass
class TrainState:
  step: jax.Array          # int32 []
  params: Any              # NASModel params + 'temp'
  params_m: Any            # momentum copies of MOMENTUM_KEYS
  batch_stats: Any         # {'dictionary': {...}} (the VD codebook), or {}
  opt_state: Any
  queues: Any              # {'image': [Q,E], 'text': [Q,E], 'idx': int32 [Q], 'ptr': int32 []}
  rng: jax.Array           # uint32 [2] raw PRNG key


@dataclasses.dataclass(frozen=True)
class TokenIds:
  """Special token ids the MLM masking needs (static), from the tokenizer (`data.text`)."""
  pad: int
  cls: int
  mask: int

  @classmethod
  def of(cls, tokenizer) -> "TokenIds":
    return cls(pad=tokenizer.pad_id, cls=tokenizer.cls_id, mask=tokenizer.mask_id)


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """Everything static a step needs besides the state and the batch."""
  config: ml_collections.ConfigDict
  model: NASModel
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  token_ids: TokenIds
  num_groups: int            # device-local batch slices (hard negatives are drawn per slice)
  alpha_warmup_steps: int

  @property
  def update_vd(self) -> bool:
    """Whether eq. 2 runs (a visual dictionary that is not frozen)."""
    c = self.config.model
    return bool(c.use_dictionary and not c.dictionary.frozen)


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
  params = dict(layer_stack.to_layout(dict(variables["params"]), c))
  params["temp"] = jnp.asarray(c.model.temp, jnp.float32)
  batch_stats = dict(variables.get("batch_stats", {}))
  q, e = c.itc.queue_size, c.model.embed_dim
  queues = {"image": objectives.init_queue(k_queue_i, q, e),
            "text": objectives.init_queue(k_queue_t, q, e),
            "idx": objectives.init_queue(k_queue_t, q),
            "ptr": jnp.zeros((), jnp.int32)}
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      params_m=jax.tree.map(jnp.copy, momentum_params(params)), batch_stats=batch_stats,
      opt_state=tx.init(params), queues=queues, rng=k_state)


# ---------------------------------------------------------------------------- batch slices
def grouped(x: jax.Array, groups: int) -> jax.Array:
  """[B, ...] → [G, B/G, ...]: contiguous slices, one per device, so per-group ops stay local."""
  return x.reshape((groups, x.shape[0] // groups) + x.shape[1:])


def ungrouped(x: jax.Array) -> jax.Array:
  return x.reshape((-1,) + x.shape[2:])


def take_grouped(x: jax.Array, idx: jax.Array, groups: int) -> jax.Array:
  """x [B, ...], idx [B] of indices local to each group → x[group's idx]."""
  xg, ig = grouped(x, groups), grouped(idx, groups)
  return ungrouped(jax.vmap(lambda a, i: jnp.take(a, i, axis=0))(xg, ig))


def interleave(*xs: jax.Array) -> jax.Array:
  """k arrays [B, ...] → [B*k, ...] row b*k + j = xs[j][b] (keeps each device's rows local)."""
  return ungrouped(jnp.stack(xs, axis=1))


def micro_split(x: jax.Array, groups: int, accum: int) -> jax.Array:
  """[B, ...] → [K, G*m, ...]: micro-batch k = rows k*m..(k+1)*m-1 of each of the G slices."""
  b = x.shape[0]
  x = x.reshape((groups, accum, b // (groups * accum)) + x.shape[1:])
  return jnp.swapaxes(x, 0, 1).reshape((accum, b // accum) + x.shape[3:])


def micro_merge(x: jax.Array, groups: int) -> jax.Array:
  """Inverse of `micro_split`: [K, G*m, ...] → [B, ...] in the batch's row order."""
  k, gm = x.shape[0], x.shape[1]
  x = x.reshape((k, groups, gm // groups) + x.shape[2:])
  return jnp.swapaxes(x, 0, 1).reshape((k * gm,) + x.shape[3:])


# ---------------------------------------------------------------------------- step parts
def mask_for_mlm(spec: StepSpec, key: jax.Array, ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(masked ids, labels) of MLM (15 %, 80/10/10), or (ids, all -100) when MLM is off."""
  c, t = spec.config, spec.token_ids
  if not c.mlm.enabled:
    return ids, jnp.full_like(ids, objectives.IGNORE)
  return objectives.mask_tokens(
      key, ids, vocab_size=c.model.bert.vocab_size, pad_id=t.pad, cls_id=t.cls, mask_id=t.mask,
      prob=c.mlm.prob, mask_prob=c.mlm.mask_prob, random_prob=c.mlm.random_prob,
      max_masked=objectives.resolve_max_masked(c.mlm.max_masked, ids.shape[1], c.mlm.prob))


def mlm_head_rows(spec: StepSpec, labels: jax.Array) -> tuple[jax.Array | None, jax.Array]:
  """Where the MLM head runs: (None, labels) on every position [B, L], or with `mlm.max_masked`
  (masking capped per row) `objectives.masked_positions`: ([B, P] positions, their labels). The
  loss is the same either way; the head's work shrinks by P / L."""
  c = spec.config
  cap = objectives.resolve_max_masked(c.mlm.max_masked, labels.shape[1], c.mlm.prob)
  if not cap:
    return None, labels
  return objectives.masked_positions(labels, cap)


def momentum_features(m: NASModel, images, ids, mask, with_embeds: bool):
  """The momentum encoders' ITC features ({'image', 'text'} [B, E]) and, `with_embeds`, the image
  tokens the momentum MLM teacher attends to (train mode, as ALBEF's momentum modules are)."""
  img_m = m.encode_image(images, train=True)
  txt_m = m.encode_text(ids, mask, train=True)
  return {"image": img_m["feat"], "text": txt_m["feat"]}, (img_m["embeds"] if with_embeds else None)


def momentum_targets(spec: StepSpec, params_m, batch, mlm_ids, mlm_labels, key):
  """ITC targets and MLM soft labels of the whole batch from the momentum model (no gradient).
  Returns (feats_m {'image','text'} [B, E], logits_m [B, L or mlm.max_masked, V] or None)."""
  with_mlm = spec.config.mlm.enabled
  positions, _ = mlm_head_rows(spec, mlm_labels)

  def forward(m: NASModel):
    feats, embeds = momentum_features(m, batch["image"], batch["text_ids"], batch["text_mask"],
                                      with_mlm)
    logits = (m.mlm(mlm_ids, batch["text_mask"], embeds, train=True, positions=positions)
              if with_mlm else None)
    return feats, logits

  return jax.lax.stop_gradient(spec.model.apply({"params": params_m}, method=forward,
                                                rngs={"dropout": key}))


def hard_negatives(keys, feat, feats_m, image_id, temp, groups: int):
  """In-batch ITM negatives per device-local slice, ∝ softmax(sim) without the positive (ALBEF).
  keys [G, 2]; feat / feats_m {'image','text'} [B, E]. Returns (neg_img, neg_txt) int32 [B] of
  indices local to each slice."""
  i_g, t_g = grouped(feat["image"], groups), grouped(feat["text"], groups)
  tm_g, im_g = grouped(feats_m["text"], groups), grouped(feats_m["image"], groups)
  sim_i2t = jnp.einsum("gie,gje->gij", i_g, tm_g) / temp      # = sim_i2t[:, :bs] of ALBEF
  sim_t2i = jnp.einsum("gie,gje->gij", t_g, im_g) / temp
  neg_img, neg_txt = jax.vmap(objectives.sample_hard_negatives)(
      keys, jax.lax.stop_gradient(sim_i2t), jax.lax.stop_gradient(sim_t2i),
      grouped(image_id, groups))
  return ungrouped(neg_img), ungrouped(neg_txt)


def online_losses(m: NASModel, spec: StepSpec, batch, mlm_ids, mlm_labels, feats_m, logits_m,
                  queues, keys, alpha, temp, inline_vd_update: bool = True):
  """The online forward and the three losses; runs inside `model.apply` so every sub-call shares
  one Flax scope (and dropout stream).

  keys: {'neg': [G, 2] one key per hard-negative group, 'nva': key}. inline_vd_update: eq. 2 runs
  in the forward (the plain step); False (micro-batches): extras['vd_sums'] [m, C] and
  extras['vd_counts'] [m] carry this batch's eq. 2 statistics instead.
  Returns (loss, metrics, extras).
  """
  c = spec.config
  images, ids, mask = batch["image"], batch["text_ids"], batch["text_mask"]
  image_id = batch["image_id"]
  metrics, extras = {}, {}

  # -- ITC (ALBEF eq. 1-3): global batch + queues, momentum distillation.
  img = m.encode_image(images, train=True)
  txt = m.encode_text(ids, mask, train=True)
  loss_itc, _ = objectives.itc_loss(
      img["feat"], txt["feat"], feats_m["image"], feats_m["text"], queues["image"],
      queues["text"], temp, alpha,
      image_id=image_id if c.itc.use_id_queue else None,
      id_queue=queues["idx"] if c.itc.use_id_queue else None)

  # -- Visual dictionary tokens for matching (NAS §3.1; eq. 2 in place unless accumulating).
  if c.model.use_dictionary:
    image_tokens, vd = m.dictionary_tokens(img["embeds"],
                                           update=inline_vd_update and spec.update_vd)
    metrics.update(vd_perplexity=vd["perplexity"], vd_used_codes=vd["used_codes"],
                   vd_commit_dist=vd["commit_dist"])
    if not inline_vd_update and spec.update_vd:
      extras["vd_sums"], extras["vd_counts"] = dictionary.code_statistics(
          vd["f"], vd["codes"], vd["codebook"].shape[0])
  else:
    image_tokens = img["embeds"]

  # -- FGITM pair groups, in the order of objectives.itm_group_names.
  g = spec.num_groups
  neg_img, neg_txt = hard_negatives(keys["neg"], {"image": img["feat"], "text": txt["feat"]},
                                    feats_m, image_id, temp, g)
  pair_img = [image_tokens, take_grouped(image_tokens, neg_img, g), image_tokens]
  pair_txt = [txt["embeds"], txt["embeds"], take_grouped(txt["embeds"], neg_txt, g)]
  pair_mask = [mask, mask, take_grouped(mask, neg_txt, g)]
  if c.nva.enabled:
    fg_tokens, replaced = m.nva_tokens(keys["nva"], img["embeds"], txt["embeds"][:, 0], vd,
                                       nva.Settings.of(c.nva))
    pair_img.append(fg_tokens)
    pair_txt.append(txt["embeds"])
    pair_mask.append(mask)
    metrics["nva_replaced_frac"] = jnp.mean(replaced.astype(jnp.float32))
  if c.itm.text_negatives:
    fg_text = m.encode_text(batch["neg_text_ids"], batch["neg_text_mask"], train=True)
    pair_img.append(image_tokens)
    pair_txt.append(fg_text["embeds"])
    pair_mask.append(batch["neg_text_mask"])
  k = len(pair_img)

  # -- MLM on the full BERT (masked text, cross-attention to the continuous image embeddings).
  # Its fusion pass joins the ITM pairs as one more row group, so that each fusion layer runs
  # one set of [B·(k+1)] matmuls: as two calls, XLA merges their matmuls anyway, copying both
  # inputs together in every layer (docs/PERF.md). Row groups stay device-local (interleave).
  if c.mlm.enabled:
    pair_img.append(img["embeds"])
    pair_txt.append(m.bert.text(mlm_ids, mask, train=True))
    pair_mask.append(mask)
  # The image tokens in the compute dtype before they are copied into pair order.
  dtype = compute_dtype(c.model.dtype)
  pair_img = [t.astype(dtype) for t in pair_img]
  fused = m.fuse(interleave(*pair_txt), interleave(*pair_mask), interleave(*pair_img), train=True)
  fused = fused.reshape((-1, len(pair_img)) + fused.shape[1:])           # [B, groups, L, D]
  itm_logits = m.itm_logits(fused[:, :k].reshape((-1,) + fused.shape[2:]))  # [B*k, 2]
  itm_labels = interleave(*([jnp.ones_like(image_id)] + [jnp.zeros_like(image_id)] * (k - 1)))
  loss_itm, itm_acc = objectives.itm_loss(itm_logits, itm_labels)
  # Accuracy per pair group: which negatives the matching head already rejects.
  correct = (jnp.argmax(itm_logits, -1) == itm_labels).astype(jnp.float32).reshape(-1, k)
  names = objectives.itm_group_names(nva=c.nva.enabled, text_negatives=c.itm.text_negatives)
  metrics.update({f"itm_acc_{name}": acc for name, acc in zip(names, correct.mean(0))})

  if c.mlm.enabled:
    positions, labels = mlm_head_rows(spec, mlm_labels)
    hidden = fused[:, k] if positions is None else take_positions(fused[:, k], positions)
    loss_mlm = objectives.mlm_loss(m.mlm_logits(hidden), labels, logits_m, alpha)
  else:
    loss_mlm = jnp.zeros((), jnp.float32)

  w = c.loss_weights
  loss = w.itc * loss_itc + w.mlm * loss_mlm + w.itm * loss_itm
  metrics.update(loss=loss, loss_itc=loss_itc, loss_itm=loss_itm, loss_mlm=loss_mlm,
                 itm_acc=itm_acc)
  return loss, metrics, extras


def _loss_and_grads(spec: StepSpec, params, batch_stats, batch, mlm_ids, mlm_labels, feats_m,
                    logits_m, queues, keys, alpha, *, inline_vd_update: bool, mlm_scale=None):
  """value_and_grad of `online_losses` with respect to `params` (whose 'temp' is the ITC
  temperature). mlm_scale (micro-batches): the MLM loss is rescaled so the mean over micro-batches
  is the big batch's mean over masked tokens. Returns (loss, metrics, extras, batch_stats, grads);
  batch_stats updated by eq. 2 when `inline_vd_update`."""
  c = spec.config

  def loss_fn(p):
    out = spec.model.apply(
        {"params": p, "batch_stats": batch_stats}, spec, batch, mlm_ids, mlm_labels, feats_m,
        logits_m, queues, keys, alpha, p["temp"], inline_vd_update, method=online_losses,
        rngs={"dropout": keys["drop"]}, mutable=["batch_stats"] if inline_vd_update else False)
    (loss, metrics, extras), mutated = out if inline_vd_update else (out, {})
    if mlm_scale is not None:
      loss = loss + c.loss_weights.mlm * (mlm_scale - 1.0) * metrics["loss_mlm"]
      metrics = dict(metrics, loss=loss, loss_mlm=mlm_scale * metrics["loss_mlm"])
    return loss, (metrics, extras, mutated.get("batch_stats", batch_stats))

  (loss, (metrics, extras, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, metrics, extras, new_stats, grads


def plain_grads(spec: StepSpec, state: TrainState, params, params_m, batch, mlm_ids, mlm_labels,
                alpha, keys):
  """Steps 2-3 on the whole batch. Returns (loss, metrics, batch_stats, grads, feats_m)."""
  feats_m, logits_m = momentum_targets(spec, params_m, batch, mlm_ids, mlm_labels, keys["drop_m"])
  loss, metrics, _, batch_stats, grads = _loss_and_grads(
      spec, params, state.batch_stats, batch, mlm_ids, mlm_labels, feats_m, logits_m,
      state.queues, {"neg": jax.random.split(keys["neg"], spec.num_groups), "nva": keys["nva"],
                     "drop": keys["drop"]}, alpha, inline_vd_update=True)
  return loss, metrics, batch_stats, grads, feats_m


def data_init_codebook(spec: StepSpec, params, batch_stats, images, key):
  """`dictionary.init='data'` under accumulation: while the codebook is not initialised (the first
  step), it is made from micro-batch 0's features (images [G*m, H, W, 3]; K=1 uses all B rows).
  `lax.cond`: later steps skip the extra forward."""
  d = spec.config.model.dictionary
  dic = dict(batch_stats["dictionary"])

  def fresh():
    def feats(m: NASModel):
      return m.dictionary.project(m.encode_image(images, train=True)["embeds"][:, 1:])

    f = jax.lax.stop_gradient(spec.model.apply({"params": params, "batch_stats": batch_stats},
                                               method=feats, rngs={"dropout": key}))
    return dictionary.data_init(f.reshape(-1, f.shape[-1]), d.size, d.init_std)

  dic["codebook"] = jax.lax.cond(dic["initialized"], lambda: dic["codebook"], fresh)
  dic["initialized"] = jnp.ones((), jnp.bool_)
  return dict(batch_stats, dictionary=dic)


def accumulated_grads(spec: StepSpec, state: TrainState, params, params_m, batch, mlm_ids,
                      mlm_labels, alpha, keys):
  """Steps 2-3 over K micro-batches (module docstring). Returns (loss, metrics, batch_stats,
  mean float32 grads, the whole batch's momentum features {'image','text'} [B, E])."""
  c, model = spec.config, spec.model
  g, accum = spec.num_groups, int(c.accum_steps)
  b = batch["image"].shape[0]
  if b % (g * accum) or b // (g * accum) < 2:
    raise ValueError(
        f"config.accum_steps={accum}: the global batch {b} (config.data.batch_size) must split "
        f"into {accum} micro-batches of at least 2 rows in each of the {g} device slices (hard-"
        f"negative groups), i.e. be a multiple of {2 * g * accum}")
  split = functools.partial(micro_split, groups=g, accum=accum)
  micro = jax.tree.map(split, batch)
  ids_k, labels_k = split(mlm_ids), split(mlm_labels)
  steps = jnp.arange(accum)
  neg_keys = jnp.swapaxes(jax.random.split(keys["neg"], g * accum).reshape(g, accum, -1), 0, 1)

  # 2. Momentum features of the whole batch first (no gradient), one micro-batch at a time.
  def momentum_feats(_, xs):
    mb, k = xs
    feats, embeds = jax.lax.stop_gradient(model.apply(
        {"params": params_m}, mb["image"], mb["text_ids"], mb["text_mask"], c.mlm.enabled,
        method=momentum_features, rngs={"dropout": jax.random.fold_in(keys["drop_m"], k)}))
    return None, (feats["image"], feats["text"], embeds)

  _, (img_fm, txt_fm, img_em) = jax.lax.scan(momentum_feats, None, (micro, steps))
  ids_fm = split(batch["image_id"].astype(jnp.int32))
  masked_total = jnp.maximum(jnp.sum(mlm_labels != objectives.IGNORE), 1).astype(jnp.float32)
  batch_stats = state.batch_stats
  if spec.update_vd and c.model.dictionary.init == "data":
    batch_stats = data_init_codebook(spec, params, batch_stats, micro["image"][0],
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
          positions=mlm_head_rows(spec, lab_mlm)[0], method=NASModel.mlm, rngs={"dropout": jax.random.fold_in(keys["drop_m"], accum + k)}))
    scale = jnp.sum(lab_mlm != objectives.IGNORE) / masked_total * accum
    _, metrics, extras, _, grads = _loss_and_grads(
        spec, p, batch_stats, mb, ids_mlm, lab_mlm, {"image": img_fm[k], "text": txt_fm[k]},
        logits_m, queues, {"neg": neg_k, "nva": jax.random.fold_in(keys["nva"], k),
                           "drop": jax.random.fold_in(keys["drop"], k)},
        alpha, inline_vd_update=False, mlm_scale=scale)
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
  if spec.update_vd:
    # One eq. 2 update from the whole batch's statistics.
    counts = extras["vd_counts"]
    dic = dict(batch_stats["dictionary"])
    dic["codebook"] = dictionary.ema_from_statistics(dic["codebook"], extras["vd_sums"], counts,
                                                     c.model.dictionary.momentum)
    batch_stats = dict(batch_stats, dictionary=dic)
    metrics["vd_perplexity"], metrics["vd_used_codes"] = dictionary.usage_from_counts(counts)
  feats_m = {"image": micro_merge(img_fm, g), "text": micro_merge(txt_fm, g)}
  return metrics["loss"], metrics, batch_stats, grads, feats_m


def apply_updates(spec: StepSpec, state: TrainState, params, params_m, batch_stats, grads,
                  feats_m, image_id, rng) -> TrainState:
  """Step 4: AdamW, the new codebook, the global batch's momentum features enqueued."""
  updates, opt_state = spec.tx.update(grads, state.opt_state, params)
  new_params = optax.apply_updates(params, updates)
  queues = dict(state.queues)
  queues["image"], _ = objectives.enqueue(queues["image"], queues["ptr"], feats_m["image"])
  queues["text"], _ = objectives.enqueue(queues["text"], queues["ptr"], feats_m["text"])
  queues["idx"], queues["ptr"] = objectives.enqueue(queues["idx"], queues["ptr"],
                                                    image_id.astype(jnp.int32))
  return state.replace(step=state.step + 1, params=new_params, params_m=params_m,
                       batch_stats=batch_stats, opt_state=opt_state, queues=queues, rng=rng)


def train_step(spec: StepSpec, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
  """One optimiser step. `batch`: image [B,H,W,3] f32, text_ids/text_mask int32 [B,L], image_id
  int32 [B], and neg_text_ids/neg_text_mask when `itm.text_negatives`. Returns (state, metrics)."""
  c = spec.config
  rng, k_drop, k_drop_m, k_mask, k_neg, k_nva = jax.random.split(state.rng, 6)
  keys = dict(drop=k_drop, drop_m=k_drop_m, neg=k_neg, nva=k_nva)
  alpha = objectives.alpha_schedule(state.step, c.itc.alpha, spec.alpha_warmup_steps)

  # 1. Momentum encoders: EMA of the online weights, before this step's forward (ALBEF).
  params_m = optax.incremental_update(momentum_params(state.params), state.params_m,
                                      1.0 - c.itc.momentum)
  # ALBEF clamps the temperature in place (no grad) before using it.
  params = dict(state.params)
  params["temp"] = jnp.clip(params["temp"], c.itc.temp_min, c.itc.temp_max)

  # 2-3. Momentum targets, online forward and backward (over K micro-batches when accumulating),
  # in the model's layout; the gradients come back in the state's (model.stacked_layout).
  mlm_ids, mlm_labels = mask_for_mlm(spec, k_mask, batch["text_ids"])
  alpha_f = jnp.asarray(alpha, jnp.float32)
  grads_fn = accumulated_grads if c.accum_steps > 1 else plain_grads
  loss, metrics, batch_stats, grads, feats_m = grads_fn(
      spec, state, layer_stack.to_model_layout(params, c),
      layer_stack.to_model_layout(params_m, c), batch, mlm_ids, mlm_labels, alpha_f, keys)
  grads = layer_stack.to_layout(grads, c)

  # 4. AdamW, codebook, enqueue; a non-finite step is skipped when asked.
  new_state = apply_updates(spec, state, params, params_m, batch_stats, grads, feats_m,
                            batch["image_id"], rng)
  finite = jnp.isfinite(loss)
  if c.nonfinite == "skip":
    new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state,
                             state.replace(step=state.step + 1, rng=rng))
  metrics.update(alpha=alpha_f, temp=params["temp"], lr=spec.schedule(state.step),
                 grad_norm=optax.tree.norm(grads), finite=finite)
  return new_state, metrics


def make_train_step(config: ml_collections.ConfigDict, model: NASModel,
                    tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                    token_ids: TokenIds, num_groups: int, alpha_warmup_steps: int):
  """`train_step` bound to its static parts: `step(state, batch) -> (state, metrics)`, to jit."""
  if config.nva.enabled and not config.model.use_dictionary:
    raise ValueError("config.nva.enabled=True needs config.model.use_dictionary=True "
                     "(NVA replaces visual-dictionary codes)")
  if int(config.accum_steps) < 1:
    raise ValueError(f"config.accum_steps={config.accum_steps} must be >= 1 (1 = no accumulation)")
  spec = StepSpec(config=config, model=model, tx=tx, schedule=schedule, token_ids=token_ids,
                  num_groups=num_groups, alpha_warmup_steps=alpha_warmup_steps)
  return functools.partial(train_step, spec)


# ---------------------------------------------------------------------------- building it
@dataclasses.dataclass(frozen=True)
class Setup:
  """A model, its optimiser and its step, ready to initialise and jit (train, bench and tests
  all build them with `setup`)."""
  config: ml_collections.ConfigDict
  model: NASModel
  tx: optax.GradientTransformation
  step: Any                  # train_step bound to its StepSpec: (state, batch) -> (state, metrics)
  abstract_state: TrainState  # jax.ShapeDtypeStructs, with shardings under a mesh
  mesh: Any = None

  def init(self, rng: jax.Array) -> TrainState:
    """A freshly initialised state (sharded as `abstract_state` under a mesh)."""
    shardings = (jax.tree.map(lambda a: a.sharding, self.abstract_state)
                 if self.mesh is not None else None)
    return jax.jit(lambda r: init_state(self.config, self.model, self.tx, r),
                   out_shardings=shardings)(rng)

  def jit(self):
    """The step jitted with the state donated (and the mesh's state / batch shardings)."""
    if self.mesh is None:
      return jax.jit(self.step, donate_argnums=0)
    from nas_jax import sharding
    state_sh = jax.tree.map(lambda a: a.sharding, self.abstract_state)
    return jax.jit(self.step, in_shardings=(state_sh, sharding.batch_sharding(self.mesh)),
                   out_shardings=(state_sh, None), donate_argnums=0)

  def compile(self, batch_spec: dict):
    """The jitted step compiled ahead of time from shapes alone: `abstract_state` and
    `batch_spec` (a global batch of jax.ShapeDtypeStruct, e.g. `data.pipeline.batch_spec`), so it
    can compile while the state is being initialised or restored (train.py does so in a thread)."""
    if self.mesh is None:
      return self.jit().lower(self.abstract_state, batch_spec).compile()
    from nas_jax import sharding
    batch_sh = sharding.batch_sharding(self.mesh)
    batch_spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=batch_sh),
                              batch_spec)
    with jax.set_mesh(self.mesh):   # The mesh context is per thread.
      return self.jit().lower(self.abstract_state, batch_spec).compile()


def setup(config: ml_collections.ConfigDict, schedule: optax.Schedule, *, token_ids: TokenIds,
          num_groups: int, alpha_warmup_steps: int, mesh=None) -> Setup:
  """The model, AdamW on `schedule`, the bound step and the abstract state (`mesh`: with the
  state's shardings from `sharding.state_shardings`)."""
  from nas_jax import optim, sharding
  model = NASModel(config=config.model)
  tx, schedule = optim.make_optimizer(config.optim, schedule)
  step = make_train_step(config, model, tx, schedule, token_ids=token_ids, num_groups=num_groups,
                         alpha_warmup_steps=alpha_warmup_steps)
  abstract = jax.eval_shape(lambda r: init_state(config, model, tx, r), jax.random.PRNGKey(0))
  if mesh is not None:
    shardings = sharding.state_shardings(abstract, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
  return Setup(config=config, model=model, tx=tx, step=step, abstract_state=abstract, mesh=mesh)
