"""What every benchmark shares: image references, the scorer protocol, score modes, text cleaning,
missing-data errors. docs/EVALUATION.md describes every benchmark's files, rules and options.

A benchmark module reads its official files, builds flat lists of (image, text) pairs, asks a
`Scorer` for their scores in one call (so the scorer can batch, jit and encode each image once),
and computes the official metric from the returned numbers. Benchmarks never see a model.

Score modes (`l0, l1` = ITM logits, index 1 = match, `s_itc` = ITC cosine):
  'itm_p'    softmax(l)[1] in float32   P(match), the score of the published per-example files
                                        (Bugliarello et al.); saturates to 1.0 (ties) on confident pairs
  'itm'      l1 - l0                    ranks like P(match) without saturation
  'itm_l1'   l1                         raw match logit: ALBEF Retrieval.py's re-ranking score
  'itc'      s_itc                      cosine of the normalised 256-d projections (no temperature)
  'itm+itc'  l1 + s_itc                 the ARO repo's BLIP/X-VLM wrappers and LAVIS' retrieval
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

SCORE_MODES = ('itm_p', 'itm', 'itm_l1', 'itc', 'itm+itc')
LOGIT_MODES = ('itm_p', 'itm', 'itm_l1')  # Functions of the two ITM logits alone.


# ---------------------------------------------------------------------------------------- images

@dataclasses.dataclass(frozen=True)
class ImageRef:
  """A hashable reference to one image the scorer can load and cache.

  Either a file (`path`, optionally cropped to `box` = (x, y, w, h) in pixels, as ARO's VG loaders
  do) or an in-memory image: `key` identifies it (equality and hash use only the key) and `pixels`
  holds it as uint8 [H, W, 3].
  """
  path: str = ''
  box: tuple[float, float, float, float] | None = None
  key: str = ''
  pixels: np.ndarray | None = dataclasses.field(default=None, compare=False, hash=False, repr=False)

  def __post_init__(self):
    if not self.path and not self.key:
      raise ValueError('ImageRef needs a path or an in-memory key')
    if self.key and self.pixels is None:
      raise ValueError(f'in-memory ImageRef {self.key!r} has no pixels')
    if self.box is not None:
      object.__setattr__(self, 'box', tuple(float(v) for v in self.box))

  def load(self):
    """Returns the image as an RGB `PIL.Image` (cropped to `box` when given)."""
    from PIL import Image
    if self.pixels is not None:
      return Image.fromarray(np.asarray(self.pixels, dtype=np.uint8)).convert('RGB')
    try:
      image = Image.open(self.path).convert('RGB')
    except FileNotFoundError:
      raise BenchmarkDataError(f'image {self.path} does not exist: check --data_dir (in training '
                               'config.eval.data_dir) against the layout printed by '
                               '`python -m nas_jax.eval --help`') from None
    except OSError as e:  # PIL.UnidentifiedImageError, truncated files.
      raise BenchmarkDataError(f'image {self.path} cannot be read ({e}): re-download or replace '
                               'it') from None
    if self.box is not None:
      x, y, w, h = self.box
      image = image.crop((x, y, x + w, y + h))
    return image


# ---------------------------------------------------------------------------------------- scorers

@runtime_checkable
class Scorer(Protocol):
  """What a benchmark needs from a model. Calls take whole benchmarks' worth of pairs at once.

  `max_tokens` is the benchmark protocol's token limit (None: the scorer's default).
  """

  def itm_logits(self, images: Sequence[ImageRef], texts: Sequence[str], *,
                 max_tokens: int | None = None) -> np.ndarray:
    """ITM logits of pairs (images[i], texts[i]): float32 [P, 2], index 1 = match."""
    ...

  def itm_scores(self, images: Sequence[ImageRef], texts: Sequence[str], *,
                 max_tokens: int | None = None) -> np.ndarray:
    """ITM logit difference l1 - l0 of each pair: float32 [P] (higher = match)."""
    ...

  def itc_features(self, images: Sequence[ImageRef] | None, texts: Sequence[str] | None, *,
                   max_tokens: int | None = None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """L2-normalised ITC projections: image float32 [n, D] and text float32 [m, D] (None if not asked)."""
    ...


class ScorerBase:
  """Derives `itm_scores` from `itm_logits` (subclasses implement the other two methods)."""

  def itm_scores(self, images, texts, *, max_tokens=None) -> np.ndarray:
    return scores_from_logits(self.itm_logits(images, texts, max_tokens=max_tokens), 'itm')


def itm_probability(logits: np.ndarray) -> np.ndarray:
  """P(match) = softmax(l)[1] of ITM logits [P, 2], computed in float32 as PyTorch's softmax does
  (exp of the max-shifted logits over their sum): float32 [P].

  This is the score of the published per-example files (`F.softmax(itm_logits)[0][1].item()` in
  Bugliarello et al.'s ALBEF scripts). It saturates: when l1 - l0 > ln(2^24) ~ 16.6, exp(l0 - l1)
  vanishes next to 1 in float32 and P is exactly 1.0, so confident pairs tie; equal logits give
  exactly 0.5. Those values match PyTorch's bit for bit; others can differ from PyTorch's CPU or GPU
  kernels by a few float32 ulps (exp and division round differently), as those kernels do among
  themselves.
  """
  logits = np.asarray(logits, np.float32).reshape(-1, 2)
  shifted = logits - logits.max(axis=1, keepdims=True)
  e = np.exp(shifted)
  return (e[:, 1] / (e[:, 0] + e[:, 1])).astype(np.float32)


def scores_from_logits(logits: np.ndarray, mode: str) -> np.ndarray:
  """Pair scores [P] of a score mode that depends on the ITM logits [P, 2] alone (LOGIT_MODES)."""
  logits = np.asarray(logits, np.float32).reshape(-1, 2)
  if mode == 'itm_p':
    return itm_probability(logits)
  if mode == 'itm':
    return logits[:, 1] - logits[:, 0]
  if mode == 'itm_l1':
    return logits[:, 1].copy()
  raise ValueError(f'score mode {mode!r} is not a function of the ITM logits: use one of '
                   f'{", ".join(LOGIT_MODES)}')


def check_mode(mode: str) -> str:
  if mode not in SCORE_MODES:
    raise ValueError(f'unknown score mode {mode!r}: use one of {", ".join(SCORE_MODES)}')
  return mode


def unique(items: Sequence) -> tuple[list, np.ndarray]:
  """Unique items in first-seen order and the index of each item in that list."""
  index: dict = {}
  inverse = np.empty(len(items), np.int64)
  for i, item in enumerate(items):
    inverse[i] = index.setdefault(item, len(index))
  return list(index), inverse


def itc_pair_scores(scorer: Scorer, images: Sequence[ImageRef], texts: Sequence[str], *,
                    max_tokens: int | None = None) -> np.ndarray:
  """Cosine of each pair's ITC features [P]; every distinct image and text is encoded once."""
  uimg, img_idx = unique(images)
  utxt, txt_idx = unique(texts)
  fi, ft = scorer.itc_features(uimg, utxt, max_tokens=max_tokens)
  fi, ft = np.asarray(fi, np.float32), np.asarray(ft, np.float32)
  return np.einsum('pd,pd->p', fi[img_idx], ft[txt_idx]).astype(np.float32)


def score_pairs_and_logits(scorer: Scorer, images: Sequence[ImageRef], texts: Sequence[str],
                           mode: str = 'itm_p', *, max_tokens: int | None = None
                           ) -> tuple[np.ndarray, np.ndarray | None]:
  """Score of each pair (images[i], texts[i]) under `mode` (module docstring): float32 [P], and the
  ITM logits [P, 2] they came from (None for 'itc'). Official rules that look at the logits
  themselves (VALSE's skip rule and p_c / p_f) need both."""
  check_mode(mode)
  if len(images) != len(texts):
    raise ValueError(f'{len(images)} images but {len(texts)} texts: pairs must align')
  if not len(images):
    return np.zeros((0,), np.float32), (None if mode == 'itc' else np.zeros((0, 2), np.float32))
  if mode == 'itc':
    return itc_pair_scores(scorer, images, texts, max_tokens=max_tokens), None
  logits = np.asarray(scorer.itm_logits(images, texts, max_tokens=max_tokens), np.float32)
  if mode in LOGIT_MODES:
    return scores_from_logits(logits, mode), logits
  return logits[:, 1] + itc_pair_scores(scorer, images, texts, max_tokens=max_tokens), logits


def score_pairs(scorer: Scorer, images: Sequence[ImageRef], texts: Sequence[str],
                mode: str = 'itm_p', *, max_tokens: int | None = None) -> np.ndarray:
  """Score of each pair (images[i], texts[i]) under `mode` (see module docstring): float32 [P]."""
  return score_pairs_and_logits(scorer, images, texts, mode, max_tokens=max_tokens)[0]


# ---------------------------------------------------------------------------------------- text

def albef_pre_caption(caption: str, max_words: int) -> str:
  """ALBEF's `pre_caption` (dataset/utils.py), shared with training."""
  from nas_jax.data.text import pre_caption
  return pre_caption(caption, max_words)


_ARO_SPACE = re.compile(r'[.!"()*#:;~]')
_SPACES = re.compile(r'\s{2,}')


def aro_pre_caption(caption: str, max_words: int = 30) -> str:
  """ARO/BLIP `pre_caption` for the Order tasks (dataset_zoo/retrieval.py of the ARO repo).

  Lower-case; replace . ! " ( ) * # : ; ~ with a space (commas, apostrophes, ?, - and / stay);
  collapse whitespace; strip; keep the first `max_words` words.
  """
  caption = _ARO_SPACE.sub(' ', caption.lower())
  caption = _SPACES.sub(' ', caption).rstrip('\n').strip(' ')
  words = caption.split(' ')
  if len(words) > max_words:
    caption = ' '.join(words[:max_words])
  return caption


def identity_text(caption: str, max_words: int = 0) -> str:
  del max_words
  return caption


# ---------------------------------------------------------------------------------------- files

class BenchmarkDataError(FileNotFoundError):
  """A benchmark's official file (or one of its images) is missing or malformed."""


def require(benchmark: str, path: str, source: str, what: str = 'file') -> str:
  """Returns `path` if it exists, else raises a one-line error naming the benchmark, the path, the
  official source and where the layout is described."""
  exists = os.path.isdir(path) if what == 'folder' else os.path.isfile(path)
  if not exists:
    raise BenchmarkDataError(
        f'[{benchmark}] {what} not found: {path}; get it from {source} and place it as '
        '`python -m nas_jax.eval --help` shows, or fix --data_dir (in training '
        'config.eval.data_dir)')
  return path


def write_jsonl(path: str, rows: Sequence[dict]) -> str:
  """Writes one JSON object per line (the per-example score files); returns `path`."""
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  with open(path, 'w') as f:
    f.write(''.join(json.dumps(r) + '\n' for r in rows))
  return path


def first_existing(candidates: Sequence[str]) -> str | None:
  for c in candidates:
    if os.path.exists(c):
      return c
  return None


def pct(num: float, den: float) -> float:
  """100 * num / den as a Python float (0 when den is 0)."""
  return float(100.0 * num / den) if den else 0.0


def progress(iterable, desc: str, total: int | None = None):
  """A tqdm bar when tqdm is installed, the bare iterable otherwise."""
  try:
    from tqdm.auto import tqdm
  except ImportError:  # pragma: no cover
    return iterable
  return tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True)


