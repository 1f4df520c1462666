"""Retrieval: recall against a brute-force reference, hand cases, and the ALBEF pipeline on the
sample coco_test.json with fixed ITC features and ITM logits."""

import numpy as np
import pytest

from nas_jax.benchmarks import common, retrieval

import bench_data


def _albef_itm_eval(scores_i2t, scores_t2i, txt2img, img2txt):
  """ALBEF Retrieval.py `itm_eval`, transcribed statement by statement (the official rule)."""
  ranks = np.zeros(scores_i2t.shape[0])
  for index, score in enumerate(scores_i2t):
    inds = np.argsort(score)[::-1]
    rank = 1e20
    for i in img2txt[index]:
      tmp = np.where(inds == i)[0][0]
      if tmp < rank:
        rank = tmp
    ranks[index] = rank
  out = {f'txt_r{k}': 100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)}
  ranks = np.zeros(scores_t2i.shape[0])
  for index, score in enumerate(scores_t2i):
    inds = np.argsort(score)[::-1]
    ranks[index] = np.where(inds == txt2img[index])[0][0]
  out.update({f'img_r{k}': 100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in (1, 5, 10)})
  return out


def _numpy_orders(row, order):
  """The hand cases below were built from what `np.argsort(row)[::-1]` gives with numpy 2.5 on an
  x86-64 AVX2 CPU (this project's CI). numpy's default sort is not stable: another numpy or CPU
  (e.g. AVX-512 sorting networks) may order ties otherwise, and then ALBEF's own numbers differ."""
  got = np.argsort(np.asarray(row, np.float32))[::-1].tolist()
  if got != order:
    pytest.skip(f'numpy orders these ties as {got} here, not {order}: the hand case does not apply')


def _shortlist(s, k):
  out = np.full_like(s, retrieval.NO_CANDIDATE)
  top = retrieval.topk_indices(s, k)
  np.put_along_axis(out, top, np.take_along_axis(s, top, axis=1), axis=1)
  return out


@pytest.mark.parametrize('seed', range(4))
def test_recall_equals_albef_itm_eval(seed):
  """Random, coarse (heavily tied) and shortlisted (k = 3, the rest -100) score matrices: every
  recall equals itm_eval's, bit for bit, ties included."""
  rng = np.random.default_rng(seed)
  n_img = 23
  counts = rng.integers(1, 7, n_img)
  img2txt, txt2img, t = [], [], 0
  for i, c in enumerate(counts):
    img2txt.append(list(range(t, t + c)))
    txt2img += [i] * c
    t += c
  s_i2t = rng.normal(size=(n_img, t)).astype(np.float32)
  s_t2i = rng.normal(size=(t, n_img)).astype(np.float32)
  if seed % 2:
    s_i2t, s_t2i = np.round(s_i2t), np.round(s_t2i)
  if seed >= 2:  # Shortlists of k = 3 < 10, the rest -100 as ALBEF fills them.
    s_i2t = _shortlist(s_i2t, 3)
    s_t2i = _shortlist(s_t2i, 3)
  m = retrieval.recall_metrics(s_i2t, s_t2i, img2txt, np.asarray(txt2img))
  ref = _albef_itm_eval(s_i2t, s_t2i, txt2img, img2txt)
  for k, v in ref.items():
    assert m[k] == v, k
  assert m['r_mean'] == pytest.approx(np.mean([ref[k] for k in ref]))


def test_recall_hand_case():
  img2txt = [[0, 1], [2], [3, 4]]
  txt2img = np.array([0, 0, 1, 2, 2])
  s_i2t = np.array([[.1, .9, .5, .2, .3],    # best GT (text 1) ranks 0: hit
                    [.9, .1, .5, .8, .2],    # GT text 2 ranks 2
                    [.5, .4, .3, .2, .1]],   # GT texts 3, 4 rank 3 and 4 -> 3
                   np.float32)
  s_t2i = np.array([[.9, .1, .2], [.1, .9, .2], [.3, .6, .5], [0, .1, 1], [1, 0, .5]], np.float32)
  assert retrieval.i2t_ranks(s_i2t, img2txt).tolist() == [0, 2, 3]
  assert retrieval.t2i_ranks(s_t2i, txt2img).tolist() == [0, 2, 0, 0, 1]
  m = retrieval.recall_metrics(s_i2t, s_t2i, img2txt, txt2img)
  assert m['txt_r1'] == 100 / 3 and m['txt_r5'] == 100.0
  assert m['img_r1'] == 60.0 and m['img_r5'] == 100.0


