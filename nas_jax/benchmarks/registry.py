"""The benchmarks by name: for each, the function that checks its files and the one that scores it.

Both ways of evaluating go through here: `python -m nas_jax.eval` (a saved checkpoint, any
benchmarks) and the evaluation inside training (`train.run_evals`: the benchmarks of
`config.eval.benches`, every `eval_every` steps and after the last one).

  check(name, options)                     the files `name` needs are there (raises
                                           common.BenchmarkDataError, aro.PerturbationBackendError)
  run(name, scorer, options, scores_dir)   its BenchResult, scored by any `common.Scorer`
  training_plan(config, tokenizer)         the benchmarks and Options of a training config, checked
  summary(results)                         flat metrics and Markdown for the training logs

`Options` holds every setting; an empty value ('' or 0) means the benchmark's own default (its
Evaluator's score and token limit, retrieval.DEFAULT_K). docs/EVALUATION.md gives the data layout
under `Options.data_dir` and each benchmark's rules.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Mapping, Sequence

from nas_jax.benchmarks import aro, common, retrieval, synthetic, valse, winoground

# Ordinary English captions: a BERT vocabulary knows every word of them (some as word pieces).
VOCAB_PROBE = ('a man riding a horse on the beach next to a dog',
               'two women are playing with a frisbee in the park',
               'the grass is eating the horse', 'an old person kisses a young person',
               'there are exactly four kites flying over the ocean')
MAX_UNKNOWN_SHARE = 0.2


@dataclasses.dataclass(frozen=True)
class SyntheticWorld:
  """The built-in synthetic suite (nas_jax.data.synthetic.build_benchmark): its cases, the world
  they are drawn from (as the model was trained on it) and its retrieval re-ranking shortlist."""
  n_per_subset: int = 200
  seed: int = 0
  image_size: int = 256
  max_objects: int = 3
  k_test: int = 16

  @classmethod
  def from_config(cls, config, **overrides) -> 'SyntheticWorld':
    """The world of `config.data` (image size, objects per scene) and `config.eval.k_test`."""
    world = dict(image_size=config.data.image_size, max_objects=config.data.synthetic.max_objects,
                 k_test=config.eval.k_test)
    return cls(**{**world, **overrides})


@dataclasses.dataclass(frozen=True)
class Options:
  """How to run the benchmarks ('' / 0: each benchmark's default).

  data_dir: root of the benchmark files. score: a common.SCORE_MODES entry for every benchmark.
  max_tokens: token limit for every benchmark. k_test: retrieval shortlist for every benchmark
  (default retrieval.DEFAULT_K, the synthetic suite's `synthetic.k_test`). valse_skip: 'valse' (the
  VALSE script's skip rule) or 'none'. aro_*: the ARO tasks, Order seeds, precomputed Order case
  files {task: paths} and the perturbation backend ('official' or 'fallback').
  """
  data_dir: str = ''
  score: str = ''
  max_tokens: int = 0
  k_test: int = 0
  valse_skip: str = 'valse'
  aro_tasks: tuple[str, ...] = aro.TASKS
  aro_seeds: tuple[int, ...] = aro.DEFAULT_SEEDS
  aro_order_files: Mapping[str, Sequence[str]] = dataclasses.field(default_factory=dict)
  aro_perturbation: str = 'official'
  synthetic: SyntheticWorld = SyntheticWorld()


# ---------------------------------------------------------------------------------------- checks

def _check_valse(o: Options) -> None:
  root = os.path.join(o.data_dir, 'valse')
  for stem in valse.STEMS:
    valse.find_file(root, stem)
  common.require('valse', os.path.join(root, 'images'), valse.SOURCE, what='folder')


def _check_winoground(o: Options) -> None:
  root = os.path.join(o.data_dir, 'winoground')
  winoground.find_examples(root)
  common.require('winoground', os.path.join(root, 'images'), winoground.SOURCE, what='folder')


def _check_aro(o: Options) -> None:
  root = os.path.join(o.data_dir, 'aro')
  for task in o.aro_tasks:
    if task in aro.VG_FILES:
      common.require(f'aro/{task}', os.path.join(root, aro.VG_FILES[task]), aro.SOURCE)
      common.require(f'aro/{task}', os.path.join(root, 'images'), aro.SOURCE, what='folder')
    elif task in o.aro_order_files:
      for path in o.aro_order_files[task]:
        common.require(f'aro/{task}', path,
                       'the ARO test_cases you generated (docs/EVALUATION.md, ARO Order)')
    else:
      bench = 'retrieval_coco' if task == 'coco_order' else 'retrieval_flickr'
      try:
        retrieval.find_json(bench, o.data_dir)
      except common.BenchmarkDataError as e:
        raise common.BenchmarkDataError(str(e).replace(f'[{bench}]', f'[aro/{task}]')) from None
      if o.aro_perturbation == 'official':
        aro.official_backend()


def _check_retrieval(name: str) -> Callable[[Options], None]:
  def check_one(o: Options) -> None:
    retrieval.find_json(name, o.data_dir)
  return check_one


def _check_nothing(o: Options) -> None:
  del o  # The synthetic suite is generated: no files.


# ---------------------------------------------------------------------------------------- runs
# (scorer, options, score mode, token limit, scores_dir) -> BenchResult.

def _run_valse(scorer, o: Options, mode, tokens, scores_dir):
  return valse.evaluate(os.path.join(o.data_dir, 'valse'), scorer, mode=mode, max_tokens=tokens,
                        skip_rule=o.valse_skip, scores_dir=scores_dir)


def _run_winoground(scorer, o: Options, mode, tokens, scores_dir):
  return winoground.evaluate(os.path.join(o.data_dir, 'winoground'), scorer, mode=mode,
                             max_tokens=tokens, scores_dir=scores_dir)


def _run_aro(scorer, o: Options, mode, tokens, scores_dir):
  return aro.evaluate(o.data_dir, scorer, mode=mode, max_tokens=tokens, tasks=o.aro_tasks,
                      seeds=o.aro_seeds, order_files=o.aro_order_files,
                      backend=o.aro_perturbation, scores_dir=scores_dir)


def _run_retrieval(name: str):
  def run_one(scorer, o: Options, mode, tokens, scores_dir):
    return retrieval.evaluate(name, o.data_dir, scorer, mode=mode, k=o.k_test or None,
                              max_tokens=tokens, scores_dir=scores_dir)
  return run_one


SYNTHETIC_HEADLINE = (('Attribute', 'attribute'), ('Relation', 'relation'),
                      ('Counting', 'counting'), ('Existence', 'existence'),
                      ('Main attribute', 'main_attribute'), ('Main object', 'main_object'),
                      ('Pairwise mean', 'pairwise_mean'), ('Wino text', 'winoground_text'),
                      ('Wino image', 'winoground_image'), ('Wino group', 'winoground_group'),
                      ('TR@1', 'txt_r1'), ('IR@1', 'img_r1'), ('R mean', 'r_mean'))


def _run_synthetic(scorer, o: Options, mode, tokens, scores_dir):
  """The synthetic suite: every metric of synthetic.evaluate in details['metrics'] (plus
  'num_cases'), its table as tables['Synthetic suite']. No per-example score files."""
  del scores_dir
  from nas_jax.benchmarks import model_scorer
  from nas_jax.data import synthetic as world
  w = o.synthetic
  k_test = o.k_test or w.k_test
  bench = world.build_benchmark(seed=w.seed, image_size=w.image_size, n_per_subset=w.n_per_subset,
                                max_objects=w.max_objects)
  score_pairs, embed = model_scorer.synthetic_callables(scorer, mode, tokens)
  metrics = synthetic.evaluate(bench, score_pairs, embed, batch_size=1 << 30, k_test=k_test,
                               threshold=0.0 if mode == 'itm' else None)
  metrics['num_cases'] = float(sum(len(v) for v in bench.values()))
  return common.BenchResult(
      name='synthetic',
      headline={column: metrics[k] for column, k in SYNTHETIC_HEADLINE if k in metrics},
      tables={'Synthetic suite': synthetic.to_markdown(metrics, bench)},
      details={'metrics': metrics},
      protocol={'score': mode, 'seed': w.seed, 'cases per subset': w.n_per_subset,
                'retrieval k_test': k_test, 'comparison': 'strict >'})


# ---------------------------------------------------------------------------------------- registry

@dataclasses.dataclass(frozen=True)
class Evaluator:
  """check(options) raises when a file is missing; run(scorer, options, mode, max_tokens,
  scores_dir) returns the BenchResult. score, max_tokens: the pair score and token limit of the
  benchmark's official pipeline (docs/EVALUATION.md; None: the scorer's own limit). english: its
  texts are English captions (the model needs a BERT vocabulary) from files under data_dir."""
  check: Callable[[Options], None]
  run: Callable[..., common.BenchResult]
  score: str
  max_tokens: int | None
  english: bool = True


EVALUATORS: dict[str, Evaluator] = {
    'valse': Evaluator(_check_valse, _run_valse, 'itm_p', 40),
    'aro': Evaluator(_check_aro, _run_aro, 'itm_p', 40),
    'winoground': Evaluator(_check_winoground, _run_winoground, 'itm_p', 40),
    'retrieval_coco': Evaluator(_check_retrieval('retrieval_coco'),
                                _run_retrieval('retrieval_coco'), 'itm_l1', 30),
    'retrieval_flickr': Evaluator(_check_retrieval('retrieval_flickr'),
                                  _run_retrieval('retrieval_flickr'), 'itm_l1', 30),
    'synthetic': Evaluator(_check_nothing, _run_synthetic, 'itm', None, english=False),
}
BENCHMARKS = tuple(EVALUATORS)


def _evaluator(name: str) -> Evaluator:
  if name not in EVALUATORS:
    raise ValueError(f'unknown benchmark {name!r}: use {", ".join(BENCHMARKS)}')
  return EVALUATORS[name]


def unknown_names(names: Sequence[str]) -> list[str]:
  return [n for n in names if n not in EVALUATORS]


def english(names: Sequence[str]) -> list[str]:
  """The benchmarks among `names` that read English captions from files under data_dir."""
  return [n for n in names if _evaluator(n).english]


def check(name: str, options: Options) -> None:
  """Raises common.BenchmarkDataError naming the first missing file of benchmark `name` (and
  aro.PerturbationBackendError when its ARO Order tasks lack spaCy / NLTK). Reads no model."""
  _evaluator(name).check(options)


def run(name: str, scorer: common.Scorer, options: Options,
        scores_dir: str | None = None) -> common.BenchResult:
  """Benchmark `name` scored by `scorer`; its per-example score files go under `scores_dir`
  (None: none)."""
  ev = _evaluator(name)
  mode = common.check_mode(options.score or ev.score)
  return ev.run(scorer, options, mode, options.max_tokens or ev.max_tokens, scores_dir)


# ---------------------------------------------------------------------------------------- vocab

def unknown_word_share(tokenizer, texts: Sequence[str] = VOCAB_PROBE) -> float:
  """Share of the word tokens of `texts` (cleaned as ALBEF does) that `tokenizer` maps to [UNK]:
  0 for BERT's vocabulary, most of them for a vocabulary made for something else (the synthetic
  world's ~40 words). A content check: two vocabularies of equal size can differ."""
  from nas_jax.data.text import pre_caption
  cleaned = [pre_caption(t, 60) for t in texts]
  ids, mask = tokenizer(cleaned, 64)
  special = {tokenizer.pad_id, tokenizer.cls_id, tokenizer.sep_id}
  words = [int(i) for row, m in zip(ids, mask) for i, on in zip(row, m) if on and i not in special]
  return sum(i == tokenizer.unk_id for i in words) / max(len(words), 1)


def vocabulary_problem(tokenizer, names: Sequence[str]) -> str | None:
  """Why `tokenizer` cannot score the English benchmarks among `names` (None when it can): the
  start of a one-line error, to which the caller adds what to pass."""
  needs = english(names)
  share = unknown_word_share(tokenizer) if needs else 0.0
  if share <= MAX_UNKNOWN_SHARE:
    return None
  return (f'the vocabulary {tokenizer.vocab_file} maps {share:.0%} of the words of ordinary '
          f'English captions to [UNK], so {", ".join(needs)} would be scored on [UNK]s')


# ---------------------------------------------------------------------------------------- training

def training_plan(config, tokenizer) -> tuple[tuple[str, ...], Options]:
  """The benchmarks of the evaluation inside training and their Options, every input checked.

  `config.eval.benches` names them; () means the synthetic suite when `config.data.source` is
  'synthetic' and none otherwise. Files are read from `config.eval.data_dir`; `config.eval.score`
  ('' = each benchmark's default) and the synthetic world of `config.data` apply. Raises ValueError
  or common.BenchmarkDataError (a FileNotFoundError) with one line saying what to change.
  """
  e = config.eval
  names = tuple(dict.fromkeys(e.benches)) or (('synthetic',) if config.data.source == 'synthetic'
                                               else ())
  if unknown_names(names):
    raise ValueError(f'config.eval.benches: unknown benchmark(s) {unknown_names(names)}: use '
                     f'{", ".join(BENCHMARKS)}')
  needs = english(names)
  if needs and not e.data_dir:
    raise ValueError(f'config.eval.benches has {", ".join(needs)}: set config.eval.data_dir to '
                     'the folder of the benchmark files (layout: python -m nas_jax.eval --help)')
  if e.score and e.score not in common.SCORE_MODES:
    raise ValueError(f'config.eval.score={e.score!r}: use one of {", ".join(common.SCORE_MODES)} '
                     "or '' (each benchmark's own)")
  options = Options(data_dir=e.data_dir, score=e.score,
                    synthetic=SyntheticWorld.from_config(
                        config, n_per_subset=config.data.synthetic.bench_per_subset))
  for name in names:
    try:
      check(name, options)
    except aro.PerturbationBackendError as err:
      raise ValueError(f'{err}; or leave aro out of config.eval.benches') from None
  problem = vocabulary_problem(tokenizer, names)
  if problem:
    raise ValueError(f"{problem}: train with bert-base-uncased's vocabulary (config.data.vocab) or "
                     'leave them out of config.eval.benches')
  return names, options


def summary(results: Sequence[common.BenchResult]) -> tuple[dict[str, float], str]:
  """Flat metrics and one Markdown text for the training logs: the synthetic suite gives every
  number under its own key ('attribute', 'r_mean', ...) and its table; another benchmark its
  headline as '<name>/<column>' ('winoground/Group') and its headline table."""
  from nas_jax.benchmarks import report
  metrics, tables = {}, []
  for r in results:
    if r.name == 'synthetic':
      metrics.update(r.details['metrics'])
      tables.append(r.tables['Synthetic suite'])
    else:
      metrics.update({f'{r.name}/{k}': v for k, v in r.headline.items()})
      tables.append(report.benchmark_markdown(r, extra_tables=False).strip())
  return metrics, '\n\n'.join(tables)
