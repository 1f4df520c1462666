"""Markdown/JSON report and the paper's tables carried as data."""

import json

import pytest

from nas_jax.benchmarks import common, paper_tables, report


def _wino():
  return common.BenchResult('winoground', {'Text': 29.25, 'Image': 15.5, 'Group': 11.0},
                            tables={'subsets': (['subset', 'n'], [['collapsed_tag=Both', 26]])},
                            details={'correct': {'text': 117}}, protocol={'score': 'itm'})


def test_paper_tables_match_the_paper():
  assert paper_tables.TABLE2['NAS(NTVA) coco (2.9M)'] == dict(
      Relation=93.2, Attribute=93.4, Avg=93.3, Text=35.3, Image=22.0, Group=18.5)
  assert paper_tables.TABLE3['ALBEF coco']['Avg 7-col'] == 71.5
  for name, row in paper_tables.TABLE3.items():  # The paper's Avg is the 7-column mean.
    cols = [v for k, v in row.items() if k != 'Avg 7-col']
    assert sum(cols) / 7 == pytest.approx(row['Avg 7-col'], abs=0.051), name
  assert paper_tables.TABLE9_COCO['NAS(NVA) (2.9M)']['IR@1'] == 52.7
  assert paper_tables.TABLE10_COCO['NAS(NVA)']['TR@10'] == 96.4
  rows = paper_tables.rows_for('aro')
  assert set(rows) == {'paper: ALBEF coco (4M) [T2]', 'paper: NAS(NTA) coco (2.9M) [T2]',
                       'paper: NAS(NVA) coco (2.9M) [T2]', 'paper: NAS(NTVA) coco (2.9M) [T2]'}
  assert rows['paper: ALBEF coco (4M) [T2]'] == {'Relation': 60.5, 'Attribute': 88.5, 'Avg': 74.5}
  assert len(paper_tables.rows_for('retrieval_coco')) == 2 + 4  # T9 ALBEF/NAS + T10 ALBEF/NAS x3.
  assert paper_tables.rows_for('synthetic') == {}


def test_markdown_with_and_without_paper_rows():
  md = report.benchmark_markdown(_wino())
  assert '| model | Text | Image | Group |' in md and '| ours | 29.25 | 15.50 | 11.00 |' in md
  assert 'paper:' not in md and 'Protocol: score = itm' in md and '| collapsed_tag=Both | 26 |' in md
  md = report.benchmark_markdown(_wino(), compare_paper=True)
  assert '| paper: NAS(NTVA) coco (2.9M) [T2] | 35.30 | 22.00 | 18.50 |' in md
  valse = common.BenchResult('valse', {'Existence': 70.0, 'Avg': 68.0, 'Avg 7-col': 71.0})
  md = report.benchmark_markdown(valse, compare_paper=True)
  assert '| paper: ALBEF coco [T3] | 75.40 | – | 71.50 |' in md  # Paper Avg sits under 7-col.


def test_write_json_has_every_number(tmp_path):
  md_path, json_path = report.write([_wino()], str(tmp_path / 'out'), meta={'checkpoint': 'x'},
                                    compare_paper=True)
  data = json.loads(open(json_path).read())
  assert data['results']['winoground']['headline']['Text'] == 29.25
  assert data['results']['winoground']['details'] == {'correct': {'text': 117}}
  assert data['meta'] == {'checkpoint': 'x'}
  assert data['paper']['winoground']['paper: ALBEF coco (4M) [T2]']['Group'] == 11.0
  assert 'checkpoint: x' in open(md_path).read()
