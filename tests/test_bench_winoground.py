"""Winoground metric on published score files and on the sample examples with fixed scores."""

import json

import numpy as np
import pytest
from PIL import Image

from nas_jax.benchmarks import common, winoground

import bench_data


def test_albef_4m_reference_scores(samples_dir):
  """The full ALBEF-4M score file (Bugliarello et al.) gives the published 29.25 / 15.50 / 11.00."""
  s = winoground.scores_from_file(str(samples_dir / 'reference_outputs' / 'winoground_albef_4m_itm.scores.jsonl'))
  assert s.shape == (400, 2, 2)
  h, d = winoground.summarize(s)
  assert (round(h['Text'], 2), round(h['Image'], 2), round(h['Group'], 2)) == (29.25, 15.50, 11.00)
  assert d['correct'] == {'text': 117, 'image': 62, 'group': 44}


def _official_text_image_group(path):
  """statistics/compute_statistics.py of the Winoground repository, transcribed: load_results and
  the three *_correct functions, averaged as get_table_dict does."""
  results = {}
  for line in open(path, 'r').readlines():
    score_dict = json.loads(line)
    id, c, i = score_dict['label'].split('_')
    scores = results.get(int(id), {})
    scores['_'.join([c, i])] = score_dict['score']
    results[int(id)] = scores
  text = [r['c0_i0'] > r['c1_i0'] and r['c1_i1'] > r['c0_i1'] for r in results.values()]
  image = [r['c0_i0'] > r['c0_i1'] and r['c1_i1'] > r['c1_i0'] for r in results.values()]
  group = [t and i for t, i in zip(text, image)]
  return [100 * float(np.mean(x)) for x in (text, image, group)]


def test_score_file_is_the_official_format(samples_dir, tmp_path):
  """Writing the ALBEF-4M scores back gives the published file line for line."""
  ref = samples_dir / 'reference_outputs' / 'winoground_albef_4m_itm.scores.jsonl'
  s = winoground.scores_from_file(str(ref))
  out = winoground.write_score_file(str(tmp_path / 'w.jsonl'), [{'id': e} for e in range(400)],
                                    s.astype(np.float32))
  assert open(out).read().splitlines() == ref.read_text().splitlines()
  assert _official_text_image_group(out) == pytest.approx([29.25, 15.5, 11.0])


def test_clip_sample_by_hand(samples_dir):
  """First 4 examples of the official CLIP score file, checked by hand from its 16 numbers."""
  s = winoground.scores_from_file(str(samples_dir / 'Winoground' / 'model_scores_clip.sample.jsonl'))
  manual = [(s[e, 0, 0] > s[e, 1, 0] and s[e, 1, 1] > s[e, 0, 1],
             s[e, 0, 0] > s[e, 0, 1] and s[e, 1, 1] > s[e, 1, 0]) for e in range(4)]
  c = winoground.scores_metric(s)
  assert [(bool(t), bool(i)) for t, i in zip(c['text'], c['image'])] == manual
  # Example 0 (labels 0_c0_i0 .. 0_c1_i1 = 29.97, 28.76, 30.73, 29.93): 0_c1_i0 beats 0_c0_i0, so
  # text fails; 29.97 > 28.76 but 29.93 < 30.73, so image fails.
  assert not c['text'][0] and not c['image'][0]


def test_strict_ties_fail():
  s = np.array([[[2., 1.], [1., 2.]],     # all right
                [[2., 1.], [2., 2.]],     # s(c1,i0) == s(c0,i0): text fails; s(c1,i1) == s(c1,i0): image fails
                [[2., 2.], [1., 3.]],     # text right (2>1, 3>2); image: s(c0,i0) == s(c0,i1) fails
                [[1., 2.], [2., 1.]]])    # all wrong
  c = winoground.scores_metric(s)
  assert c['text'].tolist() == [True, False, True, False]
  assert c['image'].tolist() == [True, False, False, False]
  assert c['group'].tolist() == [True, False, False, False]


