"""Random-access sources of image-text records (grain `RandomAccessDataSource`-like).

Every source returns, for index i, one *raw record*:
  image:        str (a file path), bytes (an encoded image) or np.uint8 [H, W, 3]
  captions:     list[str], the candidate captions (one is drawn per epoch); a non-string caption
                in the file is kept as '' so the loader can count and replace it
  image_id:     int, same-image key: records showing the same image share it (retrieval files'
                `image_id`, else the image path), contiguous from 0
  neg_captions: list[str], text hard negatives (NegCLIP), [] elsewhere
  path:         str, where the record came from, for error messages

Sources keep their strings in flat numpy buffers (`StringTable`), so pickling one into each grain
worker process costs a few buffer copies even for 4M records.

Formats (docs/DATA.md, Sources):
  albef_json   `[{"image": path, "caption": str | [str], ("image_id": str|int)}]`, several files
               mixed as one corpus; `image` relative to `image_root` unless absolute.
  negclip_tsv  pandas TSV `<idx>\\ttitle\\tfilepath\\tneg_caption\\tneg_image`, `neg_caption` a Python
               literal list; quoted fields may contain newlines.
  prepared     ArrayRecord shards written by `python -m nas_jax.data.prepare`.
  tfds         any prepared TFDS image-text dataset through `tfds.data_source` (no TensorFlow).
  synthetic    nas_jax.data.synthetic.SyntheticSource.
"""

from __future__ import annotations

import ast
import csv
import glob
import json
import os
import struct
import sys
from typing import Any, Iterable, Sequence

import numpy as np


class DataFormatError(ValueError):
  """A data file that is not in the expected format; the message names the file and record."""


# ------------------------------------------------------------------------------ compact strings

class StringTable:
  """An immutable list of strings stored as one UTF-8 buffer plus offsets (cheap to pickle)."""

  def __init__(self, strings: Iterable[str]):
    encoded = [s.encode("utf-8") for s in strings]
    self._offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
    self._buf = np.frombuffer(b"".join(encoded), np.uint8).copy()

  def __len__(self) -> int:
    return len(self._offsets) - 1

  def __getitem__(self, i: int) -> str:
    return self._buf[self._offsets[i]:self._offsets[i + 1]].tobytes().decode("utf-8")


class _RaggedStrings:
  """A list of lists of strings: StringTable plus per-row offsets."""

  def __init__(self, rows: Sequence[Sequence[str]]):
    self._table = StringTable(s for row in rows for s in row)
    self._rows = np.zeros(len(rows) + 1, np.int64)
    np.cumsum([len(r) for r in rows], out=self._rows[1:])

  def __getitem__(self, i: int) -> list[str]:
    return [self._table[k] for k in range(self._rows[i], self._rows[i + 1])]


def _contiguous_ids(keys: Sequence[Any]) -> np.ndarray:
  """Keys → ints 0.. in order of first appearance."""
  mapping: dict[Any, int] = {}
  return np.fromiter((mapping.setdefault(k, len(mapping)) for k in keys), np.int64, len(keys))


def _as_caption(value: Any) -> str:
  return value if isinstance(value, str) else ""


class _CaptionedImages:
  """Records of the file-list sources: an image path, its captions, a same-image id and hard-negative
  captions, held compactly (the corpora have millions of records)."""

  def _hold(self, images: list[str], captions: list[list[str]], image_keys: Sequence[Any],
            negs: list[list[str]] | None = None) -> None:
    self._images = StringTable(images)
    self._captions = _RaggedStrings(captions)
    self._negs = _RaggedStrings(negs) if negs is not None else None
    self._image_ids = _contiguous_ids(image_keys)
    self.num_images = int(self._image_ids.max()) + 1 if len(self._image_ids) else 0

  def __len__(self) -> int:
    return len(self._images)

  def __getitem__(self, i: int) -> dict:
    path = self._images[i]
    return dict(image=path, captions=self._captions[i], image_id=int(self._image_ids[i]),
                neg_captions=self._negs[i] if self._negs is not None else [], path=path)


