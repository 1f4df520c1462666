"""The NAS paper's reported numbers (arXiv 2412.10029), to print beside our results.

Figures as printed in Tables 2, 3, 9 and 10 (percent). Keys of each row are the headline column
names of our benchmark results (`BenchResult.headline`), so a report can line them up; a column the
paper does not report is absent. VALSE: the paper's "Avg" equals the mean of its 7 columns, so it is
filed under 'Avg 7-col' (our 'Avg' is the 11-instrument mean).
"""

from __future__ import annotations

# Table 2: ARO Relation / Attribute (+ their mean) and Winoground text / image / group.
TABLE2 = {
    'Random chance': dict(Relation=50.0, Attribute=50.0, Avg=50.0, Text=25.0, Image=25.0, Group=16.7),
    'CLIP (400M)': dict(Relation=59.0, Attribute=62.0, Avg=60.5, Text=30.8, Image=10.5, Group=8.0),
    'ALBEF coco (4M)': dict(Relation=60.5, Attribute=88.5, Avg=74.5, Text=27.5, Image=15.8, Group=11.0),
    'NegCLIP (400M)': dict(Relation=80.2, Attribute=70.5, Avg=75.4, Text=29.5, Image=10.5, Group=8.0),
    'NAS(NTA) coco (2.9M)': dict(Relation=93.1, Attribute=91.7, Avg=92.4, Text=32.3, Image=17.3, Group=13.0),
    'NAS(NVA) coco (2.9M)': dict(Relation=67.8, Attribute=89.8, Avg=78.8, Text=34.5, Image=19.0, Group=14.0),
    'NAS(NTVA) coco (2.9M)': dict(Relation=93.2, Attribute=93.4, Avg=93.3, Text=35.3, Image=22.0, Group=18.5),
}

_VALSE_COLS = ('Existence', 'Plurality', 'Counting', 'Sp.rel.', 'Action', 'Coreference', 'Foil-it!',
               'Avg 7-col')


def _valse(*values: float) -> dict[str, float]:
  return dict(zip(_VALSE_COLS, values))


# Table 3: VALSE columns and Avg (= mean of the 7 columns).
TABLE3 = {
    'CLIP': _valse(66.9, 56.2, 60.7, 64.3, 72.1, 50.9, 88.8, 65.7),
    'ALBEF coco': _valse(75.4, 76.5, 65.8, 74.4, 67.5, 48.0, 92.6, 71.5),
    'XVLM coco': _valse(83.0, 75.6, 67.5, 70.2, 71.2, 48.0, 94.8, 72.9),
    'NAS(NTA) coco': _valse(85.5, 75.9, 66.8, 71.6, 75.5, 45.4, 93.7, 73.5),
    'NAS(NVA) coco': _valse(85.1, 77.6, 66.7, 72.1, 72.7, 48.8, 94.2, 73.9),
    'NAS(NTVA) coco': _valse(87.3, 77.6, 70.1, 69.9, 75.8, 46.7, 93.2, 74.4),
}

_RET_COLS = ('TR@1', 'TR@5', 'TR@10', 'IR@1', 'IR@5', 'IR@10')


def _ret(*values: float) -> dict[str, float]:
  row = dict(zip(_RET_COLS, values))
  row['TR mean'] = round(sum(values[:3]) / 3, 2)
  row['IR mean'] = round(sum(values[3:]) / 3, 2)
  row['R mean'] = round(sum(values) / 6, 2)
  return row


# Table 9: zero-shot retrieval (the COCO-fine-tuned model on Flickr30K 1K test; COCO 5K test).
TABLE9_FLICKR = {
    'ALBEF (2.9M)': _ret(88.1, 98.3, 99.3, 74.4, 92.0, 95.3),
    'NAS(NVA) (2.9M)': _ret(90.8, 98.9, 99.7, 76.8, 93.2, 96.4),
}
TABLE9_COCO = {
    'ALBEF (2.9M)': _ret(68.0, 89.5, 94.3, 49.2, 76.0, 84.6),
    'NAS(NVA) (2.9M)': _ret(70.9, 90.6, 95.0, 52.7, 79.0, 86.8),
}
# Table 10: fine-tuned retrieval, COCO 5K test.
TABLE10_COCO = {
    'ALBEF': _ret(72.6, 91.5, 95.7, 55.2, 80.8, 89.4),
    'METER-Swin': _ret(73.0, 92.0, 96.3, 54.9, 81.4, 89.3),
    'NAS(NTA)': _ret(62.7, 88.0, 94.0, 54.5, 80.4, 88.1),
    'NAS(NVA)': _ret(74.0, 92.7, 96.4, 57.1, 82.0, 89.2),
    'NAS(NTVA)': _ret(63.1, 87.8, 94.2, 54.5, 80.2, 88.0),
}


def _only(table: dict, keys: tuple[str, ...]) -> dict:
  """The ALBEF and NAS rows of a table, restricted to `keys`."""
  return {f'paper: {name}': {k: row[k] for k in keys if k in row} for name, row in table.items()
          if name.startswith(('ALBEF', 'NAS'))}


def rows_for(benchmark: str) -> dict[str, dict[str, float]]:
  """The paper's ALBEF and NAS rows (named 'paper: <model> [table]') comparable with a benchmark's
  headline; {} for a benchmark the paper does not report (e.g. 'synthetic')."""
  if benchmark == 'aro':
    return {f'{k} [T2]': v for k, v in _only(TABLE2, ('Relation', 'Attribute', 'Avg')).items()}
  if benchmark == 'winoground':
    return {f'{k} [T2]': v for k, v in _only(TABLE2, ('Text', 'Image', 'Group')).items()}
  if benchmark == 'valse':
    return {f'{k} [T3]': v for k, v in _only(TABLE3, _VALSE_COLS).items()}
  if benchmark == 'retrieval_flickr':
    return {f'{k} [T9 zero-shot]': v for k, v in _only(TABLE9_FLICKR, tuple(_ret(*[0] * 6))).items()}
  if benchmark == 'retrieval_coco':
    rows = {f'{k} [T9 zero-shot]': v for k, v in _only(TABLE9_COCO, tuple(_ret(*[0] * 6))).items()}
    rows.update({f'{k} [T10 fine-tuned]': v
                 for k, v in _only(TABLE10_COCO, tuple(_ret(*[0] * 6))).items()})
    return rows
  return {}
