"""Retrieval: recall against a brute-force reference, hand cases, and the ALBEF pipeline on the
sample coco_test.json with fixed ITC features and ITM logits."""

import json

import numpy as np
import pytest
from PIL import Image

from nas_jax.benchmarks import common, retrieval


def _brute_force(s_i2t, s_t2i, img2txt, txt2img):
  """Python-loop reference: sort descending with ties put before the ground truth (ties count
  against it); rank = position of the first ground-truth item."""
  def rank(row, gts):
    order = sorted(range(len(row)), key=lambda j: (-row[j], j in gts))
    return min(order.index(g) for g in gts)
  ri = [rank(list(s_i2t[i]), set(gts)) for i, gts in enumerate(img2txt)]
  rt = [rank(list(s_t2i[t]), {txt2img[t]}) for t in range(len(txt2img))]
  out = {}
  for k in (1, 5, 10):
    out[f'txt_r{k}'] = 100 * sum(r < k for r in ri) / len(ri)
    out[f'img_r{k}'] = 100 * sum(r < k for r in rt) / len(rt)
  return out


@pytest.mark.parametrize('seed', range(4))
def test_recall_equals_brute_force(seed):
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
  if seed % 2:  # Coarse scores: many ties, as with ALBEF's -100 fill.
    s_i2t, s_t2i = np.round(s_i2t), np.round(s_t2i)
  m = retrieval.recall_metrics(s_i2t, s_t2i, img2txt, np.asarray(txt2img))
  ref = _brute_force(s_i2t, s_t2i, img2txt, txt2img)
  for k, v in ref.items():
    assert m[k] == pytest.approx(v), k
  assert m['r_mean'] == pytest.approx(np.mean([ref[k] for k in ref]))


def test_recall_hand_case():
  img2txt = [[0, 1], [2], [3, 4]]
  txt2img = np.array([0, 0, 1, 2, 2])
  s_i2t = np.array([[.1, .9, .5, .2, .3],    # best GT (text 1) ranks 0: hit
                    [.9, .1, .5, .8, .2],    # GT text 2 ranks 2
                    [.5, .5, .5, .5, .5]])   # all tied: 3 non-GT texts >= the best GT -> rank 3
  s_t2i = np.array([[.9, .1, .2], [.1, .9, .2], [.3, .6, .6], [0, 0, 1], [1, 0, 0]])
  assert retrieval.i2t_ranks(s_i2t, img2txt).tolist() == [0, 2, 3]
  assert retrieval.t2i_ranks(s_t2i, txt2img).tolist() == [0, 2, 1, 0, 2]
  m = retrieval.recall_metrics(s_i2t, s_t2i, img2txt, txt2img)
  assert m['txt_r1'] == pytest.approx(100 / 3) and m['txt_r5'] == 100.0
  assert m['img_r1'] == 40.0 and m['img_r5'] == 100.0


def test_topk_indices():
  sims = np.array([[.1, .7, .3, .9], [.4, .2, .8, .6]])
  assert retrieval.topk_indices(sims, 2).tolist() == [[3, 1], [2, 3]]
  assert retrieval.topk_indices(sims, 9).tolist() == [[3, 1, 2, 0], [2, 3, 0, 1]]


def _coco_fixture(samples_dir, tmp_path):
  root = tmp_path / 'coco'
  records = json.loads((samples_dir / 'ALBEF' / 'coco_test.sample.json').read_text())
  (root / 'val2014').mkdir(parents=True)
  (root / 'coco_test.json').write_text(json.dumps(records))
  for r in records:
    Image.new('RGB', (6, 4), (30, 60, 90)).save(root / r['image'])
  return root, records


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
  root, records = _coco_fixture(samples_dir, tmp_path)
  assert [len(r['caption']) for r in records] == [5, 5, 5, 5, 5, 6]
  # k = 1: image 0's shortlist is text 5 alone (ITC 0.894 > 0.707), its own captions get -100 and
  # tie with 25 non-GT texts -> missed at 1/5/10. Text 5's shortlist is image 0 (ITM 0 > -100); its own
  # image is -100, tied with 4 others -> rank 5: missed at 1 and 5, found at 10.
  scorer = _scorer(root, records)
  res = retrieval.evaluate('retrieval_coco', str(tmp_path), scorer, k=1)
  h = res.headline
  assert (h['TR@1'], h['TR@5'], h['TR@10']) == pytest.approx((500 / 6, 500 / 6, 500 / 6))
  assert (h['IR@1'], h['IR@5'], h['IR@10']) == pytest.approx((3000 / 31, 3000 / 31, 100.0))
  assert res.details['num_images'] == 6 and res.details['num_texts'] == 31
  assert res.details['official_counts'] is False  # A sample, not the 5,000 / 25,010 split.
  # ITC-only ranking: image 0 ranks text 5 first, its captions second -> TR@1 misses it, TR@5 not.
  itc = res.details['recall_itc_only']
  assert itc['txt_r1'] == pytest.approx(500 / 6) and itc['txt_r5'] == 100.0
  assert itc['img_r1'] == pytest.approx(3000 / 31)  # Text 5: image 0 (0.894) above image 1 (0.447).
  assert set(scorer.image_sizes.values()) == {(6, 4)}

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
  root, records = _coco_fixture(samples_dir, tmp_path)
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
