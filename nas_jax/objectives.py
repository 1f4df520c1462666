"""The three pre-training objectives (total L = L_itc + L_mlm + L_itm), as pure functions.

Semantics are ALBEF's (salesforce/ALBEF `models/model_pretrain.py`, `model_retrieval.py`, `xbert.py`)
with NAS's extra FGITM pair groups: (I_fg, T), the NVA-augmented image with its own caption, and
(I, T_fg), the image with a hard-negative caption (`itm_group_names`). Everything here is jit-able
with static shapes; losses and softmaxes are computed in float32 whatever the input dtype.

  ITC   image-text contrastive loss against [momentum features of the batch ; queue], momentum
        distillation targets (1 - alpha) onehot + alpha softmax(sim_m); `alpha_schedule` ramps alpha.
  MLM   `mask_tokens` (15 %, 80/10/10, never [PAD]/[CLS]) and `mlm_loss` with distillation.
  FGITM `sample_hard_negatives` (in-batch, softmax(sim), positive excluded), `itm_group_names`
        (the pair groups in the step's order) and `itm_loss`.

Queues are stored row-major, [Q, D] (ALBEF stores [D, Q]).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array

IGNORE = -100   # label of positions without an MLM target (as PyTorch's CrossEntropyLoss)


# ----------------------------------------------------------------------------------------- ITC
def alpha_schedule(step: Array | int, alpha: float, warmup_steps: int) -> Array:
  """Distillation weight: alpha * min(1, step / warmup_steps) (ALBEF ramps over the first epoch).

  warmup_steps <= 0 gives alpha from step 0.
  """
  if warmup_steps <= 0:
    return jnp.asarray(alpha, jnp.float32)
  return alpha * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup_steps)


def _soft_xent(logits: Array, targets: Array) -> Array:
  """mean_b -sum_j targets[b, j] log softmax(logits)[b, j], float32."""
  return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits, axis=-1) * targets, axis=-1))


def itc_loss(image_feat: Array, text_feat: Array, image_feat_m: Array, text_feat_m: Array,
             image_queue: Array, text_queue: Array, temp: Array, alpha: Array | float,
             image_id: Array | None = None, id_queue: Array | None = None
             ) -> tuple[Array, dict[str, Array]]:
  """Image-text contrastive loss with queues and momentum distillation (ALBEF).

  Args:
    image_feat, text_feat: [B, D] L2-normalised online projections of v_cls and t_cls.
    image_feat_m, text_feat_m: [B, D] the momentum model's (no gradient flows into them).
    image_queue, text_queue: [Q, D] earlier momentum features.
    temp: scalar temperature (the caller clamps it to [temp_min, temp_max] first, as ALBEF).
    alpha: distillation weight; 0 gives plain one-hot targets.
    image_id, id_queue: optional int [B], [Q] (retrieval fine-tuning): every entry of
      [batch ; queue] with the same image id is a positive, targets spread uniformly over them
      (initialise the id queue with an id no image has, e.g. -100 as ALBEF).
  Returns:
    loss = (CE_i2t + CE_t2i) / 2 and dict(sim_i2t, sim_t2i), the online similarities [B, B + Q]
    divided by temp (their first B columns are what `sample_hard_negatives` reads).
  """
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  image_feat_m, text_feat_m, image_queue, text_queue = jax.tree.map(
      jax.lax.stop_gradient, (image_feat_m, text_feat_m, image_queue, text_queue))
  image_all = f32(jnp.concatenate([image_feat_m, image_queue.astype(image_feat_m.dtype)], 0))
  text_all = f32(jnp.concatenate([text_feat_m, text_queue.astype(text_feat_m.dtype)], 0))
  temp = f32(temp)
  sim_i2t = jnp.dot(f32(image_feat), text_all.T, precision=hi) / temp
  sim_t2i = jnp.dot(f32(text_feat), image_all.T, precision=hi) / temp

  b, total = sim_i2t.shape
  if image_id is None:
    targets = jnp.eye(b, total, dtype=jnp.float32)
  else:
    if id_queue is None:
      raise ValueError("itc_loss: image_id needs id_queue (the retrieval id queue)")
    ids_all = jnp.concatenate([image_id, id_queue.astype(image_id.dtype)], 0)
    pos = (image_id[:, None] == ids_all[None, :]).astype(jnp.float32)
    targets = pos / jnp.sum(pos, axis=1, keepdims=True)

  t_sg = jax.lax.stop_gradient(temp)
  sim_i2t_m = jnp.dot(f32(image_feat_m), text_all.T, precision=hi) / t_sg
  sim_t2i_m = jnp.dot(f32(text_feat_m), image_all.T, precision=hi) / t_sg
  alpha = jnp.asarray(alpha, jnp.float32)
  tgt_i2t = alpha * jax.nn.softmax(sim_i2t_m, axis=-1) + (1.0 - alpha) * targets
  tgt_t2i = alpha * jax.nn.softmax(sim_t2i_m, axis=-1) + (1.0 - alpha) * targets
  loss = (_soft_xent(sim_i2t, tgt_i2t) + _soft_xent(sim_t2i, tgt_t2i)) / 2.0
  return loss, dict(sim_i2t=sim_i2t, sim_t2i=sim_t2i)


def check_queue_size(queue_size: int, global_batch: int) -> None:
  """ValueError unless the queue holds a whole number of global batches (as ALBEF asserts)."""
  if global_batch <= 0 or queue_size <= 0 or queue_size % global_batch:
    near = max(1, round(queue_size / max(global_batch, 1))) * max(global_batch, 1)
    raise ValueError(
        f"itc.queue_size={queue_size} must be a positive multiple of the global batch size "
        f"data.batch_size={global_batch} (every step enqueues one whole batch); "
        f"use e.g. --config.itc.queue_size={near}")


def init_queue(rng: Array, size: int, dim: int | None = None) -> Array:
  """A feature queue [size, dim] of random unit rows (ALBEF), or with dim=None an id queue
  [size] int32 filled with -100 (matches no image id)."""
  if dim is None:
    return jnp.full((size,), IGNORE, jnp.int32)
  q = jax.random.normal(rng, (size, dim), jnp.float32)
  return q / jnp.linalg.norm(q, axis=-1, keepdims=True)


def enqueue(queue: Array, ptr: Array, feats: Array) -> tuple[Array, Array]:
  """Writes feats [b, ...] at rows [ptr, ptr + b) of queue [Q, ...]; returns (queue, (ptr+b) % Q).

  Q must be a multiple of b (`check_queue_size`), so a write never straddles the end. Under jit
  with batch-sharded feats and a replicated queue this is ALBEF's all-gather + enqueue.
  """
  size, b = queue.shape[0], feats.shape[0]
  if size % b:
    check_queue_size(size, b)
  feats = jax.lax.stop_gradient(feats).astype(queue.dtype)
  queue = jax.lax.dynamic_update_slice_in_dim(queue, feats, ptr, axis=0)
  return queue, ((ptr + b) % size).astype(jnp.int32)


# ----------------------------------------------------------------------------------------- MLM
def mask_tokens(rng: Array, ids: Array, *, vocab_size: int, pad_id: int, cls_id: int, mask_id: int,
                prob: float = 0.15, mask_prob: float = 0.8, random_prob: float = 0.1,
                keep_ids: tuple[int, ...] = (), max_masked: int = 0) -> tuple[Array, Array]:
  """BERT/ALBEF masking of token ids [B, L].

  Each token is selected with probability `prob`, never [PAD] or [CLS] (nor any of `keep_ids`).
  ALBEF does mask [SEP]; pass keep_ids=(sep_id,) to protect it. A selected token becomes [MASK]
  with probability mask_prob, a uniformly random id in [0, vocab_size) with random_prob (as
  ALBEF, special ids included), and stays unchanged otherwise.
  max_masked > 0 (`resolve_max_masked`; BERT's max_predictions_per_seq): a row with more
  selected tokens keeps a uniformly random max_masked of them, so that the MLM head can run on
  `masked_positions` only. ALBEF has no such cap (0).
  Returns (input_ids, labels): labels are the original ids where selected, -100 elsewhere.
  """
  if not (0 <= prob <= 1 and mask_prob >= 0 and random_prob >= 0 and mask_prob + random_prob <= 1):
    raise ValueError(f"mlm: prob={prob}, mask_prob={mask_prob}, random_prob={random_prob}: need "
                     "probabilities in [0, 1] with mask_prob + random_prob <= 1")
  k_sel, k_how, k_tok = jax.random.split(rng, 3)
  maskable = (ids != pad_id) & (ids != cls_id)
  for t in keep_ids:
    maskable &= ids != t
  u_sel = jax.random.uniform(k_sel, ids.shape)
  selected = (u_sel < prob) & maskable
  if 0 < max_masked < ids.shape[1]:
    # The selected tokens with the max_masked smallest draws: uniform among them, given the count.
    rank = jnp.argsort(jnp.argsort(jnp.where(selected, u_sel, 2.0), axis=1), axis=1)
    selected &= rank < max_masked
  u = jax.random.uniform(k_how, ids.shape)
  random_ids = jax.random.randint(k_tok, ids.shape, 0, vocab_size, dtype=ids.dtype)
  out = jnp.where(selected & (u < mask_prob), jnp.asarray(mask_id, ids.dtype), ids)
  out = jnp.where(selected & (u >= mask_prob) & (u < mask_prob + random_prob), random_ids, out)
  labels = jnp.where(selected, ids, jnp.asarray(IGNORE, ids.dtype))
  return out, labels


def resolve_max_masked(max_masked: int, length: int, prob: float, tail: float = 1e-5) -> int:
  """The per-text cap on masked tokens that `mlm.max_masked` asks for at text length L: 0 (no
  cap) for 0; -1 ('auto') the smallest P with P(Binomial(L − 1, prob) > P) < tail, i.e. a cap
  that changes the masking of fewer than `tail` of the texts (12 at L = 25, prob = 0.15); a cap
  of L − 1 or more (every maskable token) is no cap: 0."""
  if max_masked == -1:
    n = length - 1
    pmf = [math.comb(n, k) * prob**k * (1 - prob) ** (n - k) for k in range(n + 1)]
    max_masked = next((cap for cap in range(n + 1) if sum(pmf[cap + 1:]) < tail), n)
  return max_masked if 0 < max_masked < length - 1 else 0


def masked_positions(labels: Array, max_masked: int) -> tuple[Array, Array]:
  """The first max_masked masked positions of each row, in order, and their labels.

  labels [B, L] (-100 = not masked; at most max_masked masked per row, as `mask_tokens` with the
  same max_masked makes them). Returns (positions [B, max_masked] int32, labels [B, max_masked]),
  a row's unused slots pointing at position 0 with label -100. The MLM head on the hidden states
  at `positions` with these labels gives `mlm_loss` of the full [B, L] head exactly.
  """
  masked = labels != IGNORE
  positions = jnp.argsort(~masked, axis=1, stable=True)[:, :max_masked].astype(jnp.int32)
  taken = jnp.take_along_axis(masked, positions, axis=1)
  positions = jnp.where(taken, positions, 0)
  return positions, jnp.where(taken, jnp.take_along_axis(labels, positions, axis=1), IGNORE)


def mlm_loss(logits: Array, labels: Array, logits_m: Array | None = None,
             alpha: Array | float = 0.0) -> Array:
  """Masked-LM loss, mean over the masked tokens (labels != -100); 0 when none is masked.

  With logits_m (the momentum model's, no gradient) ALBEF's distillation:
  (1 - alpha) CE(logits, labels) + alpha * mean_masked(-sum softmax(logits_m) log softmax(logits)).
  logits [B, L, V] (or [P, V] with labels [P]).
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  valid = labels != IGNORE
  count = jnp.maximum(jnp.sum(valid), 1).astype(jnp.float32)
  safe = jnp.where(valid, labels, 0).astype(jnp.int32)
  nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
  loss = jnp.sum(jnp.where(valid, nll, 0.0)) / count
  if logits_m is not None:
    soft = jax.nn.softmax(jax.lax.stop_gradient(logits_m).astype(jnp.float32), axis=-1)
    distill = -jnp.sum(soft * logp, axis=-1)
    distill = jnp.sum(jnp.where(valid, distill, 0.0)) / count
    alpha = jnp.asarray(alpha, jnp.float32)
    loss = (1.0 - alpha) * loss + alpha * distill
  return loss


# --------------------------------------------------------------------------------------- FGITM
def sample_hard_negatives(rng: Array, sim_i2t: Array, sim_t2i: Array,
                          image_id: Array | None = None) -> tuple[Array, Array]:
  """In-batch hard negatives, drawn with probability softmax(similarity) (ALBEF).

  Call it on a device-local batch of b pairs: sim_i2t, sim_t2i [b, >= b] whose first b columns
  are that batch's (momentum) features, i.e. the [b, b] block of `itc_loss`'s similarities.
  Entry j is excluded for row i when j == i or (with image_id [b]) image_id[j] == image_id[i].
  Returns (neg_image_idx [b], neg_text_idx [b]) int32: for each text i a negative image drawn
  from softmax(sim_t2i[i]) over the allowed entries, for each image i a negative text from
  softmax(sim_i2t[i]). A row with no allowed entry (every item of the batch shares its image)
  gets (i + 1) % b.
  """
  b = sim_i2t.shape[0]
  if b < 2:
    raise ValueError(f"ITM hard negatives need a local batch of at least 2 pairs, got {b}")
  exclude = jnp.eye(b, dtype=bool)
  if image_id is not None:
    exclude |= image_id[:, None] == image_id[None, :]
  k_img, k_txt = jax.random.split(rng)
  fallback = (jnp.arange(b) + 1) % b
  none_left = jnp.all(exclude, axis=1)

  def draw(key, sim):
    logits = jnp.where(exclude, -jnp.inf, jax.lax.stop_gradient(sim[:, :b]).astype(jnp.float32))
    idx = jax.random.categorical(key, logits, axis=-1)
    return jnp.where(none_left, fallback, idx).astype(jnp.int32)

  return draw(k_img, sim_t2i), draw(k_txt, sim_i2t)


def itm_group_names(*, nva: bool = False, text_negatives: bool = False) -> tuple[str, ...]:
  """The FGITM pair groups in the step's order; the first is the positive, label 1, the rest 0:

    pos      (I, T)        neg_img  (I_neg, T)    neg_txt  (I, T_neg)     (ALBEF)
    nva      (I_fg, T)     the NVA negative image, with `nva`
    nta      (I, T_fg)     the hard-negative caption, with `text_negatives`
  I_neg / T_neg are in-batch negatives (`sample_hard_negatives`).
  """
  return ("pos", "neg_img", "neg_txt") + ("nva",) * nva + ("nta",) * text_negatives


def itm_loss(logits: Array, labels: Array) -> tuple[Array, Array]:
  """Cross-entropy of the ITM head (mean over all P pairs, as ALBEF) and accuracy.

  logits [P, 2] (class 1 = match), labels int [P].
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  loss = -jnp.mean(jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1))
  acc = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
  return loss, acc