# ------------------------------------------------------------------------------ ALBEF json

class AlbefJsonSource(_CaptionedImages):
  """ALBEF pre-training / retrieval JSON lists, several files read as one corpus.

  Args:
    paths: JSON files, each a list of {"image": str, "caption": str | [str], ["image_id"]}.
    image_root: prefix for relative `image` paths ('' = as written).
  """

  has_negatives = False

  def __init__(self, paths: Sequence[str], image_root: str = ""):
    if isinstance(paths, str):
      paths = (paths,)
    if not paths:
      raise ValueError("albef_json source needs at least one file: set config.data.paths")
    images, captions, keys = [], [], []
    for path in paths:
      records = _load_json_list(path)
      for i, rec in enumerate(records):
        if not isinstance(rec, dict):
          raise DataFormatError(f"{path}: record {i} is a {type(rec).__name__}, expected an object "
                                f'{{"image": path, "caption": str | [str]}}: {_short(rec)}')
        image = rec.get("image")
        if not isinstance(image, str) or not image:
          raise DataFormatError(f'{path}: record {i} has no "image" path string: {_short(rec)}')
        if "caption" not in rec:
          raise DataFormatError(f'{path}: record {i} has no "caption" field: {_short(rec)}')
        cap = rec["caption"]
        captions.append([_as_caption(c) for c in cap] if isinstance(cap, list) else [_as_caption(cap)])
        full = os.path.join(image_root, image) if image_root else image
        images.append(full)
        keys.append(("id", rec["image_id"]) if "image_id" in rec else ("path", full))
    self._hold(images, captions, keys)


def _short(obj: Any, n: int = 120) -> str:
  s = repr(obj)
  return s if len(s) <= n else s[:n] + "…"


def _load_json_list(path: str) -> list:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"annotation file {path!r} does not exist (config.data.paths)")
  try:
    with open(path, "rb") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise DataFormatError(f"{path}: not valid JSON ({e}); expected ALBEF's list of "
                          '{"image": path, "caption": str | [str]} records') from None
  if not isinstance(data, list):
    raise DataFormatError(f"{path}: top level is a {type(data).__name__}, expected a JSON list of "
                          '{"image": path, "caption": str | [str]} records')
  return data


# ------------------------------------------------------------------------------ NegCLIP tsv

NEGCLIP_COLUMNS = ("", "title", "filepath", "neg_caption", "neg_image")


class NegClipTsvSource(_CaptionedImages):
  """NegCLIP's text-augmented COCO (`train_neg_clip.tsv`): (I, T) plus T_fg hard negatives.

  Args:
    paths: TSV files with header `<idx> title filepath neg_caption neg_image`.
    image_root: the directory that contains `coco/`.
  """

  has_negatives = True

  def __init__(self, paths: Sequence[str], image_root: str = ""):
    if isinstance(paths, str):
      paths = (paths,)
    if not paths:
      raise ValueError("negclip_tsv source needs at least one file: set config.data.paths")
    images, captions, negs = [], [], []
    csv.field_size_limit(sys.maxsize)
    for path in paths:
      if not os.path.isfile(path):
        raise FileNotFoundError(f"NegCLIP TSV {path!r} does not exist (config.data.paths)")
      with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader, None)
        if header is None or tuple(header[1:4]) != NEGCLIP_COLUMNS[1:4]:
          raise DataFormatError(f"{path}: header {header!r} is not NegCLIP's "
                                f"{list(NEGCLIP_COLUMNS)} (tab-separated)")
        for row_no, row in enumerate(reader):
          if len(row) < 4:
            raise DataFormatError(f"{path}: row {row_no} has {len(row)} fields, expected "
                                  f"{len(NEGCLIP_COLUMNS)}: {_short(row)}")
          negs.append(_parse_neg_list(row[3], path, row_no))
          captions.append([row[1]])
          rel = row[2]
          images.append(os.path.join(image_root, rel) if image_root else rel)
    self._hold(images, captions, images, negs)


