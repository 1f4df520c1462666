"""Metrics of the fine-grained synthetic suite (cases from `nas_jax.data.synthetic.build_benchmark`).

Each subset is scored the way the real benchmark it imitates is (docs/EVALUATION.md),
always with strict `>` so a tie is a failure:
  attribute, relation (ARO VG-Attribution / VG-Relation-like), counting, existence (VALSE-like),
  main_attribute, main_object (the main object's colour / shape / size replaced in the caption, or
  the main object replaced by a similar one: what NVA's negatives train):
      pairwise accuracy = % of cases with score(image, caption) > score(image, foil). As ARO,
      attribute, relation and main_attribute report the macro mean over their groups (attribute:
      'colour' and 'size' swaps; relation: left / right / above / below; main_attribute: 'colour',
      'shape', 'size'); counting, existence and main_object, as VALSE's acc_r, the plain (micro)
      accuracy. Every group's accuracy is reported too.
  winoground: with s(c, i) the score of caption c and image i (caption k describes image k),
      text  ⇔ s(c0,i0) > s(c1,i0) and s(c1,i1) > s(c0,i1);
      image ⇔ s(c0,i0) > s(c0,i1) and s(c1,i1) > s(c1,i0);  group ⇔ text and image.
  retrieval: R@1/5/10 image→text (txt_r*) and text→image (img_r*) as ALBEF's Retrieval.py: ITC
      cosine, optionally re-ranked by the pair score on the top `k_test` candidates (every other
      entry -inf); r_mean = mean of the six. A rank counts every other candidate scoring >= the
      ground truth (ties fail; identical to ALBEF's argsort rank when scores are distinct).

The model side is two plain callables, so this module never sees a model:
  score_pairs(images: uint8 [P, H, W, 3], captions: list[str] (P)) -> float [P], higher = match
      (e.g. the ITM logit difference l1 - l0); called with at most `batch_size` pairs at a time.
  embed(images: uint8 [n, H, W, 3], captions: list[str] (m)) -> (img_feat [n, D], txt_feat [m, D])
      ITC features; they are L2-normalised here, so cosine similarity is used.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

PAIRWISE = ('attribute', 'relation', 'counting', 'existence', 'main_attribute', 'main_object')
MACRO = ('attribute', 'relation', 'main_attribute')  # Macro over groups, as ARO; others micro (VALSE).
RECALL_KS = (1, 5, 10)

ScorePairs = Callable[[np.ndarray, Sequence[str]], np.ndarray]
Embed = Callable[[np.ndarray, Sequence[str]], tuple[np.ndarray, np.ndarray]]

_TITLES = {
    'attribute': 'Attribute swap (ARO VG-Attribution-like, macro)',
    'relation': 'Relation order swap (ARO VG-Relation-like, macro)',
    'counting': 'Counting (VALSE-like)',
    'existence': 'Existence (VALSE-like)',
    'main_attribute': "Main object's colour / shape / size replaced (macro)",
    'main_object': 'Main object replaced by a similar one',
}


# ------------------------------------------------------------------------------------------ metrics

def pairwise_accuracy(pos: np.ndarray, neg: np.ndarray) -> float:
  """% of cases with pos > neg (strict: ties fail). pos, neg: [N]."""
  pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
  if pos.shape != neg.shape or pos.ndim != 1:
    raise ValueError(f'pairwise_accuracy needs two [N] arrays, got {pos.shape} and {neg.shape}')
  return float(100.0 * np.mean(pos > neg)) if pos.size else 0.0


def winoground_scores(s: np.ndarray) -> dict[str, float]:
  """Winoground text / image / group scores (%) from s [N, 2, 2], s[n, c, i] = score(c_c, i_i)."""
  s = np.asarray(s, np.float64)
  if s.ndim != 3 or s.shape[1:] != (2, 2):
    raise ValueError(f'winoground_scores needs scores [N, 2, 2] (caption, image), got {s.shape}')
  text = (s[:, 0, 0] > s[:, 1, 0]) & (s[:, 1, 1] > s[:, 0, 1])
  image = (s[:, 0, 0] > s[:, 0, 1]) & (s[:, 1, 1] > s[:, 1, 0])
  return dict(text=float(100 * text.mean()), image=float(100 * image.mean()),
              group=float(100 * (text & image).mean()))


def _ranks(scores: np.ndarray, gt: Sequence[Sequence[int]]) -> np.ndarray:
  """For each row, the best rank of its ground-truth columns; rank = # other columns >= it."""
  out = np.empty(len(gt), np.int64)
  for r, cols in enumerate(gt):
    row = scores[r]
    out[r] = min(int(np.sum(row >= row[c])) - 1 for c in cols)
  return out


