"""Packs an image-text corpus into ArrayRecord shards: the fast path for training.

  python -m nas_jax.data.prepare --json coco.json vg.json --image_root /data --out /data/prepared \\
      --max_side 384 --workers 16
  python -m nas_jax.data.prepare --negclip_tsv train_neg_clip.tsv --image_root /data --out DIR

Each record holds the image as JPEG bytes whose longer side is at most --max_side (re-encoded
only when the original is larger or not an RGB JPEG), the record's valid captions, its image_id
(the same-image key of the source, see sources.py) and its text hard negatives. Missing, truncated
or non-image files and records without a usable caption are skipped and counted; the summary
lists how many were written and skipped, why, and example paths. Train on the result with
`--config.data.source=prepared --config.data.paths=DIR`.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import os
import sys
import time
from collections import Counter

from PIL import Image

from nas_jax.data import sources as sources_lib
from nas_jax.data.text import pre_caption

WRITER_OPTIONS = "group_size:1,uncompressed"   # Random access per record; JPEG needs no codec.


class Packer:
  """Raw record → (prepared bytes, None) or (None, skip reason). Picklable (worker processes)."""

  def __init__(self, source, max_side: int, quality: int):
    self.source, self.max_side, self.quality = source, max_side, quality

  def __call__(self, index: int):
    rec = self.source[index]
    captions = [c for c in rec["captions"] if isinstance(c, str) and pre_caption(c)]
    if not captions:
      return index, None, "no non-empty string caption", rec["path"]
    try:
      jpeg = self.encode(rec["image"])
    except FileNotFoundError:
      return index, None, "file not found", rec["path"]
    except Exception as e:  # noqa: BLE001 — PIL raises OSError, SyntaxError, ValueError, bombs…
      return index, None, f"unreadable image ({type(e).__name__})", rec["path"]
    out = sources_lib.encode_prepared(jpeg, captions, rec["image_id"], rec["path"],
                                      [c for c in rec["neg_captions"] if isinstance(c, str)])
    return index, out, None, rec["path"]

  def encode(self, image) -> bytes:
    if isinstance(image, str):
      with open(image, "rb") as f:
        data = f.read()
    else:
      data = image
    img = Image.open(io.BytesIO(data))
    if img.format == "JPEG" and img.mode == "RGB" and max(img.size) <= self.max_side:
      img.load()                   # Verifies the whole file decodes (catches truncation).
      return data
    w, h = img.size
    k = self.max_side / max(w, h)    # Fast DCT downscale (JPEG), keeping the longer side ≥ max_side.
    if k < 1:
      img.draft("RGB", (math.ceil(w * k), math.ceil(h * k)))
    img = img.convert("RGB")
    if max(img.size) > self.max_side:
      scale = self.max_side / max(img.size)
      size = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
      img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=self.quality)
    return buf.getvalue()


_PACKER: Packer | None = None


def _init_worker(packer: Packer) -> None:
  global _PACKER
  _PACKER = packer


def _pack(index: int):
  return _PACKER(index)


def prepare(source, out_dir: str, *, max_side: int = 384, quality: int = 90,
            records_per_shard: int = 10_000, workers: int = 0, progress: bool = True,
            description: dict | None = None) -> dict:
  """Writes `out_dir/part-NNNNN.array_record` + `meta.json`; returns the summary dict."""
  from array_record.python import array_record_module
  from tqdm import tqdm

  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise FileExistsError(f"{out_dir} is a file: choose a directory for --out")
  os.makedirs(out_dir, exist_ok=True)
  stale = [f for f in os.listdir(out_dir) if f.endswith(".array_record")]
  if stale:
    raise FileExistsError(f"{out_dir} already holds {len(stale)} shards: choose an empty --out")
  n = len(source)
  packer = Packer(source, max_side, quality)
  t0 = time.time()
  written, skipped, examples, nbytes, shards = 0, Counter(), {}, 0, []
  writer = None

  def results():
    if workers > 0:
      ctx = multiprocessing.get_context("spawn")
      with ctx.Pool(workers, initializer=_init_worker, initargs=(packer,)) as pool:
        yield from pool.imap(_pack, range(n), chunksize=16)
    else:
      yield from map(packer, range(n))

  bar = tqdm(total=n, desc=f"prepare → {out_dir}", unit="img", disable=not progress,
             dynamic_ncols=True)
  try:
    for _, data, why, path in results():
      bar.update(1)
      if data is None:
        skipped[why] += 1
        if len(examples.setdefault(why, [])) < 5:
          examples[why].append(path)
        bar.set_postfix(written=written, skipped=sum(skipped.values()))
        continue
      if writer is None or written % records_per_shard == 0:
        if writer is not None:
          writer.close()
        shards.append(os.path.join(out_dir, f"part-{len(shards):05d}.array_record"))
        writer = array_record_module.ArrayRecordWriter(shards[-1], WRITER_OPTIONS)
      writer.write(data)
      written += 1
      nbytes += len(data)
  finally:
    bar.close()
    if writer is not None:
      writer.close()
  seconds = time.time() - t0
  summary = dict(written=written, skipped=dict(skipped), skipped_examples=examples,
                 shards=len(shards), bytes=nbytes, seconds=round(seconds, 2),
                 max_side=max_side, quality=quality,
                 has_negatives=bool(getattr(source, "has_negatives", False)),
                 num_images=getattr(source, "num_images", None), **(description or {}))
  with open(os.path.join(out_dir, "meta.json"), "w") as f:
    json.dump(summary, f, indent=1)
  return summary


def format_summary(s: dict, out_dir: str) -> str:
  total = s["written"] + sum(s["skipped"].values())
  lines = [f"| {'':24} | {'records':>9} |", f"|{'-' * 26}|{'-' * 11}|",
           f"| {'read':24} | {total:>9,} |", f"| {'written':24} | {s['written']:>9,} |"]
  for why, k in sorted(s["skipped"].items()):
    lines.append(f"| {'skipped: ' + why:24} | {k:>9,} |")
  lines.append("")
  for why, paths in s["skipped_examples"].items():
    lines.append(f"{why}: e.g. " + ", ".join(paths))
  mb = s["bytes"] / 2 ** 20
  rate = total / s["seconds"] if s["seconds"] else float("nan")
  lines.append(f"{s['shards']} shard(s), {mb:,.1f} MiB ({s['bytes'] / max(1, s['written']) / 1024:.1f}"
               f" KiB/image, longer side ≤ {s['max_side']}) in {out_dir}; {rate:,.0f} records/s")
  lines.append(f"train on it: --config.data.source=prepared --config.data.paths='(\"{out_dir}\",)'")
  return "\n".join(lines)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(prog="python -m nas_jax.data.prepare", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--json", nargs="+", help="ALBEF JSON list file(s), mixed into one corpus")
  src.add_argument("--negclip_tsv", nargs="+", help="NegCLIP TSV file(s) (text hard negatives)")
  p.add_argument("--image_root", default="", help="prefix of relative image paths")
  p.add_argument("--out", required=True, help="output directory (must hold no shards yet)")
  p.add_argument("--max_side", type=int, default=384, help="longer image side bound (pixels)")
  p.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
  p.add_argument("--records_per_shard", type=int, default=10_000)
  p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                 help="decode/encode processes (0 = in this process)")
  p.add_argument("--no_progress", action="store_true")
  args = p.parse_args(argv)
  t0 = time.time()
  if args.json:
    source = sources_lib.AlbefJsonSource(args.json, args.image_root)
  else:
    source = sources_lib.NegClipTsvSource(args.negclip_tsv, args.image_root)
  print(f"[prepare] {len(source):,} records from {len(args.json or args.negclip_tsv)} file(s) "
        f"(read in {time.time() - t0:.1f}s); {args.workers} worker(s)", file=sys.stderr)
  summary = prepare(source, args.out, max_side=args.max_side, quality=args.quality,
                    records_per_shard=args.records_per_shard, workers=args.workers,
                    progress=not args.no_progress,
                    description=dict(inputs=list(args.json or args.negclip_tsv),
                                     image_root=args.image_root))
  print(format_summary(summary, args.out))
  return summary


def cli(argv=None) -> int:
  """`main` for the command line: bad input (missing files, a non-empty --out, malformed
  annotations) ends with one `error: ...` line and exit status 2, not a traceback."""
  try:
    main(argv)
  except (FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError,
          sources_lib.DataFormatError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(cli())
