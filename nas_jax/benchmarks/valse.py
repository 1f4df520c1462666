"""VALSE (Parcalabescu et al., ACL 2022): 11 foiling instruments in 7 pieces. docs/EVALUATION.md
has the details.

Data layout: `<root>/<name>.json` for the 11 files of Heidelberg-NLP/VALSE `data/` (or
`<root>/data/<name>.json`), images flat in `<root>/images/<image_file>`.

Metric: only valid records (`mturk.caption >= 2`). The VALSE repository's script
(lxmert_valse_eval.py) then leaves out every pair whose foil gets two equal ITM logits (l0 == l1:
"something is wrong with the tokenisation"); the other pairs are counted. Per instrument
acc_r = % of counted pairs whose caption scores strictly higher than its foil (a tie fails). The
default score is the float32 softmax P(match) of the published score files; with 'itm_l1' the
comparison is the script's own (raw match logits). p_c / p_f are the script's binary ITM decisions
(caption l0 < l1, foil l0 >= l1). A piece (column) is the unweighted mean of its instruments.
Averages: the mean of the 11 instruments ('Avg', the default, CE-CLIP's convention), the 7-column mean
('Avg 7-col', what the NAS paper's Table 3 Avg matches) and pooled over all counted pairs ('Pooled').
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
# Valid records per file in the official release: 7,702 in all.
OFFICIAL_VALID = {'existence': 505, 'plurals': 851, 'counting-hard': 868, 'counting-small-quant': 900,
                  'counting-adversarial': 691, 'relations': 535, 'action-replacement': 648,
                  'actant-swap': 949, 'coreference-standard': 708, 'coreference-hard': 104,
                  'foil-it': 943}


# Bugliarello et al.'s score files (e-bug/fine-grained-evals VALSE.py): files in this order, a running
# id over every record of all files (invalid ones use an id but are not written), and these pieces.
SCORE_FILE_PIECE = {
    'actant-swap': 'actions', 'action-replacement': 'actions', 'coreference-hard': 'coreference',
    'coreference-standard': 'coreference', 'counting-adversarial': 'counting',
    'counting-hard': 'counting', 'counting-small-quant': 'counting', 'existence': 'existence',
    'foil-it': 'foil-it', 'plurals': 'plurality', 'relations': 'relations'}
SKIP_RULES = ('valse', 'none')  # The VALSE script's rule (default), or count every valid pair.


@dataclasses.dataclass(frozen=True)
class Pair:
  id: str
  image_file: str
  caption: str
  foil: str
  index: int = dataclasses.field(default=-1, compare=False)  # Position of the record in its file.


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
  for k, (rid, r) in enumerate(records.items()):
    try:
      if is_valid(r):
        pairs.append(Pair(str(rid), r['image_file'], r['caption'], r['foil'], k))
    except (KeyError, TypeError) as e:
      raise common.BenchmarkDataError(f'[{NAME}] {path}: record {rid!r} lacks field {e}') from None
  return pairs, len(records)


# ---------------------------------------------------------------------------------------- metric

def skipped_pairs(foil_logits: np.ndarray | None, rule: str = 'valse') -> np.ndarray:
  """bool [N]: pairs the VALSE script leaves out, i.e. whose foil's ITM logits [N, 2] are exactly
  equal (`cross_score[1, 0] == cross_score[1, 1]` in lxmert_valse_eval.py). Nothing is skipped with
  rule 'none' or without logits (the 'itc' score)."""
  if rule not in SKIP_RULES:
    raise ValueError(f'unknown VALSE skip rule {rule!r}: use {" or ".join(SKIP_RULES)}')
  if foil_logits is None or rule == 'none':
    return np.zeros(0 if foil_logits is None else len(foil_logits), bool)
  foil_logits = np.asarray(foil_logits, np.float32).reshape(-1, 2)
  return foil_logits[:, 0] == foil_logits[:, 1]


def count_correct(caption_scores: np.ndarray, foil_scores: np.ndarray,
                  skip: np.ndarray | None = None) -> tuple[int, int]:
  """(correct, counted): pairs not in `skip` whose caption scores strictly higher than the foil
  (a tie is a failure), and the number of pairs not in `skip`."""
  cap, foil = np.asarray(caption_scores), np.asarray(foil_scores)
  keep = np.ones(len(cap), bool) if skip is None or not len(skip) else ~np.asarray(skip, bool)
  return int(np.sum((cap > foil) & keep)), int(keep.sum())


def binary_decisions(caption_logits: np.ndarray, foil_logits: np.ndarray,
                     skip: np.ndarray | None = None) -> dict[str, float]:
  """The VALSE script's ITM decisions over the counted pairs: p_c = % captions judged a match
  (l0 < l1), p_f = % foils judged no match (l0 >= l1), acc = their mean, min = the smaller."""
  cap = np.asarray(caption_logits, np.float32).reshape(-1, 2)
  foil = np.asarray(foil_logits, np.float32).reshape(-1, 2)
  keep = np.ones(len(cap), bool) if skip is None or not len(skip) else ~np.asarray(skip, bool)
  n = int(keep.sum())
  p_c = common.pct(np.sum((cap[:, 0] < cap[:, 1]) & keep), n)
  p_f = common.pct(np.sum((foil[:, 0] >= foil[:, 1]) & keep), n)
  return {'p_c': p_c, 'p_f': p_f, 'acc': (p_c + p_f) / 2, 'min': min(p_c, p_f)}


def summarize(counts: dict[str, tuple[int, int]]) -> tuple[dict[str, float], dict]:
  """Per-instrument (correct, counted) -> (headline columns, details).

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
             'counted': {s: n for s, (_, n) in counts.items()}}
  if all(s in acc for s in STEMS):
    headline['Avg'] = float(np.mean([acc[s] for s in STEMS]))
    headline['Avg 7-col'] = float(np.mean([headline[p] for p in PIECES]))
    headline['Pooled'] = common.pct(sum(c for c, _ in counts.values()),
                                    sum(n for _, n in counts.values()))
  return headline, details


