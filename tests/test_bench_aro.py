"""ARO: VG-Relation / VG-Attribution macro accuracies (crop, option order, ties, exclusions, the
25-case filter) and the Order tasks (perturbations, precomputed files, ties, mean over seeds)."""

import collections
import json

import numpy as np
import pytest

from nas_jax.benchmarks import aro, common

import bench_data


def test_exclusion_list_matches_the_authors_notebook(samples_dir):
  names = (samples_dir / 'ARO' / 'vgr_excluded_relations.txt').read_text().splitlines()
  assert len(names) == 157 and frozenset(names) == aro.EXCLUDED_RELATIONS


def _vg_case(image, box, true, false, **extra):
  x, y, w, h = box
  return dict(image_path=image, bbox_x=x, bbox_y=y, bbox_w=w, bbox_h=h, true_caption=true,
              false_caption=false, **extra)


def _write_vg(tmp_path, relation_cases, attribution_cases):
  root = tmp_path / 'aro'
  for name in ('2316.jpg', '2407.jpg'):
    bench_data.image(root / 'images' / name, size=(40, 30))
  (root / 'visual_genome_relation.json').write_text(json.dumps(relation_cases))
  (root / 'visual_genome_attribution.json').write_text(json.dumps(attribution_cases))
  return root


def test_vg_relation_and_attribution(tmp_path):
  """Scores: true caption 1.0; false caption 0.0 (right), 1.0 (tie: wrong) or 2.0 (wrong).
  VG-R: 'on' 2 right + 1 tie -> 66.67; 'wearing' 1 right + 1 wrong -> 50; 'holding' 1 wrong -> 0;
  'next to' (excluded) 2 right: not in the macro. Macro = (66.67 + 50 + 0) / 3 = 38.89.
  VG-A: 'white_paved' 20 of 25 -> 80; 'big_small' 15 of 30 (one tie among the 15 wrong) -> 50;
  'red_blue' 24 of 24, dropped (< 25 cases). Macro = 65."""
  rel_spec = [('on', 0.0), ('on', 0.0), ('on', 1.0), ('wearing', 0.0), ('wearing', 2.0),
              ('holding', 2.0), ('next to', 0.0), ('next to', 0.0)]
  rel_cases = [_vg_case('2316.jpg' if i % 2 else '2407.jpg', (i, 2, 10 + i, 12),
                        f'the man is {r} the thing {i}', f'the thing {i} is {r} the man',
                        relation_name=r) for i, (r, _) in enumerate(rel_spec)]
  att_spec = ([('white', 'paved', 0.0)] * 20 + [('white', 'paved', 2.0)] * 5 +
              [('big', 'small', 0.0)] * 15 + [('big', 'small', 1.0)] + [('big', 'small', 2.0)] * 14 +
              [('red', 'blue', 0.0)] * 24)
  att_cases = [_vg_case('2316.jpg', (1, 1, 20, 20), f'the {a} road and the {b} house {i}',
                        f'the {b} road and the {a} house {i}', attributes=[a, b])
               for i, (a, b, _) in enumerate(att_spec)]
  root = _write_vg(tmp_path, rel_cases, att_cases)
  table = {}
  for cases, spec in ((rel_cases, [v for _, v in rel_spec]), (att_cases, [v for *_, v in att_spec])):
    for c, false_score in zip(cases, spec):
      ref = common.ImageRef(str(root / 'images' / c['image_path']),
                            box=(c['bbox_x'], c['bbox_y'], c['bbox_w'], c['bbox_h']))
      table[(ref, c['true_caption'])] = 1.0  # Raw captions: no pre_caption for VG.
      table[(ref, c['false_caption'])] = false_score
  scorer = common.TableScorer(table, load_images=True)
  res = aro.evaluate(str(tmp_path), scorer, tasks=('vg_relation', 'vg_attribution'),
                     scores_dir=str(tmp_path / 'scores'))
  assert res.headline['Relation'] == pytest.approx((200 / 3 + 50 + 0) / 3)
  assert res.headline['Attribute'] == pytest.approx((80 + 50) / 2)
  assert res.headline['Avg'] == pytest.approx((res.headline['Relation'] + 65) / 2)
  vgr = res.details['vg_relation']
  assert vgr['per_group']['next to'] == {'n': 2, 'correct': 2, 'acc': 100.0}
  assert sorted(vgr['kept']) == ['holding', 'on', 'wearing']
  assert vgr['micro'] == pytest.approx(100 * 5 / 8)
  vga = res.details['vg_attribution']
  assert vga['per_group']['red_blue']['n'] == 24 and 'red_blue' not in vga['kept']
  # Crops: every image was cut to its case's box.
  sizes = {(ref.path.rsplit('/', 1)[1], ref.box): size for ref, size in scorer.image_sizes.items()}
  assert sizes[('2407.jpg', (0.0, 2.0, 10.0, 12.0))] == (10, 12)
  assert sizes[('2316.jpg', (1.0, 1.0, 20.0, 20.0))] == (20, 20)
  assert scorer.calls == [('itm', 16), ('itm', 2 * len(att_spec))]
  table_rows = res.tables['ARO Relation: per relation (counts logged for filtering)'][1]
  assert ['next to', 2, 2, 100.0, 'no'] in table_rows
  # Score arrays as the ARO repo keeps them, [cases, 1, 2]; its evaluate_scores + the notebook's
  # exclusion (VG-R) give the same macro accuracies.
  rel = np.load(vgr['score_file'])
  att = np.load(vga['score_file'])
  assert rel.shape == (8, 1, 2) and att.shape == (len(att_spec), 1, 2) and rel.dtype == np.float32
  assert vgr['score_file'].endswith('aro/VG_Relation--None--None--nas_jax--1--si2t.npy')
  records = _aro_evaluate_scores(rel, [c['relation_name'] for c in rel_cases], min_count=1)
  kept = [r['Accuracy'] for r in records if r['Group'] not in aro.EXCLUDED_RELATIONS]
  assert 100 * np.mean(kept) == pytest.approx(res.headline['Relation'])
  records = _aro_evaluate_scores(att, [f'{a}_{b}' for a, b, _ in att_spec], min_count=25)
  assert 100 * np.mean([r['Accuracy'] for r in records]) == pytest.approx(res.headline['Attribute'])


