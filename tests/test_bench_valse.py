"""VALSE reader, validity filter, acc_r, columns and averages; reference scores of ALBEF-4M."""

import json

import numpy as np
import pytest

from nas_jax.benchmarks import common, valse

import bench_data

# Valid records (mturk.caption >= 2) per sample file, counted by hand from the sample JSONs.
SAMPLE_VALID = {'existence': 9, 'plurals': 11, 'counting-hard': 8, 'counting-small-quant': 8,
                'counting-adversarial': 8, 'relations': 10, 'action-replacement': 9,
                'actant-swap': 9, 'coreference-standard': 6, 'coreference-hard': 9, 'foil-it': 9}


def _records(samples_dir, stem):
  return json.loads((samples_dir / 'VALSE' / f'{stem}.sample.json').read_text())


def test_reader_keeps_only_valid_records(samples_dir):
  for stem, n_valid in SAMPLE_VALID.items():
    pairs, n = valse.read_file(str(samples_dir / 'VALSE' / f'{stem}.sample.json'))
    assert len(pairs) == n_valid, stem
    assert n == len(_records(samples_dir, stem))
  pairs, _ = valse.read_file(str(samples_dir / 'VALSE' / 'actant-swap.sample.json'))
  ids = [p.id for p in pairs]
  assert 'actions_test_3' not in ids and 'actions_test_28' not in ids  # mturk.caption == 1
  assert ids[:3] == ['actions_test_0', 'actions_test_1', 'actions_test_2']
  assert pairs[0] == valse.Pair('actions_test_0', 'exercising_255.jpg', 'A man exercises his torso.',
                                'A torso exercises for a man.')


def test_fixture_accuracies_columns_averages(samples_dir, tmp_path):
  """ITM logits (0, v): captions v = 1; in every file the first 5 valid foils v = -1 (right), the
  6th ties at 1 (wrong: strict >), the rest 2 (wrong). So correct = 5 in every file. (No foil has
  v = 0, i.e. l0 == l1, which the VALSE script would skip: test_skip_rule covers that.)"""
  root = bench_data.valse(samples_dir, tmp_path)
  table = {}
  for stem in valse.STEMS:
    valid = [r for r in _records(samples_dir, stem).values() if r['mturk']['caption'] >= 2]
    for k, r in enumerate(valid):
      ref = common.ImageRef(str(root / 'images' / r['image_file']))
      cap, foil = (common.albef_pre_caption(r[t], 40) for t in ('caption', 'foil'))
      foil_score = -1.0 if k < 5 else 1.0 if k == 5 else 2.0
      for key, v in (((ref, cap), 1.0), ((ref, foil), foil_score)):
        assert table.get(key, v) == v, f'fixture conflict on {key}'
        table[key] = v
  scorer = common.TableScorer(table, load_images=True)  # Invalid records are not in the table.
  res = valse.evaluate(str(root), scorer, scores_dir=str(tmp_path / 'scores'))
  assert scorer.calls == [('itm', 2 * sum(SAMPLE_VALID.values()))]  # One batched call.
  acc = {s: 100 * 5 / n for s, n in SAMPLE_VALID.items()}
  for s in valse.STEMS:
    assert res.details['acc_r'][s] == pytest.approx(acc[s])
    assert res.details['correct'][s] == 5 and res.details['valid'][s] == SAMPLE_VALID[s]
  h = res.headline
  assert h['Existence'] == pytest.approx(500 / 9)
  assert h['Counting'] == pytest.approx((500 / 8 + 500 / 8 + 500 / 8) / 3)
  assert h['Action'] == pytest.approx((500 / 9 + 500 / 9) / 2)
  assert h['Coreference'] == pytest.approx((500 / 6 + 500 / 9) / 2)
  assert h['Avg'] == pytest.approx(np.mean(list(acc.values())))
  assert h['Pooled'] == pytest.approx(100 * 55 / sum(SAMPLE_VALID.values()))
  assert h['Avg 7-col'] == pytest.approx(np.mean([h[p] for p in valse.PIECES]))
  assert list(h) == list(valse.PIECES) + ['Avg', 'Avg 7-col', 'Pooled']
  assert res.details['official_counts'] is False  # Samples, not the 7,702 valid records.
  assert sum(valse.OFFICIAL_VALID.values()) == 7702
  assert res.details['skipped'] == {s: 0 for s in valse.STEMS}
  # Binary decisions: every caption has l0 < l1; foils l0 >= l1 only for the first 5.
  assert res.details['binary']['existence']['p_c'] == 100.0
  assert res.details['binary']['existence']['p_f'] == pytest.approx(500 / 9)
  # The score file: Bugliarello et al.'s format, files in their order, ids over all records.
  lines = [json.loads(l) for l in open(res.details['score_file'])]
  assert len(lines) == 2 * sum(SAMPLE_VALID.values())
  assert lines[0] == {'label': '0_c', 'score': float(np.float32(1 / (1 + np.exp(-1.0)))),
                      'instrument': 'actant-swap', 'piece': 'actions', 'type': 'caption', 'id': 0,
                      'logits': [0.0, 1.0]}
  assert lines[1]['label'] == '0_f' and lines[1]['type'] == 'foil' and lines[1]['logits'] == [0.0, -1.0]
  n_actant = len(_records(samples_dir, 'actant-swap'))
  first_replacement = next(l for l in lines if l['instrument'] == 'action-replacement')
  assert first_replacement['id'] == n_actant  # Running id: action-replacement follows actant-swap.
  assert [l['instrument'] for l in lines[::2]] == sorted(l['instrument'] for l in lines[::2])
  assert valse.counts_from_score_file(res.details['score_file']) == {
      s: (5, SAMPLE_VALID[s]) for s in valse.STEMS}


