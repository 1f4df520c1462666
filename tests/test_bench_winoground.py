"""Winoground metric on published score files and on the sample examples with fixed scores."""

import json

import numpy as np
import pytest
from PIL import Image

from nas_jax.benchmarks import common, winoground


def test_albef_4m_reference_scores(samples_dir):
  """The full ALBEF-4M score file (Bugliarello et al.) gives the published 29.25 / 15.50 / 11.00."""
  s = winoground.scores_from_file(str(samples_dir / 'reference_outputs' / 'winoground_albef_4m_itm.scores.jsonl'))
  assert s.shape == (400, 2, 2)
  h, d = winoground.summarize(s)
  assert (round(h['Text'], 2), round(h['Image'], 2), round(h['Group'], 2)) == (29.25, 15.50, 11.00)
  assert d['correct'] == {'text': 117, 'image': 62, 'group': 44}


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
  root = tmp_path / 'winoground'
  (root / 'images').mkdir(parents=True)
  examples = [json.loads(l) for l in (samples_dir / 'Winoground' / 'examples.sample.jsonl').read_text().splitlines()]
  for e in examples:
    for i in (0, 1):
      mode = 'RGBA' if e['id'] % 2 else 'RGB'
      Image.new(mode, (5, 4)).save(root / 'images' / f'{e[f"image_{i}"]}.png')
  (root / 'examples.jsonl').write_text((samples_dir / 'Winoground' / 'examples.sample.jsonl').read_text())
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
  res = winoground.evaluate(str(root), scorer)
  n = len(examples)
  assert n == 14 and scorer.calls == [('itm', 4 * n)]
  assert res.headline == pytest.approx({'Text': 100 * 12 / n, 'Image': 100 * 11 / n,
                                        'Group': 100 * 11 / n})
  assert res.details['correct'] == {'text': 12, 'image': 11, 'group': 11}
  both = res.details['subsets']['collapsed_tag=Both']
  assert both['n'] == 1 and both['text'] == both['image'] == both['group'] == 0.0
  assert res.details['subsets']['secondary_tag=Pragmatics']['group'] == 100.0
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
