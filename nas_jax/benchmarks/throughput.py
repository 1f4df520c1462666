r"""Throughput of a full evaluation pass and the projected time of each benchmark.

  python -m nas_jax.benchmarks.throughput --config configs/stage2.py --batch 256,512,1024,2048
  python -m nas_jax.benchmarks.throughput --config configs/finetune_coco.py --batch 512   # 384 px
  python -m nas_jax.benchmarks.throughput --config configs/demo.py:tiny --batch 8 \
      --images 32 --pairs_per_image 4                                               # CPU smoke test

What a benchmark run costs on the device, measured with `ModelScorer` (the scorer `nas_jax.eval`
uses) on random weights and in-memory random images, after a warm-up call that compiles:
  images/s  ViT encoding (+ VD tokens and ITC feature) of distinct images: `itc_features(images)`;
  texts/s   text encoder + ITC projection: `itc_features(None, texts)` (retrieval's shortlists);
  pairs/s   ITM pairs (text encoder, fusion, ITM head) with the images' tokens at hand:
            `itm_logits` over `pairs_per_image` captions per image, minus its image encoding time;
  host images/s  loading, cropping and resizing 640 x 480 JPEG files (smooth random colour fields
            with mild noise) with a thread pool like the scorer's, which loads one chunk ahead
            of the device.
Texts are padded to the token limit (one static shape), so their words do not matter. Each batch
size in --batch is measured at the first --max_tokens; the other limits at the fastest batch.

The projection multiplies the work of each benchmark (`workloads`: images encoded, texts encoded,
ITM pairs, from the official counts) by these rates: device seconds = images / images/s +
texts / texts/s + pairs / pairs/s, and a benchmark takes the larger of that and its host loading
time. Retrieval counts both shortlists in full (k per image and k per text); pairs on both lists
are scored once, so it is an upper bound. JSON compilation and file reading outside the scorer are
not included.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import sys
import tempfile
import time
from typing import Sequence

import numpy as np

from nas_jax.benchmarks import aro, retrieval, valse, winoground


@dataclasses.dataclass(frozen=True)
class Workload:
  """What one benchmark asks of the scorer. images: image encodings (an image met again in a later
  call is encoded again); texts: ITC text encodings; pairs: ITM pairs; max_tokens: its token limit."""
  images: int
  texts: int
  pairs: int
  max_tokens: int
  note: str = ''


def workloads(seeds: int = len(aro.DEFAULT_SEEDS), k_coco: int = retrieval.DEFAULT_K['retrieval_coco'],
              k_flickr: int = retrieval.DEFAULT_K['retrieval_flickr']) -> dict[str, Workload]:
  """The official benchmarks' work, from their released counts (see docs/EVALUATION.md)."""
  n_valse = sum(valse.OFFICIAL_VALID.values())
  coco_img, coco_txt = retrieval.OFFICIAL_COUNTS['retrieval_coco']
  flickr_img, flickr_txt = retrieval.OFFICIAL_COUNTS['retrieval_flickr']
  vgr, vga = aro.OFFICIAL_CASES['vg_relation'], aro.OFFICIAL_CASES['vg_attribution']
  return {
      'VALSE': Workload(n_valse, 0, 2 * n_valse, 40, f'{n_valse:,} valid pairs x (caption, foil); '
                        'images at most one per pair'),
      'ARO VG-Relation': Workload(vgr, 0, 2 * vgr, 40, 'one crop per case, 2 options'),
      'ARO VG-Attribution': Workload(vga, 0, 2 * vga, 40, 'one crop per case, 2 options'),
      'ARO COCO-Order': Workload(seeds * coco_img, 0, seeds * coco_txt * 5, 40,
                                 f'{seeds} seeds x {coco_txt:,} captions x 5 options'),
      'ARO Flickr30k-Order': Workload(seeds * flickr_img, 0, seeds * flickr_txt * 5, 40,
                                      f'{seeds} seeds x {flickr_txt:,} captions x 5 options'),
      'Winoground': Workload(2 * winoground.OFFICIAL_EXAMPLES, 0, 4 * winoground.OFFICIAL_EXAMPLES,
                             40, '400 examples x 4 pairs'),
      'COCO 5K retrieval': Workload(2 * coco_img, coco_txt, (coco_img + coco_txt) * k_coco, 30,
                                    f'k_test {k_coco} both directions (at most); images encoded '
                                    'for ITC and again for ITM'),
      'Flickr30K 1K retrieval': Workload(2 * flickr_img, flickr_txt,
                                         (flickr_img + flickr_txt) * k_flickr, 30,
                                         f'k_test {k_flickr} both directions (at most)'),
  }