def test_albef_reference_scores(samples_dir, tmp_path):
  """Bugliarello et al.'s ALBEF-4M scores: the 40-line sample holds 20 valid actant-swap pairs;
  13 captions beat their foils (by hand) -> 65.00. Ids 0-9 are the sample file's first 10 records
  (id 3 is invalid, so it has no score): 5 of those 9 are right -> 55.56 through `evaluate`."""
  path = samples_dir / 'reference_outputs' / 'valse_albef_4m_itm.scores.sample.jsonl'
  counts = valse.counts_from_score_file(str(path))
  assert counts == {'actant-swap': (13, 20)}
  assert valse.summarize(counts)[1]['acc_r']['actant-swap'] == 65.0

  ref = {}
  for line in path.read_text().splitlines():
    r = json.loads(line)
    ref[(r['id'], r['type'])] = r['score']
  root = bench_data.valse(samples_dir, tmp_path)
  table = {}
  for idx, r in enumerate(_records(samples_dir, 'actant-swap').values()):
    if idx < 10 and (idx, 'caption') in ref:
      img = common.ImageRef(str(root / 'images' / r['image_file']))
      table[(img, common.albef_pre_caption(r['caption'], 40))] = ref[(idx, 'caption')]
      table[(img, common.albef_pre_caption(r['foil'], 40))] = ref[(idx, 'foil')]
  assert {i for i, _ in ref if i < 10} == {0, 1, 2, 4, 5, 6, 7, 8, 9}
  res = valse.evaluate(str(root), common.TableScorer(table), stems=('actant-swap',))
  assert res.details['correct'] == {'actant-swap': 5}
  assert res.details['acc_r']['actant-swap'] == pytest.approx(500 / 9)
  assert res.headline == {}  # One file: no full column or average.


def _one_pair_dir(samples_dir, tmp_path):
  """The actant-swap sample alone; returns (root, [(image ref, caption, foil)] of its valid pairs)."""
  root = bench_data.valse(samples_dir, tmp_path)
  valid = [r for r in _records(samples_dir, 'actant-swap').values() if r['mturk']['caption'] >= 2]
  return root, [(common.ImageRef(str(root / 'images' / r['image_file'])),
                 common.albef_pre_caption(r['caption'], 40), common.albef_pre_caption(r['foil'], 40))
                for r in valid]


