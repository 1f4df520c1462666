"""Image-text retrieval, COCO 5K test and Flickr30K 1K test, as ALBEF's Retrieval.py scores it.
docs/EVALUATION.md describes the files, the rules and the score files written.

Data layout: COCO `<data_dir>/coco/coco_test.json` (ALBEF `data.tar.gz`; BLIP's
`coco_karpathy_test.json` is the same) with the images under `<data_dir>/coco/val2014/`; Flickr30K
`<data_dir>/flickr30k/flickr30k_test.json` with `<data_dir>/flickr30k/flickr30k-images/`.

Protocol (ALBEF `evaluation` + `itm_eval`): ITC cosine similarity image x text; for each image the
top-k texts (k = 256 COCO, 128 Flickr) and for each text the top-k images are re-scored by the ITM
head (raw match logit l1, `mode='itm_l1'`, or any other score mode); every other entry is -100.
Ranks are positions in `np.argsort(score)[::-1]` of each row, exactly as `itm_eval` computes them:
the i2t rank of an image is the best position among its ground-truth captions, the t2i rank of a
caption the position of its image; R@K = % with rank < K. Equal scores (identical caption strings,
the -100 of every non-candidate) are ordered as numpy's default sort leaves them, not against the
ground truth.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from nas_jax.benchmarks import common

SOURCE = {
    'retrieval_coco': ('coco_test.json from ALBEF\'s "Dataset json files for downstream tasks" '
                       '(data.tar.gz; BLIP/LAVIS coco_karpathy_test.json is the same) and the '
                       'COCO 2014 val images (val2014/)'),
    'retrieval_flickr': ('flickr30k_test.json from ALBEF\'s data.tar.gz (or BLIP/LAVIS) and the '
                         'Flickr30k images (flickr30k-images/, request form at '
                         'https://forms.illinois.edu/sec/229675)'),
}
DEFAULT_K = {'retrieval_coco': 256, 'retrieval_flickr': 128}
LAYOUT = {  # benchmark -> (sub-folder of data_dir, json candidates)
    'retrieval_coco': ('coco', ('coco_test.json', 'coco_karpathy_test.json')),
    'retrieval_flickr': ('flickr30k', ('flickr30k_test.json',)),
}
NO_CANDIDATE = -100.0
# (images, captions) of the official test files; a copy of COCO's with 25,009 captions circulates.
OFFICIAL_COUNTS = {'retrieval_coco': (5000, 25010), 'retrieval_flickr': (1000, 5000)}


def find_json(name: str, data_dir: str) -> tuple[str, str]:
  """(path of the test json, image root) of a retrieval benchmark."""
  sub, names = LAYOUT[name]
  root = os.path.join(data_dir, sub)
  path = common.first_existing([os.path.join(root, n) for n in names])
  return common.require(name, path or os.path.join(root, names[0]), SOURCE[name]), root


def read_split(path: str, name: str = 'retrieval') -> tuple[list[str], list[str], list[list[int]], np.ndarray]:
  """ALBEF eval json -> (image paths, captions, txt ids per image, image id per text [T])."""
  with open(path) as f:
    records = json.load(f)
  if not isinstance(records, list):
    raise common.BenchmarkDataError(f'[{name}] {path}: expected a JSON list of {{"image", "caption"}}')
  images, texts, img2txt, txt2img = [], [], [], []
  for i, r in enumerate(records):
    try:
      caps = r['caption'] if isinstance(r['caption'], list) else [r['caption']]
      images.append(r['image'])
    except (KeyError, TypeError):
      raise common.BenchmarkDataError(f'[{name}] {path}: record {i} lacks "image" or "caption"') from None
    img2txt.append(list(range(len(texts), len(texts) + len(caps))))
    texts += caps
    txt2img += [i] * len(caps)
  return images, texts, img2txt, np.asarray(txt2img, np.int64)


# ---------------------------------------------------------------------------------------- metric

def albef_rank(row: np.ndarray, targets) -> int:
  """ALBEF itm_eval's rank of one score row: the smallest position of any of `targets` in
  `np.argsort(row)[::-1]`. numpy's default sort is not stable, so among equal scores the order is
  numpy's (for rows of <= 16 entries an insertion sort: the larger column index first)."""
  inds = np.argsort(row)[::-1]
  position = np.empty(len(inds), np.int64)
  position[inds] = np.arange(len(inds))
  return int(position[np.asarray(targets, np.int64)].min())