TextFn = Callable[[str, int], str]


# ---------------------------------------------------------------------------------------- results

@dataclasses.dataclass
class BenchResult:
  """One benchmark's numbers.

  name: benchmark id ('valse', 'aro', ...). headline: the main table's columns in order (percent).
  tables: extra tables, title -> (column names, rows) or an already rendered Markdown table.
  details: every other number, JSON-able.
  protocol: how it was scored (score mode, token limit, conventions), printed under the table.
  """
  name: str
  headline: dict[str, float]
  tables: dict[str, tuple[list[str], list[list]] | str] = dataclasses.field(default_factory=dict)
  details: dict = dataclasses.field(default_factory=dict)
  protocol: dict = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


class TableScorer(ScorerBase):
  """Replays fixed scores: for tests, and for re-scoring saved model outputs with our metrics.

  itm: {(ImageRef, text): value} or a function (ImageRef, text) -> value; value = the logit
  difference l1 - l0 (logits [0, value]) or a pair (l0, l1). A pair not in the table raises KeyError
  naming it. itc_image / itc_text: {ImageRef: [D]},
  {text: [D]} (normalised here). With `load_images`, every image is opened (and cropped) once, and
  its size recorded in `image_sizes`, so tests also exercise the files. `calls` counts pairs per call.
  """

  def __init__(self, itm: dict | None = None, itc_image: dict | None = None,
               itc_text: dict | None = None, load_images: bool = False):
    self.itm, self.itc_image, self.itc_text = itm or {}, itc_image or {}, itc_text or {}
    self.load_images = load_images
    self.image_sizes: dict[ImageRef, tuple[int, int]] = {}
    self.calls: list[tuple[str, int]] = []

  def _touch(self, images):
    if self.load_images:
      for ref in images:
        if ref not in self.image_sizes:
          self.image_sizes[ref] = ref.load().size

  def itm_logits(self, images, texts, *, max_tokens=None):
    self.calls.append(('itm', len(images)))
    self._touch(images)
    out = np.zeros((len(images), 2), np.float32)
    for p, key in enumerate(zip(images, texts)):
      if callable(self.itm):
        v = self.itm(*key)
      elif key in self.itm:
        v = self.itm[key]
      else:
        raise KeyError(f'TableScorer has no ITM score for pair {key}')
      out[p] = v if isinstance(v, (tuple, list)) else (0.0, v)
    return out

  def itc_features(self, images, texts, *, max_tokens=None):
    self.calls.append(('itc', len(images or ()) + len(texts or ())))
    self._touch(images or ())

    def feats(table, keys):
      if keys is None:
        return None
      x = np.asarray([table[k] for k in keys], np.float32).reshape(len(keys), -1)
      return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    return feats(self.itc_image, images), feats(self.itc_text, texts)