def test_skip_rule(samples_dir, tmp_path):
  """lxmert_valse_eval.py skips a pair when the foil's two logits are equal
  (`cross_score[1, 0] == cross_score[1, 1]`), whatever the caption scores. Hand cases on the 9 valid
  actant-swap pairs, logits (l0, l1) of caption / foil:
    0: (0, 2) / (1, 1)      skipped (would be right: P 0.88 > 0.5)
    1: (0, 2) / (-3, -3)    skipped
    2: (2, 2) / (0, 1)      counted; caption P 0.5 < foil 0.73: wrong; caption not a match (p_c)
    3-8: (0, 2) / (0, -1)   counted, right
  -> 6 of 7 counted right; with skip_rule='none' 8 of 9 (pairs 0 and 1 right)."""
  root, pairs = _one_pair_dir(samples_dir, tmp_path)
  assert len(pairs) == 9
  logits = {0: ((0, 2), (1, 1)), 1: ((0, 2), (-3, -3)), 2: ((2, 2), (0, 1))}
  table = {}
  for k, (ref, cap, foil) in enumerate(pairs):
    c, f = logits.get(k, ((0, 2), (0, -1)))
    table[(ref, cap)], table[(ref, foil)] = c, f
  res = valse.evaluate(str(root), common.TableScorer(table), stems=('actant-swap',),
                       scores_dir=str(tmp_path / 'scores'))
  assert res.details['correct'] == {'actant-swap': 6} and res.details['counted'] == {'actant-swap': 7}
  assert res.details['skipped'] == {'actant-swap': 2} and res.details['valid'] == {'actant-swap': 9}
  assert res.details['acc_r']['actant-swap'] == pytest.approx(600 / 7)
  b = res.details['binary']['actant-swap']
  assert (b['p_c'], b['p_f']) == pytest.approx((600 / 7, 600 / 7))
  # The written logits let the rule be re-applied from the file.
  assert valse.counts_from_score_file(res.details['score_file']) == {'actant-swap': (6, 7)}
  assert valse.counts_from_score_file(res.details['score_file'], 'none') == {'actant-swap': (8, 9)}
  none = valse.evaluate(str(root), common.TableScorer(table), stems=('actant-swap',), skip_rule='none')
  assert none.details['correct'] == {'actant-swap': 8} and none.details['counted'] == {'actant-swap': 9}
  # The raw match logit (the script's own acc_r comparison): pair 2 has l1 2 > 1: right, 7 of 7.
  l1 = valse.evaluate(str(root), common.TableScorer(table), stems=('actant-swap',), mode='itm_l1')
  assert l1.details['correct'] == {'actant-swap': 7}
  # ITC scores have no logits: nothing can be skipped.
  assert valse.skipped_pairs(None).tolist() == []
  with pytest.raises(ValueError, match='skip rule'):
    valse.evaluate(str(root), common.TableScorer(table), skip_rule='official')


def test_softmax_saturation_makes_ties(samples_dir, tmp_path):
  """float32 softmax P(match) is exactly 1.0 once l1 - l0 > ln(2^24) ~ 16.6: a caption at
  (0, 20) and a foil at (0, 17) tie at P = 1.0, so the pair fails under the default 'itm_p' (as in
  the published score files) and is right under 'itm' (l1 - l0: 20 > 17). At (0, 16) the foil's P
  is 1 - 2^-23, still below the caption's."""
  root, pairs = _one_pair_dir(samples_dir, tmp_path)
  foil_logit = {0: 17.0, 1: 16.0}
  table = {}
  for k, (ref, cap, foil) in enumerate(pairs):
    table[(ref, cap)], table[(ref, foil)] = (0.0, 20.0), (0.0, foil_logit.get(k, -5.0))
  p = common.itm_probability(np.array([[0, 20], [0, 17], [0, 16]], np.float32))
  assert p.tolist() == [1.0, 1.0, 1 - 2 ** -23]
  res = valse.evaluate(str(root), common.TableScorer(table), stems=('actant-swap',))
  assert res.protocol['score'] == 'itm_p' and res.details['correct'] == {'actant-swap': 8}
  res = valse.evaluate(str(root), common.TableScorer(table), stems=('actant-swap',), mode='itm')
  assert res.details['correct'] == {'actant-swap': 9}


def test_published_albef_summary():
  """Bugliarello et al.'s ALBEF-4M counts (correct / valid per instrument, recomputed from their
  released per-example file; docs/EVALUATION.md, VALSE) -> the published columns and averages."""
  counts = {'existence': (360, 505), 'plurals': (671, 851), 'counting-hard': (540, 868),
            'counting-small-quant': (586, 900), 'counting-adversarial': (413, 691),
            'relations': (391, 535), 'action-replacement': (477, 648), 'actant-swap': (554, 949),
            'coreference-standard': (371, 708), 'coreference-hard': (58, 104), 'foil-it': (901, 943)}
  h, _ = valse.summarize(counts)
  expect = {'Existence': 71.29, 'Plurality': 78.85, 'Counting': 62.36, 'Sp.rel.': 73.08,
            'Action': 65.99, 'Coreference': 54.09, 'Foil-it!': 95.55, 'Avg': 67.82,
            'Pooled': 69.10, 'Avg 7-col': 71.60}
  assert {k: round(v, 2) for k, v in h.items()} == expect


def test_missing_data_error_names_benchmark_file_and_source(tmp_path):
  with pytest.raises(common.BenchmarkDataError) as e:
    valse.evaluate(str(tmp_path / 'valse'), common.TableScorer())
  msg = str(e.value)
  assert '[valse]' in msg and str(tmp_path / 'valse' / 'existence.json') in msg
  assert 'Heidelberg-NLP/VALSE' in msg
