r"""Evaluate a checkpoint on the fine-grained benchmarks and retrieval; print and save the tables.

  python -m nas_jax.eval --bench valse --bench aro --bench winoground \
      --checkpoint runs/nas/stage2 --data_dir /data/bench --out runs/nas/eval --compare paper
  python -m nas_jax.eval --bench synthetic --checkpoint runs/demo/stage2     # the demo model

Benchmarks: valse, aro, winoground, retrieval_coco, retrieval_flickr, synthetic (several allowed,
also comma-separated). Each reads its official files under --data_dir:

  <data_dir>/valse/       the 11 JSON files of Heidelberg-NLP/VALSE data/ + images/ (all images, flat)
  <data_dir>/aro/         visual_genome_relation.json, visual_genome_attribution.json, images/
  <data_dir>/winoground/  examples.jsonl + images/ex_<id>_img_<k>.png
  <data_dir>/coco/        coco_test.json (ALBEF) or coco_karpathy_test.json + val2014/
                          (retrieval_coco, and ARO COCO-Order)
  <data_dir>/flickr30k/   flickr30k_test.json + flickr30k-images/ (retrieval_flickr, Flickr30k-Order)

Every file is checked before the model is loaded; a missing one stops the run with the benchmark,
the path looked for and where the official data comes from. The ARO Order tasks need spaCy and
NLTK with their models (pip install 'nas_jax[aro]', then the two model downloads the error names).

Each benchmark is scored as its official script scores it (ties, skip rules, ranks): see
docs/EVALUATION.md. Scores (--score, default per benchmark): 'itm_p' = float32 softmax P(match),
the score of the published per-example files (VALSE, ARO, Winoground); 'itm' = logit difference
l1 - l0 (same ranking without P's saturation at 1.0; the synthetic suite's default); 'itm_l1' =
raw match logit (ALBEF retrieval re-ranking, the retrieval default); 'itc' = ITC cosine;
'itm+itc' = l1 + cosine (the ARO repo's BLIP/X-VLM wrappers).
Outputs: <out>/results.md, <out>/results.json (every number, the protocol of each benchmark) and
<out>/scores/ (per-example scores in the official formats, to re-check any number with the
official code: winoground.jsonl, valse.jsonl, aro/*.npy, retrieval_*.npz).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Sequence


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  from nas_jax.benchmarks import registry
  from nas_jax.benchmarks.aro import BACKENDS, DEFAULT_SEEDS, TASKS as ARO_TASKS
  from nas_jax.benchmarks.common import SCORE_MODES
  from nas_jax.benchmarks.registry import BENCHMARKS
  p = argparse.ArgumentParser(prog='python -m nas_jax.eval', description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split('\n\n', 1)[1])
  p.add_argument('--bench', action='append', required=True,
                 help=f'benchmark(s) to run: {", ".join(BENCHMARKS)} (repeat or comma-separate)')
  p.add_argument('--checkpoint', required=True,
                 help='training workdir, its checkpoints/<step> folder, or a converted checkpoint')
  p.add_argument('--data_dir', default='', help='root of the benchmark files (layout below)')
  p.add_argument('--config', default='',
                 help='config file (file.py or file.py:arg); default: the config saved with the checkpoint')
  p.add_argument('--out', default='', help='output folder (default: <checkpoint>/eval)')
  p.add_argument('--compare', choices=('paper',), default=None,
                 help="'paper': add the paper's ALBEF and NAS rows (Tables 2, 3, 9, 10)")
  p.add_argument('--score', choices=SCORE_MODES, default=None,
                 help='pair score for every benchmark (default: itm_p for VALSE, ARO, Winoground; '
                 'itm_l1 for retrieval; itm for synthetic; see above)')
  p.add_argument('--vocab', default='', help="BERT vocab.txt / model dir (default: config.data.vocab)")
  p.add_argument('--batch_size', type=int, default=0, help='pairs per step over all local devices (default: 256 per device)')
  p.add_argument('--max_tokens', type=int, default=0, help='token limit for every benchmark '
                 '(default: 40 VALSE/Winoground/ARO, 30 retrieval)')
  p.add_argument('--k_test', type=int, default=0, help='retrieval shortlist (default 256 COCO, 128 Flickr)')
  p.add_argument('--score_files', action=argparse.BooleanOptionalAction, default=True,
                 help='write the per-example scores in the official formats to <out>/scores/')
  p.add_argument('--valse_skip', choices=('valse', 'none'), default='valse',
                 help="'valse': leave out pairs whose foil gets equal ITM logits, as the VALSE "
                 "repository's script does; 'none': count every valid pair (Bugliarello et al.'s notebook)")
  p.add_argument('--aro_tasks', default=','.join(ARO_TASKS),
                 help=f'comma-separated ARO tasks to run (default: all of {", ".join(ARO_TASKS)})')
  p.add_argument('--aro_seeds', default=','.join(map(str, DEFAULT_SEEDS)), help='seeds of the Order perturbations')
  p.add_argument('--aro_order_file', action='append', default=[],
                 help='TASK=PATH: precomputed Order cases (ARO test_cases json), e.g. coco_order=/x/seed1.json')
  p.add_argument('--aro_perturbation', choices=BACKENDS, default='official',
                 help="Order perturbations: 'official' (spaCy en_core_web_sm + NLTK, the extra "
                 "nas_jax[aro]) or 'fallback' (approximate tagger, named in the table)")
  p.add_argument('--synthetic_n', type=int, default=200, help='cases per synthetic subset')
  p.add_argument('--synthetic_seed', type=int, default=0)
  args = p.parse_args(argv)
  benches = [b.strip() for group in args.bench for b in group.split(',') if b.strip()]
  unknown = registry.unknown_names(benches)
  if unknown:
    p.error(f'unknown benchmark(s) {unknown}: use {", ".join(BENCHMARKS)}')
  args.bench = list(dict.fromkeys(benches))
  if registry.english(args.bench) and not args.data_dir:
    p.error(f'--data_dir is required for {registry.english(args.bench)}')
  args.aro_tasks = [t.strip() for t in args.aro_tasks.split(',') if t.strip()]
  bad = [t for t in args.aro_tasks if t not in ARO_TASKS]
  if bad:
    p.error(f'--aro_tasks: unknown task(s) {bad}: use {", ".join(ARO_TASKS)}')
  args.aro_seeds = [int(s) for s in args.aro_seeds.split(',') if s.strip()]
  files: dict[str, list[str]] = {}
  for spec in args.aro_order_file:
    task, sep, path = spec.partition('=')
    if not sep or task not in ('coco_order', 'flickr_order'):
      p.error(f'--aro_order_file {spec!r}: use coco_order=PATH or flickr_order=PATH')
    files.setdefault(task, []).append(path)
  args.aro_order_file = files
  return args


def bench_options(args: argparse.Namespace):
  """registry.Options of the command line (the synthetic world comes with the checkpoint's config)."""
  from nas_jax.benchmarks import registry
  return registry.Options(
      data_dir=args.data_dir, score=args.score or '', max_tokens=args.max_tokens,
      k_test=args.k_test, valse_skip=args.valse_skip, aro_tasks=tuple(args.aro_tasks),
      aro_seeds=tuple(args.aro_seeds), aro_order_files=args.aro_order_file,
      aro_perturbation=args.aro_perturbation)


def check_data(args: argparse.Namespace, opts) -> None:
  """Every file of every --bench, before any model work (raises BenchmarkDataError or
  aro.PerturbationBackendError)."""
  from nas_jax.benchmarks import common, registry
  for bench in args.bench:
    try:
      registry.check(bench, opts)
    except common.BenchmarkDataError as e:
      if bench != 'aro':
        raise
      raise common.BenchmarkDataError(
          f'{e}; to run the other ARO tasks only, pass --aro_tasks (now: {",".join(args.aro_tasks)})'
      ) from None


def _load(args: argparse.Namespace):
  """(config, params, batch_stats, tokenizer) of --checkpoint / --config / --vocab; raises
  SystemExit(2) after printing a one-line error saying what to pass."""
  import logging
  from nas_jax import checkpoint
  from nas_jax.benchmarks import registry
  from nas_jax.config_lib import load_config_file
  from nas_jax.data.text import load_tokenizer

  def fail(msg):
    print(f'error: {msg}', file=sys.stderr)
    raise SystemExit(2)

  if not os.path.exists(args.checkpoint):
    fail(f'--checkpoint {args.checkpoint} does not exist: pass a training workdir, its '
         'checkpoints/<step> folder or a converted checkpoint')
  absl_logger = logging.getLogger('absl')  # Orbax warns about metadata files old checkpoints lack.
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    config = load_config_file(args.config) if args.config else None
    config, params, batch_stats = checkpoint.load_params(args.checkpoint, config)
  except FileNotFoundError as e:
    fail(f'{e}'.splitlines()[0])
  finally:
    absl_logger.setLevel(level)
  try:
    tokenizer = load_tokenizer(args.vocab or config.data.vocab)
  except FileNotFoundError as e:
    fail(f'{e}'.splitlines()[0])
  problem = registry.vocabulary_problem(tokenizer, args.bench)
  if problem:
    trained = ("; the checkpoint was trained on the synthetic world's vocabulary"
               if config.data.vocab == 'synthetic' and not args.vocab else '')
    fail(f"{problem}{trained}: pass --vocab with bert-base-uncased's vocab.txt (for a model trained "
         "on it), or run --bench synthetic only")
  if tokenizer.vocab_size != config.model.bert.vocab_size:
    fail(f'the vocabulary {tokenizer.vocab_file} has {tokenizer.vocab_size} tokens but the model has '
         f"{config.model.bert.vocab_size}: pass --vocab with the model's vocab.txt (bert-base-uncased "
         'for ALBEF/NAS checkpoints)')
  return config, params, batch_stats, tokenizer


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  from nas_jax.benchmarks import aro, common, registry, report

  opts = bench_options(args)
  try:  # Fail before loading anything heavy.
    check_data(args, opts)
  except (common.BenchmarkDataError, aro.PerturbationBackendError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2

  import jax
  from nas_jax.benchmarks.model_scorer import ModelScorer
  from nas_jax.models.nas import NASModel

  try:
    config, params, batch_stats, tokenizer = _load(args)
  except SystemExit as e:
    return int(e.code)
  opts = dataclasses.replace(opts, synthetic=registry.SyntheticWorld.from_config(
      config, n_per_subset=args.synthetic_n, seed=args.synthetic_seed))
  image_size = config.model.vit.image_size  # Position embeddings fix the resolution.
  model = NASModel(config=config.model)
  scorer = ModelScorer(model, params, batch_stats, tokenizer, image_size=image_size,
                       batch_size=args.batch_size or max(config.eval.batch_size,
                                                         256 * jax.local_device_count()),
                       max_tokens=config.eval.max_text_len)
  out = args.out or os.path.join(args.checkpoint, 'eval')
  scores_dir = os.path.join(out, 'scores') if args.score_files else None
  meta = {'checkpoint': os.path.abspath(args.checkpoint), 'data_dir': args.data_dir,
          'image_size': image_size, 'use_dictionary': bool(config.model.use_dictionary),
          'devices': f'{jax.local_device_count()} x {jax.local_devices()[0].device_kind}',
          'jax': jax.__version__, 'score_files': scores_dir or 'not written'}
  print(f'[eval] {meta["checkpoint"]} on {meta["devices"]}: {", ".join(args.bench)}', flush=True)
  results = []
  for bench in args.bench:
    scorer.desc = bench
    t0 = time.time()
    try:
      result = registry.run(bench, scorer, opts, scores_dir)
    except common.BenchmarkDataError as e:  # A missing or unreadable image, a malformed record.
      print(f'error: {e}', file=sys.stderr)
      return 2
    result.protocol['seconds'] = round(time.time() - t0, 1)
    results.append(result)
    print('\n' + report.benchmark_markdown(result, compare_paper=args.compare == 'paper',
                                           extra_tables=False) + '\n', flush=True)
    report.write(results, out, meta=meta, compare_paper=args.compare == 'paper')  # Partial results survive a crash.
    scorer.clear_cache()
  md_path, json_path = report.write(results, out, meta=meta, compare_paper=args.compare == 'paper')
  print(f'[eval] wrote {md_path} and {json_path}' + (f'; per-example scores in {scores_dir}'
                                                     if scores_dir else ''), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