def i2t_ranks(scores_i2t: np.ndarray, img2txt: Sequence[Sequence[int]]) -> np.ndarray:
  """scores [N_img, N_txt] -> [N_img] best (smallest) rank among each image's captions
  (`albef_rank` of each row, in the matrix's own dtype as itm_eval sorts it)."""
  return np.asarray([albef_rank(row, img2txt[i]) for i, row in enumerate(np.asarray(scores_i2t))],
                    np.int64)


def t2i_ranks(scores_t2i: np.ndarray, txt2img: np.ndarray) -> np.ndarray:
  """scores [N_txt, N_img] -> [N_txt] rank of each text's image (`albef_rank` of each row)."""
  txt2img = np.asarray(txt2img, np.int64)
  return np.asarray([albef_rank(row, [txt2img[t]]) for t, row in enumerate(np.asarray(scores_t2i))],
                    np.int64)


def recall_metrics(scores_i2t: np.ndarray, scores_t2i: np.ndarray, img2txt, txt2img) -> dict[str, float]:
  """ALBEF's itm_eval: txt_r1/5/10 (TR), img_r1/5/10 (IR), their means and r_mean (percent)."""
  ri, rt = i2t_ranks(scores_i2t, img2txt), t2i_ranks(scores_t2i, txt2img)
  m = {}  # Same float operations as itm_eval: 100 * count / n.
  for k in (1, 5, 10):
    m[f'txt_r{k}'] = 100.0 * int(np.count_nonzero(ri < k)) / len(ri)
  for k in (1, 5, 10):
    m[f'img_r{k}'] = 100.0 * int(np.count_nonzero(rt < k)) / len(rt)
  m['txt_r_mean'] = (m['txt_r1'] + m['txt_r5'] + m['txt_r10']) / 3
  m['img_r_mean'] = (m['img_r1'] + m['img_r5'] + m['img_r10']) / 3
  m['r_mean'] = (m['txt_r_mean'] + m['img_r_mean']) / 2
  return m


# ---------------------------------------------------------------------------------------- scoring

def topk_indices(sims: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
  """[R, C] -> [R, min(k, C)] column indices of each row's k largest values (descending)."""
  k = min(k, sims.shape[1])
  out = np.empty((sims.shape[0], k), np.int64)
  for a in range(0, sims.shape[0], chunk):
    s = sims[a:a + chunk]
    part = np.argpartition(-s, k - 1, axis=1)[:, :k] if k < s.shape[1] else \
        np.broadcast_to(np.arange(k), (len(s), k))
    vals = np.take_along_axis(s, part, axis=1)
    out[a:a + chunk] = np.take_along_axis(part, np.argsort(-vals, axis=1, kind='stable'), axis=1)
  return out


def score_matrices(scorer: common.Scorer, image_refs: Sequence[common.ImageRef], texts: Sequence[str],
                   *, k: int, mode: str = 'itm_l1', max_tokens: int = 30) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(ITC sims [N_img, N_txt], i2t scores [N_img, N_txt], t2i scores [N_txt, N_img]).

  ITC features of all images and texts give the top-k shortlists in both directions; the union of
  the shortlisted pairs is scored once (a pair on both shortlists is not scored twice). For
  'itm+itc' the shortlisted pairs get l1 + sims.
  """
  common.check_mode(mode)
  fi, ft = scorer.itc_features(list(image_refs), list(texts), max_tokens=max_tokens)
  sims = np.asarray(fi, np.float32) @ np.asarray(ft, np.float32).T
  n_img, n_txt = sims.shape
  if mode == 'itc':
    return sims, sims.copy(), np.ascontiguousarray(sims.T)
  top_i2t = topk_indices(sims, k)            # [N_img, k] text ids
  top_t2i = topk_indices(sims.T, k)          # [N_txt, k] image ids
  img = np.concatenate([np.repeat(np.arange(n_img), top_i2t.shape[1]), top_t2i.reshape(-1)])
  txt = np.concatenate([top_i2t.reshape(-1), np.repeat(np.arange(n_txt), top_t2i.shape[1])])
  codes, inverse = np.unique(img * n_txt + txt, return_inverse=True)
  ui, ut = codes // n_txt, codes % n_txt
  itm_mode = 'itm_l1' if mode == 'itm+itc' else mode
  vals = common.score_pairs(scorer, [image_refs[i] for i in ui], [texts[t] for t in ut], itm_mode,
                            max_tokens=max_tokens)
  if mode == 'itm+itc':
    vals = vals + sims[ui, ut]
  pair_vals = vals[inverse]
  n1 = n_img * top_i2t.shape[1]
  i2t = np.full((n_img, n_txt), NO_CANDIDATE, np.float32)
  i2t[img[:n1], txt[:n1]] = pair_vals[:n1]
  t2i = np.full((n_txt, n_img), NO_CANDIDATE, np.float32)
  t2i[txt[n1:], img[n1:]] = pair_vals[n1:]
  return sims, i2t, t2i


def write_score_file(path: str, i2t: np.ndarray, t2i: np.ndarray, txt2img: np.ndarray) -> str:
  """ALBEF's score matrices in one compressed npz: `score_matrix_i2t` float32 [N_img, N_txt],
  `score_matrix_t2i` float32 [N_txt, N_img] (what `evaluation` returns and `itm_eval` takes) and
  `txt2img` int64 [N_txt]; img2txt[i] = np.flatnonzero(txt2img == i). Mostly -100, so it packs
  small (the COCO matrices are 2 x 500 MB raw)."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  np.savez_compressed(path, score_matrix_i2t=np.asarray(i2t, np.float32),
                      score_matrix_t2i=np.asarray(t2i, np.float32),
                      txt2img=np.asarray(txt2img, np.int64))
  return path


