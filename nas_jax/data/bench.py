"""Input-pipeline speed: images/s of the raw-JPEG path and the prepared-shard path.

  # A COCO-like corpus (640x480 JPEGs of ~COCO's byte size) and its prepared shards, then both paths:
  python -m nas_jax.data.bench --make_corpus 1000 --corpus_dir /tmp/nas_bench --vocab VOCAB
  # Your own data:
  python -m nas_jax.data.bench --source albef_json --paths coco.json --image_root /data \\
      --prepared /data/prepared --vocab /models/bert-base-uncased --workers 0 4 8

For each path it reports
  * the per-sample cost on one core, split into read (file / record bytes), decode (+ crop and
    resize: PIL fuses them), augment (flip, RandAugment, normalise) and tokenise;
  * the grain pipeline's throughput with N worker processes (images/s total and per worker).
The last lines turn the one-core rate into the number of cores 8 GPUs need at a given rate.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from nas_jax import config_lib
from nas_jax.data import pipeline, prepare as prepare_lib, sources, text
from nas_jax.data import transforms as T

TARGET_PER_GPU = 1100   # Samples/s of one GPU's training step (the lead's measured target).


def make_corpus(out_dir: str, num: int, seed: int = 0, size=(640, 480)) -> str:
  """COCO-like photos: 640x480 JPEG (q 90) with multi-scale texture and noise (~150 KB, near
  COCO's ~160 KB average), five captions each. Returns the JSON path."""
  from PIL import Image

  rng = np.random.default_rng(seed)
  img_dir = os.path.join(out_dir, "images")
  os.makedirs(img_dir, exist_ok=True)
  w, h = size
  records = []
  words = ("a man woman dog cat riding sitting on the left right of red blue green small large "
           "street table next to with two three bus train kitchen near field").split()
  for i in range(num):
    path = os.path.join(img_dir, f"{i:06d}.jpg")
    if not os.path.exists(path):
      img = np.zeros((h, w, 3), np.float32)
      for cells, amp in ((4, 90.0), (16, 40.0), (64, 50.0), (160, 50.0)):
        small = rng.uniform(-amp, amp, (cells * h // w + 1, cells, 3)).astype(np.float32)
        img += np.stack([np.asarray(Image.fromarray(small[..., k]).resize(
            (w, h), Image.Resampling.BICUBIC)) for k in range(3)], -1)
      img += rng.normal(0, 12, img.shape) + rng.uniform(60, 190, 3)
      Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
    caps = [" ".join(rng.choice(words, int(rng.integers(8, 16)))) for _ in range(5)]
    records.append({"image": f"{i:06d}.jpg", "caption": caps})
  ann = os.path.join(out_dir, "train.json")
  with open(ann, "w") as f:
    json.dump(records, f)
  return ann


def _config(source: str, paths, image_root: str, args) -> config_lib.ml_collections.ConfigDict:
  c = config_lib.base_config()
  c.data.update(dict(source=source, paths=tuple(paths), image_root=image_root,
                     image_size=args.image_size, batch_size=args.batch_size,
                     max_text_len=args.max_text_len, read_threads=args.threads,
                     prefetch=2, max_error_rate=0.05, vocab=args.vocab,
                     image_dtype=args.image_dtype))
  return c


def stage_breakdown(config, tokenizer, samples: int) -> dict:
  """One core, no grain: ms per sample in each stage."""
  src = sources.make_source(config)
  maker = pipeline.SampleMaker(src, pipeline.make_transform(config), tokenizer, seed=0,
                               max_text_len=config.data.max_text_len, timing=True)
  for i in range(min(8, len(src))):       # Warm-up (imports, caches).
    maker((0, i))
  for k in maker.seconds:
    maker.seconds[k] = 0.0
  n = min(samples, len(src))
  t0 = time.perf_counter()
  for i in range(n):
    maker((1, i))
  total = time.perf_counter() - t0
  ms = {k: 1000 * v / n for k, v in maker.seconds.items()}
  ms["other"] = max(0.0, 1000 * total / n - sum(ms.values()))
  return dict(images_per_s=n / total, ms=ms, total_ms=1000 * total / n)


def pipeline_rate(config, tokenizer, workers: int, batches: int) -> float:
  """Images/s delivered by make_train_iterator with `workers` processes (after warm-up)."""
  c = config_lib.ml_collections.ConfigDict(config.to_dict())
  c.data.num_workers = workers
  it = pipeline.make_train_iterator(c, tokenizer)
  try:
    for _ in range(2 + 2 * workers):                       # Warm-up: workers start, buffers fill.
      next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
      next(it)
    return batches * c.data.batch_size / (time.perf_counter() - t0)
  finally:
    if hasattr(it, "close"):
      it.close()


def cores_needed(per_core: float, gpus: int = 8, per_gpu: float = TARGET_PER_GPU) -> float:
  return gpus * per_gpu / per_core


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(prog="python -m nas_jax.data.bench", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--source", default="albef_json",
                 choices=("albef_json", "negclip_tsv", "prepared", "synthetic"),
                 help="what --paths holds ('prepared': shard dirs; 'synthetic': no paths)")
  p.add_argument("--paths", nargs="*", default=())
  p.add_argument("--image_root", default="")
  p.add_argument("--prepared", default="", help="prepared shard directory (adds that path)")
  p.add_argument("--make_corpus", type=int, default=0,
                 help="write N COCO-like JPEGs + JSON to --corpus_dir, prepare them, bench both")
  p.add_argument("--corpus_dir", default="/tmp/nas_bench")
  p.add_argument("--max_side", type=int, default=384, help="for --make_corpus's prepared shards")
  p.add_argument("--prepare_workers", type=int, default=os.cpu_count() or 1)
  p.add_argument("--vocab", default="synthetic", help="BERT vocab.txt or model dir")
  p.add_argument("--image_size", type=int, default=256)
  p.add_argument("--max_text_len", type=int, default=25)
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--threads", type=int, default=1, help="grain read threads per process")
  p.add_argument("--image_dtype", default="float32", choices=("float32", "uint8"),
                 help="batch image dtype (uint8: normalised later on the device)")
  p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
  p.add_argument("--samples", type=int, default=200, help="samples for the stage breakdown")
  p.add_argument("--batches", type=int, default=30, help="timed batches per pipeline run")
  p.add_argument("--json_out", default="", help="also write the results as JSON here")
  args = p.parse_args(argv)

  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()

  paths, image_root, prepared = list(args.paths), args.image_root, args.prepared
  if args.make_corpus:
    print(f"[bench] writing {args.make_corpus} COCO-like JPEGs to {args.corpus_dir}", file=sys.stderr)
    paths, image_root = [make_corpus(args.corpus_dir, args.make_corpus)], os.path.join(
        args.corpus_dir, "images")
    prepared = os.path.join(args.corpus_dir, f"prepared_{args.max_side}")
    if not os.path.isdir(prepared):
      s = prepare_lib.prepare(sources.AlbefJsonSource(paths, image_root), prepared,
                              max_side=args.max_side, workers=args.prepare_workers,
                              progress=False)
      print(prepare_lib.format_summary(s, prepared), file=sys.stderr)
  if args.source == "prepared" and paths:
    paths, prepared = [], paths[0]
  runs = []
  if args.source == "synthetic":
    cfg = _config("synthetic", (), "", args)
    cfg.data.synthetic.num_train = max(args.samples, args.batch_size * (args.batches + 40))
    runs.append(("synthetic", cfg))
  elif paths:
    runs.append(("raw JPEG", _config(args.source, paths, image_root, args)))
  if prepared:
    runs.append(("prepared", _config("prepared", [prepared], "", args)))
  if not runs:
    p.error("give --paths (raw path), --prepared, --source synthetic, or --make_corpus N")
  tokenizer = text.load_tokenizer(args.vocab)

  sizes = {}
  if paths and args.source != "synthetic":
    src = sources.make_source(runs[0][1])
    k = min(50, len(src))
    sizes["raw JPEG"] = np.mean([os.path.getsize(src[i]["image"]) for i in range(k)]) / 1024
  if prepared:
    src = sources.PreparedSource([prepared])
    k = min(50, len(src))
    sizes["prepared"] = np.mean([len(src[i]["image"]) for i in range(k)]) / 1024

  results = []
  for name, cfg in runs:
    br = stage_breakdown(cfg, tokenizer, args.samples)
    for w in args.workers:
      rate = pipeline_rate(cfg, tokenizer, w, args.batches)
      results.append(dict(path=name, workers=w, threads=args.threads, images_per_s=rate,
                          per_worker=rate / max(1, w), one_core=br["images_per_s"],
                          ms=br["ms"], kib=sizes.get(name)))
      print(f"[bench] {name}: {w} worker(s) → {rate:,.0f} images/s", file=sys.stderr)

  load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
  print(f"\nimage {args.image_size} px {args.image_dtype}, batch {args.batch_size}, text {args.max_text_len} tokens, "
        f"{args.threads} read thread(s), {os.cpu_count()} CPU core(s) visible (load average "
        f"{load}), OpenCV {'on' if T.cv2 is not None else 'off'}, vocab {args.vocab}\n")
  print("| path | KiB/image | workers | images/s | per worker | one core, in-process | "
        "read | decode+crop | augment | tokenise | other |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for r in results:
    ms = r["ms"]
    tot = sum(ms.values())
    share = " | ".join(f"{100 * ms[k] / tot:.0f}% ({ms[k]:.2f} ms)"
                       for k in ("read", "decode", "augment", "tokenize", "other"))
    print(f"| {r['path']} | {r['kib'] or 0:.0f} | {r['workers']} | {r['images_per_s']:,.0f} | "
          f"{r['per_worker']:,.0f} | {r['one_core']:,.0f} | {share} |")
  print()
  for name in dict.fromkeys(r["path"] for r in results):
    one = next(r["one_core"] for r in results if r["path"] == name)
    print(f"{name}: 8 GPUs x {TARGET_PER_GPU} samples/s = {8 * TARGET_PER_GPU:,} images/s "
          f"/ {one:,.0f} per core = {cores_needed(one):,.0f} cores")
  if args.json_out:
    with open(args.json_out, "w") as f:
      json.dump(results, f, indent=1)
  return results


if __name__ == "__main__":
  main()