def _parse_neg_list(text: str, path: str, row_no: int) -> list[str]:
  try:
    value = ast.literal_eval(text) if text.strip() else []
  except (ValueError, SyntaxError) as e:
    raise DataFormatError(f"{path}: row {row_no}: neg_caption {_short(text)} is not a Python list "
                          f"literal ({e})") from None
  if not isinstance(value, (list, tuple)):
    raise DataFormatError(f"{path}: row {row_no}: neg_caption is a {type(value).__name__}, "
                          "expected a list of strings")
  return [_as_caption(v) for v in value]


# ------------------------------------------------------------------------------ prepared shards

_MAGIC = b"NASR"


def encode_prepared(image: bytes, captions: Sequence[str], image_id: int, path: str,
                    neg_captions: Sequence[str] = ()) -> bytes:
  """One ArrayRecord record: b'NASR' | uint32 header length | JSON header | encoded image bytes."""
  header = json.dumps(dict(captions=list(captions), image_id=int(image_id), path=path,
                           neg_captions=list(neg_captions)), ensure_ascii=False).encode("utf-8")
  return _MAGIC + struct.pack("<I", len(header)) + header + image


def decode_prepared(record: bytes) -> dict:
  if record[:4] != _MAGIC:
    raise DataFormatError("record is not a nas_jax prepared record (bad magic): re-run "
                          "python -m nas_jax.data.prepare")
  (n,) = struct.unpack("<I", record[4:8])
  out = json.loads(record[8:8 + n].decode("utf-8"))
  out["image"] = bytes(record[8 + n:])
  return out


def prepared_files(paths: Sequence[str]) -> list[str]:
  """Directories (all *.array_record inside, sorted), globs or files → shard files."""
  if isinstance(paths, str):
    paths = (paths,)
  files = []
  for p in paths:
    if os.path.isdir(p):
      found = sorted(glob.glob(os.path.join(p, "*.array_record")))
      if not found:
        raise FileNotFoundError(f"{p} holds no *.array_record shards: write them with "
                                "python -m nas_jax.data.prepare --out " + p)
      files += found
    elif any(ch in p for ch in "*?["):
      found = sorted(glob.glob(p))
      if not found:
        raise FileNotFoundError(f"no prepared shards match {p!r}")
      files += found
    elif os.path.isfile(p):
      files.append(p)
    else:
      raise FileNotFoundError(f"prepared shard or directory {p!r} does not exist")
  if not files:
    raise ValueError("prepared source needs shard files or a directory: set config.data.paths")
  return files


class PreparedSource:
  """ArrayRecord shards of (re-encoded JPEG, captions, image_id) from `nas_jax.data.prepare`."""

  def __init__(self, paths: Sequence[str]):
    import grain

    self.files = prepared_files(paths)
    self._src = grain.sources.ArrayRecordDataSource(self.files)
    meta = [os.path.join(os.path.dirname(f), "meta.json") for f in self.files]
    self.has_negatives = any(_read_meta(m).get("has_negatives", False) for m in set(meta))

  def __len__(self) -> int:
    return len(self._src)

  def __getitem__(self, i: int) -> dict:
    return decode_prepared(self._src[i])