def test_fixture_evaluate(samples_dir, tmp_path):
  """The 14 sample examples with generated PNGs (RGBA for half, as the real mixed files). Scores:
  right caption/image 3.0, wrong 1.0, except: example 1's caption 1 scores 2.0 with both images
  (text right: 3 > 2, 2 > 1; image fails: s(c1,i1) == s(c1,i0)); example 2's image 1 scores 3.0
  with both captions (text fails: s(c1,i1) == s(c0,i1); image fails: s(c0,i0) == s(c0,i1));
  example 73 is all 2.0 (all fail). Text 12, image 11, group 11 of 14."""
  root = bench_data.winoground(samples_dir, tmp_path)
  examples = [json.loads(l) for l in (root / 'examples.jsonl').read_text().splitlines()]
  table = {}
  for e in examples:
    for c in (0, 1):
      for i in (0, 1):
        v = 3.0 if c == i else 1.0
        if e['id'] == 1 and c == 1:
          v = 2.0
        if e['id'] == 2 and i == 1:
          v = 3.0
        if e['id'] == 73:
          v = 2.0
        ref = common.ImageRef(str(root / 'images' / f'{e[f"image_{i}"]}.png'))
        table[(ref, common.albef_pre_caption(e[f'caption_{c}'], 40))] = v
  scorer = common.TableScorer(table, load_images=True)
  res = winoground.evaluate(str(root), scorer, scores_dir=str(tmp_path / 'scores'))
  n = len(examples)
  assert n == 14 and scorer.calls == [('itm', 4 * n)]
  assert res.headline == pytest.approx({'Text': 100 * 12 / n, 'Image': 100 * 11 / n,
                                        'Group': 100 * 11 / n})
  assert res.details['correct'] == {'text': 12, 'image': 11, 'group': 11}
  both = res.details['subsets']['collapsed_tag=Both']
  assert both['n'] == 1 and both['text'] == both['image'] == both['group'] == 0.0
  assert res.details['subsets']['secondary_tag=Pragmatics']['group'] == 100.0
  # The per-example file: the official scripts read it back to the same numbers.
  assert _official_text_image_group(res.details['score_file']) == pytest.approx(
      [res.headline['Text'], res.headline['Image'], res.headline['Group']])
  first = json.loads(open(res.details['score_file']).readline())
  assert first == {'label': '0_c0_i0', 'score': float(common.itm_probability(np.array([[0, 3.0]]))[0])}
  # ITC-only scoring uses the cosine of the features (here one-hot: right pairs 1, wrong 0).
  feats_img, feats_txt = {}, {}
  for e in examples:
    for k in (0, 1):
      onehot = np.eye(2 * n)[2 * examples.index(e) + k]
      feats_img[common.ImageRef(str(root / 'images' / f'{e[f"image_{k}"]}.png'))] = onehot
      feats_txt[common.albef_pre_caption(e[f'caption_{k}'], 40)] = onehot
  res_itc = winoground.evaluate(str(root), common.TableScorer(itc_image=feats_img, itc_text=feats_txt),
                                mode='itc')
  assert res_itc.headline == {'Text': 100.0, 'Image': 100.0, 'Group': 100.0}


def test_saturated_probabilities_tie():
  """Default score float32 P(match): logits (0, 20) and (0, 17) both give exactly 1.0, so an
  example whose right pairs score 20 and wrong pairs 17 fails every score (strict >), while the
  logit difference l1 - l0 gets it right. Equal logits give exactly 0.5."""
  logits = np.array([[0, 20], [0, 17], [0, 17], [0, 20], [3, 3]], np.float32)
  p = common.itm_probability(logits)
  assert p.tolist() == [1.0, 1.0, 1.0, 1.0, 0.5]
  c = winoground.scores_metric(p[:4].reshape(1, 2, 2))
  assert not c['text'][0] and not c['image'][0]
  c = winoground.scores_metric(common.scores_from_logits(logits[:4], 'itm').reshape(1, 2, 2))
  assert c['text'][0] and c['image'][0] and c['group'][0]


def test_missing_data_error(tmp_path):
  with pytest.raises(common.BenchmarkDataError) as e:
    winoground.evaluate(str(tmp_path), common.TableScorer())
  assert '[winoground]' in str(e.value) and 'examples.jsonl' in str(e.value)
  assert 'facebook/winoground' in str(e.value)


def test_image_ref_errors_name_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.png'):
    common.ImageRef(str(tmp_path / 'nope.png')).load()
  (tmp_path / 'bad.png').write_bytes(b'not an image')
  with pytest.raises(OSError, match='bad.png.*cannot be read'):
    common.ImageRef(str(tmp_path / 'bad.png')).load()
  with pytest.raises(ValueError, match='path or an in-memory key'):
    common.ImageRef()
  Image.new('RGB', (10, 8)).save(tmp_path / 'ok.png')
  assert common.ImageRef(str(tmp_path / 'ok.png'), box=(2, 1, 5, 4)).load().size == (5, 4)


def test_itm_probability_matches_pytorch_softmax(run_torch):
  """P(match) against `F.softmax(itm_logits)[0][1].item()` (the published files' pipeline) on
  PyTorch's CPU kernel: the saturated 1.0s (which decide ties) and the exact 0.5 of equal logits
  coincide; elsewhere the two differ by at most a few float32 ulps (their exp and division round
  differently; PyTorch's CPU and GPU kernels differ from each other the same way)."""
  rng = np.random.default_rng(0)
  logits = np.concatenate([rng.normal(0, 8, (4000, 2)),
                           [[0, 16], [0, 16.6], [0, 16.7], [0, 17], [0, 40], [3, 3], [-7, -7],
                            [0, -90], [0, -200]]]).astype(np.float32)
  ref = run_torch('''
import sys, numpy as np, torch, torch.nn.functional as F
x = np.load(sys.argv[1])['logits']
p = [F.softmax(torch.from_numpy(r[None]), dim=-1)[0][1].item() for r in x]
np.savez(sys.argv[2], p=np.asarray(p, np.float32))
''', {'logits': logits})['p']
  ours = common.itm_probability(logits)
  assert np.array_equal(ours == 1.0, ref == 1.0) and (ours == 1.0).sum() > 100
  assert ours[-4] == ref[-4] == 0.5 and ours[-3] == ref[-3] == 0.5
  assert np.all(np.abs(ours - ref) <= 4 * np.spacing(np.maximum(ours, ref)))