def retrieval_recalls(i2t: np.ndarray, t2i: np.ndarray, txt2img: Sequence[int],
                      ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
  """ALBEF's recalls. i2t: [n_img, n_txt] scores, t2i: [n_txt, n_img] scores (usually i2t.T, but
  re-ranking makes them differ), txt2img[t] = the image of text t. Returns txt_r{k} (image→text,
  an image's rank is its best caption's), img_r{k} (text→image), txt_r_mean, img_r_mean, r_mean."""
  i2t, t2i = np.asarray(i2t, np.float64), np.asarray(t2i, np.float64)
  txt2img = np.asarray(txt2img, np.int64)
  n_img, n_txt = i2t.shape
  if t2i.shape != (n_txt, n_img) or txt2img.shape != (n_txt,):
    raise ValueError(f'retrieval_recalls: i2t {i2t.shape}, t2i {t2i.shape} and txt2img '
                     f'{txt2img.shape} do not agree')
  img2txt = [np.flatnonzero(txt2img == i) for i in range(n_img)]
  if any(len(t) == 0 for t in img2txt):
    raise ValueError('retrieval_recalls: every image needs at least one caption')
  r_i2t = _ranks(i2t, img2txt)
  r_t2i = _ranks(t2i, [[int(i)] for i in txt2img])
  out = {}
  for k in ks:
    out[f'txt_r{k}'] = float(100 * np.mean(r_i2t < k))
  for k in ks:
    out[f'img_r{k}'] = float(100 * np.mean(r_t2i < k))
  out['txt_r_mean'] = float(np.mean([out[f'txt_r{k}'] for k in ks]))
  out['img_r_mean'] = float(np.mean([out[f'img_r{k}'] for k in ks]))
  out['r_mean'] = (out['txt_r_mean'] + out['img_r_mean']) / 2
  return out


def cosine(img_feat: np.ndarray, txt_feat: np.ndarray) -> np.ndarray:
  """[n, D] x [m, D] -> cosine similarities [n, m]."""
  a = np.asarray(img_feat, np.float64)
  b = np.asarray(txt_feat, np.float64)
  a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
  b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
  return a @ b.T


# ------------------------------------------------------------------------------------------ scoring

def _score(score_pairs: ScorePairs, images: np.ndarray, captions: Sequence[str],
           batch_size: int) -> np.ndarray:
  """Scores aligned pairs in chunks of at most batch_size; float64 [P]."""
  out = []
  for start in range(0, len(captions), batch_size):
    s = np.asarray(score_pairs(images[start:start + batch_size],
                               list(captions[start:start + batch_size])), np.float64).reshape(-1)
    if s.shape[0] != len(captions[start:start + batch_size]):
      raise ValueError(f'score_pairs returned {s.shape[0]} scores for '
                       f'{len(captions[start:start + batch_size])} pairs')
    out.append(s)
  return np.concatenate(out) if out else np.zeros((0,))


def _rerank(score_pairs, images, captions, sims, k, batch_size, transpose: bool) -> np.ndarray:
  """Scores of the top-k columns of each row of `sims` by score_pairs, -inf elsewhere.
  Rows are images (transpose=False) or captions (transpose=True)."""
  k = min(k, sims.shape[1])
  top = np.argsort(-sims, axis=1, kind='stable')[:, :k]
  rows = np.repeat(np.arange(sims.shape[0]), k)
  cols = top.reshape(-1)
  img_idx, txt_idx = (cols, rows) if transpose else (rows, cols)
  scores = _score(score_pairs, images[img_idx], [captions[t] for t in txt_idx], batch_size)
  out = np.full(sims.shape, -np.inf)
  out[rows, cols] = scores
  return out


def evaluate(bench: Mapping[str, list], score_pairs: ScorePairs | None = None,
             embed: Embed | None = None, *, batch_size: int = 128, k_test: int = 0,
             threshold: float | None = None) -> dict[str, float]:
  """Scores a built suite. Returns a flat dict of percentages.

  Keys: per pairwise subset its accuracy (macro over groups for attribute, relation and
  main_attribute) and '<subset>/<group>' breakdowns, 'pairwise_mean' (of those present);
  'winoground_text|image|group' (+ '/relation', '/attribute' tags); retrieval 'txt_r1/5/10',
  'img_r1/5/10', 'txt_r_mean', 'img_r_mean', 'r_mean'.
  Retrieval uses `embed` (ITC cosine), re-ranked by `score_pairs` on the top `k_test` when
  k_test > 0 (ALBEF); without `embed`, `score_pairs` scores all n x n pairs.
  With `threshold` (0 for a logit difference, 0.5 for a probability), also the binary ITM decision
  accuracy over the pairwise subsets: 'itm_acc' = mean of 'itm_p_caption' (% captions scored >
  threshold) and 'itm_p_foil' (% foils scored <= threshold), as VALSE's p_c / p_f.
  """
  if batch_size < 1:
    raise ValueError(f'evaluate: batch_size must be >= 1, got {batch_size}')
  out: dict[str, float] = {}
  needs_pairs = [k for k in (*PAIRWISE, 'winoground') if k in bench]
  if needs_pairs and score_pairs is None:
    raise ValueError(f'evaluate: subsets {needs_pairs} need a score_pairs function')
  pos_all, neg_all = [], []
  for name in PAIRWISE:
    cases = bench.get(name)
    if not cases:
      continue
    images = np.stack([c['image'] for c in cases])
    scores = _score(score_pairs, np.concatenate([images, images]),
                    [c['caption'] for c in cases] + [c['foil'] for c in cases], batch_size)
    pos, neg = scores[:len(cases)], scores[len(cases):]
    pos_all.append(pos)
    neg_all.append(neg)
    groups = np.array([c['group'] for c in cases])
    per_group = {g: pairwise_accuracy(pos[groups == g], neg[groups == g]) for g in sorted(set(groups))}
    out[name] = (float(np.mean(list(per_group.values()))) if name in MACRO
                 else pairwise_accuracy(pos, neg))
    out.update({f'{name}/{g}': v for g, v in per_group.items()})
  present = [n for n in PAIRWISE if n in out]
  if present:
    out['pairwise_mean'] = float(np.mean([out[n] for n in present]))
  if threshold is not None and pos_all:
    pos, neg = np.concatenate(pos_all), np.concatenate(neg_all)
    out['itm_p_caption'] = float(100 * np.mean(pos > threshold))
    out['itm_p_foil'] = float(100 * np.mean(neg <= threshold))
    out['itm_acc'] = (out['itm_p_caption'] + out['itm_p_foil']) / 2

  cases = bench.get('winoground')
  if cases:
    # Order: for each case (c0,i0), (c0,i1), (c1,i0), (c1,i1) -> s[n, c, i].
    images = np.stack([c['images'][i] for c in cases for _ in range(2) for i in range(2)])
    caps = [c['captions'][j] for c in cases for j in range(2) for _ in range(2)]
    s = _score(score_pairs, images, caps, batch_size).reshape(len(cases), 2, 2)
    for key, v in winoground_scores(s).items():
      out[f'winoground_{key}'] = v
    tags = np.array([c['tag'] for c in cases])
    for t in sorted(set(tags)):
      for key, v in winoground_scores(s[tags == t]).items():
        out[f'winoground_{key}/{t}'] = v

  cases = bench.get('retrieval')
  if cases:
    images = np.stack([c['image'] for c in cases])
    captions = [c['caption'] for c in cases]
    n = len(cases)
    if embed is not None:
      fi, ft = embed(images, captions)
      sims = cosine(fi, ft)
      if sims.shape != (n, n):
        raise ValueError(f'embed returned features giving similarities {sims.shape}, want {(n, n)}')
      i2t, t2i = sims, sims.T
      if k_test > 0:
        if score_pairs is None:
          raise ValueError('evaluate: k_test > 0 re-ranks with score_pairs, which is missing')
        i2t = _rerank(score_pairs, images, captions, sims, k_test, batch_size, transpose=False)
        t2i = _rerank(score_pairs, images, captions, sims.T, k_test, batch_size, transpose=True)
    elif score_pairs is not None:
      rows, cols = np.divmod(np.arange(n * n), n)
      i2t = _score(score_pairs, images[rows], [captions[t] for t in cols], batch_size).reshape(n, n)
      t2i = i2t.T
    else:
      raise ValueError('evaluate: retrieval needs embed (ITC) or score_pairs')
    out.update(retrieval_recalls(i2t, t2i, np.arange(n)))
    if score_pairs is not None and threshold is not None and n > 1:
      # Held-out matching: each scene with its caption vs with the next scene's caption.
      other = [captions[(i + 1) % n] for i in range(n)]
      s = _score(score_pairs, np.concatenate([images, images]), captions + other, batch_size)
      pos, neg = s[:n], s[n:]
      out['heldout_itm_p_match'] = float(100 * np.mean(pos > threshold))
      out['heldout_itm_p_nonmatch'] = float(100 * np.mean(neg <= threshold))
      out['heldout_itm_acc'] = (out['heldout_itm_p_match'] + out['heldout_itm_p_nonmatch']) / 2
      out['heldout_itm_pairwise'] = pairwise_accuracy(pos, neg)
  return out


# ------------------------------------------------------------------------------------------ table

def _fmt(metrics, keys) -> str:
  return ' / '.join(f'{metrics[k]:.1f}' for k in keys)


def to_markdown(metrics: Mapping[str, float], bench: Mapping[str, list] | None = None,
                title: str = 'Synthetic fine-grained suite') -> str:
  """A Markdown table of the headline numbers with their chance levels (and case counts when
  `bench` is given)."""
  count = (lambda name: str(len(bench[name])) if bench and name in bench else '')
  rows = []
  for name in PAIRWISE:
    if name in metrics:
      rows.append((f'{_TITLES[name]}: pairwise acc', f'{metrics[name]:.1f}', '50.0', count(name)))
  groups = [f'main_attribute/{g}' for g in ('colour', 'shape', 'size')]
  if all(k in metrics for k in groups):
    rows.append(("Main object's colour / shape / size replaced, per attribute", _fmt(metrics, groups),
                 '50.0 / 50.0 / 50.0', ''))
  if 'pairwise_mean' in metrics:
    rows.append(('Mean of the pairwise subsets', f'{metrics["pairwise_mean"]:.1f}', '50.0', ''))
  if 'itm_acc' in metrics:
    rows.append(('ITM decision acc (captions / foils)',
                 f'{metrics["itm_acc"]:.1f} ({_fmt(metrics, ("itm_p_caption", "itm_p_foil"))})',
                 '50.0', ''))
  if 'heldout_itm_pairwise' in metrics:
    rows.append(('ITM on held-out scenes: own caption scored above another scene\'s',
                 f'{metrics["heldout_itm_pairwise"]:.1f}', '50.0', count('retrieval')))
  if 'heldout_itm_acc' in metrics:
    rows.append(('ITM on held-out scenes: decision acc at 0 (match / other scene\'s caption)',
                 f'{metrics["heldout_itm_acc"]:.1f} '
                 f'({_fmt(metrics, ("heldout_itm_p_match", "heldout_itm_p_nonmatch"))})',
                 '50.0', count('retrieval')))
  if 'winoground_text' in metrics:
    rows.append(('Winoground-style: text / image / group',
                 _fmt(metrics, ('winoground_text', 'winoground_image', 'winoground_group')),
                 '25.0 / 25.0 / 16.7', count('winoground')))
  if 'txt_r1' in metrics:
    n = len(bench['retrieval']) if bench and 'retrieval' in bench else 0
    chance = ' / '.join(f'{100 * min(k, n) / n:.1f}' for k in RECALL_KS) if n else ''
    ks = [f'R@{k}' for k in RECALL_KS]
    rows.append((f'Retrieval image→text {" / ".join(ks)}',
                 _fmt(metrics, [f'txt_r{k}' for k in RECALL_KS]), chance, count('retrieval')))
    rows.append((f'Retrieval text→image {" / ".join(ks)}',
                 _fmt(metrics, [f'img_r{k}' for k in RECALL_KS]), chance, count('retrieval')))
    rows.append(('Retrieval r_mean', f'{metrics["r_mean"]:.1f}', '', ''))
  lines = [f'| {title} | Score (%) | Chance (%) | Cases |', '|---|---|---|---|']
  lines += [f'| {a} | {b} | {c} | {d} |' for a, b, c, d in rows]
  return '\n'.join(lines)
