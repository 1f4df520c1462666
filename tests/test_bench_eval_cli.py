"""`python -m nas_jax.eval`: argument handling, one-line errors (missing data, checkpoint,
vocabulary, ARO extra), and an end-to-end run on a tiny checkpoint with a BERT vocabulary (synthetic
suite + Winoground fixture in one call, per-example score files), which training's evaluation
(`train.run_evals`, the same registry) matches."""

import json
import types

import jax
import jax.numpy as jnp
import pytest

from nas_jax import eval as nas_eval

import bench_data
from step_utils import tiny_config


def test_missing_data_stops_before_loading_the_model(tmp_path, capsys):
  rc = nas_eval.main(['--bench', 'valse,retrieval_flickr', '--checkpoint', str(tmp_path / 'none'),
                      '--data_dir', str(tmp_path)])
  err = capsys.readouterr().err
  assert rc == 2 and err.count('\n') == 1  # One line, saying what to do.
  assert '[valse]' in err and str(tmp_path / 'valse' / 'existence.json') in err
  assert 'Heidelberg-NLP/VALSE' in err and 'python -m nas_jax.eval --help' in err
  (tmp_path / 'aro').mkdir()
  rc = nas_eval.main(['--bench', 'aro', '--checkpoint', 'x', '--data_dir', str(tmp_path),
                      '--aro_tasks', 'coco_order'])
  err = capsys.readouterr().err
  assert rc == 2 and '[aro/coco_order' in err and str(tmp_path / 'coco' / 'coco_test.json') in err
  assert err.count('\n') == 1 and 'pass --aro_tasks (now: coco_order)' in err


def test_aro_order_without_spacy_stops_before_loading(tmp_path, capsys, monkeypatch):
  """The official perturbations are the default: without spaCy / NLTK the run stops at once with
  the install line (no silent fallback); --aro_perturbation fallback or precomputed cases pass."""
  from nas_jax.benchmarks import aro

  def missing():
    raise aro.PerturbationBackendError(f'the ARO Order perturbations need spaCy: {aro.INSTALL_HINT}')

  monkeypatch.setattr(aro, 'official_backend', missing)
  (tmp_path / 'coco').mkdir()
  (tmp_path / 'coco' / 'coco_test.json').write_text('[]')
  base = ['--bench', 'aro', '--checkpoint', str(tmp_path / 'none'), '--data_dir', str(tmp_path),
          '--aro_tasks', 'coco_order']
  assert nas_eval.main(base) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and "pip install 'nas_jax[aro]'" in err
  # Past the data checks, the missing checkpoint is the next one-line error.
  assert nas_eval.main(base + ['--aro_perturbation', 'fallback']) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and f'--checkpoint {tmp_path / "none"} does not exist' in err


def test_argument_errors(capsys):
  with pytest.raises(SystemExit):
    nas_eval.parse_args(['--bench', 'vqa', '--checkpoint', 'x'])
  assert 'unknown benchmark' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    nas_eval.parse_args(['--bench', 'aro', '--checkpoint', 'x'])
  assert '--data_dir is required' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    nas_eval.parse_args(['--bench', 'aro', '--checkpoint', 'x', '--data_dir', 'd',
                         '--aro_tasks', 'vg_relation,coco'])
  assert "--aro_tasks: unknown task(s) ['coco']" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    nas_eval.parse_args(['--bench', 'aro', '--checkpoint', 'x', '--data_dir', 'd',
                         '--aro_perturbation', 'auto'])
  assert "invalid choice: 'auto'" in capsys.readouterr().err
  args = nas_eval.parse_args(['--bench', 'synthetic', '--bench', 'aro,winoground', '--checkpoint', 'x',
                              '--data_dir', 'd', '--aro_order_file', 'coco_order=/a.json'])
  assert args.bench == ['synthetic', 'aro', 'winoground']
  assert args.aro_order_file == {'coco_order': ['/a.json']} and args.aro_seeds == [1, 2, 3, 4, 5]


