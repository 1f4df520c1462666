"""The benchmark registry: defaults and overrides of the score and token limit, file checks, the
benchmarks a training config asks for (and its one-line errors), the training-log summary."""

import json

import pytest

from nas_jax.benchmarks import common, registry
from nas_jax.data.text import load_tokenizer

import bench_data
from step_utils import tiny_config


def test_every_benchmark_has_its_defaults():
  assert registry.BENCHMARKS == ('valse', 'aro', 'winoground', 'retrieval_coco', 'retrieval_flickr',
                                 'synthetic')
  defaults = {n: (e.score, e.max_tokens) for n, e in registry.EVALUATORS.items()}
  assert defaults == {'valse': ('itm_p', 40), 'aro': ('itm_p', 40), 'winoground': ('itm_p', 40),
                      'retrieval_coco': ('itm_l1', 30), 'retrieval_flickr': ('itm_l1', 30),
                      'synthetic': ('itm', None)}  # docs/EVALUATION.md, Pair scores.
  assert registry.english(registry.BENCHMARKS) == list(registry.BENCHMARKS[:-1])
  with pytest.raises(ValueError, match="unknown benchmark 'vqa': use valse, aro"):
    registry.check('vqa', registry.Options())


def test_check_and_run_on_sample_folders(samples_dir, tmp_path):
  """Folders built from the samples pass the checks; a missing file is named. Winoground through
  the registry: its official score and token limit by default, the Options' when given."""
  bench_data.valse(samples_dir, tmp_path)
  root = bench_data.winoground(samples_dir, tmp_path)
  bench_data.coco(samples_dir, tmp_path)
  options = registry.Options(data_dir=str(tmp_path))
  for name in ('valse', 'winoground', 'retrieval_coco', 'synthetic'):
    registry.check(name, options)
  with pytest.raises(common.BenchmarkDataError, match=r'\[retrieval_flickr\].*flickr30k_test.json'):
    registry.check('retrieval_flickr', options)
  (tmp_path / 'valse' / 'relations.json').unlink()
  with pytest.raises(common.BenchmarkDataError, match=r'\[valse\].*relations.json'):
    registry.check('valse', options)

  # Caption k scores 1 with image k, 0 with the other: every example is right under any score.
  itm = {}
  for line in (root / 'examples.jsonl').read_text().splitlines():
    e = json.loads(line)
    for c in (0, 1):
      for i in (0, 1):
        ref = common.ImageRef(str(root / 'images' / f'{e[f"image_{i}"]}.png'))
        itm[(ref, common.albef_pre_caption(e[f'caption_{c}'], 40))] = float(c == i)
  res = registry.run('winoground', common.TableScorer(itm), options)
  assert res.name == 'winoground' and res.headline == {'Text': 100.0, 'Image': 100.0, 'Group': 100.0}
  assert (res.protocol['score'], res.protocol['max_tokens']) == ('itm_p', 40)
  res = registry.run('winoground', common.TableScorer(itm),
                     registry.Options(data_dir=str(tmp_path), score='itm', max_tokens=12))
  assert (res.protocol['score'], res.protocol['max_tokens']) == ('itm', 12)
  with pytest.raises(ValueError, match="unknown score mode 'p'"):
    registry.run('winoground', common.TableScorer(itm), registry.Options(str(tmp_path), score='p'))


def test_training_plan(samples_dir, tmp_path, minilm_dir, monkeypatch):
  synthetic_vocab, bert_vocab = load_tokenizer('synthetic'), load_tokenizer(str(minilm_dir))
  # Default: the synthetic suite on synthetic data, in the world the model trains on; none on
  # real data.
  names, options = registry.training_plan(tiny_config(), synthetic_vocab)
  assert names == ('synthetic',) and options.score == '' and options.data_dir == ''
  assert options.synthetic == registry.SyntheticWorld(n_per_subset=200, seed=0, image_size=32,
                                                      max_objects=3, k_test=8)
  assert registry.training_plan(tiny_config(**{'data.source': 'albef_json'}), bert_vocab)[0] == ()

  def plan(tokenizer=bert_vocab, **eval_keys):
    return registry.training_plan(tiny_config(**{f'eval.{k}': v for k, v in eval_keys.items()}),
                                  tokenizer)

  with pytest.raises(ValueError, match=r"config.eval.benches: unknown benchmark\(s\) \['vqa'\]"):
    plan(benches=('synthetic', 'vqa'))
  with pytest.raises(ValueError, match='has winoground: set config.eval.data_dir'):
    plan(benches=('winoground',))
  with pytest.raises(ValueError, match="config.eval.score='p': use one of itm_p"):
    plan(score='p')
  with pytest.raises(common.BenchmarkDataError, match=str(tmp_path / 'winoground' / 'examples')):
    plan(benches=('winoground',), data_dir=str(tmp_path))
  bench_data.winoground(samples_dir, tmp_path)
  with pytest.raises(ValueError, match=r"to \[UNK\], so winoground would be scored on \[UNK\]s: "
                                       r"train with bert-base-uncased's vocabulary"):
    plan(synthetic_vocab, benches=('synthetic', 'winoground'), data_dir=str(tmp_path))
  names, options = plan(benches=('winoground', 'synthetic', 'winoground'), data_dir=str(tmp_path),
                        score='itm')
  assert names == ('winoground', 'synthetic') and options.score == 'itm'
  assert options.data_dir == str(tmp_path)
  # ARO's Order tasks without spaCy: a ValueError (train's one-line errors) saying what to do.
  from nas_jax.benchmarks import aro

  def missing():
    raise aro.PerturbationBackendError('the ARO Order perturbations need spaCy')

  monkeypatch.setattr(aro, 'official_backend', missing)
  (tmp_path / 'aro' / 'images').mkdir(parents=True)
  for name in aro.VG_FILES.values():
    (tmp_path / 'aro' / name).write_text('[]')
  bench_data.coco(samples_dir, tmp_path)
  with pytest.raises(ValueError, match='need spaCy; or leave aro out of config.eval.benches'):
    plan(benches=('aro',), data_dir=str(tmp_path))


def test_summary_for_the_training_logs():
  """The synthetic suite alone gives its table and metrics unchanged (eval.md / eval.json as they
  always were); another benchmark adds '<name>/<column>' metrics and its headline table."""
  syn = common.BenchResult('synthetic', {'Attribute': 75.0}, tables={'Synthetic suite': '| t |'},
                           details={'metrics': {'attribute': 75.0, 'r_mean': 10.0}})
  wino = common.BenchResult('winoground', {'Text': 25.0, 'Group': 12.5},
                            tables={'Per tag': '| x |'}, protocol={'score': 'itm_p'})
  assert registry.summary([syn]) == ({'attribute': 75.0, 'r_mean': 10.0}, '| t |')
  metrics, md = registry.summary([syn, wino])
  assert metrics == {'attribute': 75.0, 'r_mean': 10.0, 'winoground/Text': 25.0,
                     'winoground/Group': 12.5}
  assert md == ('| t |\n\n## winoground\n\n| model | Text | Group |\n|---|---|---|\n'
                '| ours | 25.00 | 12.50 |\n\nProtocol: score = itm_p')