def projected_seconds(work: Workload, rates: dict) -> tuple[float, float]:
  """(device seconds, host loading seconds) of one benchmark. rates: 'images_per_s',
  'texts_per_s' and 'pairs_per_s' (dicts keyed by token limit, or numbers), 'host_images_per_s'."""
  def at(key):
    r = rates[key]
    return r.get(work.max_tokens, next(iter(r.values()))) if isinstance(r, dict) else r
  device = (work.images / rates['images_per_s'] + work.texts / at('texts_per_s')
            + work.pairs / at('pairs_per_s'))
  host = work.images / rates['host_images_per_s'] if rates.get('host_images_per_s') else 0.0
  return device, host


def projection_table(rates: dict, works: dict[str, Workload] | None = None) -> str:
  """Markdown: per benchmark its work, device and host seconds, and the projected time."""
  works = works or workloads()
  lines = ['| benchmark | images | texts (ITC) | ITM pairs | tokens | device s | host load s | '
           'projected | what |', '|---|---|---|---|---|---|---|---|---|']
  total = 0.0
  for name, w in works.items():
    device, host = projected_seconds(w, rates)
    t = max(device, host)
    total += t
    lines.append(f'| {name} | {w.images:,} | {w.texts:,} | {w.pairs:,} | {w.max_tokens} | '
                 f'{device:,.1f} | {host:,.1f} | **{_duration(t)}** | {w.note} |')
  lines.append(f'| **all of the above** | | | {sum(w.pairs for w in works.values()):,} | | | | '
               f'**{_duration(total)}** | |')
  return '\n'.join(lines)


def _duration(seconds: float) -> str:
  if seconds < 120:
    return f'{seconds:.1f} s'
  if seconds < 7200:
    return f'{seconds / 60:.1f} min'
  return f'{seconds / 3600:.2f} h'


# ---------------------------------------------------------------------------------------- measuring

