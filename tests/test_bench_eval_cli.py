"""`python -m nas_jax.eval`: argument handling, missing data, and an end-to-end run on a tiny
checkpoint (synthetic suite + Winoground fixture in one call)."""

import json

import jax
import jax.numpy as jnp
import pytest
from PIL import Image

from nas_jax import eval as nas_eval

from step_utils import tiny_config


def test_missing_data_stops_before_loading_the_model(tmp_path, capsys):
  rc = nas_eval.main(['--bench', 'valse,retrieval_flickr', '--checkpoint', str(tmp_path / 'none'),
                      '--data_dir', str(tmp_path)])
  err = capsys.readouterr().err
  assert rc == 2
  assert '[valse]' in err and str(tmp_path / 'valse' / 'existence.json') in err
  assert 'Heidelberg-NLP/VALSE' in err
  (tmp_path / 'aro').mkdir()
  rc = nas_eval.main(['--bench', 'aro', '--checkpoint', 'x', '--data_dir', str(tmp_path),
                      '--aro_tasks', 'coco_order'])
  err = capsys.readouterr().err
  assert rc == 2 and '[aro/coco_order' in err and str(tmp_path / 'coco' / 'coco_test.json') in err


def test_argument_errors(capsys):
  with pytest.raises(SystemExit):
    nas_eval.parse_args(['--bench', 'vqa', '--checkpoint', 'x'])
  assert 'unknown benchmark' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    nas_eval.parse_args(['--bench', 'aro', '--checkpoint', 'x'])
  assert '--data_dir is required' in capsys.readouterr().err
  args = nas_eval.parse_args(['--bench', 'synthetic', '--bench', 'aro,winoground', '--checkpoint', 'x',
                              '--data_dir', 'd', '--aro_order_file', 'coco_order=/a.json'])
  assert args.bench == ['synthetic', 'aro', 'winoground']
  assert args.aro_order_file == {'coco_order': ['/a.json']} and args.aro_seeds == [1, 2, 3, 4, 5]


def test_end_to_end_tiny_checkpoint(tmp_path, samples_dir, capsys):
  from nas_jax.checkpoint import Checkpointer
  from nas_jax.models.nas import NASModel

  c = tiny_config()
  model = NASModel(config=c.model)
  res = c.model.vit.image_size
  ids = jnp.zeros((1, 8), jnp.int32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)), ids,
                                  jnp.ones_like(ids))
  params = dict(variables['params'], temp=jnp.float32(0.07))
  ckpt = Checkpointer(str(tmp_path / 'run'), async_save=False)
  ckpt.save(1, {'params': params, 'batch_stats': dict(variables['batch_stats'])}, c)
  ckpt.close()

  wino = tmp_path / 'data' / 'winoground'
  (wino / 'images').mkdir(parents=True)
  text = (samples_dir / 'Winoground' / 'examples.sample.jsonl').read_text()
  (wino / 'examples.jsonl').write_text(text)
  for line in text.splitlines():
    e = json.loads(line)
    for k in (0, 1):
      Image.new('RGBA', (20, 12), (e['id'] * 7 % 256, 40 * k, 9, 255)).save(wino / 'images' / f'{e[f"image_{k}"]}.png')

  out = tmp_path / 'out'
  rc = nas_eval.main(['--bench', 'synthetic,winoground', '--checkpoint', str(tmp_path / 'run'),
                      '--data_dir', str(tmp_path / 'data'), '--out', str(out), '--synthetic_n', '4',
                      '--batch_size', '8', '--compare', 'paper'])
  assert rc == 0
  printed = capsys.readouterr().out
  assert '## synthetic' in printed and '## winoground' in printed
  assert 'paper: NAS(NTVA) coco (2.9M) [T2]' in printed
  data = json.loads((out / 'results.json').read_text())
  syn = data['results']['synthetic']
  assert syn['details']['metrics']['num_cases'] > 0 and '| Attribute swap' in syn['tables']['Synthetic suite']
  assert 0.0 <= syn['headline']['Attribute'] <= 100.0 and 'Wino group' in syn['headline']
  w = data['results']['winoground']
  assert w['details']['num_examples'] == 14 and set(w['headline']) == {'Text', 'Image', 'Group'}
  assert w['protocol']['score'] == 'itm' and w['protocol']['max_tokens'] == 40
  assert data['meta']['use_dictionary'] is True
  assert '| ours |' in (out / 'results.md').read_text()

  # The in-training entry point (train.run_evals' arguments): same metrics from params directly.
  from nas_jax.benchmarks.model_scorer import data_mesh
  from nas_jax.data.text import load_tokenizer
  metrics, table = nas_eval.evaluate_synthetic(c, model, params, dict(variables['batch_stats']),
                                               data_mesh(), load_tokenizer('synthetic'),
                                               n_per_subset=4)
  for key in ('attribute', 'winoground_group', 'r_mean'):
    assert metrics[key] == pytest.approx(syn['details']['metrics'][key])
  assert table == syn['tables']['Synthetic suite']

  # A vocabulary that does not fit the model's embedding table is refused.
  vocab = tmp_path / 'vocab.txt'
  vocab.write_text('\n'.join(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'a']))
  rc = nas_eval.main(['--bench', 'synthetic', '--checkpoint', str(tmp_path / 'run'),
                      '--vocab', str(vocab), '--out', str(out)])
  assert rc == 2 and 'has 6 tokens but the model has' in capsys.readouterr().err
