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
the path looked for and where the official data comes from.

Scores (--score, default per benchmark protocol): 'itm' = ITM logit difference l1 - l0 (VALSE,
Winoground, ARO, synthetic), 'itm_l1' = raw match logit (ALBEF retrieval re-ranking, the retrieval
default), 'itc' = ITC cosine, 'itm+itc' = l1 + cosine (the ARO repo's BLIP/X-VLM wrappers).
Outputs: <out>/results.md and <out>/results.json (every number, the protocol of each benchmark).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Sequence

BENCHMARKS = ('valse', 'aro', 'winoground', 'retrieval_coco', 'retrieval_flickr', 'synthetic')
DEFAULT_SCORE = {'valse': 'itm', 'aro': 'itm', 'winoground': 'itm', 'retrieval_coco': 'itm_l1',
                 'retrieval_flickr': 'itm_l1', 'synthetic': 'itm'}
DEFAULT_TOKENS = {'valse': 40, 'aro': 40, 'winoground': 40, 'retrieval_coco': 30,
                  'retrieval_flickr': 30, 'synthetic': None}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m nas_jax.eval', description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog=__doc__.split('\n\n', 1)[1])
  p.add_argument('--bench', action='append', required=True,
                 help=f'benchmark(s) to run: {", ".join(BENCHMARKS)} (repeat or comma-separate)')
  p.add_argument('--checkpoint', required=True,
                 help='training workdir, its checkpoints/<step> folder, or a converted checkpoint')
  p.add_argument('--data_dir', default='', help='root of the benchmark files (layout above)')
  p.add_argument('--config', default='',
                 help='config file (file.py or file.py:arg); default: the config saved with the checkpoint')
  p.add_argument('--out', default='', help='output folder (default: <checkpoint>/eval)')
  p.add_argument('--compare', choices=('paper',), default=None,
                 help="'paper': add the paper's ALBEF and NAS rows (Tables 2, 3, 9, 10)")
  p.add_argument('--score', choices=('itm', 'itm_l1', 'itc', 'itm+itc'), default=None,
                 help='pair score for every benchmark (default: each benchmark\'s protocol)')
  p.add_argument('--vocab', default='', help="BERT vocab.txt / model dir (default: config.data.vocab)")
  p.add_argument('--batch_size', type=int, default=0, help='pairs per step over all local devices (default: 256 per device)')
  p.add_argument('--max_tokens', type=int, default=0, help='token limit for every benchmark '
                 '(default: 40 VALSE/Winoground/ARO, 30 retrieval)')
  p.add_argument('--k_test', type=int, default=0, help='retrieval shortlist (default 256 COCO, 128 Flickr)')
  p.add_argument('--aro_tasks', default='vg_relation,vg_attribution,coco_order,flickr_order')
  p.add_argument('--aro_seeds', default='1,2,3,4,5', help='seeds of the Order perturbations')
  p.add_argument('--aro_order_file', action='append', default=[],
                 help='TASK=PATH: precomputed Order cases (ARO test_cases json), e.g. coco_order=/x/seed1.json')
  p.add_argument('--aro_perturbation', choices=('auto', 'fallback', 'official'), default='auto',
                 help='tagger for the Order perturbations (see nas_jax/benchmarks/aro.py)')
  p.add_argument('--synthetic_n', type=int, default=200, help='cases per synthetic subset')
  p.add_argument('--synthetic_seed', type=int, default=0)
  args = p.parse_args(argv)
  benches = [b.strip() for group in args.bench for b in group.split(',') if b.strip()]
  unknown = [b for b in benches if b not in BENCHMARKS]
  if unknown:
    p.error(f'unknown benchmark(s) {unknown}: use {", ".join(BENCHMARKS)}')
  args.bench = list(dict.fromkeys(benches))
  if any(b != 'synthetic' for b in args.bench) and not args.data_dir:
    p.error(f'--data_dir is required for {[b for b in args.bench if b != "synthetic"]}')
  args.aro_tasks = [t.strip() for t in args.aro_tasks.split(',') if t.strip()]
  args.aro_seeds = [int(s) for s in args.aro_seeds.split(',') if s.strip()]
  files: dict[str, list[str]] = {}
  for spec in args.aro_order_file:
    task, sep, path = spec.partition('=')
    if not sep or task not in ('coco_order', 'flickr_order'):
      p.error(f'--aro_order_file {spec!r}: use coco_order=PATH or flickr_order=PATH')
    files.setdefault(task, []).append(path)
  args.aro_order_file = files
  return args


# ---------------------------------------------------------------------------------------- data check

def check_data(bench: str, args: argparse.Namespace) -> None:
  """Raises BenchmarkDataError when an official file of `bench` is missing (before any model work)."""
  from nas_jax.benchmarks import common, retrieval, valse, winoground
  d = args.data_dir
  if bench == 'valse':
    root = os.path.join(d, 'valse')
    for stem in valse.STEMS:
      valse.find_file(root, stem)
    common.require('valse', os.path.join(root, 'images'), valse.SOURCE, what='folder')
  elif bench == 'winoground':
    root = os.path.join(d, 'winoground')
    winoground.find_examples(root)
    common.require('winoground', os.path.join(root, 'images'), winoground.SOURCE, what='folder')
  elif bench in ('retrieval_coco', 'retrieval_flickr'):
    retrieval.find_json(bench, d)
  elif bench == 'aro':
    try:
      _check_aro(args)
    except common.BenchmarkDataError as e:
      raise common.BenchmarkDataError(
          f'{e}\n  To run the other ARO tasks only, pass --aro_tasks (now: {",".join(args.aro_tasks)}).') from None


def _check_aro(args: argparse.Namespace) -> None:
  from nas_jax.benchmarks import aro, common, retrieval
  root = os.path.join(args.data_dir, 'aro')
  for task in args.aro_tasks:
    if task in aro.VG_FILES:
      common.require(f'aro/{task}', os.path.join(root, aro.VG_FILES[task]), aro.SOURCE)
      common.require(f'aro/{task}', os.path.join(root, 'images'), aro.SOURCE, what='folder')
    elif task in args.aro_order_file:
      for path in args.aro_order_file[task]:
        common.require(f'aro/{task}', path, 'a file you generated (see nas_jax/benchmarks/aro.py)')
    elif task in ('coco_order', 'flickr_order'):
      bench = 'retrieval_coco' if task == 'coco_order' else 'retrieval_flickr'
      try:
        retrieval.find_json(bench, args.data_dir)
      except common.BenchmarkDataError as e:
        raise common.BenchmarkDataError(str(e).replace(f'[{bench}]', f'[aro/{task}]')) from None
    else:
      raise ValueError(f'unknown ARO task {task!r}: use {", ".join(aro.TASKS)}')


# ---------------------------------------------------------------------------------------- run

def run_benchmark(bench: str, scorer, args: argparse.Namespace, config):
  from nas_jax.benchmarks import aro, retrieval, valse, winoground
  mode = args.score or DEFAULT_SCORE[bench]
  tokens = args.max_tokens or DEFAULT_TOKENS[bench]
  d = args.data_dir
  if bench == 'valse':
    return valse.evaluate(os.path.join(d, 'valse'), scorer, mode=mode, max_tokens=tokens)
  if bench == 'winoground':
    return winoground.evaluate(os.path.join(d, 'winoground'), scorer, mode=mode, max_tokens=tokens)
  if bench == 'aro':
    return aro.evaluate(d, scorer, mode=mode, max_tokens=tokens, tasks=args.aro_tasks,
                        seeds=args.aro_seeds, order_files=args.aro_order_file,
                        backend=args.aro_perturbation)
  if bench in ('retrieval_coco', 'retrieval_flickr'):
    return retrieval.evaluate(bench, d, scorer, mode=mode, k=args.k_test or None, max_tokens=tokens)
  if bench == 'synthetic':
    return run_synthetic(scorer, args, config, mode)
  raise ValueError(bench)


def evaluate_synthetic(config, model, params, batch_stats, mesh=None, tokenizer=None, *,
                       n_per_subset: int = 200, seed: int = 0, mode: str | None = None,
                       k_test: int | None = None, scorer=None) -> tuple[dict, str]:
  """The built-in synthetic suite (nas_jax.benchmarks.synthetic) through a ModelScorer.

  Usable from training (same arguments as train.run_evals passes). Returns (metrics, Markdown
  table). `mesh`: a mesh with a 'data' axis; one spanning other processes' devices is replaced by
  this process's devices. Score: config.eval.score unless `mode` is given; k_test likewise.
  """
  import jax
  from nas_jax.benchmarks import model_scorer, synthetic
  from nas_jax.data import synthetic as world
  from nas_jax.data.text import load_tokenizer
  mode = mode or config.eval.score
  k_test = config.eval.k_test if k_test is None else k_test
  if scorer is None:
    if mesh is not None and any(d.process_index != jax.process_index() for d in mesh.devices.flat):
      mesh = None
    scorer = model_scorer.ModelScorer(
        model, params, batch_stats, tokenizer or load_tokenizer(config.data.vocab),
        image_size=config.model.vit.image_size, batch_size=config.eval.batch_size,
        max_tokens=config.eval.max_text_len, mesh=mesh, show_progress=False)
  bench = world.build_benchmark(seed=seed, image_size=config.data.image_size,
                                n_per_subset=n_per_subset,
                                max_objects=config.data.synthetic.max_objects)
  score_pairs, embed = model_scorer.synthetic_callables(scorer, mode)
  metrics = synthetic.evaluate(bench, score_pairs, embed, batch_size=1 << 30, k_test=k_test,
                               threshold=0.0 if mode == 'itm' else None)
  metrics['num_cases'] = float(sum(len(v) for v in bench.values()))
  return metrics, synthetic.to_markdown(metrics, bench)


def run_synthetic(scorer, args, config, mode: str):
  from nas_jax.benchmarks import common
  k_test = args.k_test or config.eval.k_test
  metrics, table = evaluate_synthetic(config, None, None, None, n_per_subset=args.synthetic_n,
                                      seed=args.synthetic_seed, mode=mode, k_test=k_test,
                                      scorer=scorer)
  keys = [('Attribute', 'attribute'), ('Relation', 'relation'), ('Counting', 'counting'),
          ('Existence', 'existence'), ('Pairwise mean', 'pairwise_mean'),
          ('Wino text', 'winoground_text'), ('Wino image', 'winoground_image'),
          ('Wino group', 'winoground_group'), ('TR@1', 'txt_r1'), ('IR@1', 'img_r1'),
          ('R mean', 'r_mean')]
  headline = {name: metrics[k] for name, k in keys if k in metrics}
  return common.BenchResult(
      name='synthetic', headline=headline, tables={'Synthetic suite': table},
      details={'metrics': metrics},
      protocol={'score': mode, 'seed': args.synthetic_seed, 'cases per subset': args.synthetic_n,
                'retrieval k_test': k_test, 'comparison': 'strict >'})


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  from nas_jax.benchmarks import common, report

  try:  # Fail before loading anything heavy.
    for bench in args.bench:
      check_data(bench, args)
  except common.BenchmarkDataError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2

  import jax
  from nas_jax import checkpoint
  from nas_jax.benchmarks.model_scorer import ModelScorer
  from nas_jax.data.text import load_tokenizer
  from nas_jax.models.nas import NASModel

  from nas_jax.config_lib import load_config_file
  config = load_config_file(args.config) if args.config else None
  config, params, batch_stats = checkpoint.load_params(args.checkpoint, config)
  image_size = config.model.vit.image_size  # Position embeddings fix the resolution.
  model = NASModel(config=config.model)
  tokenizer = load_tokenizer(args.vocab or config.data.vocab)
  if tokenizer.vocab_size != config.model.bert.vocab_size:
    print(f'error: the vocabulary {tokenizer.vocab_file} has {tokenizer.vocab_size} tokens but the '
          f'model has {config.model.bert.vocab_size}: pass --vocab with the model\'s vocab.txt '
          '(bert-base-uncased for ALBEF/NAS checkpoints)', file=sys.stderr)
    return 2
  scorer = ModelScorer(model, params, batch_stats, tokenizer, image_size=image_size,
                       batch_size=args.batch_size or max(config.eval.batch_size,
                                                         256 * jax.local_device_count()),
                       max_tokens=config.eval.max_text_len)
  out = args.out or os.path.join(args.checkpoint, 'eval')
  meta = {'checkpoint': os.path.abspath(args.checkpoint), 'data_dir': args.data_dir,
          'image_size': image_size, 'use_dictionary': bool(config.model.use_dictionary),
          'devices': f'{jax.local_device_count()} x {jax.local_devices()[0].device_kind}',
          'jax': jax.__version__}
  print(f'[eval] {meta["checkpoint"]} on {meta["devices"]}: {", ".join(args.bench)}', flush=True)
  results = []
  for bench in args.bench:
    scorer.desc = bench
    t0 = time.time()
    result = run_benchmark(bench, scorer, args, config)
    result.protocol['seconds'] = round(time.time() - t0, 1)
    results.append(result)
    print('\n' + report.benchmark_markdown(result, compare_paper=args.compare == 'paper',
                                           extra_tables=False) + '\n', flush=True)
    report.write(results, out, meta=meta, compare_paper=args.compare == 'paper')  # Partial results survive a crash.
    scorer.clear_cache()
  md_path, json_path = report.write(results, out, meta=meta, compare_paper=args.compare == 'paper')
  print(f'[eval] wrote {md_path} and {json_path}', flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