def _aro_evaluate_scores(scores, groups, min_count):
  """VG_Relation / VG_Attribution.evaluate_scores of the ARO repo (dataset_zoo/aro_datasets.py),
  transcribed; the two differ only in the smallest group kept (relation: 1, attribution: 25)."""
  preds = np.argmax(np.squeeze(scores, axis=1), axis=-1)
  correct_mask = (preds == 1)
  groups = np.array(groups)
  records = []
  for group in np.unique(groups):
    group_mask = (groups == group)
    if group_mask.sum() < min_count:
      continue
    records.append({'Group': group, 'Accuracy': correct_mask[group_mask].mean(),
                    'Count': group_mask.sum()})
  return records


def test_saturated_probabilities_decide_ties():
  """Default score float32 P(match): ITM logits (0, 20) and (0, 18) both give P = 1.0. VG: the
  false caption ties the true one -> argmax 0 -> wrong. Order: a perturbation ties the original ->
  argmax 0 -> right. With the logit difference both cases are decided by the values (20 > 18)."""
  p = common.itm_probability(np.array([[0, 18], [0, 20]], np.float32))
  assert p.tolist() == [1.0, 1.0]
  assert aro.vg_metric('vg_relation', ['on'], p[None, :])[0] == 0.0
  assert aro.vg_metric('vg_relation', ['on'], np.float32([[18, 20]]))[0] == 100.0
  assert aro.order_metric(np.array([[1.0, 1.0, 0.5, 0.5, 0.5]])) == 100.0
  assert aro.order_metric(np.float32([[18, 20, 0, 0, 0]])) == 0.0


def test_vg_metric_tie_is_wrong():
  acc, info = aro.vg_metric('vg_relation', ['on', 'on'], np.array([[1., 1.], [0., 1.]]))
  assert acc == 50.0 and info['per_group']['on']['correct'] == 1


def test_order_metric_tie_is_right():
  scores = np.array([[3., 1, 1, 1, 1], [2., 2, 0, 0, 0], [1., 2, 0, 0, 0], [0., 0, 0, 0, 0]])
  assert aro.order_metric(scores) == 75.0


