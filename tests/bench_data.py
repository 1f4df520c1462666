"""Benchmark folders for tests, laid out as `python -m nas_jax.eval --data_dir` expects, from the
real sample files (read in place or linked, never copied into the repository) and small generated
images (a colour that depends on the file name, so different images score differently)."""

from __future__ import annotations

import json
import os
import pathlib
import zlib

from PIL import Image


def image(path: pathlib.Path, size: tuple[int, int] = (12, 10), mode: str = "RGB") -> None:
  """A small image (RGB or RGBA) at `path` whose colour is a function of its name."""
  path.parent.mkdir(parents=True, exist_ok=True)
  h = zlib.crc32(path.name.encode())
  colour = (h % 256, (h >> 8) % 256, (h >> 16) % 256) + (255,) * (mode == "RGBA")
  Image.new(mode, size, colour).save(path)


def valse(samples: pathlib.Path, data_dir: pathlib.Path) -> pathlib.Path:
  """<data_dir>/valse/<stem>.json (links to the 11 samples) + images/."""
  from nas_jax.benchmarks import valse as valse_lib
  root = data_dir / "valse"
  (root / "images").mkdir(parents=True, exist_ok=True)
  for stem in valse_lib.STEMS:
    src = samples / "VALSE" / f"{stem}.sample.json"
    os.symlink(src, root / f"{stem}.json")
    for r in json.loads(src.read_text()).values():
      image(root / "images" / r["image_file"])
  return root


def winoground(samples: pathlib.Path, data_dir: pathlib.Path) -> pathlib.Path:
  """<data_dir>/winoground/examples.jsonl (the sample) + images/<name>.png, RGBA for odd example
  ids (the real files mix RGB and RGBA)."""
  root = data_dir / "winoground"
  (root / "images").mkdir(parents=True, exist_ok=True)
  text = (samples / "Winoground" / "examples.sample.jsonl").read_text()
  (root / "examples.jsonl").write_text(text)
  for line in text.splitlines():
    e = json.loads(line)
    for k in (0, 1):
      image(root / "images" / f"{e[f'image_{k}']}.png", mode="RGBA" if e["id"] % 2 else "RGB")
  return root


def coco(samples: pathlib.Path, data_dir: pathlib.Path,
         name: str = "coco_test.json") -> tuple[pathlib.Path, list[dict]]:
  """<data_dir>/coco/<name> (ALBEF's coco_test.json sample) + its val2014 images."""
  root = data_dir / "coco"
  records = json.loads((samples / "ALBEF" / "coco_test.sample.json").read_text())
  root.mkdir(parents=True, exist_ok=True)
  (root / name).write_text(json.dumps(records))
  for r in records:
    image(root / r["image"])
  return root, records


def negclip(samples: pathlib.Path, root: pathlib.Path) -> pathlib.Path:
  """NegCLIP's TSV sample at <root>/neg_clip.tsv with its images under <root>/<filepath>."""
  import csv
  src = samples / "NegCLIP" / "valid_neg_clip.sample.tsv"
  with open(src, newline="") as f:
    rows = list(csv.DictReader(f, delimiter="\t"))
  for r in rows:
    image(root / r["filepath"])
  dst = root / "neg_clip.tsv"
  os.symlink(src, dst)
  return dst