def _random_model(config, seed: int = 0):
  import jax
  import jax.numpy as jnp
  from nas_jax.models.nas import NASModel
  model = NASModel(config=config.model)
  res = config.model.vit.image_size
  ids = jnp.zeros((1, 8), jnp.int32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, res, res, 3)), ids,
                                  jnp.ones_like(ids))
  return model, variables['params'], variables.get('batch_stats', {})


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def measure(config, *, batch: int, max_tokens: int = 40, images: int = 2048,
            pairs_per_image: int = 8, seed: int = 0, model_state=None) -> dict:
  """Device rates of `ModelScorer` at one batch size and token limit (module docstring)."""
  import jax
  from nas_jax.benchmarks import common, model_scorer
  from nas_jax.data.text import load_tokenizer

  model, params, batch_stats = model_state or _random_model(config, seed)
  res = config.model.vit.image_size
  rng = np.random.default_rng(seed)
  tok = load_tokenizer('synthetic')  # Padded to max_tokens: the words do not change the cost.
  scorer = model_scorer.ModelScorer(model, params, batch_stats, tok, image_size=res,
                                    batch_size=batch, image_chunk=max(batch, 512),
                                    max_tokens=max_tokens, show_progress=False)
  refs = [common.ImageRef(key=f'img{i}', pixels=rng.integers(0, 256, (res, res, 3), np.uint8))
          for i in range(images)]
  words = 'a red blue green circle square triangle left of right above below two three the'.split()
  texts = [' '.join(rng.choice(words, 12)) for _ in range(images * pairs_per_image)]
  pair_images = [refs[i // pairs_per_image] for i in range(len(texts))]

  warm = scorer.image_chunk  # One chunk compiles every function at these shapes.
  scorer.itc_features(refs[:warm], texts[:batch])
  scorer.itm_logits(pair_images[:warm], texts[:warm])
  scorer.clear_cache()
  t_img = _timed(lambda: scorer.itc_features(refs, None))
  scorer.clear_cache()
  t_txt = _timed(lambda: scorer.itc_features(None, texts))
  t_itm = _timed(lambda: scorer.itm_logits(pair_images, texts))
  pair_s = max(t_itm - t_img, 1e-9)
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return {'batch': scorer.batch_size, 'max_tokens': max_tokens, 'images': images,
          'pairs': len(texts), 'images_per_s': images / t_img, 'texts_per_s': len(texts) / t_txt,
          'pairs_per_s': len(texts) / pair_s, 'pairs_per_s_incl_images': len(texts) / t_itm,
          'peak_gib': peak / 2 ** 30 if peak is not None else None,
          'device': f'{jax.local_device_count()} x {jax.local_devices()[0].device_kind}',
          'image_size': res, 'dtype': config.model.dtype}


def measure_host(image_size: int, n: int = 256, workers: int = 0, seed: int = 0) -> float:
  """Host images/s: 640 x 480 JPEG files loaded, cropped and resized (bicubic) by a thread pool."""
  import concurrent.futures
  from PIL import Image
  from nas_jax.benchmarks import common
  rng = np.random.default_rng(seed)
  with tempfile.TemporaryDirectory() as d:
    paths = []
    for i in range(min(n, 32)):  # Smooth colour fields with mild noise, roughly a photo's entropy.
      coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), np.uint8)).resize(
          (640, 480), Image.Resampling.BICUBIC)
      noisy = np.asarray(coarse, np.int16) + rng.integers(-12, 13, (480, 640, 3))
      p = os.path.join(d, f'{i}.jpg')
      Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(p, quality=90)
      paths.append(p)
    refs = [common.ImageRef(paths[i % len(paths)], box=(0, 0, 640, 480 - i % 7)) for i in range(n)]

    def load(ref):
      img = ref.load()
      return np.asarray(img.resize((image_size, image_size), Image.Resampling.BICUBIC))

    with concurrent.futures.ThreadPoolExecutor(workers or min(32, os.cpu_count() or 8)) as pool:
      list(pool.map(load, refs[:8]))
      t = _timed(lambda: list(pool.map(load, refs)))
  return n / t


def sweep(config, batches: Sequence[int], token_limits: Sequence[int] = (40, 30), *,
          images: int = 2048, pairs_per_image: int = 8, host_images: int = 256,
          log=print) -> dict:
  """Rates at every batch (first token limit), then the other limits at the fastest batch.
  Returns {'rows': [...], 'best': row, 'rates': for projected_seconds}."""
  state = _random_model(config)
  rows = []
  for b in batches:
    row = measure(config, batch=b, max_tokens=token_limits[0], images=images,
                  pairs_per_image=pairs_per_image, model_state=state)
    rows.append(row)
    log(_row_line(row))
  best = max(rows, key=lambda r: r['pairs_per_s'])
  for t in token_limits[1:]:
    row = measure(config, batch=best['batch'], max_tokens=t, images=images,
                  pairs_per_image=pairs_per_image, model_state=state)
    rows.append(row)
    log(_row_line(row))
  at_best = [r for r in rows if r['batch'] == best['batch']]
  host = measure_host(config.model.vit.image_size, host_images) if host_images else None
  rates = {'images_per_s': best['images_per_s'],
           'texts_per_s': {r['max_tokens']: r['texts_per_s'] for r in at_best},
           'pairs_per_s': {r['max_tokens']: r['pairs_per_s'] for r in at_best},
           'host_images_per_s': host}
  return {'rows': rows, 'best': best, 'rates': rates}