def counts_from_score_file(path: str, skip_rule: str = 'valse') -> dict[str, tuple[int, int]]:
  """Per-instrument (correct, counted) from a score file in Bugliarello et al.'s format (JSONL of
  label `<id>_c|_f`, score, instrument, ...). Lines that carry "logits" (the files we write) get the
  VALSE script's skip rule; the published files have none, so every pair counts."""
  scores: dict[str, dict[str, dict[str, dict]]] = defaultdict(lambda: defaultdict(dict))
  with open(path) as f:
    for line in f:
      if line.strip():
        r = json.loads(line)
        rid, kind = r['label'].rsplit('_', 1)
        scores[r['instrument']][rid][kind] = r
  counts = {}
  for inst, by_id in scores.items():
    pairs = [(v['c'], v['f']) for v in by_id.values() if 'c' in v and 'f' in v]
    cap = np.asarray([c['score'] for c, _ in pairs], np.float64)
    foil = np.asarray([f_['score'] for _, f_ in pairs], np.float64)
    logits = [f_.get('logits') for _, f_ in pairs]
    skip = skipped_pairs(np.asarray(logits, np.float32), skip_rule) if all(
        l is not None for l in logits) and logits else None
    counts[inst] = count_correct(cap, foil, skip)
  return counts


def write_score_file(path: str, data: dict[str, tuple[list[Pair], int]], scores: dict[str, np.ndarray],
                     logits: dict[str, np.ndarray | None]) -> str:
  """Bugliarello et al.'s format (the file their VALSE notebook reads): per valid record two lines,
  {"label": "<id>_c" | "<id>_f", "score", "instrument", "piece", "type": "caption" | "foil", "id"},
  files in SCORE_FILE_PIECE's order, id running over every record of the scored files. We add
  "logits": [l0, l1] (when the score has them) so the VALSE script's skip rule can be re-applied.

  scores[stem]: [N, 2] (caption, foil) of the valid pairs; logits[stem]: [N, 2, 2] or None.
  """
  rows, offset = [], 0
  for stem in SCORE_FILE_PIECE:
    if stem not in data:
      continue
    pairs, n_records = data[stem]
    for k, pair in enumerate(pairs):
      rid = offset + pair.index
      for j, kind in ((0, 'caption'), (1, 'foil')):
        row = {'label': f'{rid}_{kind[0]}', 'score': float(scores[stem][k, j]), 'instrument': stem,
               'piece': SCORE_FILE_PIECE[stem], 'type': kind, 'id': rid}
        if logits[stem] is not None:
          row['logits'] = [float(v) for v in logits[stem][k, j]]
        rows.append(row)
    offset += n_records
  return common.write_jsonl(path, rows)