def _read_meta(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


# ------------------------------------------------------------------------------ tfds

class TfdsSource:
  """Any prepared TFDS image-text dataset (e.g. `coco_captions`) through `tfds.data_source`.

  Needs `pip install tensorflow-datasets` (not TensorFlow) and the dataset already prepared in
  `data_dir` in array_record format. Keys address nested features with '/': for coco_captions
  image_key='image', caption_key='captions/text', id_key='image/id'.
  """

  def __init__(self, name: str, split: str = "train", data_dir: str = "",
               image_key: str = "image", caption_key: str = "captions/text",
               id_key: str = "image/id"):
    try:
      import tensorflow_datasets as tfds
    except ImportError:
      raise ImportError(
          "source='tfds' needs tensorflow-datasets (TensorFlow itself is not needed): "
          "pip install 'nas_jax[tfds]' or pip install tensorflow-datasets, prepare the dataset "
          "in array_record format (tfds build --file_format=array_record), and set "
          "config.data.tfds.data_dir") from None
    if not name:
      raise ValueError("source='tfds' needs config.data.tfds.name (e.g. 'coco_captions')")
    self.name = name
    self._src = tfds.data_source(name, split=split, data_dir=data_dir or None)
    self.image_key, self.caption_key, self.id_key = image_key, caption_key, id_key
    self.has_negatives = False

  def __len__(self) -> int:
    return len(self._src)

  def __getitem__(self, i: int) -> dict:
    ex = self._src[i]
    image = np.asarray(_nested(ex, self.image_key))
    caps = _nested(ex, self.caption_key)
    caps = [caps] if isinstance(caps, (str, bytes)) else list(np.asarray(caps).reshape(-1))
    caps = [c.decode("utf-8") if isinstance(c, bytes) else _as_caption(c) for c in caps]
    try:
      image_id = int(np.asarray(_nested(ex, self.id_key)))
    except (KeyError, IndexError, TypeError, ValueError):
      image_id = i
    return dict(image=image, captions=caps, image_id=image_id, neg_captions=[],
                path=f"tfds:{self.name}[{i}]")


def _nested(ex: dict, key: str):
  """ex['a/b'] if TFDS flattened the name (coco_captions' 'image/id'), else ex['a']['b']."""
  if key in ex:
    return ex[key]
  for part in key.split("/"):
    ex = ex[part]
  return ex


# ------------------------------------------------------------------------------ synthetic

class SyntheticRecords:
  """Adapts nas_jax.data.synthetic.SyntheticSource's samples to the raw-record layout."""

  def __init__(self, source):
    self.source = source
    self.has_negatives = bool(getattr(source, "text_negatives", True))

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict:
    ex = self.source[i]
    return dict(image=np.asarray(ex["image"], np.uint8), captions=[ex["caption"]],
                image_id=int(ex["image_id"]), neg_captions=list(ex.get("neg_captions", ())),
                path=f"synthetic[{i}]")


# ------------------------------------------------------------------------------ factory

SOURCES = ("synthetic", "albef_json", "prepared", "negclip_tsv", "tfds")


def make_source(config, split: str = "train"):
  """The raw-record source named by `config.data.source` (see the module docstring)."""
  d = config.data
  kind = d.source
  if kind == "synthetic":
    from nas_jax.data import synthetic
    s = d.synthetic
    kwargs = (synthetic.source_kwargs(s, split) if hasattr(synthetic, "source_kwargs")
              else dict(max_objects=s.max_objects))
    num = s.num_train if split == "train" else s.num_heldout
    return SyntheticRecords(synthetic.SyntheticSource(
        num, seed=config.seed, split=split, image_size=d.image_size,
        text_negatives=bool(config.itm.text_negatives), **kwargs))
  if kind == "albef_json":
    return AlbefJsonSource(tuple(d.paths), d.image_root)
  if kind == "negclip_tsv":
    return NegClipTsvSource(tuple(d.paths), d.image_root)
  if kind == "prepared":
    return PreparedSource(tuple(d.paths))
  if kind == "tfds":
    t = d.tfds
    return TfdsSource(t.name, split=split, data_dir=t.data_dir, image_key=t.image_key,
                      caption_key=t.caption_key, id_key=t.id_key)
  raise ValueError(f"config.data.source={kind!r} is not one of {SOURCES}")