def _row_line(r: dict) -> str:
  peak = f", peak {r['peak_gib']:.1f} GiB" if r['peak_gib'] is not None else ''
  return (f"[throughput] batch {r['batch']}, {r['max_tokens']} tokens: {r['pairs_per_s']:,.0f} ITM "
          f"pairs/s ({r['pairs_per_s_incl_images']:,.0f} with their images encoded), "
          f"{r['images_per_s']:,.0f} images/s, {r['texts_per_s']:,.0f} texts/s{peak}")


def rates_table(rows: Sequence[dict]) -> str:
  lines = ['| batch | tokens | ITM pairs/s | pairs/s incl. images (8 per image) | images/s | texts/s | '
           'peak GiB |', '|---|---|---|---|---|---|---|']
  for r in rows:
    peak = f"{r['peak_gib']:.1f}" if r['peak_gib'] is not None else 'n/a'
    lines.append(f"| {r['batch']} | {r['max_tokens']} | {r['pairs_per_s']:,.0f} | "
                 f"{r['pairs_per_s_incl_images']:,.0f} | {r['images_per_s']:,.0f} | "
                 f"{r['texts_per_s']:,.0f} | {peak} |")
  return '\n'.join(lines)


# ---------------------------------------------------------------------------------------- CLI

def _apply_overrides(config, overrides: Sequence[str]):
  for spec in overrides:
    key, sep, value = spec.partition('=')
    if not sep:
      raise SystemExit(f'error: --set {spec!r}: use KEY=VALUE, e.g. model.attention=cudnn')
    try:
      parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      parsed = value
    node = config
    *parents, leaf = key.split('.')
    with config.unlocked():
      for p in parents:
        node = node[p]
      node[leaf] = parsed
  return config


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog='python -m nas_jax.benchmarks.throughput',
                              description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split('\n\n', 1)[1])
  p.add_argument('--config', required=True, help='config file (file.py or file.py:arg)')
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='config override, e.g. --set model.attention=cudnn (repeatable)')
  p.add_argument('--batch', default='256,512,1024', help='comma-separated batch sizes to sweep')
  p.add_argument('--max_tokens', default='40,30',
                 help='token limits: the first for the sweep, the others at the fastest batch')
  p.add_argument('--images', type=int, default=2048, help='distinct images per measurement')
  p.add_argument('--pairs_per_image', type=int, default=8)
  p.add_argument('--host_images', type=int, default=256, help='JPEGs for the host rate (0: skip)')
  p.add_argument('--json_out', default='', help='append the result as one JSON line to this file')
  args = p.parse_args(argv)
  from nas_jax.config_lib import load_config_file
  try:
    config = _apply_overrides(load_config_file(args.config), args.set)
    batches = [int(b) for b in args.batch.split(',') if b.strip()]
    limits = [int(t) for t in args.max_tokens.split(',') if t.strip()]
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  result = sweep(config, batches, limits, images=args.images, pairs_per_image=args.pairs_per_image,
                 host_images=args.host_images)
  rates = result['rates']
  print('\n' + rates_table(result['rows']))
  host = rates['host_images_per_s']
  print(f"\nFastest batch {result['best']['batch']} on {result['best']['device']} "
        f"({result['best']['image_size']} px, {result['best']['dtype']}); host JPEG loading "
        + (f'{host:,.0f} images/s' if host else 'not measured') + '.\n')
  print(projection_table(rates))
  if args.json_out:
    os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
    with open(args.json_out, 'a') as f:
      f.write(json.dumps({'config': args.config, 'set': args.set, **result}) + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
