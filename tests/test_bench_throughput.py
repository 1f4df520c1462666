"""The evaluation throughput tool: the benchmarks' work counted by hand, the projection arithmetic,
and the CLI on the tiny config (CPU)."""

import json

import pytest

from nas_jax.benchmarks import throughput

from step_utils import ROOT


def test_workloads_from_the_official_counts():
  """Pairs each benchmark scores, by hand: VALSE 7,702 valid pairs x 2; VG-R 23,937 x 2; VG-A
  28,748 x 2; COCO-Order 5 seeds x 25,010 captions x 5 options; Flickr30k-Order 5 x 5,000 x 5;
  Winoground 400 x 4; COCO 5K (5,000 + 25,010) x 256; Flickr 1K (1,000 + 5,000) x 128."""
  w = throughput.workloads()
  pairs = {k: v.pairs for k, v in w.items()}
  assert pairs == {'VALSE': 15404, 'ARO VG-Relation': 47874, 'ARO VG-Attribution': 57496,
                   'ARO COCO-Order': 625250, 'ARO Flickr30k-Order': 125000, 'Winoground': 1600,
                   'COCO 5K retrieval': 7682560, 'Flickr30K 1K retrieval': 768000}
  assert w['COCO 5K retrieval'].images == 10000 and w['COCO 5K retrieval'].texts == 25010
  assert w['ARO COCO-Order'].images == 25000 and w['Winoground'].images == 800
  assert {v.max_tokens for k, v in w.items() if 'retrieval' in k} == {30}
  assert throughput.workloads(seeds=1)['ARO COCO-Order'].pairs == 125050


def test_projection_arithmetic():
  work = throughput.Workload(images=1000, texts=500, pairs=20000, max_tokens=30)
  rates = {'images_per_s': 500.0, 'texts_per_s': {40: 1000.0, 30: 2500.0},
           'pairs_per_s': {40: 2000.0, 30: 4000.0}, 'host_images_per_s': 100.0}
  device, host = throughput.projected_seconds(work, rates)
  assert device == pytest.approx(2 + 0.2 + 5) and host == pytest.approx(10)
  table = throughput.projection_table(rates, {'x': work})
  assert '| x | 1,000 | 500 | 20,000 | 30 | 7.2 | 10.0 | **10.0 s** |' in table
  assert '| **all of the above** | | | 20,000 |' in table
  assert throughput._duration(7300) == '2.03 h' and throughput._duration(150) == '2.5 min'


def test_cli_on_tiny_config(tmp_path, capsys):
  out = tmp_path / 'rates.jsonl'
  rc = throughput.main(['--config', str(ROOT / 'configs/demo.py') + ':tiny', '--batch', '8',
                        '--max_tokens', '16,12', '--images', '16', '--pairs_per_image', '2',
                        '--host_images', '8', '--json_out', str(out)])
  assert rc == 0
  printed = capsys.readouterr().out
  assert '| batch | tokens | ITM pairs/s |' in printed and '| COCO 5K retrieval | 10,000 |' in printed
  assert '**all of the above**' in printed
  row = json.loads(out.read_text())
  assert [(r['batch'], r['max_tokens']) for r in row['rows']] == [(8, 16), (8, 12)]
  assert row['best'] == row['rows'][0]
  assert all(r['pairs_per_s'] > 0 and r['images_per_s'] > 0 for r in row['rows'])
  assert set(row['rates']['pairs_per_s']) == {'16', '12'} and row['rates']['host_images_per_s'] > 0
  assert throughput.main(['--config', str(tmp_path / 'none.py')]) == 2
  assert 'not found' in capsys.readouterr().err
