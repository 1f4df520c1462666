"""The built-in synthetic world: rendered scenes of a few shapes and their captions.

A scene holds 1..`max_objects` objects, each with a shape (circle, square, triangle, star), a colour
(red, green, blue, yellow, white), a size (small, large) and a cell of a 3x3 grid (plus a little
jitter), on a dark background. Everything is deterministic per (seed, split, index): each index has
its own `np.random.default_rng([seed, split_id, index])`, so any record can be produced in any
order, by any process, at any resolution.

Captions come from a small closed grammar (every word is in `vocab_words()`):

  caption := part (" and " part)*  |  "there is a" NP0  |  "there is no" NP0
  part    := NP | NP " " RELATION " " NP
  NP      := "a" [size] colour shape           (at least one such object; distinct per mention)
           | number colour shape["s"]           (exactly that many objects of this colour and shape)
  RELATION:= "to the left of" | "to the right of" | "above" | "below"   (grid column / row order)

e.g. "a small red circle to the left of a large blue square and two green stars",
"there is no yellow triangle". Captions are lower-case without punctuation, so ALBEF's
`pre_caption` leaves them unchanged, and a horizontal flip is exactly the left <-> right word swap.

Text hard negatives (for NTA's (I, T_fg) pairs) are edits of the caption that are false for the
scene: attributes swapped between two objects, relation order swapped, relation word flipped, wrong
number, wrong colour / shape / size, negation flipped. Each candidate is checked with `holds`.

Splits: a fixed hash of a scene's composition (its sizes, colours and shapes, positions and which
object has which ignored) reserves HELDOUT_FRACTION of all compositions for evaluation
(`is_heldout`). The 'train' split never draws one; every other split and every benchmark case draws
only those, so evaluation asks about combinations never trained on, in any binding.

From the same generator, `build_benchmark` makes the fine-grained synthetic suite (attribute swap,
relation swap, counting, existence, the main object's colour / shape / size replaced, the main
object replaced by a similar one, Winoground-style pairs, retrieval); its metrics are in
`nas_jax.benchmarks.synthetic`. No material / texture attribute: small objects are 7 px across at
48 px (radius 0.075 of the side), too small for a stripe or sheen to render clearly.

Speed: `python -m nas_jax.data.synthetic --image_size 64` prints samples and records/s; on one core
of the 2-core dev machine, about 3-4k records/s at 64 px with negatives (about 1k/s while other
jobs share the core), 1-2 s to build the 8 x 100-case suite (held-out cases are drawn by rejection).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import tempfile
import zlib
from typing import NamedTuple, Sequence, Union

import numpy as np

# ------------------------------------------------------------------------------------------ world

SHAPES = ('circle', 'square', 'triangle', 'star')
COLOURS = ('red', 'green', 'blue', 'yellow', 'white')
SIZES = ('small', 'large')
NUMBERS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six')  # NUMBERS[n] is n.
RELATIONS = {'left': 'to the left of', 'right': 'to the right of', 'above': 'above',
             'below': 'below'}
_FLIP = {'left': 'right', 'right': 'left', 'above': 'below', 'below': 'above'}

GRID = 3                       # Objects sit in distinct cells of a GRID x GRID grid.
MAX_OBJECTS = 6                # Largest number word we caption with is six.
_RADIUS = {'small': 0.075, 'large': 0.125}   # Fraction of the image side.
_JITTER = 0.015                # Centre jitter inside the cell, fraction of the image side.
_RGB = {'red': (220, 50, 50), 'green': (50, 190, 70), 'blue': (60, 100, 235),
        'yellow': (235, 215, 50), 'white': (235, 235, 235)}
_SHADE = 12.0                  # Per-object brightness jitter (+- this many levels).
BACKGROUND = (40, 40, 40)


class Obj(NamedTuple):
  """One object. x, y: centre as a fraction of the image side (x right, y down)."""
  shape: str
  colour: str
  size: str
  row: int
  col: int
  x: float
  y: float
  shade: float = 0.0   # In [-1, 1]; brightness jitter of the fill colour.


Scene = tuple  # tuple[Obj, ...]


def _make_obj(rng: np.random.Generator, shape: str, colour: str, size: str, cell: int) -> Obj:
  row, col = divmod(int(cell), GRID)
  jx, jy, shade = rng.uniform(-1.0, 1.0, size=3)
  return Obj(shape, colour, size, row, col, float((col + 0.5) / GRID + _JITTER * jx),
             float((row + 0.5) / GRID + _JITTER * jy), float(shade))


def sample_scene(rng: np.random.Generator, max_objects: int = 3,
                 p_duplicate: float = 0.3) -> Scene:
  """A random scene of 1..max_objects objects in distinct cells.

  Each new object copies the (colour, shape) of an earlier one with probability `p_duplicate`
  (so counting captions occur), else gets a (colour, shape) not yet in the scene.
  """
  n = int(rng.integers(1, max_objects + 1))
  cells = rng.choice(GRID * GRID, size=n, replace=False)
  kinds: list[tuple[str, str]] = []
  objs = []
  for cell in cells:
    if kinds and rng.random() < p_duplicate:
      colour, shape = kinds[int(rng.integers(len(kinds)))]
    else:
      colour, shape = _new_kind(rng, kinds)
    kinds.append((colour, shape))
    objs.append(_make_obj(rng, shape, colour, SIZES[int(rng.integers(2))], cell))
  return tuple(objs)


def _new_kind(rng: np.random.Generator, taken: Sequence[tuple[str, str]]) -> tuple[str, str]:
  while True:
    kind = (COLOURS[int(rng.integers(len(COLOURS)))], SHAPES[int(rng.integers(len(SHAPES)))])
    if kind not in taken:
      return kind


HELDOUT_FRACTION = 0.1   # Share of scene compositions kept for evaluation (see `is_heldout`).
_MAX_DRAWS = 10_000      # Rejection-sampling guard (acceptance is about HELDOUT_FRACTION).


def composition(scene: Scene) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
  """What a scene is made of, positions and bindings ignored: its sizes, its colours and its shapes,
  each sorted. A scene and its rebindings (colours or sizes exchanged between objects, as in the
  attribute-swap and Winoground foils) have the same composition."""
  return _composition((o.size, o.colour, o.shape) for o in scene)


def _composition(kinds) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
  kinds = list(kinds)   # (size, colour, shape) of each object.
  return tuple(tuple(sorted(k[i] for k in kinds)) for i in range(3))


@functools.lru_cache(maxsize=1 << 16)
def _heldout_key(comp: tuple) -> bool:
  digest = hashlib.blake2b(repr(comp).encode(), digest_size=8).digest()
  return int.from_bytes(digest, 'little') / 2.0 ** 64 < HELDOUT_FRACTION


def is_heldout(scene: Scene) -> bool:
  """Whether the scene's composition is reserved for evaluation.

  A fixed hash of `composition(scene)` (the same for every seed and split) puts HELDOUT_FRACTION of
  all compositions aside. The 'train' split never draws one; every other split (held-out scenes,
  the benchmark's cases) draws only those. So the model never saw an evaluated scene's sizes,
  colours and shapes together, in any binding: neither the scene, nor its caption's rebindings
  that the swap tasks use as foils. Each object kind was trained on, in other company.
  """
  return _heldout_key(composition(scene))


def sample_scene_from(rng: np.random.Generator, compositions: str, max_objects: int = 3,
                      p_duplicate: float = 0.3) -> Scene:
  """`sample_scene` restricted to 'train' compositions, 'heldout' ones (`is_heldout`) or 'all'
  (by rejection: scenes are drawn until one fits)."""
  if compositions not in ('train', 'heldout', 'all'):
    raise ValueError(f"compositions must be 'train', 'heldout' or 'all', got {compositions!r}")
  for _ in range(_MAX_DRAWS):
    scene = sample_scene(rng, max_objects, p_duplicate)
    if compositions == 'all' or is_heldout(scene) == (compositions == 'heldout'):
      return scene
  raise ValueError(f'no {compositions} scene in {_MAX_DRAWS} draws with max_objects={max_objects}')


# ------------------------------------------------------------------------------------------ render

def _grid(size: int) -> np.ndarray:
  return (np.arange(size, dtype=np.float32) + 0.5) / size   # Pixel centres, fraction units.


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
  """Boolean mask of `shape` of nominal radius r; dx [1, w], dy [h, 1] offsets from the centre."""
  if shape == 'circle':
    return dx * dx + dy * dy <= r * r
  if shape == 'square':
    return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85 * r
  if shape == 'triangle':
    big = 1.35 * r          # Circumradius. The box is centred: the centroid sits 0.25*big low.
    ty = dy - 0.25 * big    # Offset from the centroid.
    return (ty <= 0.5 * big) & (ty >= np.sqrt(3.0) * np.abs(dx) - big)
  if shape == 'star':
    outer, inner, half = 1.25 * r, 0.5 * 1.25 * r, np.pi / 5
    theta = np.arctan2(dx, -dy)                              # 0 at the top, a tip there.
    alpha = np.abs(np.mod(theta + half, 2 * half) - half)    # Angle to the nearest tip, [0, pi/5].
    # Radius of the edge from the tip (outer, 0) to the notch (inner, pi/5) at angle alpha.
    edge = outer * inner * np.sin(half) / (outer * np.sin(alpha) + inner * np.sin(half - alpha))
    return dx * dx + dy * dy <= edge * edge
  raise ValueError(f'unknown shape {shape!r}: use one of {SHAPES}')


def render(scene: Scene, image_size: int = 64, antialias: bool = True) -> np.ndarray:
  """Draws a scene: uint8 [image_size, image_size, 3].

  With `antialias`, each pixel's coverage is the mean of a 2x2 grid of sub-pixel samples and the
  fill colour is blended by it (small shapes at 32 px keep their outline). Only each object's
  bounding box is touched.
  """
  img = np.empty((image_size, image_size, 3), np.float32)
  img[...] = BACKGROUND
  g = _grid(image_size)
  offsets = (-0.25 / image_size, 0.25 / image_size) if antialias else (0.0,)
  for o in scene:
    r = _RADIUS[o.size]
    reach = 1.3 * r   # Covers every shape's extent (the star's tip, 1.25 r).
    x0 = max(int((o.x - reach) * image_size), 0)
    x1 = min(int((o.x + reach) * image_size) + 1, image_size)
    y0 = max(int((o.y - reach) * image_size), 0)
    y1 = min(int((o.y + reach) * image_size) + 1, image_size)
    dx, dy = (g[x0:x1] - o.x)[None, :], (g[y0:y1] - o.y)[:, None]
    cover = sum(_shape_mask(o.shape, dx + ox, dy + oy, r).astype(np.float32)
                for ox in offsets for oy in offsets) / len(offsets) ** 2
    rgb = np.clip(np.asarray(_RGB[o.colour], np.float32) + _SHADE * o.shade, 0, 255)
    box = img[y0:y1, x0:x1]
    box += cover[..., None] * (rgb - box)
  return np.rint(img).astype(np.uint8)


# ------------------------------------------------------------------------------------------ captions

class NP(NamedTuple):
  """A noun phrase. count 0: "a [size] colour shape" (one object, distinct from the other
  mentions); count n >= 1: "n colour shape(s)", exactly n objects of that colour and shape."""
  colour: str
  shape: str
  size: str | None = None
  count: int = 0


class Rel(NamedTuple):
  """`subj` RELATION `obj`, relation in RELATIONS (by grid column / row, strict)."""
  subj: NP
  rel: str
  obj: NP


class Exists(NamedTuple):
  """"there is a colour shape" (positive) or "there is no colour shape"."""
  np: NP
  positive: bool


Part = Union[NP, Rel]
Claim = tuple  # tuple[Part, ...] joined with "and", or (Exists,).


def np_text(np_: NP) -> str:
  if np_.count == 0:
    return ' '.join(w for w in ('a', np_.size, np_.colour, np_.shape) if w)
  return f'{NUMBERS[np_.count]} {np_.colour} {np_.shape}{"s" if np_.count > 1 else ""}'


def text(claim: Claim) -> str:
  """The caption of a claim."""
  out = []
  for part in claim:
    if isinstance(part, Exists):
      out.append(f'there is {"a" if part.positive else "no"} {part.np.colour} {part.np.shape}')
    elif isinstance(part, Rel):
      out.append(f'{np_text(part.subj)} {RELATIONS[part.rel]} {np_text(part.obj)}')
    else:
      out.append(np_text(part))
  return ' and '.join(out)


def _parse_np(words: list[str], caption: str) -> NP:
  def bad(why):
    return ValueError(f'caption {caption!r} is not in the synthetic grammar: {why}')
  if not words:
    raise bad('empty noun phrase')
  if words[0] == 'a':
    count = 0
  elif words[0] in NUMBERS[1:]:
    count = NUMBERS.index(words[0])
  else:
    raise bad(f'noun phrase starts with {words[0]!r}, not "a" or a number')
  rest = words[1:]
  size = None
  if rest and rest[0] in SIZES:
    if count:
      raise bad('counted noun phrases carry no size')
    size, rest = rest[0], rest[1:]
  if len(rest) != 2 or rest[0] not in COLOURS:
    raise bad(f'expected "colour shape" in {" ".join(words)!r}')
  shape = rest[1]
  if count > 1:
    if not shape.endswith('s'):
      raise bad(f'{shape!r} should be plural after {words[0]!r}')
    shape = shape[:-1]
  if shape not in SHAPES:
    raise bad(f'unknown shape {rest[1]!r}')
  return NP(rest[0], shape, size, count)


def parse(caption: str) -> Claim:
  """The claim of a caption (the inverse of `text`). Raises ValueError outside the grammar."""
  claim = []
  for chunk in caption.split(' and '):
    if chunk.startswith('there is '):
      words = chunk.split()
      if len(words) != 5 or words[2] not in ('a', 'no'):
        raise ValueError(f'caption {caption!r} is not in the synthetic grammar: bad existence')
      np_ = _parse_np(['a'] + words[3:], caption)
      claim.append(Exists(np_, words[2] == 'a'))
      continue
    for rel, phrase in RELATIONS.items():
      left, sep, right = chunk.partition(f' {phrase} ')
      if sep:
        claim.append(Rel(_parse_np(left.split(), caption), rel, _parse_np(right.split(), caption)))
        break
    else:
      claim.append(_parse_np(chunk.split(), caption))
  if any(isinstance(p, Exists) for p in claim) and len(claim) > 1:
    raise ValueError(f'caption {caption!r}: "there is" cannot be joined with "and"')
  return tuple(claim)


def _matches(o: Obj, np_: NP) -> bool:
  return o.colour == np_.colour and o.shape == np_.shape and (np_.size is None or o.size == np_.size)


def relation_holds(a: Obj, rel: str, b: Obj) -> bool:
  if rel == 'left':
    return a.col < b.col
  if rel == 'right':
    return a.col > b.col
  if rel == 'above':
    return a.row < b.row
  if rel == 'below':
    return a.row > b.row
  raise ValueError(f'unknown relation {rel!r}: use one of {tuple(RELATIONS)}')


def holds(scene: Scene, claim: Claim | str) -> bool:
  """Whether a claim (or caption) is true of the scene.

  Counted NPs are exact counts over the whole scene; "a ..." mentions must be matched by distinct
  objects, and relations hold between the objects matched to their two mentions.
  """
  if isinstance(claim, str):
    claim = parse(claim)
  mentions: list[NP] = []
  rels: list[tuple[int, str, int]] = []
  for part in claim:
    if isinstance(part, Exists):
      if any(_matches(o, part.np) for o in scene) != part.positive:
        return False
    elif isinstance(part, Rel):
      rels.append((len(mentions), part.rel, len(mentions) + 1))
      mentions += [part.subj, part.obj]
    elif part.count:
      if sum(_matches(o, part) for o in scene) != part.count:
        return False
    else:
      mentions.append(part)
  if len(mentions) > len(scene):
    return False
  for assign in itertools.permutations(range(len(scene)), len(mentions)):
    if all(_matches(scene[k], m) for k, m in zip(assign, mentions)) and all(
        relation_holds(scene[assign[i]], rel, scene[assign[j]]) for i, rel, j in rels):
      return True
  return False


def _true_relations(a: Obj, b: Obj) -> list[str]:
  return [r for r in RELATIONS if relation_holds(a, r, b)]


def describe(scene: Scene, rng: np.random.Generator, *, p_and: float = 0.25,
             p_one: float = 0.1) -> Claim:
  """A full description of the scene: every object is mentioned.

  Groups of identical (colour, shape) are counted ("two red circles"); two single objects are
  related ("a small red circle above a large blue square"), or with probability `p_and` just listed
  ("... and ..."); a single object is counted as "one red circle" with probability `p_one`.
  """
  groups: dict[tuple[str, str], list[Obj]] = {}
  for o in scene:
    groups.setdefault((o.colour, o.shape), []).append(o)
  parts: list[Part] = []
  singles: list[Obj] = []
  for (colour, shape), objs in groups.items():
    if len(objs) > 1:
      parts.append(NP(colour, shape, None, len(objs)))
    elif rng.random() < p_one:
      parts.append(NP(colour, shape, None, 1))
    else:
      singles.append(objs[0])
  if len(singles) >= 2 and rng.random() >= p_and:
    i, j = (int(k) for k in rng.choice(len(singles), size=2, replace=False))
    a, b = singles[i], singles[j]
    rels = _true_relations(a, b)
    parts.append(Rel(NP(a.colour, a.shape, a.size), rels[int(rng.integers(len(rels)))],
                     NP(b.colour, b.shape, b.size)))
    singles = [o for k, o in enumerate(singles) if k not in (i, j)]
  parts += [NP(o.colour, o.shape, o.size) for o in singles]
  order = rng.permutation(len(parts))
  return tuple(parts[int(k)] for k in order)


def existence_claim(scene: Scene, rng: np.random.Generator, positive: bool | None = None) -> Claim:
  """"there is a X" for a present (colour, shape), or "there is no X" for an absent one."""
  if positive is None:
    positive = bool(rng.random() < 0.5)
  present = sorted({(o.colour, o.shape) for o in scene})
  if positive:
    colour, shape = present[int(rng.integers(len(present)))]
  else:
    colour, shape = _new_kind(rng, present)
  return (Exists(NP(colour, shape), positive),)


# ------------------------------------------------------------------------------------------ negatives

def _other(rng: np.random.Generator, options: Sequence[str], current: str) -> str:
  rest = [o for o in options if o != current]
  return rest[int(rng.integers(len(rest)))]


def _np_edits(np_: NP, rng: np.random.Generator, max_count: int) -> list[NP]:
  out = [np_._replace(colour=_other(rng, COLOURS, np_.colour)),
         np_._replace(shape=_other(rng, SHAPES, np_.shape))]
  if np_.size is not None:
    out.append(np_._replace(size=_other(rng, SIZES, np_.size)))
  if np_.count:
    out += [np_._replace(count=n) for n in (np_.count - 1, np_.count + 1) if 1 <= n <= max_count]
  return out


def _swap_attr(a: NP, b: NP, attr: str) -> tuple[NP, NP] | None:
  va, vb = getattr(a, attr), getattr(b, attr)
  if va == vb or va is None or vb is None:
    return None
  return a._replace(**{attr: vb}), b._replace(**{attr: va})


def _candidates(claim: Claim, rng: np.random.Generator,
                max_count: int) -> tuple[list[Claim], list[Claim]]:
  """Edited claims: (swaps of two things already in the caption, single-word edits)."""
  swaps, edits = [], []
  parts = list(claim)

  def put(bucket, k, new_part):
    bucket.append(tuple(parts[:k] + [new_part] + parts[k + 1:]))

  for k, part in enumerate(parts):
    if isinstance(part, Exists):
      put(swaps, k, part._replace(positive=not part.positive))
    elif isinstance(part, Rel):
      put(swaps, k, Rel(part.obj, part.rel, part.subj))          # Relation order swapped.
      put(edits, k, part._replace(rel=_FLIP[part.rel]))           # Relation word flipped.
      for attr in ('colour', 'shape', 'size'):
        pair = _swap_attr(part.subj, part.obj, attr)
        if pair:
          put(swaps, k, Rel(pair[0], part.rel, pair[1]))
      for np_ in _np_edits(part.subj, rng, max_count):
        put(edits, k, part._replace(subj=np_))
      for np_ in _np_edits(part.obj, rng, max_count):
        put(edits, k, part._replace(obj=np_))
    else:
      for np_ in _np_edits(part, rng, max_count):
        put(edits, k, np_)
  # Attributes swapped between the leading noun phrases of two parts.
  heads = [(k, p.subj if isinstance(p, Rel) else p) for k, p in enumerate(parts)
           if not isinstance(p, Exists)]
  for (i, a), (j, b) in itertools.combinations(heads, 2):
    for attr in ('colour', 'shape'):
      pair = _swap_attr(a, b, attr)
      if pair:
        new = list(parts)
        new[i] = parts[i]._replace(subj=pair[0]) if isinstance(parts[i], Rel) else pair[0]
        new[j] = parts[j]._replace(subj=pair[1]) if isinstance(parts[j], Rel) else pair[1]
        swaps.append(tuple(new))
  return swaps, edits


def negatives(scene: Scene, claim: Claim, rng: np.random.Generator, *, max_negatives: int = 4,
              max_count: int = MAX_OBJECTS) -> list[str]:
  """Up to `max_negatives` distinct captions that are false for the scene (at least one for every
  caption `describe`/`existence_claim` make). Swap-type negatives come first, then the rest, each
  group in random order."""
  true_text = text(claim)
  swaps, edits = _candidates(claim, rng, max_count)
  out: list[str] = []
  seen = {true_text}
  for group in (swaps, edits):
    for k in rng.permutation(len(group)):
      if len(out) == max_negatives:
        break
      t = text(group[int(k)])
      if t not in seen:
        seen.add(t)
        if not holds(scene, group[int(k)]):
          out.append(t)
  if not out:  # The grammar always has one (e.g. a wrong colour); reaching this is a bug.
    raise AssertionError(f'no false caption found for {true_text!r}')
  return out


# ------------------------------------------------------------------------------------------ vocab

def vocab_words() -> list[str]:
  """Every word the grammar can produce, sorted."""
  words = set(SHAPES) | {s + 's' for s in SHAPES} | set(COLOURS) | set(SIZES) | set(NUMBERS[1:])
  words |= {'a', 'and', 'there', 'is', 'no'}
  for phrase in RELATIONS.values():
    words |= set(phrase.split())
  return sorted(words)


SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')


def vocab_size() -> int:
  """Rows of the synthetic vocabulary (set `model.bert.vocab_size` to this, or more)."""
  return len(SPECIAL_TOKENS) + len(vocab_words())


def _cache_dir() -> str:
  root = os.environ.get('NAS_JAX_CACHE') or os.path.join(os.path.expanduser('~'), '.cache',
                                                         'nas_jax')
  try:
    os.makedirs(root, exist_ok=True)
    if os.access(root, os.W_OK):
      return root
  except OSError:
    pass
  root = os.path.join(tempfile.gettempdir(), f'nas_jax-{os.getuid() if hasattr(os, "getuid") else 0}')
  os.makedirs(root, exist_ok=True)
  return root


def vocab_file() -> str:
  """Path of the synthetic world's BERT `vocab.txt` ([PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4,
  then `vocab_words()`), written once into the cache dir ($NAS_JAX_CACHE or ~/.cache/nas_jax).
  The name carries a hash of the content, so a changed grammar never reads a stale file."""
  content = '\n'.join(SPECIAL_TOKENS + tuple(vocab_words())) + '\n'
  digest = hashlib.sha1(content.encode()).hexdigest()[:10]
  root = _cache_dir()
  path = os.path.join(root, f'synthetic_vocab_{digest}.txt')
  if not os.path.isfile(path):
    fd, tmp = tempfile.mkstemp(dir=root, prefix='.vocab', suffix='.tmp')
    with os.fdopen(fd, 'w') as f:
      f.write(content)
    os.replace(tmp, path)   # Atomic: concurrent workers never see a half-written file.
  return path


# ------------------------------------------------------------------------------------------ source

def split_id(split: str) -> int:
  """A stable integer for a split name (part of each record's RNG seed)."""
  if not isinstance(split, str) or not split:
    raise ValueError(f'split must be a non-empty string such as "train" or "heldout", got {split!r}')
  return zlib.crc32(split.encode()) & 0x7FFFFFFF


def record_rng(seed: int, split: str, index: int) -> np.random.Generator:
  return np.random.default_rng([int(seed), split_id(split), int(index)])


class SyntheticSource:
  """Random-access source of synthetic scenes for grain (picklable; no state but the arguments).

  Record i: dict(image=uint8 [image_size, image_size, 3], caption=str, image_id=int (= i),
  neg_captions=list[str]): 1..max_negatives captions false for the image (empty when
  text_negatives=False). Different (seed, split) pairs give independent streams; use split='train'
  for training and e.g. 'heldout' for evaluation.

  Scenes come from 'train' compositions on split='train' and from held-out ones on every other split
  (`is_heldout`; `compositions` overrides: 'train', 'heldout' or 'all'), so no held-out scene's
  combination of sizes, colours and shapes is ever trained on.

  Captions are full descriptions (`describe`), except a fraction `p_existence` of "there is (no) X"
  statements. p_existence=None means 0.1 on 'train' and 0 on other splits, so held-out captions
  always describe the whole scene (retrieval). Identical scenes can repeat (single objects come in
  40 kinds); the benchmark's retrieval subset de-duplicates captions.

  Horizontal flips stay consistent if "left" <-> "right" are swapped in the caption AND the
  negatives. Longest captions: 17 words at max_objects=3, 22 at 4 (fit 25 tokens with [CLS] and
  [SEP]), 32 at 6 (raise data.max_text_len).
  """

  def __init__(self, num_records: int, *, seed: int = 0, split: str = 'train',
               image_size: int = 64, max_objects: int = 3, text_negatives: bool = True,
               p_existence: float | None = None, p_duplicate: float = 0.3, p_and: float = 0.25,
               p_one: float = 0.1, max_negatives: int = 4, compositions: str | None = None):
    if int(num_records) < 1:
      raise ValueError(f'SyntheticSource: num_records must be >= 1, got {num_records}')
    if not 1 <= int(max_objects) <= MAX_OBJECTS:
      raise ValueError(f'SyntheticSource: max_objects must be in 1..{MAX_OBJECTS} (data.synthetic.'
                       f'max_objects), got {max_objects}')
    if int(image_size) < 16:
      raise ValueError(f'SyntheticSource: image_size must be >= 16 pixels, got {image_size}')
    for name, p in (('p_duplicate', p_duplicate), ('p_and', p_and), ('p_one', p_one),
                    ('p_existence', p_existence)):
      if p is not None and not 0.0 <= p <= 1.0:
        raise ValueError(f'SyntheticSource: {name} must be a probability in [0, 1], got {p}')
    if compositions not in (None, 'train', 'heldout', 'all'):
      raise ValueError(f"SyntheticSource: compositions must be 'train', 'heldout', 'all' or None "
                       f"(by split), got {compositions!r}")
    self.num_records = int(num_records)
    self.seed = int(seed)
    self.split = split
    self._split_id = split_id(split)
    self.image_size = int(image_size)
    self.max_objects = int(max_objects)
    self.text_negatives = bool(text_negatives)
    self.p_existence = (0.1 if split == 'train' else 0.0) if p_existence is None else float(p_existence)
    self.p_duplicate = float(p_duplicate)
    self.p_and = float(p_and)
    self.p_one = float(p_one)
    self.max_negatives = int(max_negatives)
    self.compositions = compositions or ('train' if split == 'train' else 'heldout')

  def __len__(self) -> int:
    return self.num_records

  def __repr__(self) -> str:
    return (f'SyntheticSource(num_records={self.num_records}, seed={self.seed}, '
            f'split={self.split!r}, image_size={self.image_size}, max_objects={self.max_objects})')

  def _check(self, index) -> int:
    i = int(index)
    if not 0 <= i < self.num_records:
      raise IndexError(f'{self!r}: index {index} out of range [0, {self.num_records})')
    return i

  def scene(self, index: int) -> tuple[Scene, Claim, np.random.Generator]:
    """The record's scene, its caption's claim, and the RNG positioned after them."""
    i = self._check(index)
    rng = np.random.default_rng([self.seed, self._split_id, i])
    scene = sample_scene_from(rng, self.compositions, self.max_objects, self.p_duplicate)
    if self.p_existence and rng.random() < self.p_existence:
      claim = existence_claim(scene, rng)
    else:
      claim = describe(scene, rng, p_and=self.p_and, p_one=self.p_one)
    return scene, claim, rng

  def __getitem__(self, index) -> dict:
    scene, claim, rng = self.scene(index)
    negs = (negatives(scene, claim, rng, max_negatives=self.max_negatives)
            if self.text_negatives else [])
    return dict(image=render(scene, self.image_size), caption=text(claim), image_id=int(index),
                neg_captions=negs)


def source_kwargs(synthetic_cfg, split: str = 'train') -> dict:
  """SyntheticSource keyword arguments from `config.data.synthetic` (max_objects, p_*).
  Existence captions are for training only: other splits get p_existence=0 (full descriptions)."""
  return dict(max_objects=synthetic_cfg.max_objects,
              p_existence=synthetic_cfg.p_existence if split == 'train' else 0.0,
              p_duplicate=synthetic_cfg.p_duplicate, p_and=synthetic_cfg.p_and)


# ------------------------------------------------------------------------------------------ benchmark

BENCH_SUBSETS = ('attribute', 'relation', 'counting', 'existence', 'main_attribute', 'main_object',
                 'winoground', 'retrieval')
PAIRWISE_SUBSETS = ('attribute', 'relation', 'counting', 'existence', 'main_attribute',
                    'main_object')
MAIN_GROUPS = ('colour', 'shape', 'size')   # The main object's attribute replaced (main_attribute).


def _two_kinds(rng: np.random.Generator, distinct_shapes: bool) -> list[tuple[str, str, str]]:
  """Two (size, colour, shape) with different colours (and shapes if asked)."""
  c = rng.choice(len(COLOURS), size=2, replace=False)
  s = (rng.choice(len(SHAPES), size=2, replace=False) if distinct_shapes
       else rng.integers(len(SHAPES), size=2))
  z = rng.integers(2, size=2)
  return [(SIZES[int(z[k])], COLOURS[int(c[k])], SHAPES[int(s[k])]) for k in range(2)]


def _cells_for(rng: np.random.Generator, rel: str) -> tuple[int, int]:
  """Two distinct cells (a, b) with `a rel b` (rejection sampling over the grid)."""
  while True:
    a, b = (int(k) for k in rng.choice(GRID * GRID, size=2, replace=False))
    if relation_holds(Obj('', '', '', *divmod(a, GRID), 0, 0),
                      rel, Obj('', '', '', *divmod(b, GRID), 0, 0)):
      return a, b


def _np(o: Obj, size: bool = True) -> NP:
  return NP(o.colour, o.shape, o.size if size else None)


def _pair_case(scene, caption: Claim, foil: Claim, group: str) -> dict:
  """A caption-vs-foil case; `_heldout_case` checks it and renders it once its scene is kept."""
  return dict(caption=caption, foil=foil, group=group, scene=scene)


def _checked_pair(case: dict) -> dict:
  scene, caption, foil = case['scene'], case['caption'], case['foil']
  if not holds(scene, caption) or holds(scene, foil):  # Guaranteed by construction.
    raise AssertionError(f'bad benchmark case {text(caption)!r} / {text(foil)!r} for {scene}')
  return dict(case, caption=text(caption), foil=text(foil))


def _attribute_case(rng, max_objects) -> dict:
  """ARO VG-Attribution-like: "a small red circle and a large blue square" vs the two colours (or
  the two sizes) exchanged."""
  (z1, c1, s1), (z2, c2, s2) = _two_kinds(rng, distinct_shapes=True)
  group = 'colour' if rng.random() < 0.5 else 'size'
  if group == 'size':
    z2 = _other(rng, SIZES, z1)
  cells = rng.choice(GRID * GRID, size=2, replace=False)
  scene = (_make_obj(rng, s1, c1, z1, cells[0]), _make_obj(rng, s2, c2, z2, cells[1]))
  a, b = _np(scene[0]), _np(scene[1])
  fa, fb = _swap_attr(a, b, group)
  return _pair_case(scene, (a, b), (fa, fb), group)


def _relation_case(rng, max_objects) -> dict:
  """ARO VG-Relation-like: "a X to the left of a Y" vs "a Y to the left of a X"."""
  (z1, c1, s1), (z2, c2, s2) = _two_kinds(rng, distinct_shapes=False)
  rel = tuple(RELATIONS)[int(rng.integers(len(RELATIONS)))]
  ca, cb = _cells_for(rng, rel)
  scene = (_make_obj(rng, s1, c1, z1, ca), _make_obj(rng, s2, c2, z2, cb))
  a, b = _np(scene[0]), _np(scene[1])
  return _pair_case(scene, (Rel(a, rel, b),), (Rel(b, rel, a),), rel)


def _counting_case(rng, max_objects) -> dict:
  """VALSE counting-like: "three red circles" vs a wrong number (1..max_objects); the scene may
  hold other objects of other kinds."""
  n = int(rng.integers(2, max_objects + 1))
  wrong = _other(rng, [str(k) for k in range(1, max_objects + 1)], str(n))
  colour, shape = _new_kind(rng, [])
  kinds = [(colour, shape)] * n
  for _ in range(int(rng.integers(0, max_objects - n + 1))):
    kinds.append(_new_kind(rng, kinds))
  cells = rng.choice(GRID * GRID, size=len(kinds), replace=False)
  scene = tuple(_make_obj(rng, s, c, SIZES[int(rng.integers(2))], cell)
                for (c, s), cell in zip(kinds, cells))
  scene = tuple(scene[int(k)] for k in rng.permutation(len(scene)))
  return _pair_case(scene, (NP(colour, shape, None, n),), (NP(colour, shape, None, int(wrong)),),
                    str(n))


def _existence_case(rng, max_objects, positive: bool) -> dict:
  """VALSE existence-like: "there is a X" vs "there is no X" (and the reverse for absent X)."""
  scene = sample_scene(rng, max_objects)
  claim = existence_claim(scene, rng, positive)
  foil = (claim[0]._replace(positive=not positive),)
  return _pair_case(scene, claim, foil, 'present' if positive else 'absent')


# The main object: the caption's subject (its first noun phrase). Its (colour, shape) is unique in
# the scene and it is the largest object: large, every other object small (in the 'size' cases where
# the caption says "small", it is small like the rest).
#
# Cases come in pairs with the same two values the other way round (case 2j: the image shows value
# A, the foil says B; case 2j + 1: the image shows B, the foil says A), so a scorer blind to the
# image that just prefers some words to others scores 50 % on every pair: above 50 needs the image.

def _main_scene(rng: np.random.Generator, max_objects: int, main_size: str,
                main_kind: tuple[str, str]) -> Scene:
  """The main object (first, of `main_kind` (colour, shape)) and 0..max_objects-1 small objects of
  other kinds, in distinct cells."""
  n = 1 + int(rng.integers(max_objects))
  cells = rng.choice(GRID * GRID, size=n, replace=False)
  kinds: list[tuple[str, str]] = [main_kind]
  while len(kinds) < n:
    kinds.append(_new_kind(rng, kinds))
  return tuple(_make_obj(rng, shape, colour, main_size if k == 0 else 'small', cells[k])
               for k, (colour, shape) in enumerate(kinds))


def _main_caption(rng: np.random.Generator, scene: Scene) -> Claim:
  """A full description with the main object (scene[0]) as its subject: "a large red circle above a
  small blue square and a small green star" (related to the next object 3 times in 4)."""
  main, rest = scene[0], list(scene[1:])
  if rest and rng.random() < 0.75:
    rels = _true_relations(main, rest[0])
    first = Rel(_np(main), rels[int(rng.integers(len(rels)))], _np(rest.pop(0)))
  else:
    first = _np(main)
  return (first, *(_np(o) for o in rest))


def main_subject(claim: Claim) -> NP:
  """The caption's subject: the noun phrase it names first."""
  first = claim[0]
  return first.np if isinstance(first, Exists) else first.subj if isinstance(first, Rel) else first


def _with_subject(claim: Claim, np_: NP) -> Claim:
  first = claim[0]
  return (first._replace(subj=np_) if isinstance(first, Rel) else np_, *claim[1:])


@functools.lru_cache(maxsize=None)
def _has_heldout_main_scene(colour: str, shape: str, max_objects: int) -> bool:
  """Whether a large main object of this kind with up to max_objects - 1 (at most 2 tried) small
  objects of other kinds makes a held-out composition (not always so for max_objects=2)."""
  main = ('large', colour, shape)
  others = [('small', c, s) for c in COLOURS for s in SHAPES if (c, s) != (colour, shape)]
  return any(_heldout_key(_composition((main, *more)))
             for k in range(min(max_objects - 1, 2) + 1) for more in itertools.combinations(others, k))


def _main_pair(rng: np.random.Generator, group: str, max_objects: int) -> tuple:
  """Two values of the main object's `group` ('colour', 'shape', 'size' or 'object' = its
  (colour, shape) and the most similar other kind, `similar_kinds`), in random order."""
  if group == 'object':
    while True:
      kind = (COLOURS[int(rng.integers(len(COLOURS)))], SHAPES[int(rng.integers(len(SHAPES)))])
      pair = [kind, similar_kinds(*kind)[0]]
      if all(_has_heldout_main_scene(*k, max_objects) for k in pair):
        break
  else:
    values = dict(colour=COLOURS, shape=SHAPES, size=SIZES)[group]
    pair = [values[int(k)] for k in rng.choice(len(values), size=2, replace=False)]
  return tuple(pair)


def _main_case(rng, max_objects, group: str, shown, named) -> dict:
  """The main object shows `shown` and the foil names `named` instead (values of `group`, see
  `_main_pair`); its other attributes are random, its size large unless the group is 'size'.
  The foil is false: the other objects are small and of other kinds than the main one."""
  colour = COLOURS[int(rng.integers(len(COLOURS)))]
  shape = SHAPES[int(rng.integers(len(SHAPES)))]
  size = 'large'
  if group == 'object':
    colour, shape = shown
  else:
    colour, shape, size = {'colour': (shown, shape, size), 'shape': (colour, shown, size),
                           'size': (colour, shape, shown)}[group]
  scene = _main_scene(rng, max_objects, size, (colour, shape))
  caption = _main_caption(rng, scene)
  subj = main_subject(caption)
  foil_subj = (subj._replace(colour=named[0], shape=named[1]) if group == 'object'
               else subj._replace(**{group: named}))
  return _pair_case(scene, caption, _with_subject(caption, foil_subj), group)


def _distance_ranks(values: Sequence[str], distance) -> dict[str, list[str]]:
  return {v: sorted((w for w in values if w != v), key=lambda w: (distance(v, w), w)) for v in values}


@functools.lru_cache(maxsize=None)
def _similar_colours() -> dict[str, list[str]]:
  """Each colour's others, nearest first (Euclidean RGB distance)."""
  rgb = {c: np.asarray(v, np.float64) for c, v in _RGB.items()}
  return _distance_ranks(COLOURS, lambda a, b: float(np.linalg.norm(rgb[a] - rgb[b])))


@functools.lru_cache(maxsize=None)
def _similar_shapes() -> dict[str, list[str]]:
  """Each shape's others, nearest first (pixels that differ between the two large masks, 64 px)."""
  masks = {s: render((Obj(s, 'white', 'large', 1, 1, 0.5, 0.5),), 64)[..., 0] > 137 for s in SHAPES}
  return _distance_ranks(SHAPES, lambda a, b: int((masks[a] ^ masks[b]).sum()))


def similar_kinds(colour: str, shape: str) -> list[tuple[str, str]]:
  """Every (colour, shape) with a different colour AND a different shape, most similar first: by the
  sum of the colour's rank among the nearest colours and the shape's among the nearest shapes (then
  colour first). E.g. a red circle's most similar other object is a yellow square."""
  colours, shapes = _similar_colours()[colour], _similar_shapes()[shape]
  pairs = [(i + j, i, c, s) for i, c in enumerate(colours) for j, s in enumerate(shapes)]
  return [(c, s) for _, _, c, s in sorted(pairs)]


@functools.lru_cache(maxsize=None)
def _winoground_kinds(tag: str) -> list[tuple[tuple[str, str, str], tuple[str, str, str]]]:
  """Every two (size, colour, shape) of different colours and shapes (`_two_kinds`) whose scene is a
  held-out composition (its colour-swapped scene has the same composition), listed once to draw
  from rather than by rejection."""
  out = []
  for z1, z2 in itertools.product(SIZES, repeat=2):
    for (c1, c2), (s1, s2) in itertools.product(itertools.permutations(COLOURS, 2),
                                                itertools.permutations(SHAPES, 2)):
      scenes = [((z1, c1, s1), (z2, c2, s2))] + ([((z1, c2, s1), (z2, c1, s2))]
                                                  if tag == 'attribute' else [])
      if all(_heldout_key(_composition(k)) for k in scenes):
        out.append(scenes[0])
  return out


def _winoground_case(rng, tag: str) -> dict:
  """Two scenes, two captions with the same words in a different order; caption k is true of image
  k only. 'relation': the two objects trade places; 'attribute': they trade colours."""
  options = _winoground_kinds(tag)
  (z1, c1, s1), (z2, c2, s2) = options[int(rng.integers(len(options)))]
  rel = tuple(RELATIONS)[int(rng.integers(len(RELATIONS)))]
  ca, cb = _cells_for(rng, rel)
  a0, b0 = _make_obj(rng, s1, c1, z1, ca), _make_obj(rng, s2, c2, z2, cb)
  if tag == 'relation':
    a1, b1 = _make_obj(rng, s1, c1, z1, cb), _make_obj(rng, s2, c2, z2, ca)
    captions = ((Rel(_np(a0), rel, _np(b0)),), (Rel(_np(b0), rel, _np(a0)),))
  else:
    a1, b1 = _make_obj(rng, s1, c2, z1, ca), _make_obj(rng, s2, c1, z2, cb)
    captions = ((Rel(_np(a0), rel, _np(b0)),), (Rel(_np(a1), rel, _np(b1)),))
  return dict(captions=captions, tag=tag, scenes=((a0, b0), (a1, b1)))


def _checked_winoground(case: dict) -> dict:
  scenes, captions = case['scenes'], case['captions']
  texts = [text(c) for c in captions]
  ok = (all(holds(scenes[k], captions[k]) and not holds(scenes[k], captions[1 - k])
            for k in range(2)) and sorted(texts[0].split()) == sorted(texts[1].split()))
  if not ok:
    raise AssertionError(f'bad Winoground-style case {texts} for {scenes}')
  return dict(case, captions=texts)


def _heldout_case(make, rng: np.random.Generator, image_size: int) -> dict:
  """Draws cases with `make(rng)` until every scene of one is a held-out composition
  (`is_heldout`), then checks it (captions true, foils false) and renders it: image [H, W, 3] (one
  scene) or images [2, H, W, 3] (two); claims become caption strings."""
  for _ in range(_MAX_DRAWS):
    case = make(rng)
    scenes = case['scenes'] if 'scenes' in case else (case['scene'],)
    if all(is_heldout(s) for s in scenes):
      if 'scenes' in case:
        return dict(_checked_winoground(case),
                    images=np.stack([render(s, image_size) for s in scenes]))
      return dict(_checked_pair(case), image=render(case['scene'], image_size))
  raise AssertionError(f'build_benchmark: no case with held-out scenes in {_MAX_DRAWS} draws')


def build_benchmark(seed: int = 0, image_size: int = 64, n_per_subset: int = 100, *,
                    max_objects: int = 3, n_retrieval: int | None = None,
                    subsets: Sequence[str] = BENCH_SUBSETS) -> dict[str, list[dict]]:
  """The fine-grained synthetic suite (metrics: `nas_jax.benchmarks.synthetic.evaluate`).

  Every case has its own RNG from (seed, 'bench/<subset>', index), a stream apart from the training
  splits, and every scene of every case is a held-out composition (`is_heldout`): a set of objects
  the 'train' split never shows together. Returns {subset: cases}:
    attribute, relation, counting, existence, main_attribute, main_object (caption vs foil, one
    image): dict(image=uint8 [H, W, 3], caption=str, foil=str, group=str, scene=Scene)
      groups: attribute 'colour'|'size' (two objects' values exchanged); relation
      'left'|'right'|'above'|'below' (the two objects exchanged); counting the true number;
      existence 'present' (foil "there is no X") | 'absent' (foil "there is a X");
      main_attribute 'colour'|'shape'|'size' (the main object's, i.e. the caption's subject's,
      value replaced; groups in turn); main_object 'object' (the main object replaced by a similar
      one, `similar_kinds`). Both come in pairs of cases with the two values exchanged (case 2j
      shows A and names B, case 2j + 1 shows B and names A).
    winoground: dict(images=uint8 [2, H, W, 3], captions=[c0, c1], tag='relation'|'attribute',
      scenes=(s0, s1)); caption k describes image k; both captions have the same words.
    retrieval: dict(image, caption, scene), `n_retrieval` (default n_per_subset) held-out scenes with
      full descriptions, all captions distinct.
  """
  if not 2 <= max_objects <= MAX_OBJECTS:
    raise ValueError(f'build_benchmark: max_objects must be in 2..{MAX_OBJECTS} (counting needs 2), '
                     f'got {max_objects}')
  if n_per_subset < 1:
    raise ValueError(f'build_benchmark: n_per_subset must be >= 1, got {n_per_subset}')
  unknown = set(subsets) - set(BENCH_SUBSETS)
  if unknown:
    raise ValueError(f'build_benchmark: unknown subsets {sorted(unknown)}; use {BENCH_SUBSETS}')

  def maker(name: str, i: int):
    if name == 'existence':
      return lambda rng: _existence_case(rng, max_objects, i % 2 == 0)
    if name in ('main_attribute', 'main_object'):
      group = MAIN_GROUPS[(i // 2) % len(MAIN_GROUPS)] if name == 'main_attribute' else 'object'
      pair = _main_pair(record_rng(seed, f'bench/{name}/pair', i // 2), group, max_objects)
      shown, named = pair if i % 2 == 0 else pair[::-1]
      return lambda rng: _main_case(rng, max_objects, group, shown, named)
    if name == 'winoground':
      return lambda rng: _winoground_case(rng, 'relation' if i % 2 == 0 else 'attribute')
    make = dict(attribute=_attribute_case, relation=_relation_case, counting=_counting_case)[name]
    return lambda rng: make(rng, max_objects)

  bench: dict[str, list[dict]] = {}
  for name in subsets:
    if name == 'retrieval':
      bench[name] = _retrieval_cases(seed, image_size, n_retrieval or n_per_subset, max_objects)
    else:
      bench[name] = [_heldout_case(maker(name, i), record_rng(seed, f'bench/{name}', i), image_size)
                     for i in range(n_per_subset)]
  return bench


def _retrieval_cases(seed: int, image_size: int, n: int, max_objects: int) -> list[dict]:
  src = SyntheticSource(10 ** 9, seed=seed, split='bench/retrieval', image_size=image_size,
                        max_objects=max_objects, text_negatives=False, p_existence=0.0,
                        compositions='heldout')
  cases, seen = [], set()
  for i in range(100 * n):
    scene, claim, _ = src.scene(i)
    caption = text(claim)
    if caption not in seen:
      seen.add(caption)
      cases.append(dict(image=render(scene, image_size), caption=caption, scene=scene))
      if len(cases) == n:
        return cases
  raise ValueError(f'build_benchmark: could not find {n} distinct retrieval scenes with '
                   f'max_objects={max_objects}; ask for fewer')


# ------------------------------------------------------------------------------------------ CLI

def _main() -> None:
  import argparse
  import time
  ap = argparse.ArgumentParser(description='Print synthetic samples and the rendering speed.')
  ap.add_argument('--image_size', type=int, default=64)
  ap.add_argument('--max_objects', type=int, default=3)
  ap.add_argument('--n', type=int, default=2000, help='records to time')
  ap.add_argument('--save', default='', help='write a 4x4 grid of images to this PNG')
  args = ap.parse_args()
  src = SyntheticSource(args.n, image_size=args.image_size, max_objects=args.max_objects)
  for i in range(8):
    r = src[i]
    print(f'{i}: {r["caption"]!r}  negatives: {r["neg_captions"]}')
  t = time.perf_counter()
  for i in range(args.n):
    src[i]
  dt = time.perf_counter() - t
  print(f'{args.n / dt:,.0f} records/s at {args.image_size} px (render + caption + negatives, '
        f'one core); vocabulary {vocab_size()} tokens at {vocab_file()}')
  if args.save:
    from PIL import Image
    imgs = [src[i]['image'] for i in range(16)]
    grid = np.concatenate([np.concatenate(imgs[r * 4:r * 4 + 4], 1) for r in range(4)], 0)
    Image.fromarray(grid).save(args.save)
    print(f'wrote {args.save}')


if __name__ == '__main__':
  _main()