def test_ties_are_ordered_as_numpy_sorts_them():
  """Two equal scores: argsort keeps them in index order, `[::-1]` puts the later column first, so
  a ground truth in the later column wins the tie (rank 0) and one in the earlier column loses it
  (rank 1); counting every tie against the ground truth would give 1 for both."""
  row = [.5, .5]
  _numpy_orders(row, [1, 0])
  assert retrieval.albef_rank(np.float32(row), [1]) == 0
  assert retrieval.albef_rank(np.float32(row), [0]) == 1
  m = retrieval.recall_metrics(np.float32([row, row]), np.float32([[1, 0], [1, 0]]), [[1], [0]],
                               np.array([0, 0]))
  assert m['txt_r1'] == 50.0


def test_shortlist_smaller_than_10_ties_at_minus_100():
  """k_test = 3 of 12 texts: the other 9 hold -100 and a ground truth outside the shortlist is
  ranked among them in numpy's order (here 11 8 9 10 7 3 2 1 0 after the shortlist 4 5 6). Text 11
  thus ranks 3 (inside R@5), text 10 ranks 6 (inside R@10), text 0 ranks 11; counting ties against
  the ground truth would put all three at 11."""
  row = np.full(12, retrieval.NO_CANDIDATE, np.float32)
  row[[4, 5, 6]] = [2.0, 1.5, 1.0]            # The re-ranked shortlist.
  _numpy_orders(row, [4, 5, 6, 11, 8, 9, 10, 7, 3, 2, 1, 0])
  assert [retrieval.albef_rank(row, [t]) for t in (11, 10, 0)] == [3, 6, 11]
  assert retrieval.albef_rank(row, [0, 10]) == 6
  m = retrieval.recall_metrics(np.stack([row] * 3), np.zeros((12, 3), np.float32),
                               [[11], [10], [0]], np.zeros(12, np.int64))
  assert (m['txt_r1'], m['txt_r5'], m['txt_r10']) == (0.0, 100 / 3, 200 / 3)


def test_topk_indices():
  sims = np.array([[.1, .7, .3, .9], [.4, .2, .8, .6]])
  assert retrieval.topk_indices(sims, 2).tolist() == [[3, 1], [2, 3]]
  assert retrieval.topk_indices(sims, 9).tolist() == [[3, 1, 2, 0], [2, 3, 0, 1]]


def _scorer(root, records, swapped_logits=(0.0, 0.0)):
  """ITC: image i = e_i; captions of image i = e_i, except image 0's (e_0 + e_6, cos 0.707) and
  text 5 = image 1's first caption (2 e_0 + e_1: cos 0.894 with image 0, 0.447 with image 1).
  ITM logits (l0, l1): ground truth (1, 2) (l1 - l0 = 1), (image 0, text 5) = `swapped_logits`,
  every other pair (0, 0)."""
  refs = [common.ImageRef(str(root / r['image'])) for r in records]
  texts = [common.albef_pre_caption(c, 30) for r in records for c in r['caption']]
  owner = [i for i, r in enumerate(records) for _ in r['caption']]
  eye = np.eye(7)
  itc_img = {ref: eye[i] for i, ref in enumerate(refs)}
  itc_txt = {}
  for t, (text, i) in enumerate(zip(texts, owner)):
    itc_txt[text] = eye[0] + eye[6] if i == 0 else 2 * eye[0] + eye[1] if t == 5 else eye[i]
  itm = {(ref, text): ((1.0, 2.0) if owner[t] == i else (0.0, 0.0))
         for i, ref in enumerate(refs) for t, text in enumerate(texts)}
  itm[(refs[0], texts[5])] = swapped_logits
  assert len(set(texts)) == len(texts)
  return common.TableScorer(itm, itc_img, itc_txt, load_images=True)


