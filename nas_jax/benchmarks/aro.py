"""ARO (Yuksekgonul et al., ICLR 2023): VG-Relation, VG-Attribution, COCO-Order, Flickr30k-Order,
as the ARO repository (mertyg/vision-language-models-are-bows) scores them. docs/EVALUATION.md has
the details.

Data layout: `<data_dir>/aro/visual_genome_relation.json`, `visual_genome_attribution.json` and
`images/` (vgr_vga_images.zip); the Order tasks read the Karpathy test json of
`<data_dir>/coco/` (`coco_karpathy_test.json` or ALBEF's `coco_test.json`, images in `val2014/`) and
`<data_dir>/flickr30k/` (`flickr30k_test.json`, images in `flickr30k-images/`), or precomputed
perturbation files (`order_files`).

VG-R / VG-A: one image (cropped to the case's box), caption options [false, true]; correct iff the
argmax is index 1, so a tie is wrong. VG-R = unweighted mean of per-relation accuracies over the
relations not in `EXCLUDED_RELATIONS` (the authors' notebook list); VG-A = unweighted mean over
attribute pairs with >= 25 cases. Captions are scored raw (no pre_caption), as the ARO loaders do.
Order: options [original, 4 perturbations], all through ARO's pre_caption (max 30 words); correct
iff the argmax is index 0, so a tie is right. Precision@1, micro, mean over seeds. With the default
score (float32 softmax P(match)) confident pairs tie at 1.0, so these tie rules matter.

Perturbations: the official generation tags tokens with spaCy's en_core_web_sm and tokenises with
NLTK's word_tokenize (the optional extra `nas_jax[aro]` plus their two models); without them the
Order tasks stop with an error that says how to install them. Only when asked for
(`backend='fallback'`) an approximate tokeniser (regex: words, punctuation, English clitics split as
NLTK does) and tagger (closed-class word lists, an adjective lexicon plus suffix rules; every other
alphabetic word is a noun) stand in; the result then names it in the table's column. Precomputed
cases (`order_files`: JSON list of {"image": path, "caption_options": [5 strings]}, i.e. the ARO
dataset's `test_cases`, one file per seed) need neither.
"""

from __future__ import annotations

import functools
import json
import os
import random
import re
from collections import defaultdict
from typing import Sequence

import numpy as np

from nas_jax.benchmarks import common, retrieval

NAME = 'aro'
SOURCE = ('github.com/mertyg/vision-language-models-are-bows: dataset_zoo/aro_datasets.py downloads '
          'visual_genome_relation.json, visual_genome_attribution.json and vgr_vga_images.zip '
          '(Google Drive ids in that file; unzip to images/)')
TASKS = ('vg_relation', 'vg_attribution', 'coco_order', 'flickr_order')
OFFICIAL_CASES = {'vg_relation': 23937, 'vg_attribution': 28748}  # Before the metric's filters.
BACKENDS = ('official', 'fallback')
# The ARO repo's dataset names (main_aro.py --dataset), used in the score files' names.
ARO_DATASET = {'vg_relation': 'VG_Relation', 'vg_attribution': 'VG_Attribution',
               'coco_order': 'COCO_Order', 'flickr_order': 'Flickr30k_Order'}
INSTALL_HINT = ("pip install 'nas_jax[aro]' && python -m spacy download en_core_web_sm && "
                "python -m nltk.downloader punkt punkt_tab")
MIN_ATTRIBUTE_CASES = 25
ORDER_MAX_WORDS = 30
DEFAULT_SEEDS = (1, 2, 3, 4, 5)  # ARO's seed_all(1) default, then 4 more (the authors averaged 5).

