"""ITC against a hand (numpy) cross-entropy, queue order and wrap-around, MLM masking rates,
MLM/ITM losses by hand, hard negatives never the positive, FGITM label layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nas_jax import objectives as obj


def _unit(key, shape):
  x = jax.random.normal(key, shape)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _itc_inputs(b=4, q=8, d=6):
  ks = jax.random.split(jax.random.PRNGKey(0), 6)
  return [np.asarray(_unit(k, (b if i < 4 else q, d))) for i, k in enumerate(ks)]


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_itc(img, txt, img_m, txt_m, iq, tq, temp, alpha, targets):
  img_all, txt_all = np.concatenate([img_m, iq]), np.concatenate([txt_m, tq])
  losses = []
  for a, a_m, other_all in ((img, img_m, txt_all), (txt, txt_m, img_all)):
    sim, sim_m = a @ other_all.T / temp, a_m @ other_all.T / temp
    tgt = alpha * np.exp(_np_log_softmax(sim_m)) + (1 - alpha) * targets
    losses.append(-(tgt * _np_log_softmax(sim)).sum(-1).mean())
  return (losses[0] + losses[1]) / 2


def test_itc_alpha0_is_plain_cross_entropy_over_batch_and_queue():
  img, txt, img_m, txt_m, iq, tq = (x.astype(np.float64) for x in _itc_inputs())
  temp = 0.07
  loss, sims = obj.itc_loss(*(jnp.asarray(x, jnp.float32) for x in (img, txt, img_m, txt_m, iq, tq)),
                            temp=jnp.float32(temp), alpha=0.0)
  # By hand: logits over [momentum batch ; queue], the positive of row i is column i.
  logits_i2t = img @ np.concatenate([txt_m, tq]).T / temp
  logits_t2i = txt @ np.concatenate([img_m, iq]).T / temp
  ce = lambda lg: -np.mean(_np_log_softmax(lg)[np.arange(4), np.arange(4)])
  np.testing.assert_allclose(loss, (ce(logits_i2t) + ce(logits_t2i)) / 2, rtol=1e-5)
  np.testing.assert_allclose(sims['sim_i2t'], logits_i2t, rtol=1e-4, atol=1e-4)
  assert sims['sim_t2i'].shape == (4, 12)


def test_itc_distillation_and_id_positives():
  x = _itc_inputs()
  ids, id_queue = np.array([0, 1, 0, 2]), np.array([1, -100, 5, 0, -100, -100, 3, 3])
  loss, _ = obj.itc_loss(*map(jnp.asarray, x), temp=0.1, alpha=0.4,
                         image_id=jnp.asarray(ids), id_queue=jnp.asarray(id_queue))
  pos = (ids[:, None] == np.concatenate([ids, id_queue])[None]).astype(np.float64)
  expected = _np_itc(*(a.astype(np.float64) for a in x), 0.1, 0.4, pos / pos.sum(1, keepdims=True))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  loss_plain, _ = obj.itc_loss(*map(jnp.asarray, x), temp=0.1, alpha=0.4)
  expected = _np_itc(*(a.astype(np.float64) for a in x), 0.1, 0.4, np.eye(4, 12))
  np.testing.assert_allclose(loss_plain, expected, rtol=1e-5)


def test_alpha_schedule():
  assert float(obj.alpha_schedule(0, 0.4, 100)) == 0.0
  np.testing.assert_allclose(obj.alpha_schedule(50, 0.4, 100), 0.2, rtol=1e-6)
  np.testing.assert_allclose(obj.alpha_schedule(1000, 0.4, 100), 0.4, rtol=1e-6)
  np.testing.assert_allclose(obj.alpha_schedule(0, 0.4, 0), 0.4, rtol=1e-6)


def test_queue_holds_last_features_in_order_and_wraps():
  queue, ptr = jnp.zeros((8, 3)), jnp.int32(0)
  step = jax.jit(obj.enqueue)
  for s in range(5):   # 5 batches of 2 rows = rows 1..10 into 8 slots
    feats = jnp.arange(2 * s + 1, 2 * s + 3, dtype=jnp.float32)[:, None] * jnp.ones((1, 3))
    queue, ptr = step(queue, ptr, feats)
  assert int(ptr) == 2
  np.testing.assert_array_equal(queue[:, 0], [9, 10, 3, 4, 5, 6, 7, 8])
  # Read from the pointer on: the last 8 features, oldest first.
  np.testing.assert_array_equal(np.roll(queue[:, 0], -int(ptr)), np.arange(3, 11))
  ids, _ = obj.enqueue(obj.init_queue(None, 4), jnp.int32(2), jnp.array([7, 8]))
  np.testing.assert_array_equal(ids, [-100, -100, 7, 8])


def test_queue_size_error_is_clear():
  with pytest.raises(ValueError, match=r'itc.queue_size=100 .*multiple.*batch_size=16.*=96'):
    obj.check_queue_size(100, 16)
  obj.check_queue_size(65536, 512)
  with pytest.raises(ValueError, match='queue_size=10'):
    obj.enqueue(jnp.zeros((10, 2)), jnp.int32(0), jnp.ones((4, 2)))
  q = obj.init_queue(jax.random.PRNGKey(0), 16, 4)
  np.testing.assert_allclose(jnp.linalg.norm(q, axis=-1), 1.0, rtol=1e-5)


PAD, CLS, SEP, MASK, VOCAB = 0, 101, 102, 103, 1000


def test_mask_tokens_rates_and_never_pad_cls():
  rng = np.random.default_rng(0)
  ids = rng.integers(200, VOCAB, size=(512, 64))
  ids[:, 0] = CLS
  ids[:, 40] = SEP
  ids[:, 48:] = PAD
  ids = jnp.asarray(ids, jnp.int32)
  out, labels = jax.jit(lambda k, x: obj.mask_tokens(k, x, vocab_size=VOCAB, pad_id=PAD, cls_id=CLS,
                                                      mask_id=MASK))(jax.random.PRNGKey(0), ids)
  ids, out, labels = map(np.asarray, (ids, out, labels))
  sel = labels != -100
  maskable = (ids != PAD) & (ids != CLS)
  assert not sel[~maskable].any() and (out[~maskable] == ids[~maskable]).all()
  np.testing.assert_array_equal(labels[sel], ids[sel])
  assert sel[:, 40].any()  # ALBEF masks [SEP] too
  np.testing.assert_allclose(sel.sum() / maskable.sum(), 0.15, atol=0.006)
  n = sel.sum()
  to_mask = (out[sel] == MASK).sum() / n
  unchanged = (out[sel] == ids[sel]).sum() / n
  random = 1 - to_mask - unchanged
  np.testing.assert_allclose([to_mask, random, unchanged], [0.8, 0.1, 0.1], atol=0.02)
  assert (out[~sel] == ids[~sel]).all()


def test_mask_tokens_keep_ids():
  ids = jnp.full((64, 16), SEP, jnp.int32)
  _, labels = obj.mask_tokens(jax.random.PRNGKey(1), ids, vocab_size=VOCAB, pad_id=PAD, cls_id=CLS,
                              mask_id=MASK, prob=0.9, keep_ids=(SEP,))
  assert (np.asarray(labels) == -100).all()


def test_mask_tokens_cap_keeps_a_random_subset_and_changes_nothing_below_it():
  """max_masked: rows with more selected tokens keep exactly max_masked of them (a subset of the
  uncapped selection, not always the first ones); rows at or below the cap are unchanged."""
  rng = np.random.default_rng(3)
  ids = jnp.asarray(rng.integers(200, VOCAB, size=(256, 30)), jnp.int32).at[:, 0].set(CLS)
  mask = lambda cap: obj.mask_tokens(jax.random.PRNGKey(4), ids, vocab_size=VOCAB, pad_id=PAD,
                                     cls_id=CLS, mask_id=MASK, prob=0.3, max_masked=cap)
  (out0, lab0), (out9, lab9) = (map(np.asarray, mask(cap)) for cap in (0, 9))
  sel0, sel9 = lab0 != -100, lab9 != -100
  count0 = sel0.sum(1)
  assert (count0 > 9).sum() > 50 and (count0 <= 9).sum() > 50
  np.testing.assert_array_equal(sel9.sum(1), np.minimum(count0, 9))
  assert not (sel9 & ~sel0).any()
  small = count0 <= 9
  np.testing.assert_array_equal(lab9[small], lab0[small])
  np.testing.assert_array_equal(out9[sel9], out0[sel9])           # same 80/10/10 draw per token
  np.testing.assert_array_equal(out9[~sel9], np.asarray(ids)[~sel9])
  last_kept = np.array([np.flatnonzero(r)[-1] for r in sel9[count0 > 9]])
  last_any = np.array([np.flatnonzero(r)[-1] for r in sel0[count0 > 9]])
  assert (last_kept == last_any).mean() > 0.3                      # not a prefix of the selection


def test_resolve_max_masked_auto_is_the_smallest_cap_with_a_tail_below_1e5():
  from math import comb
  tail = lambda n, cap: sum(comb(n, k) * 0.15**k * 0.85 ** (n - k) for k in range(cap + 1, n + 1))
  for length in (10, 25, 30, 40):
    cap = obj.resolve_max_masked(-1, length, 0.15)
    assert tail(length - 1, cap) < 1e-5 <= tail(length - 1, cap - 1)
  assert obj.resolve_max_masked(-1, 25, 0.15) == 12
  assert [obj.resolve_max_masked(m, 25, 0.15) for m in (0, 5, 23, 24, 30)] == [0, 5, 23, 0, 0]
  assert obj.resolve_max_masked(-1, 4, 0.15) == 0      # every maskable token: no cap


def test_masked_positions_give_the_full_heads_loss():
  """The MLM loss (with distillation) of the head run on `masked_positions` equals the loss of
  the head run on every position."""
  b, l, v, cap = 3, 7, 11, 4
  labels = np.full((b, l), -100)
  labels[0, [1, 4, 6]] = [3, 5, 7]
  labels[1, [2]] = [1]
  labels[2, [1, 2, 3, 5]] = [2, 4, 6, 8]
  hidden = jax.random.normal(jax.random.PRNGKey(5), (b, l, 6))
  w = jax.random.normal(jax.random.PRNGKey(6), (6, v))
  w_m = jax.random.normal(jax.random.PRNGKey(7), (6, v))
  full = obj.mlm_loss(hidden @ w, jnp.asarray(labels), hidden @ w_m, 0.4)
  positions, sel_labels = obj.masked_positions(jnp.asarray(labels), cap)
  np.testing.assert_array_equal(positions, [[1, 4, 6, 0], [2, 0, 0, 0], [1, 2, 3, 5]])
  np.testing.assert_array_equal(sel_labels, [[3, 5, 7, -100], [1, -100, -100, -100], [2, 4, 6, 8]])
  rows = jnp.take_along_axis(hidden, positions[..., None], axis=1)
  np.testing.assert_allclose(obj.mlm_loss(rows @ w, sel_labels, rows @ w_m, 0.4), full, rtol=1e-6)


def test_mlm_loss_by_hand():
  logits = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (2, 3, 5)), np.float64)
  logits_m = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (2, 3, 5)), np.float64)
  labels = np.array([[-100, 4, -100], [1, -100, 0]])
  lp = _np_log_softmax(logits)
  pos = [(0, 1, 4), (1, 0, 1), (1, 2, 0)]
  ce = -np.mean([lp[b, t, c] for b, t, c in pos])
  soft = np.exp(_np_log_softmax(logits_m))
  dist = np.mean([-(soft[b, t] * lp[b, t]).sum() for b, t, _ in pos])
  lg, lg_m, lab = jnp.float32(logits), jnp.float32(logits_m), jnp.asarray(labels)
  np.testing.assert_allclose(obj.mlm_loss(lg, lab), ce, rtol=1e-5)
  np.testing.assert_allclose(obj.mlm_loss(lg, lab, lg_m, alpha=0.4), 0.6 * ce + 0.4 * dist,
                             rtol=1e-5)
  assert float(obj.mlm_loss(lg, jnp.full((2, 3), -100))) == 0.0


def test_hard_negatives_never_positive_and_follow_softmax():
  b = 4
  sim = jnp.asarray(np.random.default_rng(1).normal(size=(b, b + 3)) * 2, jnp.float32)
  keys = jax.random.split(jax.random.PRNGKey(0), 2000)
  draw = jax.jit(jax.vmap(obj.sample_hard_negatives, in_axes=(0, None, None, None)))
  neg_img, neg_txt = map(np.asarray, draw(keys, sim, sim * 0.5, jnp.arange(b)))
  assert (neg_img != np.arange(b)).all() and (neg_txt != np.arange(b)).all()
  # Frequencies of the negative text of image 0 ~ softmax(sim_i2t[0, 1:b]).
  s = np.asarray(sim[0, 1:b], np.float64)
  p = np.exp(s - s.max())
  np.testing.assert_allclose(np.bincount(neg_txt[:, 0], minlength=b)[1:] / 2000, p / p.sum(),
                             atol=0.035)
  # Same image id: items 0 and 2 share an image, so they are never each other's negative.
  ids = jnp.array([7, 3, 7, 5])
  neg_img, neg_txt = map(np.asarray, draw(keys[:200], sim, sim * 0.5, ids))
  for neg in (neg_img, neg_txt):
    assert (neg != np.arange(b)).all()
    assert (neg[:, 0] != 2).all() and (neg[:, 2] != 0).all()
  neg_img, neg_txt = obj.sample_hard_negatives(keys[1], sim, sim)   # no ids: diagonal excluded
  assert (np.asarray(neg_img) != np.arange(b)).all() and (np.asarray(neg_txt) != np.arange(b)).all()
  # No allowed candidate at all: (i + 1) % b.
  neg_img, _ = obj.sample_hard_negatives(keys[0], sim, sim, jnp.zeros(b, jnp.int32))
  np.testing.assert_array_equal(neg_img, [1, 2, 3, 0])


@pytest.mark.parametrize('nva,text_neg', [(False, False), (True, False), (True, True)])
def test_itm_group_order_and_loss(nva, text_neg):
  b = 3
  names = obj.itm_group_names(nva=nva, text_negatives=text_neg)
  assert names == ('pos', 'neg_img', 'neg_txt') + ('nva',) * nva + ('nta',) * text_neg
  labels = jnp.asarray(np.repeat([1] + [0] * (len(names) - 1), b), jnp.int32)
  # Loss by hand: logits favour class 1 for the first 2 rows only.
  p = labels.shape[0]
  logits = np.zeros((p, 2), np.float32)
  logits[:2, 1] = 2.0
  loss, acc = obj.itm_loss(jnp.asarray(logits), labels)
  lab = np.asarray(labels)
  lp = _np_log_softmax(logits.astype(np.float64))
  np.testing.assert_allclose(loss, -lp[np.arange(p), lab].mean(), rtol=1e-6)
  # argmax of a tie is class 0: rows 0, 1 right (label 1), row 2 wrong, zeros right.
  np.testing.assert_allclose(acc, (p - 1) / p, rtol=1e-6)