def test_fallback_tokenizer_and_pre_caption():
  assert aro.fallback_tokenize("The chef's knife isn't on the tub, sink.") == [
      'The', 'chef', "'s", 'knife', 'is', "n't", 'on', 'the', 'tub', ',', 'sink', '.']
  assert common.aro_pre_caption("A Dog's (big) ball: red!  Next-to it, ok?") == \
      "a dog's big ball red next-to it, ok?"
  assert common.aro_pre_caption('one two three four', max_words=2) == 'one two'
  assert [aro.fallback_tag(t) for t in ['a', 'red', 'dog', 'is', 'running', 'on', 'grass', '.']] == \
      ['OTHER', 'ADJ', 'NOUN', 'OTHER', 'OTHER', 'OTHER', 'NOUN', 'OTHER']


def test_official_perturbations_need_the_extra(monkeypatch):
  """Without spaCy / NLTK (or their models) the official backend stops with one line naming the
  extra and the alternatives; there is no silent fallback."""
  import builtins
  real_import = builtins.__import__

  def no_nlp(name, *args, **kwargs):
    if name in ('spacy', 'nltk'):
      raise ImportError(f'No module named {name!r}')
    return real_import(name, *args, **kwargs)

  aro.official_backend.cache_clear()
  monkeypatch.setattr(builtins, '__import__', no_nlp)
  with pytest.raises(aro.PerturbationBackendError) as e:
    aro.TextShuffler(1)
  msg = str(e.value)
  assert '\n' not in msg and 'spaCy and NLTK' in msg and "pip install 'nas_jax[aro]'" in msg
  assert 'en_core_web_sm' in msg and '--aro_perturbation fallback' in msg and '--aro_order_file' in msg
  aro.official_backend.cache_clear()
  with pytest.raises(ValueError, match='official or fallback'):
    aro.TextShuffler(1, backend='auto')


def test_perturbations_are_token_permutations():
  caption = 'A young girl with a tall hat is blowing out the candle on cake.'  # 15 tokens
  tokens, tags = zip(*[(t, aro.fallback_tag(t)) for t in aro.fallback_tokenize(caption)])
  sh = aro.TextShuffler(1, backend='fallback')
  nouns_adj = sh.shuffle_nouns_and_adj(caption).split(' ')
  allbut = sh.shuffle_allbut_nouns_and_adj(caption).split(' ')
  within = sh.shuffle_within_trigrams(caption).split(' ')
  trigrams = sh.shuffle_trigrams(caption).split(' ')
  for out in (nouns_adj, allbut, within, trigrams):
    assert collections.Counter(out) == collections.Counter(tokens)
  for pos, tag in enumerate(tags):
    if tag == 'OTHER':
      assert nouns_adj[pos] == tokens[pos]
    else:
      assert allbut[pos] == tokens[pos]
  nouns = [t for t, g in zip(tokens, tags) if g == 'NOUN']
  assert sorted(t for t, g in zip(nouns_adj, tags) if g == 'NOUN') == sorted(nouns)
  for i in range(0, len(tokens), 3):
    assert sorted(within[i:i + 3]) == sorted(tokens[i:i + 3])
  grams = {tuple(tokens[i:i + 3]) for i in range(0, len(tokens), 3)}
  assert len(tokens) == 15 and {tuple(trigrams[i:i + 3]) for i in range(0, 15, 3)} == grams
  assert within != list(tokens) and trigrams != list(tokens)
  again = aro.TextShuffler(1, backend='fallback').options(caption)
  assert again == aro.TextShuffler(1, backend='fallback').options(caption)
  assert again != aro.TextShuffler(2, backend='fallback').options(caption)
  assert again[0] == common.aro_pre_caption(caption, 30)