# The 157 relations removed before the VG-Relation macro average: the `symmetric` list of the
# authors' notebook "Replicate ARO! VG-Relation, VG-Attribution" (data, transcribed).
EXCLUDED_RELATIONS: frozenset[str] = frozenset((
    'adjusting', 'attached to', 'between', 'bigger than', 'biting', 'boarding', 'brushing',
    'chewing', 'cleaning', 'climbing', 'close to', 'coming from', 'coming out of', 'contain',
    'crossing', 'dragging', 'draped over', 'drinking', 'drinking from', 'driving', 'driving down',
    'driving on', 'eating from', 'eating in', 'enclosing', 'exiting', 'facing', 'filled with',
    'floating in', 'floating on', 'flying', 'flying above', 'flying in', 'flying over',
    'flying through', 'full of', 'going down', 'going into', 'going through', 'grazing in',
    'growing in', 'growing on', 'guiding', 'hanging from', 'hanging in', 'hanging off',
    'hanging over', 'higher than', 'holding onto', 'hugging', 'in between', 'jumping off',
    'jumping on', 'jumping over', 'kept in', 'larger than', 'leading', 'leaning over', 'leaving',
    'licking', 'longer than', 'looking in', 'looking into', 'looking out', 'looking over',
    'looking through', 'lying next to', 'lying on top of', 'making', 'mixed with', 'mounted on',
    'moving', 'on the back of', 'on the edge of', 'on the front of', 'on the other side of',
    'opening', 'painted on', 'parked at', 'parked beside', 'parked by', 'parked in',
    'parked in front of', 'parked near', 'parked next to', 'perched on', 'petting', 'piled on',
    'playing', 'playing in', 'playing on', 'playing with', 'pouring', 'reaching for', 'reading',
    'reflected on', 'riding on', 'running in', 'running on', 'running through', 'seen through',
    'sitting behind', 'sitting beside', 'sitting by', 'sitting in front of', 'sitting near',
    'sitting next to', 'sitting under', 'skiing down', 'skiing on', 'sleeping in', 'sleeping on',
    'smiling at', 'sniffing', 'splashing', 'sprinkled on', 'stacked on', 'standing against',
    'standing around', 'standing behind', 'standing beside', 'standing in front of',
    'standing near', 'standing next to', 'staring at', 'stuck in', 'surrounding', 'swimming in',
    'swinging', 'talking to', 'topped with', 'touching', 'traveling down', 'traveling on', 'tying',
    'typing on', 'underneath', 'wading in', 'waiting for', 'walking across', 'walking by',
    'walking down', 'walking next to', 'walking through', 'working in', 'working on', 'worn on',
    'wrapped around', 'wrapped in', 'by', 'of', 'near', 'next to', 'with', 'beside',
    'on the side of', 'around',
))


# ---------------------------------------------------------------------------------------- VG-R / VG-A

VG_FILES = {'vg_relation': 'visual_genome_relation.json',
            'vg_attribution': 'visual_genome_attribution.json'}


def read_vg(path: str) -> list[dict]:
  """A VG-Relation / VG-Attribution json: a list of cases (fields checked, file order kept)."""
  with open(path) as f:
    cases = json.load(f)
  if not isinstance(cases, list):
    raise common.BenchmarkDataError(f'[{NAME}] {path}: expected a JSON list of test cases')
  need = ('image_path', 'bbox_x', 'bbox_y', 'bbox_w', 'bbox_h', 'true_caption', 'false_caption')
  for i, c in enumerate(cases):
    missing = [k for k in need if k not in c]
    if missing:
      raise common.BenchmarkDataError(f'[{NAME}] {path}: case {i} lacks {", ".join(missing)}')
  return cases


def vg_group(task: str, case: dict) -> str:
  """The unit of the macro average: the relation name (VG-R) or 'adj1_adj2' (VG-A)."""
  if task == 'vg_relation':
    return case['relation_name']
  a = case['attributes']
  return f'{a[0]}_{a[1]}'


def vg_pairs(cases: list[dict], image_dir: str) -> tuple[list[common.ImageRef], list[str]]:
  """Two pairs per case, options in the official order [false_caption, true_caption]."""
  images, texts = [], []
  for c in cases:
    ref = common.ImageRef(os.path.join(image_dir, c['image_path']),
                          box=(c['bbox_x'], c['bbox_y'], c['bbox_w'], c['bbox_h']))
    images += [ref, ref]
    texts += [c['false_caption'], c['true_caption']]
  return images, texts


