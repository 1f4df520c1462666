"""Winoground (Thrush et al., CVPR 2022): text, image and group scores, as the official
statistics/compute_statistics.py computes them. docs/EVALUATION.md has the details.

Data layout: `<root>/examples.jsonl` (or `<root>/data/examples.jsonl`) and `<root>/images/<stem>.png`
(the extracted `data/images.zip` of the Hugging Face dataset `facebook/winoground`).

With s(c, i) the pair score and strict `>` (ties fail):
  text  correct <=> s(c0,i0) > s(c1,i0) and s(c1,i1) > s(c0,i1)
  image correct <=> s(c0,i0) > s(c0,i1) and s(c1,i1) > s(c1,i0)
  group correct <=> text and image correct
Scores are 100 x the mean over examples; also per `collapsed_tag`, `num_main_preds` and
`secondary_tag` subset (exact value match, as the official statistics script). The default score is
the float32 softmax P(match) of the published score files, whose saturation at 1.0 makes ties.
The per-example file (`write_score_file`) is in the official model_scores format.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np

from nas_jax.benchmarks import common

NAME = 'winoground'
SOURCE = ('the Hugging Face dataset facebook/winoground (gated: accept the licence): data/examples.jsonl '
          'and data/images.zip extracted to images/')
OFFICIAL_EXAMPLES = 400


def find_examples(root: str) -> str:
  path = common.first_existing([os.path.join(root, 'examples.jsonl'),
                                os.path.join(root, 'data', 'examples.jsonl')])
  return common.require(NAME, path or os.path.join(root, 'examples.jsonl'), SOURCE)


def read_examples(path: str) -> list[dict]:
  with open(path) as f:
    examples = [json.loads(line) for line in f if line.strip()]
  for e in examples:
    for k in ('id', 'caption_0', 'caption_1', 'image_0', 'image_1'):
      if k not in e:
        raise common.BenchmarkDataError(f'[{NAME}] {path}: example {e.get("id")!r} lacks {k!r}')
  return examples


def scores_metric(s: np.ndarray) -> dict[str, np.ndarray]:
  """s: [E, 2, 2] with s[e, c, i] = score of caption c with image i. Returns bool [E] per score."""
  s = np.asarray(s)
  text = (s[:, 0, 0] > s[:, 1, 0]) & (s[:, 1, 1] > s[:, 0, 1])
  image = (s[:, 0, 0] > s[:, 0, 1]) & (s[:, 1, 1] > s[:, 1, 0])
  return {'text': text, 'image': image, 'group': text & image}


def _percent(correct: dict[str, np.ndarray], mask: np.ndarray | None = None) -> dict[str, float]:
  return {k: float(100.0 * (v if mask is None else v[mask]).mean()) if (mask is None or mask.any())
          else 0.0 for k, v in correct.items()}


def summarize(s: np.ndarray, examples: list[dict] | None = None) -> tuple[dict[str, float], dict]:
  """Headline text/image/group (percent) and per-subset scores when the examples are given."""
  correct = scores_metric(s)
  headline = {'Text': 0.0, 'Image': 0.0, 'Group': 0.0}
  for k, v in _percent(correct).items():
    headline[k.capitalize()] = v
  details: dict = {'num_examples': int(len(s)),
                   'correct': {k: int(v.sum()) for k, v in correct.items()}}
  if examples:
    subsets = {}
    for field in ('collapsed_tag', 'num_main_preds', 'secondary_tag'):
      values = sorted({str(e.get(field, '')) for e in examples})
      for val in values:
        mask = np.array([str(e.get(field, '')) == val for e in examples])
        subsets[f'{field}={val}'] = dict(n=int(mask.sum()), **_percent(correct, mask))
    details['subsets'] = subsets
  return headline, details


_LABEL = re.compile(r'^(\d+)_c([01])_i([01])$')


def write_score_file(path: str, examples: list[dict], s: np.ndarray) -> str:
  """The official model_scores format (statistics/model_scores/*.jsonl): per example 4 lines
  {"label": "<id>_c<c>_i<i>", "score": s[e, c, i]} in the order c0_i0, c0_i1, c1_i0, c1_i1.
  Scores are written as the float32 values' exact decimal (what `.item()` gives)."""
  rows = [{'label': f'{e["id"]}_c{c}_i{i}', 'score': float(s[k, c, i])}
          for k, e in enumerate(examples) for c in (0, 1) for i in (0, 1)]
  return common.write_jsonl(path, rows)


def scores_from_file(path: str) -> np.ndarray:
  """[E, 2, 2] scores from an official/Bugliarello score file (JSONL of `<id>_c<c>_i<i>`, score),
  examples in id order."""
  table: dict[int, np.ndarray] = {}
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      r = json.loads(line)
      m = _LABEL.match(r['label'])
      if not m:
        raise common.BenchmarkDataError(f'[{NAME}] {path}: bad label {r["label"]!r} '
                                        '(expected <id>_c<0|1>_i<0|1>)')
      e, c, i = (int(g) for g in m.groups())
      table.setdefault(e, np.full((2, 2), np.nan))[c, i] = float(r['score'])
  ids = sorted(table)
  s = np.stack([table[e] for e in ids])
  if np.isnan(s).any():
    raise common.BenchmarkDataError(f'[{NAME}] {path}: some examples lack one of their 4 scores')
  return s


def evaluate(root: str, scorer: common.Scorer, *, mode: str = 'itm_p', max_tokens: int = 40,
             max_words: int = 40, image_dir: str | None = None,
             scores_dir: str | None = None) -> common.BenchResult:
  """Scores the 4 (caption, image) pairs of every example in one call. With `scores_dir`, the
  per-example scores go to `<scores_dir>/winoground.jsonl` (`write_score_file`)."""
  common.check_mode(mode)
  examples = read_examples(find_examples(root))
  if len(examples) != OFFICIAL_EXAMPLES:
    print(f'[winoground] warning: {len(examples)} examples, the official file has '
          f'{OFFICIAL_EXAMPLES}: numbers will not be comparable with published ones')
  image_dir = image_dir or os.path.join(root, 'images')
  common.require(NAME, image_dir, SOURCE, what='folder')
  images, texts = [], []
  for e in examples:
    caps = [common.albef_pre_caption(e[f'caption_{c}'], max_words) for c in (0, 1)]
    refs = [common.ImageRef(os.path.join(image_dir, e[f'image_{i}'] + '.png')) for i in (0, 1)]
    for c in (0, 1):
      for i in (0, 1):
        images.append(refs[i])
        texts.append(caps[c])
  s = common.score_pairs(scorer, images, texts, mode, max_tokens=max_tokens).reshape(-1, 2, 2)
  headline, details = summarize(s, examples)
  if scores_dir:
    details['score_file'] = write_score_file(os.path.join(scores_dir, 'winoground.jsonl'),
                                             examples, s)
  rows = [[k, v['n'], v['text'], v['image'], v['group']] for k, v in details['subsets'].items()]
  return common.BenchResult(
      name=NAME, headline=headline,
      tables={'Winoground subsets': (['subset', 'n', 'text', 'image', 'group'], rows)},
      details=details,
      protocol={'score': mode, 'max_tokens': max_tokens, 'max_words': max_words,
                'text': 'ALBEF pre_caption', 'comparison': 'strict >'})
