"""VALSE (Parcalabescu et al., ACL 2022): 11 foiling instruments in 7 pieces. FORMATS.md §1.

Data layout: `<root>/<name>.json` for the 11 files of Heidelberg-NLP/VALSE `data/` (or
`<root>/data/<name>.json`), images flat in `<root>/images/<image_file>`.

Metric: only valid records (`mturk.caption >= 2`); per instrument acc_r = % of records whose caption
scores strictly higher than its foil. A piece (column) is the unweighted mean of its instruments.
Averages: the mean of the 11 instruments ('Avg', the default, CE-CLIP's convention), the 7-column mean
('Avg 7-col', what the NAS paper's Table 3 Avg matches) and pooled over all valid pairs ('Pooled').
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import defaultdict
from typing import Sequence

import numpy as np

from nas_jax.benchmarks import common

NAME = 'valse'
SOURCE = ('https://github.com/Heidelberg-NLP/VALSE (folder data/: the 11 JSON files); images from '
          'Visual7W, COCO 2014/2017, SWiG (imSitu) and VisDial v1.0, all in one folder images/')

# (file stem, piece = paper column, instrument) in the paper's order.
FILES: tuple[tuple[str, str, str], ...] = (
    ('existence', 'Existence', 'quantifiers'),
    ('plurals', 'Plurality', 'number'),
    ('counting-hard', 'Counting', 'balanced'),
    ('counting-small-quant', 'Counting', 'small numbers'),
    ('counting-adversarial', 'Counting', 'adversarial'),
    ('relations', 'Sp.rel.', 'relations'),
    ('action-replacement', 'Action', 'replacement'),
    ('actant-swap', 'Action', 'actant swap'),
    ('coreference-standard', 'Coreference', 'standard'),
    ('coreference-hard', 'Coreference', 'clean'),
    ('foil-it', 'Foil-it!', 'noun phrases'),
)
PIECES: tuple[str, ...] = ('Existence', 'Plurality', 'Counting', 'Sp.rel.', 'Action', 'Coreference',
                           'Foil-it!')
STEMS = tuple(f[0] for f in FILES)
# Valid records per file in the official release (FORMATS.md §1.1): 7,702 in all.
OFFICIAL_VALID = {'existence': 505, 'plurals': 851, 'counting-hard': 868, 'counting-small-quant': 900,
                  'counting-adversarial': 691, 'relations': 535, 'action-replacement': 648,
                  'actant-swap': 949, 'coreference-standard': 708, 'coreference-hard': 104,
                  'foil-it': 943}


@dataclasses.dataclass(frozen=True)
class Pair:
  id: str
  image_file: str
  caption: str
  foil: str


def is_valid(record: dict) -> bool:
  """The official filter: at least 2 of 3 annotators said only the caption fits the image."""
  return int(record['mturk']['caption']) >= 2


def find_file(root: str, stem: str) -> str:
  path = common.first_existing([os.path.join(root, f'{stem}.json'),
                                os.path.join(root, 'data', f'{stem}.json')])
  return common.require(NAME, path or os.path.join(root, f'{stem}.json'), SOURCE)


def read_file(path: str) -> tuple[list[Pair], int]:
  """Valid pairs of one VALSE file in file order, and the number of records in the file."""
  with open(path) as f:
    records = json.load(f)
  if not isinstance(records, dict):
    raise common.BenchmarkDataError(f'[{NAME}] {path}: expected a JSON object id -> record, '
                                    f'got {type(records).__name__}')
  pairs = []
  for rid, r in records.items():
    try:
      if is_valid(r):
        pairs.append(Pair(str(rid), r['image_file'], r['caption'], r['foil']))
    except (KeyError, TypeError) as e:
      raise common.BenchmarkDataError(f'[{NAME}] {path}: record {rid!r} lacks field {e}') from None
  return pairs, len(records)


# ---------------------------------------------------------------------------------------- metric

def count_correct(caption_scores: np.ndarray, foil_scores: np.ndarray) -> int:
  """Records whose caption scores strictly higher than the foil (a tie is a failure)."""
  return int(np.sum(np.asarray(caption_scores) > np.asarray(foil_scores)))


def summarize(counts: dict[str, tuple[int, int]]) -> tuple[dict[str, float], dict]:
  """Per-instrument (correct, valid) counts -> (headline columns, details).

  Columns need all instruments of their piece; the averages need all 11 files. Missing ones are left
  out of the headline (a partial run, e.g. a sample) rather than averaged over fewer files.
  """
  acc = {s: common.pct(c, n) for s, (c, n) in counts.items()}
  headline: dict[str, float] = {}
  for piece in PIECES:
    stems = [s for s, p, _ in FILES if p == piece]
    if all(s in acc for s in stems):
      headline[piece] = float(np.mean([acc[s] for s in stems]))
  details = {'acc_r': acc, 'correct': {s: c for s, (c, _) in counts.items()},
             'valid': {s: n for s, (_, n) in counts.items()}}
  if all(s in acc for s in STEMS):
    headline['Avg'] = float(np.mean([acc[s] for s in STEMS]))
    headline['Avg 7-col'] = float(np.mean([headline[p] for p in PIECES]))
    headline['Pooled'] = common.pct(sum(c for c, _ in counts.values()),
                                    sum(n for _, n in counts.values()))
  return headline, details


def counts_from_score_file(path: str) -> dict[str, tuple[int, int]]:
  """Per-instrument (correct, valid) from a Bugliarello et al. score file (JSONL of label
  `<id>_c|_f`, score, instrument)."""
  scores: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
  with open(path) as f:
    for line in f:
      if line.strip():
        r = json.loads(line)
        rid, kind = r['label'].rsplit('_', 1)
        scores[r['instrument']][rid][kind] = float(r['score'])
  counts = {}
  for inst, by_id in scores.items():
    pairs = [(v['c'], v['f']) for v in by_id.values() if 'c' in v and 'f' in v]
    c, f_ = np.asarray(pairs, np.float64).T
    counts[inst] = (count_correct(c, f_), len(pairs))
  return counts


# ---------------------------------------------------------------------------------------- evaluate

def load(root: str, stems: Sequence[str] = STEMS) -> dict[str, tuple[list[Pair], int]]:
  return {s: read_file(find_file(root, s)) for s in stems}


def evaluate(root: str, scorer: common.Scorer, *, mode: str = 'itm', max_tokens: int = 40,
             max_words: int = 40, image_dir: str | None = None,
             stems: Sequence[str] = STEMS) -> common.BenchResult:
  """Scores every valid (image, caption) and (image, foil) pair of the VALSE files in one call."""
  common.check_mode(mode)
  if max_tokens < 40:
    print(f'[valse] warning: max_tokens={max_tokens} < 40 turns some coreference caption/foil pairs '
          'into identical token sequences (guaranteed failures); FORMATS.md §1.4')
  data = load(root, stems)
  image_dir = image_dir or os.path.join(root, 'images')
  common.require(NAME, image_dir, SOURCE, what='folder')
  images, texts, spans = [], [], {}
  for stem, (pairs, _) in data.items():
    start = len(images)
    for p in pairs:
      ref = common.ImageRef(os.path.join(image_dir, p.image_file))
      images += [ref, ref]
      texts += [common.albef_pre_caption(p.caption, max_words),
                common.albef_pre_caption(p.foil, max_words)]
    spans[stem] = (start, len(images))
  scores = common.score_pairs(scorer, images, texts, mode, max_tokens=max_tokens)
  counts, binary = {}, {}
  for stem, (a, b) in spans.items():
    cap, foil = scores[a:b:2], scores[a + 1:b:2]
    counts[stem] = (count_correct(cap, foil), len(cap))
    if mode == 'itm':  # Binary ITM decisions (match <=> l1 > l0), the official LXMERT script's p_c/p_f.
      p_c, p_f = common.pct(np.sum(cap > 0), len(cap)), common.pct(np.sum(foil <= 0), len(foil))
      binary[stem] = {'p_c': p_c, 'p_f': p_f, 'acc': (p_c + p_f) / 2, 'min': min(p_c, p_f)}
  headline, details = summarize(counts)
  details['records'] = {s: n for s, (_, n) in data.items()}
  off = {s: (n, OFFICIAL_VALID[s]) for s, (_, n) in counts.items() if n != OFFICIAL_VALID[s]}
  details['official_counts'] = not off
  if off:
    print(f'[valse] warning: valid records differ from the official release (file: ours, official): '
          f'{off}; numbers will not be comparable with published ones')
  if binary:
    details['binary'] = binary
  rows = [[s, piece, inst, counts[s][0], counts[s][1], details['acc_r'][s]]
          for s, piece, inst in FILES if s in counts]
  return common.BenchResult(
      name=NAME, headline=headline,
      tables={'VALSE per instrument (acc_r)': (
          ['file', 'piece', 'instrument', 'correct', 'valid', 'acc_r'], rows)},
      details=details,
      protocol={'score': mode, 'max_tokens': max_tokens, 'max_words': max_words,
                'text': 'ALBEF pre_caption', 'valid': 'mturk.caption >= 2',
                'comparison': 'strict >', 'Avg': 'mean of the 11 instruments',
                'Avg 7-col': 'mean of the 7 columns (the paper\'s Table 3 Avg)',
                'Pooled': 'accuracy over all valid pairs'})