def test_order_precomputed_files_mean_over_seeds(samples_dir, tmp_path):
  """Two files in the ARO test_cases format. Seed A: original wins, ties with a perturbation
  (right), loses -> 2/3. Seed B: all three right -> 3/3. Mean = 83.33."""
  root, records = bench_data.coco(samples_dir, tmp_path, 'coco_karpathy_test.json')
  img = [r['image'] for r in records[:3]]
  opts = [[f'caption {k} option {j}' for j in range(5)] for k in range(3)]
  cases = [{'image': i, 'caption_options': o} for i, o in zip(img, opts)]
  (tmp_path / 'a.json').write_text(json.dumps(cases))
  (tmp_path / 'b.json').write_text(json.dumps(cases[::-1]))
  scores = {'a': [[5, 1, 1, 1, 1], [2, 2, 1, 1, 1], [1, 3, 1, 1, 1]],
            'b': [[5, 1, 1, 1, 1], [2, 2, 1, 1, 1], [4, 3, 1, 1, 1]]}
  state = {'seed': 'a'}

  def itm(ref, text):
    k, j = int(text.split()[1]), int(text.split()[3])
    return float(scores[state['seed']][k][j])

  scorer = common.TableScorer(itm, load_images=True)
  # Run each file separately so the fake scorer knows which seed it is scoring.
  a, _ = aro.evaluate_order('coco_order', str(tmp_path), scorer, order_files=[str(tmp_path / 'a.json')])
  state['seed'] = 'b'
  b, _ = aro.evaluate_order('coco_order', str(tmp_path), scorer, order_files=[str(tmp_path / 'b.json')])
  assert (a, b) == pytest.approx((200 / 3, 100.0))
  state['seed'] = 'a'
  mean, info = aro.evaluate_order('coco_order', str(tmp_path), common.TableScorer(itm),
                                  order_files=[str(tmp_path / 'a.json'), str(tmp_path / 'a.json')])
  assert mean == pytest.approx(200 / 3) and len(info['runs']) == 1  # Same name: one run.


def test_order_generated_from_karpathy_json(samples_dir, tmp_path):
  """Originals score 1, perturbations 0 -> every case right; the reverse -> right only where all
  four perturbations equal the original (ties resolve to index 0)."""
  root, records = bench_data.coco(samples_dir, tmp_path, 'coco_karpathy_test.json')
  originals = {common.aro_pre_caption(c, 30) for r in records for c in r['caption']}
  res = aro.evaluate(str(tmp_path), common.TableScorer(lambda ref, t: float(t in originals)),
                     tasks=('coco_order',), seeds=(1, 2), backend='fallback',
                     scores_dir=str(tmp_path / 'scores'))
  assert res.headline == {'COCO-Order (fallback tagger)': 100.0}  # The fallback is named.
  assert 'APPROXIMATE' in res.protocol['COCO-Order (fallback tagger) perturbations']
  runs = res.details['coco_order']['runs']
  assert set(runs) == {'seed 1', 'seed 2'} and runs['seed 1']['cases'] == 31
  assert 'fallback' in runs['seed 1']['perturbations']
  # Per seed: the score array [31, 1, 5] and the generated cases, reusable as --aro_order_file.
  assert np.load(runs['seed 2']['score_file']).shape == (31, 1, 5)
  assert runs['seed 2']['score_file'].endswith('COCO_Order--None--None--nas_jax--2--si2t.npy')
  again, _ = aro.evaluate_order('coco_order', str(tmp_path),
                                common.TableScorer(lambda ref, t: float(t in originals)),
                                order_files=[runs['seed 2']['cases_file']])
  assert again == 100.0
  cases, _ = aro.order_cases(records, 1, 'fallback')
  unchanged = sum(all(o == c['caption_options'][0] for o in c['caption_options']) for c in cases)
  value, _ = aro.evaluate_order('coco_order', str(tmp_path),
                                common.TableScorer(lambda ref, t: float(t not in originals)),
                                seeds=(1,), backend='fallback')
  assert value == pytest.approx(100 * unchanged / 31)


def test_missing_data_errors(tmp_path):
  with pytest.raises(common.BenchmarkDataError) as e:
    aro.evaluate(str(tmp_path), common.TableScorer(), tasks=('vg_relation',))
  msg = str(e.value)
  assert '[aro/vg_relation]' in msg and str(tmp_path / 'aro' / 'visual_genome_relation.json') in msg
  assert 'vision-language-models-are-bows' in msg
  with pytest.raises(common.BenchmarkDataError) as e:
    aro.evaluate(str(tmp_path), common.TableScorer(), tasks=('flickr_order',))
  assert '[aro/flickr_order]' in str(e.value) and 'flickr30k_test.json' in str(e.value)