def test_pipeline_shortlist_rerank_multicaption(samples_dir, tmp_path):
  root, records = bench_data.coco(samples_dir, tmp_path)
  assert [len(r['caption']) for r in records] == [5, 5, 5, 5, 5, 6]
  # k = 1: image 0's shortlist is text 5 alone (ITC 0.894 > 0.707), its own captions get -100 and
  # tie with 25 non-GT texts -> missed at 1/5/10. Text 5's shortlist is image 0 (ITM 0 > -100); its own
  # image is -100, tied with 4 others -> rank 5: missed at 1 and 5, found at 10.
  scorer = _scorer(root, records)
  res = retrieval.evaluate('retrieval_coco', str(tmp_path), scorer, k=1,
                           scores_dir=str(tmp_path / 'scores'))
  h = res.headline
  assert (h['TR@1'], h['TR@5'], h['TR@10']) == pytest.approx((500 / 6, 500 / 6, 500 / 6))
  assert (h['IR@1'], h['IR@5'], h['IR@10']) == pytest.approx((3000 / 31, 3000 / 31, 100.0))
  assert res.details['num_images'] == 6 and res.details['num_texts'] == 31
  assert res.details['official_counts'] is False  # A sample, not the 5,000 / 25,010 split.
  # ITC-only ranking: image 0 ranks text 5 first, its captions second -> TR@1 misses it, TR@5 not.
  itc = res.details['recall_itc_only']
  assert itc['txt_r1'] == pytest.approx(500 / 6) and itc['txt_r5'] == 100.0
  assert itc['img_r1'] == pytest.approx(3000 / 31)  # Text 5: image 0 (0.894) above image 1 (0.447).
  assert set(scorer.image_sizes.values()) == {(12, 10)}
  # The score file holds ALBEF's two matrices: itm_eval on them gives the same recalls.
  with np.load(res.details['score_file']) as f:
    i2t, t2i, txt2img = f['score_matrix_i2t'], f['score_matrix_t2i'], f['txt2img']
  assert i2t.dtype == t2i.dtype == np.float32 and i2t.shape == (6, 31) and t2i.shape == (31, 6)
  assert np.sum(i2t != retrieval.NO_CANDIDATE) == 6 and np.sum(t2i != retrieval.NO_CANDIDATE) == 31
  img2txt = [np.flatnonzero(txt2img == i) for i in range(6)]
  ref = _albef_itm_eval(i2t, t2i, txt2img, img2txt)
  assert ref == {k: res.details['recall'][k] for k in ref}

  # k = all: ITM re-ranks everything; raw l1 (ALBEF) puts every ground truth first (2 > 0).
  res = retrieval.evaluate('retrieval_coco', str(tmp_path), _scorer(root, records), k=64)
  assert all(v == 100.0 for v in res.headline.values())

  # Logits (-5, 0) for (image 0, text 5): raw l1 = 0 < 2 (still right), but l1 - l0 = 5 > 1, so
  # with mode 'itm' image 0 ranks text 5 first (TR@1 misses it) and text 5 ranks image 0 first.
  swapped = _scorer(root, records, swapped_logits=(-5.0, 0.0))
  res = retrieval.evaluate('retrieval_coco', str(tmp_path), swapped, k=64, mode='itm_l1')
  assert res.headline['TR@1'] == 100.0 and res.headline['IR@1'] == 100.0
  res = retrieval.evaluate('retrieval_coco', str(tmp_path), swapped, k=64, mode='itm')
  assert res.headline['TR@1'] == pytest.approx(500 / 6) and res.headline['TR@5'] == 100.0
  assert res.headline['IR@1'] == pytest.approx(3000 / 31) and res.headline['IR@5'] == 100.0


def test_pairs_scored_once_and_image_major(samples_dir, tmp_path):
  root, records = bench_data.coco(samples_dir, tmp_path)
  scorer = _scorer(root, records)
  retrieval.evaluate('retrieval_coco', str(tmp_path), scorer, k=64)
  assert scorer.calls == [('itc', 6 + 31), ('itm', 6 * 31)]  # Both directions: each pair once.


def test_missing_data_error(tmp_path):
  for name, file, source in (('retrieval_coco', 'coco/coco_test.json', 'ALBEF'),
                             ('retrieval_flickr', 'flickr30k/flickr30k_test.json', 'illinois')):
    with pytest.raises(common.BenchmarkDataError) as e:
      retrieval.evaluate(name, str(tmp_path), common.TableScorer())
    assert f'[{name}]' in str(e.value) and str(tmp_path / file) in str(e.value)
    assert source in str(e.value)