def evaluate(name: str, data_dir: str, scorer: common.Scorer, *, mode: str = 'itm_l1',
             k: int | None = None, max_tokens: int = 30, max_words: int = 30,
             scores_dir: str | None = None) -> common.BenchResult:
  """`name` is 'retrieval_coco' or 'retrieval_flickr'. With `scores_dir`, the score matrices go to
  `<scores_dir>/<name>.npz` (`write_score_file`)."""
  if name not in LAYOUT:
    raise ValueError(f'unknown retrieval benchmark {name!r}: use {", ".join(LAYOUT)}')
  path, root = find_json(name, data_dir)
  image_paths, captions, img2txt, txt2img = read_split(path, name)
  counts = (len(image_paths), len(captions))
  if counts != OFFICIAL_COUNTS[name]:
    print(f'[{name}] warning: {path} has {counts[0]} images / {counts[1]} captions, the official '
          f'test split has {OFFICIAL_COUNTS[name][0]} / {OFFICIAL_COUNTS[name][1]}: numbers will not '
          'be comparable with published ones')
  refs = [common.ImageRef(os.path.join(root, p)) for p in image_paths]
  texts = [common.albef_pre_caption(c, max_words) for c in captions]
  k = k or DEFAULT_K[name]
  sims, i2t, t2i = score_matrices(scorer, refs, texts, k=k, mode=mode, max_tokens=max_tokens)
  m = recall_metrics(i2t, t2i, img2txt, txt2img)
  itc_only = recall_metrics(sims, sims.T, img2txt, txt2img)
  headline = {'TR@1': m['txt_r1'], 'TR@5': m['txt_r5'], 'TR@10': m['txt_r10'],
              'IR@1': m['img_r1'], 'IR@5': m['img_r5'], 'IR@10': m['img_r10'],
              'TR mean': m['txt_r_mean'], 'IR mean': m['img_r_mean'], 'R mean': m['r_mean']}
  details = {'recall': m, 'recall_itc_only': itc_only, 'num_images': len(refs),
             'num_texts': len(texts), 'json': path,
             'official_counts': counts == OFFICIAL_COUNTS[name]}
  if scores_dir:
    details['score_file'] = write_score_file(os.path.join(scores_dir, f'{name}.npz'), i2t, t2i,
                                             txt2img)
  return common.BenchResult(
      name=name, headline=headline, details=details,
      protocol={'score': mode, 'k_test': k, 'max_tokens': max_tokens, 'max_words': max_words,
                'text': 'ALBEF pre_caption', 'non_candidates': NO_CANDIDATE,
                'rank': 'position in np.argsort(score)[::-1] (ALBEF itm_eval; numpy orders ties)',
                'i2t rank': 'best rank among the image\'s captions'})