def vg_metric(task: str, groups: Sequence[str], scores: np.ndarray) -> tuple[float, dict]:
  """scores [C, 2] over [false, true] -> (macro accuracy in %, per-group counts and accuracies).

  Correct iff argmax is index 1 (np.argmax picks the first maximum, so a tie is wrong).
  VG-R drops EXCLUDED_RELATIONS; VG-A keeps groups with >= MIN_ATTRIBUTE_CASES cases.
  """
  correct = np.argmax(np.asarray(scores), axis=1) == 1
  by_group: dict[str, list[bool]] = defaultdict(list)
  for g, ok in zip(groups, correct):
    by_group[g].append(bool(ok))
  per_group = {g: {'n': len(v), 'correct': int(sum(v)), 'acc': common.pct(sum(v), len(v))}
               for g, v in sorted(by_group.items())}
  if task == 'vg_relation':
    kept = [g for g in per_group if g not in EXCLUDED_RELATIONS]
    rule = f'relations not in the {len(EXCLUDED_RELATIONS)}-name exclusion list'
  else:
    kept = [g for g in per_group if per_group[g]['n'] >= MIN_ATTRIBUTE_CASES]
    rule = f'attribute pairs with >= {MIN_ATTRIBUTE_CASES} cases'
  macro = float(np.mean([per_group[g]['acc'] for g in kept])) if kept else float('nan')
  return macro, {'per_group': per_group, 'kept': kept, 'rule': rule, 'num_cases': int(len(correct)),
                 'micro': common.pct(correct.sum(), len(correct))}


def evaluate_vg(task: str, root: str, scorer: common.Scorer, *, mode: str = 'itm_p',
                max_tokens: int = 40, image_dir: str | None = None,
                scores_dir: str | None = None) -> tuple[float, dict]:
  path = common.require(f'{NAME}/{task}', os.path.join(root, VG_FILES[task]), SOURCE)
  cases = read_vg(path)
  image_dir = image_dir or os.path.join(root, 'images')
  common.require(f'{NAME}/{task}', image_dir, SOURCE, what='folder')
  images, texts = vg_pairs(cases, image_dir)
  scores = common.score_pairs(scorer, images, texts, mode, max_tokens=max_tokens).reshape(-1, 2)
  value, info = vg_metric(task, [vg_group(task, c) for c in cases], scores)
  if scores_dir:
    info['score_file'] = write_score_array(scores_dir, task, 1, scores)
  return value, info


# ---------------------------------------------------------------------------------------- perturbations