def test_unknown_word_share(minilm_dir):
  from nas_jax.benchmarks import registry
  from nas_jax.data.text import load_tokenizer
  assert registry.unknown_word_share(load_tokenizer(str(minilm_dir))) == 0.0
  assert registry.unknown_word_share(load_tokenizer('synthetic')) > 0.5


def _save_tiny(tmp_path, config):
  from nas_jax.checkpoint import Checkpointer
  from nas_jax.models.nas import NASModel
  model = NASModel(config=config.model)
  res = config.model.vit.image_size
  ids = jnp.zeros((1, 8), jnp.int32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)), ids,
                                  jnp.ones_like(ids))
  params = dict(variables['params'], temp=jnp.float32(0.07))
  ckpt = Checkpointer(str(tmp_path / 'run'), async_save=False)
  ckpt.save(1, {'params': params, 'batch_stats': dict(variables['batch_stats'])}, config)
  ckpt.close()
  return model, params, dict(variables['batch_stats'])


def test_end_to_end_tiny_checkpoint(tmp_path, samples_dir, minilm_dir, capsys):
  """The tiny model with a real BERT uncased vocabulary (30,522 WordPieces, from the MiniLM
  package): English benchmarks need one."""
  c = tiny_config(**{'model.bert.vocab_size': 30522, 'data.vocab': str(minilm_dir)})
  model, params, batch_stats = _save_tiny(tmp_path, c)

  wino = bench_data.winoground(samples_dir, tmp_path / 'data')

  out = tmp_path / 'out'
  rc = nas_eval.main(['--bench', 'synthetic,winoground', '--checkpoint', str(tmp_path / 'run'),
                      '--data_dir', str(tmp_path / 'data'), '--out', str(out), '--synthetic_n', '4',
                      '--batch_size', '8', '--compare', 'paper'])
  assert rc == 0
  captured = capsys.readouterr()
  printed = captured.out
  assert '## synthetic' in printed and '## winoground' in printed
  assert 'paper: NAS(NTVA) coco (2.9M) [T2]' in printed
  assert '_CHECKPOINT_METADATA' not in captured.err  # Orbax's warning is silenced.
  data = json.loads((out / 'results.json').read_text())
  syn = data['results']['synthetic']
  assert syn['details']['metrics']['num_cases'] > 0 and '| Attribute swap' in syn['tables']['Synthetic suite']
  assert 0.0 <= syn['headline']['Attribute'] <= 100.0 and 'Wino group' in syn['headline']
  assert syn['protocol']['score'] == 'itm'  # The synthetic suite keeps the logit difference.
  w = data['results']['winoground']
  assert w['details']['num_examples'] == 14 and set(w['headline']) == {'Text', 'Image', 'Group'}
  assert w['protocol']['score'] == 'itm_p' and w['protocol']['max_tokens'] == 40
  assert data['meta']['use_dictionary'] is True
  assert '| ours |' in (out / 'results.md').read_text()
  # Per-example scores in the official format, next to the results.
  lines = (out / 'scores' / 'winoground.jsonl').read_text().splitlines()
  assert w['details']['score_file'] == str(out / 'scores' / 'winoground.jsonl') and len(lines) == 56
  assert json.loads(lines[3])['label'] == '0_c1_i1' and 0.0 <= json.loads(lines[3])['score'] <= 1.0

  # Training's evaluation (train.run_evals, benchmarks from config.eval.benches) on the same
  # parameters: the same numbers, as metrics eval/..., eval.json, eval.md and the printed table.
  from nas_jax import train
  from nas_jax.benchmarks.model_scorer import data_mesh
  from nas_jax.data.text import load_tokenizer
  from nas_jax.metrics_writer import MetricWriter
  ct = tiny_config(**{'model.bert.vocab_size': 30522, 'data.vocab': str(minilm_dir),
                      'eval.benches': ('synthetic', 'winoground'),
                      'eval.data_dir': str(tmp_path / 'data'), 'data.synthetic.bench_per_subset': 4})
  workdir = tmp_path / 'train'
  writer = MetricWriter(str(workdir), tensorboard=False)
  metrics = train.run_evals(ct, model, types.SimpleNamespace(params=params, batch_stats=batch_stats),
                            data_mesh(), load_tokenizer(str(minilm_dir)), writer, 7, str(workdir),
                            final=True)
  writer.close()
  for key in ('attribute', 'winoground_group', 'r_mean', 'num_cases'):
    assert metrics[key] == pytest.approx(syn['details']['metrics'][key])
  for column in ('Text', 'Image', 'Group'):
    assert metrics[f'winoground/{column}'] == pytest.approx(w['headline'][column])
  assert json.loads((workdir / 'eval.json').read_text()) == pytest.approx({'step': 7, **metrics})
  md = (workdir / 'eval.md').read_text()
  assert md.startswith(syn['tables']['Synthetic suite'] + '\n\n## winoground\n')
  row = json.loads((workdir / 'metrics.jsonl').read_text().splitlines()[-1])
  assert row['step'] == 7 and row['eval/winoground/Group'] == metrics['winoground/Group']
  assert row['eval/attribute'] == metrics['attribute']
  assert f'Evaluation after 7 steps ({workdir}):\n\n{md}' in capsys.readouterr().out

  # A vocabulary that is not BERT's is refused by content, before any scoring, in one line.
  rc = nas_eval.main(['--bench', 'winoground', '--checkpoint', str(tmp_path / 'run'),
                      '--data_dir', str(tmp_path / 'data'), '--vocab', 'synthetic', '--out', str(out)])
  err = capsys.readouterr().err
  assert rc == 2 and err.count('\n') == 1
  assert 'to [UNK]' in err and "pass --vocab with bert-base-uncased's vocab.txt" in err
  # One of the right content but another size does not fit the model's embedding table.
  vocab = tmp_path / 'vocab.txt'
  vocab.write_text((minilm_dir / 'vocab.txt').read_text().rstrip('\n') + '\n[extra]\n')
  rc = nas_eval.main(['--bench', 'synthetic', '--checkpoint', str(tmp_path / 'run'),
                      '--vocab', str(vocab), '--out', str(out)])
  err = capsys.readouterr().err
  assert rc == 2 and 'has 30523 tokens but the model has 30522' in err and err.count('\n') == 1
  # An image that disappeared after the checks: one line naming it, not a traceback.
  (wino / 'images' / 'ex_3_img_1.png').unlink()
  rc = nas_eval.main(['--bench', 'winoground', '--checkpoint', str(tmp_path / 'run'),
                      '--data_dir', str(tmp_path / 'data'), '--out', str(out)])
  err = capsys.readouterr().err
  assert rc == 2 and err.count('\n') == 1 and 'ex_3_img_1.png does not exist' in err
  # A missing vocabulary file: one line too.
  rc = nas_eval.main(['--bench', 'synthetic', '--checkpoint', str(tmp_path / 'run'),
                      '--vocab', str(tmp_path / 'nope.txt'), '--out', str(out)])
  err = capsys.readouterr().err
  assert rc == 2 and 'nope.txt' in err and err.count('\n') == 1


def test_synthetic_vocabulary_checkpoint_refused_for_english(tmp_path, capsys):
  """The demo's checkpoint (data.vocab = 'synthetic'): English benchmarks stop with the reason;
  the synthetic suite still runs on it."""
  _save_tiny(tmp_path, tiny_config())
  wino = tmp_path / 'data' / 'winoground'
  (wino / 'images').mkdir(parents=True)
  (wino / 'examples.jsonl').write_text('')
  rc = nas_eval.main(['--bench', 'winoground', '--checkpoint', str(tmp_path / 'run'),
                      '--data_dir', str(tmp_path / 'data')])
  err = capsys.readouterr().err
  assert rc == 2 and err.count('\n') == 1
  assert "trained on the synthetic world's vocabulary" in err and 'run --bench synthetic only' in err
