"""Fixture corpora for the data tests: real JPEG/PNG files in ALBEF's JSON layout, with bad records."""

from __future__ import annotations

import json
import pathlib

import numpy as np
from PIL import Image


def _picture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
  """A smooth colour gradient plus noise: compresses like a photo, distinguishable per file."""
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  base = rng.uniform(0, 255, 3)
  img = base + 80 * np.stack([np.sin(x / w * 3 + k) * np.cos(y / h * 2 + k) for k in range(3)], -1)
  img += rng.normal(0, 10, img.shape)
  return np.clip(img, 0, 255).astype(np.uint8)


def make_albef_corpus(root: pathlib.Path, num_good: int = 12, seed: int = 0) -> dict:
  """Writes images under root/images and root/train.json; returns what is where.

  Records: `num_good` valid ones (JPEGs of several sizes, every third a PNG, some with caption
  lists), then a corrupt file (not an image), a truncated JPEG, a missing file, an empty caption
  and a non-string caption. Paths in the JSON are relative to root/images (image_root).
  """
  rng = np.random.default_rng(seed)
  img_dir = root / "images"
  img_dir.mkdir(parents=True, exist_ok=True)
  records = []
  for i in range(num_good):
    h, w = int(rng.integers(40, 120)), int(rng.integers(40, 120))
    ext = "png" if i % 3 == 2 else "jpg"
    name = f"img{i:03d}.{ext}"
    Image.fromarray(_picture(rng, h, w)).save(img_dir / name)
    cap = (f"picture number {i} with a dog on the left" if i % 2 == 0
           else [f"caption a of picture {i}", f"caption b of picture {i}", ""])
    records.append({"image": name, "caption": cap})
  (img_dir / "corrupt.jpg").write_bytes(b"this is not a jpeg at all" * 10)
  buf = img_dir / "full.jpg"
  Image.fromarray(_picture(rng, 100, 100)).save(buf, quality=95)
  data = buf.read_bytes()
  (img_dir / "truncated.jpg").write_bytes(data[: len(data) // 2])
  buf.unlink()
  Image.fromarray(_picture(rng, 50, 50)).save(img_dir / "fine_but_bad_caption.jpg")
  bad = [
      {"image": "corrupt.jpg", "caption": "a corrupt file"},
      {"image": "truncated.jpg", "caption": "a truncated file"},
      {"image": "missing.jpg", "caption": "a file that is not there"},
      {"image": "fine_but_bad_caption.jpg", "caption": "   "},
      {"image": "fine_but_bad_caption.jpg", "caption": 123},
  ]
  records += bad
  ann = root / "train.json"
  ann.write_text(json.dumps(records))
  return dict(json=str(ann), image_root=str(img_dir), num_good=num_good, num_bad=len(bad),
              records=records)


def make_negclip_images(tsv: pathlib.Path, image_root: pathlib.Path, seed: int = 0) -> None:
  """A small JPEG at every `filepath` of a NegCLIP TSV (the COCO images are not available here)."""
  import csv
  rng = np.random.default_rng(seed)
  with open(tsv, newline="", encoding="utf-8") as f:
    rows = list(csv.reader(f, delimiter="\t"))[1:]
  for row in rows:
    p = image_root / row[2]
    p.parent.mkdir(parents=True, exist_ok=True)
    if not p.exists():
      Image.fromarray(_picture(rng, 48, 64)).save(p)


def test_fixture_corpus_holds_real_images_and_the_bad_records(tmp_path):
  c = make_albef_corpus(tmp_path)
  root = pathlib.Path(c["image_root"])
  formats = {Image.open(root / r["image"]).format for r in c["records"][:c["num_good"]]}
  assert formats == {"JPEG", "PNG"}
  import pytest
  with pytest.raises(Exception):
    Image.open(root / "corrupt.jpg").load()
  with pytest.raises(OSError, match="truncated"):
    Image.open(root / "truncated.jpg").load()
  assert not (root / "missing.jpg").exists()
  assert json.loads(pathlib.Path(c["json"]).read_text()) == c["records"]