_CLITIC = re.compile(r"(?i)(\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(r"(?i)n't|'(?:s|re|ve|ll|d|m)\b|\w+(?:[-.']\w+)*|[^\w\s]")


def fallback_tokenize(text: str) -> list[str]:
  """Words and punctuation, English clitics split off ("chef's" -> "chef 's", "don't" -> "do n't")."""
  return _TOKEN.findall(_CLITIC.sub(r'\1 \2', text))


_CLOSED = frozenset('''
a an the this that these those some any each every all both either neither no another other such
what which whose whom who whoever whatever whichever here there where when why how
i me my mine you your yours he him his she her hers it its we us our ours they them their theirs
myself yourself himself herself itself ourselves themselves one ones
in on at of to for from with without by about above below under over into onto upon off out up
down near behind beside besides between among through across along around against toward towards
inside outside beneath underneath during before after since until till via per than like as
atop amid amongst within throughout next front top
and or but nor so yet if because while although though whereas unless whether
is am are was were be been being has have had having do does did done doing
can could may might must shall should will would 's n't 're 've 'll 'd 'm not very too also just
only even still again almost quite really then
zero two three four five six seven eight nine ten eleven twelve dozen hundred several many few
much more most less least lots lot
'''.split())
_ADJECTIVES = frozenset('''
red orange yellow green blue purple pink brown black white gray grey silver gold golden tan beige
dark light bright colorful colourful big small large little tiny huge giant tall short long wide
narrow thick thin fat skinny high low young old new older younger ancient modern open closed empty
full clean dirty wet dry hot cold warm cool fresh ripe rotten raw cooked fried grilled baked
sliced chopped wooden metal plastic glass stone brick concrete leather furry fluffy hairy bald
cute pretty beautiful ugly nice good bad great happy sad angry busy quiet loud lone single double
multiple various different same several own whole half entire first second third last front back
left right top bottom middle upper lower outdoor indoor outdoors indoors sunny cloudy rainy snowy
foggy grassy sandy rocky muddy dusty shiny striped spotted plaid checkered floral cluttered neat
messy crowded fancy plain simple male female adult giant stuffed asian african american
italian french chinese mexican professional electric digital antique vintage round square
flat steep busy calm rough smooth soft hard heavy strong weak fast slow early late real fake
blond blonde brunette elderly
'''.split())
_ADJ_SUFFIXES = ('ous', 'ful', 'ive', 'able', 'ible', 'less', 'ish', 'ary', 'ic', 'ical', 'ial')
_VERB_SUFFIXES = ('ing', 'ed')
_VERBS = frozenset('''
sit sits sat stand stands stood lay lays lie lies lying hold holds held ride rides rode eat eats
ate look looks walk walks run runs ran play plays fly flies flew wear wears wore carry carries
drive drives drove hang hangs hung make makes made take takes took get gets got go goes went
come comes came show shows shown see sees seen park parks wait waits rest rests swim swims
jump jumps throw throws threw catch catches caught grab grabs cut cuts put puts set sets stare
stares watch watches use uses keep keeps kept contain contains fill fills cover covers lead leads
give gives gave hit hits kick kicks pose poses smile smiles talk talks read reads cook cooks
'''.split())


def fallback_tag(token: str) -> str:
  """'NOUN', 'ADJ' or 'OTHER' for one token: the stand-in for spaCy's NN*/JJ* tags."""
  w = token.lower()
  if not re.fullmatch(r"[a-z][a-z'-]*", w) or w in _CLOSED:
    return 'OTHER'
  if w in _ADJECTIVES or '-' in w and w.split('-')[-1] in _ADJECTIVES:
    return 'ADJ'
  if w in _VERBS:
    return 'OTHER'
  if len(w) > 4 and w.endswith(_ADJ_SUFFIXES) and not w.endswith(('ic', 'ship')):
    return 'ADJ'
  if len(w) > 4 and w.endswith(_VERB_SUFFIXES) and not w.endswith(('ceiling', 'building', 'bed', 'sled')):
    return 'OTHER'
  return 'NOUN'


class PerturbationBackendError(RuntimeError):
  """spaCy / NLTK or their models are missing for the official Order perturbations."""


@functools.lru_cache(maxsize=1)
def official_backend():
  """(spaCy en_core_web_sm pipeline, nltk.word_tokenize), the tools of the ARO repo's TextShuffler;
  raises PerturbationBackendError (one line saying what to install) when one is missing."""
  missing = []
  nlp = word_tokenize = None
  try:
    import spacy
    nlp = spacy.load('en_core_web_sm')
  except ImportError:
    missing.append('spaCy')
  except OSError:
    missing.append("spaCy's model en_core_web_sm")
  try:
    import nltk
    nltk.word_tokenize('a test.')
    word_tokenize = nltk.word_tokenize
  except ImportError:
    missing.append('NLTK')
  except LookupError:
    missing.append("NLTK's punkt tokenizer data")
  if missing:
    raise PerturbationBackendError(
        f'the ARO Order perturbations need {" and ".join(missing)}: {INSTALL_HINT} (or pass '
        '--aro_order_file with precomputed cases, or --aro_perturbation fallback for an approximate '
        'tagger whose numbers are not comparable with published ones)')
  return nlp, word_tokenize


class TextShuffler:
  """The four ARO Order perturbations with explicit RNGs (numpy for the POS-based ones, `random` for
  the trigram ones, consumed in the official call order: `seed_all(seed)` then the four functions
  per caption).

  backend: 'official' (spaCy en_core_web_sm tags, NLTK word_tokenize; PerturbationBackendError
  when missing) or 'fallback' (the approximate tokeniser and tagger of this module).
  """

  def __init__(self, seed: int, backend: str = 'official'):
    if backend not in BACKENDS:
      raise ValueError(f'unknown perturbation backend {backend!r}: use {" or ".join(BACKENDS)}')
    self.np_rng = np.random.RandomState(seed)
    self.rng = random.Random(seed)
    self.tagger, self.tokenizer = 'fallback', 'fallback'
    self._nlp = self._word_tokenize = None
    if backend == 'official':
      self._nlp, self._word_tokenize = official_backend()
      self.tagger, self.tokenizer = 'spacy en_core_web_sm', 'nltk word_tokenize'

  def _tagged(self, text: str) -> tuple[np.ndarray, list[str]]:
    if self._nlp is not None:
      doc = self._nlp(text)
      tags = ['NOUN' if t.tag_ in ('NN', 'NNS', 'NNP', 'NNPS') else
              'ADJ' if t.tag_ in ('JJ', 'JJR', 'JJS') else 'OTHER' for t in doc]
      return np.array([t.text for t in doc], dtype=object), tags
    tokens = fallback_tokenize(text)
    return np.array(tokens, dtype=object), [fallback_tag(t) for t in tokens]

  def _tokens(self, text: str) -> list[str]:
    return self._word_tokenize(text) if self._word_tokenize else fallback_tokenize(text)

  def shuffle_nouns_and_adj(self, text: str) -> str:
    tokens, tags = self._tagged(text)
    for kind in ('NOUN', 'ADJ'):
      idx = [i for i, t in enumerate(tags) if t == kind]
      tokens[idx] = self.np_rng.permutation(tokens[idx])
    return ' '.join(tokens)

  def shuffle_allbut_nouns_and_adj(self, text: str) -> str:
    tokens, tags = self._tagged(text)
    idx = [i for i, t in enumerate(tags) if t == 'OTHER']
    tokens[idx] = self.np_rng.permutation(tokens[idx])
    return ' '.join(tokens)

  @staticmethod
  def trigrams(tokens: Sequence[str]) -> list[list[str]]:
    """Consecutive trigrams; the last one may be shorter."""
    return [list(tokens[i:i + 3]) for i in range(0, len(tokens), 3)]

  def shuffle_within_trigrams(self, text: str) -> str:
    grams = self.trigrams(self._tokens(text))
    for g in grams:
      self.rng.shuffle(g)
    return ' '.join(' '.join(g) for g in grams)

  def shuffle_trigrams(self, text: str) -> str:
    grams = self.trigrams(self._tokens(text))
    self.rng.shuffle(grams)
    return ' '.join(' '.join(g) for g in grams)

  def options(self, caption: str, max_words: int = ORDER_MAX_WORDS) -> list[str]:
    """[original, 4 perturbations] of a raw caption, each through ARO's pre_caption."""
    perturbed = [self.shuffle_nouns_and_adj(caption), self.shuffle_allbut_nouns_and_adj(caption),
                 self.shuffle_within_trigrams(caption), self.shuffle_trigrams(caption)]
    return [common.aro_pre_caption(t, max_words) for t in [caption] + perturbed]


def order_cases(annotation: list[dict], seed: int, backend: str = 'official') -> tuple[list[dict], str]:
  """ARO's Order test cases from a Karpathy test json: one per caption, in file order.

  Returns the cases ({"image", "caption_options"}) and a description of the tagger used."""
  shuffler = TextShuffler(seed, backend)
  cases = [{'image': ann['image'], 'caption_options': shuffler.options(caption)}
           for ann in annotation for caption in ann['caption']]
  return cases, f'tagger: {shuffler.tagger}; tokenizer: {shuffler.tokenizer}'


def write_order_file(annotation_path: str, out_path: str, seed: int, backend: str = 'official') -> str:
  """Writes the Order cases of one seed in the precomputed-file format; returns the tagger used."""
  with open(annotation_path) as f:
    cases, how = order_cases(json.load(f), seed, backend)
  with open(out_path, 'w') as f:
    json.dump(cases, f)
  return how


def read_order_file(path: str) -> list[dict]:
  with open(path) as f:
    cases = json.load(f)
  if not isinstance(cases, list) or any(len(c.get('caption_options', ())) < 2 or 'image' not in c
                                        for c in cases):
    raise common.BenchmarkDataError(
        f'[{NAME}] {path}: expected a JSON list of {{"image": path, "caption_options": [original, '
        'perturbation, ...]}} (the ARO dataset\'s test_cases)')
  return cases


def order_metric(scores: np.ndarray) -> float:
  """scores [C, O] with the original at index 0 -> Precision@1 in %. np.argmax picks the first
  maximum, so a tie with the original counts as correct (the official behaviour)."""
  return common.pct(np.sum(np.argmax(np.asarray(scores), axis=1) == 0), len(scores))


def score_file_name(task: str, seed: int | str) -> str:
  """The ARO repo's save_scores name (`<dataset>--<text perturb>--<image perturb>--<model>--<seed>
  --si2t`), as .npy: pickles written by numpy 2 do not load in the numpy 1.x of its environment."""
  return f'{ARO_DATASET[task]}--None--None--nas_jax--{seed}--si2t.npy'


def write_score_array(scores_dir: str, task: str, seed: int | str, scores: np.ndarray) -> str:
  """Scores [C, O] as the ARO repo keeps them, float32 [C, 1 image option, O caption options]:
  `dataset.evaluate_scores(np.load(path))` recomputes the task's records."""
  path = os.path.join(scores_dir, 'aro', score_file_name(task, seed))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  np.save(path, np.asarray(scores, np.float32)[:, None, :])
  return path


def evaluate_order(task: str, data_dir: str, scorer: common.Scorer, *, mode: str = 'itm_p',
                   max_tokens: int = 40, seeds: Sequence[int] = DEFAULT_SEEDS,
                   order_files: Sequence[str] = (), backend: str = 'official',
                   scores_dir: str | None = None) -> tuple[float, dict]:
  """Precision@1 of COCO-Order ('coco_order') or Flickr30k-Order ('flickr_order'), mean over seeds
  (or over the precomputed `order_files`). With `scores_dir`, each run's score array and (for
  generated runs) its cases go to `<scores_dir>/aro/`."""
  bench = 'retrieval_coco' if task == 'coco_order' else 'retrieval_flickr'
  if order_files:
    runs = [(p, k, read_order_file(p), 'precomputed file')
            for k, p in enumerate(dict.fromkeys(order_files), 1)]
    image_root = os.path.join(data_dir, retrieval.LAYOUT[bench][0])
  else:
    try:
      path, image_root = retrieval.find_json(bench, data_dir)
    except common.BenchmarkDataError as e:
      raise common.BenchmarkDataError(str(e).replace(f'[{bench}]', f'[{NAME}/{task}]')) from None
    with open(path) as f:
      annotation = json.load(f)
    runs = []
    for seed in seeds:
      cases, how = order_cases(annotation, seed, backend)
      runs.append((f'seed {seed}', seed, cases, how))
  per_run = {}
  for label, seed, cases, how in runs:
    n_opt = len(cases[0]['caption_options'])
    images, texts = [], []
    for c in cases:
      ref = common.ImageRef(os.path.join(image_root, c['image']))
      opts = [common.aro_pre_caption(t, ORDER_MAX_WORDS) for t in c['caption_options']]
      if len(opts) != n_opt:
        raise common.BenchmarkDataError(f'[{NAME}/{task}] {label}: cases have different option counts')
      images += [ref] * n_opt
      texts += opts
    scores = common.score_pairs(scorer, images, texts, mode, max_tokens=max_tokens).reshape(-1, n_opt)
    per_run[label] = {'precision_at_1': order_metric(scores), 'cases': len(cases),
                      'perturbations': how}
    if scores_dir:
      per_run[label]['score_file'] = write_score_array(scores_dir, task, seed, scores)
      if how != 'precomputed file':
        cases_path = os.path.join(scores_dir, 'aro', f'{ARO_DATASET[task]}--{seed}--test_cases.json')
        with open(cases_path, 'w') as f:
          json.dump(cases, f)
        per_run[label]['cases_file'] = cases_path
  values = [r['precision_at_1'] for r in per_run.values()]
  return float(np.mean(values)), {'runs': per_run, 'std': float(np.std(values))}


# ---------------------------------------------------------------------------------------- evaluate

HEADLINE = {'vg_relation': 'Relation', 'vg_attribution': 'Attribute', 'coco_order': 'COCO-Order',
            'flickr_order': 'Flickr-Order'}
FALLBACK_MARK = ' (fallback tagger)'  # Appended to an Order column scored with the fallback.


def evaluate(data_dir: str, scorer: common.Scorer, *, mode: str = 'itm_p', max_tokens: int = 40,
             tasks: Sequence[str] = TASKS, seeds: Sequence[int] = DEFAULT_SEEDS,
             order_files: dict[str, Sequence[str]] | None = None,
             backend: str = 'official', scores_dir: str | None = None) -> common.BenchResult:
  """The ARO tasks in `tasks`; 'Avg' = mean of Relation and Attribute (the paper's ARO Avg).
  An Order task generated with the fallback tagger is headed '<task> (fallback tagger)'."""
  common.check_mode(mode)
  unknown = [t for t in tasks if t not in TASKS]
  if unknown:
    raise ValueError(f'unknown ARO task(s) {unknown}: use {", ".join(TASKS)}')
  if backend not in BACKENDS:
    raise ValueError(f'unknown perturbation backend {backend!r}: use {" or ".join(BACKENDS)}')
  root = os.path.join(data_dir, 'aro')
  headline, details, tables = {}, {}, {}
  perturbations = {}
  for task in tasks:
    column = HEADLINE[task]
    if task.startswith('vg_'):
      value, info = evaluate_vg(task, root, scorer, mode=mode, max_tokens=max_tokens,
                                scores_dir=scores_dir)
      unit = 'relation' if task == 'vg_relation' else 'attribute pair'
      tables[f'ARO {column}: per {unit} (counts logged for filtering)'] = (
          [unit, 'n', 'correct', 'acc', 'in macro'],
          [[g, v['n'], v['correct'], v['acc'], 'yes' if g in info['kept'] else 'no']
           for g, v in info['per_group'].items()])
    else:
      files = (order_files or {}).get(task, ())
      value, info = evaluate_order(task, data_dir, scorer, mode=mode, max_tokens=max_tokens,
                                   seeds=seeds, order_files=files, backend=backend,
                                   scores_dir=scores_dir)
      if not files and backend == 'fallback':
        column += FALLBACK_MARK
      perturbations[column] = 'precomputed files' if files else (
          'spaCy en_core_web_sm + NLTK word_tokenize' if backend == 'official'
          else 'APPROXIMATE fallback tagger, not comparable with published numbers')
    headline[column] = value
    details[task] = info
  if 'Relation' in headline and 'Attribute' in headline:
    headline['Avg'] = (headline['Relation'] + headline['Attribute']) / 2
  protocol = {'score': mode, 'max_tokens': max_tokens, 'vg options': '[false, true], tie = wrong',
              'order options': '[original, 4 perturbations], tie = right',
              'order text': f'ARO pre_caption, max {ORDER_MAX_WORDS} words',
              'vg text': 'raw captions', 'seeds': list(seeds),
              'Avg': 'mean of Relation and Attribute'}
  for column, how in perturbations.items():
    protocol[f'{column} perturbations'] = how
  return common.BenchResult(name=NAME, headline=headline, tables=tables, details=details,
                            protocol=protocol)