# ---------------------------------------------------------------------------------------- evaluate

def load(root: str, stems: Sequence[str] = STEMS) -> dict[str, tuple[list[Pair], int]]:
  return {s: read_file(find_file(root, s)) for s in stems}


def evaluate(root: str, scorer: common.Scorer, *, mode: str = 'itm_p', max_tokens: int = 40,
             max_words: int = 40, image_dir: str | None = None, stems: Sequence[str] = STEMS,
             skip_rule: str = 'valse', scores_dir: str | None = None) -> common.BenchResult:
  """Scores every valid (image, caption) and (image, foil) pair of the VALSE files in one call.
  With `scores_dir`, the per-pair scores go to `<scores_dir>/valse.jsonl` (`write_score_file`)."""
  common.check_mode(mode)
  skipped_pairs(None, skip_rule)  # Checks the rule's name before any work.
  if max_tokens < 40:
    print(f'[valse] warning: max_tokens={max_tokens} < 40 turns some coreference caption/foil pairs '
          'into identical token sequences (guaranteed failures)')
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
  all_scores, all_logits = common.score_pairs_and_logits(scorer, images, texts, mode,
                                                          max_tokens=max_tokens)
  counts, binary, skipped, pair_scores, pair_logits = {}, {}, {}, {}, {}
  for stem, (a, b) in spans.items():
    pair_scores[stem] = all_scores[a:b].reshape(-1, 2)
    pair_logits[stem] = None if all_logits is None else all_logits[a:b].reshape(-1, 2, 2)
    foil_logits = None if all_logits is None else pair_logits[stem][:, 1]
    skip = skipped_pairs(foil_logits, skip_rule)
    skipped[stem] = int(skip.sum())
    counts[stem] = count_correct(pair_scores[stem][:, 0], pair_scores[stem][:, 1], skip)
    if all_logits is not None:
      binary[stem] = binary_decisions(pair_logits[stem][:, 0], foil_logits, skip)
    if skipped[stem] and counts[stem][1] == 0:
      print(f'[valse] warning: every valid pair of {stem} was skipped (its foils\' ITM logits are '
            'equal): its accuracy is 0; is the model trained?')
  headline, details = summarize(counts)
  details['records'] = {s: n for s, (_, n) in data.items()}
  details['valid'] = {s: len(pairs) for s, (pairs, _) in data.items()}
  details['skipped'] = skipped
  off = {s: (len(pairs), OFFICIAL_VALID[s]) for s, (pairs, _) in data.items()
         if len(pairs) != OFFICIAL_VALID[s]}
  details['official_counts'] = not off
  if off:
    print(f'[valse] warning: valid records differ from the official release (file: ours, official): '
          f'{off}; numbers will not be comparable with published ones')
  if binary:
    details['binary'] = binary
  if scores_dir:
    details['score_file'] = write_score_file(os.path.join(scores_dir, 'valse.jsonl'), data,
                                             pair_scores, pair_logits)
  rows = [[s, piece, inst, counts[s][0], counts[s][1], skipped[s], details['acc_r'][s]]
          for s, piece, inst in FILES if s in counts]
  return common.BenchResult(
      name=NAME, headline=headline,
      tables={'VALSE per instrument (acc_r)': (
          ['file', 'piece', 'instrument', 'correct', 'counted', 'skipped', 'acc_r'], rows)},
      details=details,
      protocol={'score': mode, 'max_tokens': max_tokens, 'max_words': max_words,
                'text': 'ALBEF pre_caption', 'valid': 'mturk.caption >= 2',
                'skip': ('pairs whose foil has l0 == l1 (VALSE script)' if skip_rule == 'valse'
                         else 'none'),
                'comparison': 'strict >', 'Avg': 'mean of the 11 instruments',
                'Avg 7-col': 'mean of the 7 columns (the paper\'s Table 3 Avg)',
                'Pooled': 'accuracy over all counted pairs'})
