"""The synthetic world (nas_jax/data/synthetic.py) and its fine-grained suite's metrics
(nas_jax/benchmarks/synthetic.py)."""

import pickle

import numpy as np
import pytest

from nas_jax.benchmarks import synthetic as bench_lib
from nas_jax.data import synthetic as S
from nas_jax.data.text import load_tokenizer, pre_caption

N = 300  # Records checked per property test.


@pytest.fixture(scope='module')
def train():
  return S.SyntheticSource(10_000, seed=0, split='train', image_size=32)


@pytest.fixture(scope='module')
def records(train):
  return [train[i] for i in range(N)]


@pytest.fixture(scope='module')
def bench():
  return S.build_benchmark(seed=3, image_size=32, n_per_subset=80)


# ------------------------------------------------------------------------------------------ source

def test_record_is_deterministic_per_seed_split_index(train, records):
  again = S.SyntheticSource(10_000, seed=0, split='train', image_size=32)
  clone = pickle.loads(pickle.dumps(train))
  for i in (0, 17, 299, 9_999):
    a, b, c = train[i], again[i], clone[i]
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['image'], c['image'])
    assert a['caption'] == b['caption'] == c['caption']
    assert a['neg_captions'] == b['neg_captions'] == c['neg_captions']
    assert a['image_id'] == i
  # Order of access does not matter.
  np.testing.assert_array_equal(train[5]['image'], records[5]['image'])


def test_indices_seeds_and_splits_give_different_scenes(train, records):
  assert len({r['image'].tobytes() for r in records[:100]}) >= 95
  assert len({r['caption'] for r in records[:100]}) >= 80
  other_seed = S.SyntheticSource(100, seed=1, split='train', image_size=32)
  heldout = S.SyntheticSource(100, seed=0, split='heldout', image_size=32)
  for other in (other_seed, heldout):
    same = sum(np.array_equal(other[i]['image'], records[i]['image']) for i in range(50))
    assert same <= 5


def test_image_dtype_shape_range_and_pixels_match_the_scene():
  for size in (32, 48, 64):
    src = S.SyntheticSource(50, image_size=size, max_objects=3)
    for i in range(50):
      scene, _, _ = src.scene(i)
      img = src[i]['image']
      assert img.shape == (size, size, 3) and img.dtype == np.uint8
      # The pixel under each object's centre has the object's colour (+- its shade jitter).
      for o in scene:
        px = img[int(o.y * size), int(o.x * size)].astype(int)
        assert np.abs(px - np.array(S._RGB[o.colour])).max() <= S._SHADE + 1, (o, px)
      # The rest is background: the painted area is no more than the objects' boxes.
      painted = np.any(img != np.array(S.BACKGROUND, np.uint8), axis=-1).sum()
      assert 0 < painted <= sum((2 * 1.3 * S._RADIUS[o.size] * size + 2) ** 2 for o in scene)


def test_shapes_are_distinct_and_sizes_differ():
  masks = {}
  for shape in S.SHAPES:
    for size in S.SIZES:
      img = S.render((S.Obj(shape, 'white', size, 1, 1, 0.5, 0.5),), 64)
      masks[shape, size] = img[..., 0] > 137  # More than half covered.
  for shape in S.SHAPES:
    assert masks[shape, 'large'].sum() > 2 * masks[shape, 'small'].sum()
  for a in S.SHAPES:
    for b in S.SHAPES:
      if a < b:
        assert (masks[a, 'large'] ^ masks[b, 'large']).sum() >= 15, (a, b)
  # A square fills its corners, a circle does not; a triangle's apex is on top.
  # Pixel centres 6.5 px from the centre on both axes (radius 8 px): outside the circle (9.2 px),
  # inside the square (half side 6.8 px).
  lo, hi = 32 - 7, 32 + 6
  assert masks['square', 'large'][lo, lo] and masks['square', 'large'][hi, hi]
  assert not masks['circle', 'large'][lo, lo]
  assert not masks['triangle', 'large'][lo, lo] and masks['triangle', 'large'][hi, lo]
  assert masks['triangle', 'large'][32 - 7, 32] and not masks['triangle', 'large'][32 - 10, 32]


def _find(scene, np_):
  return [o for o in scene if o.colour == np_.colour and o.shape == np_.shape and
          (np_.size is None or o.size == np_.size)]


def test_captions_describe_the_scene(train, records):
  """Checked from the scene spec directly (coordinates, counts), not through `holds`."""
  n_rel = 0
  for i, r in enumerate(records):
    scene, _, _ = train.scene(i)
    claim = S.parse(r['caption'])
    assert S.text(claim) == r['caption']
    assert S.holds(scene, claim)
    if isinstance(claim[0], S.Exists):
      assert bool(_find(scene, claim[0].np)) == claim[0].positive
      continue
    mentioned = 0
    for part in claim:
      if isinstance(part, S.Rel):
        (a,), (b,) = _find(scene, part.subj), _find(scene, part.obj)
        gap = 1 / S.GRID - 2 * S._JITTER  # Objects in different cells are this far apart at least.
        if part.rel == 'left':
          assert a.x < b.x - gap
        elif part.rel == 'right':
          assert a.x > b.x + gap
        elif part.rel == 'above':
          assert a.y < b.y - gap
        else:
          assert a.y > b.y + gap
        mentioned += 2
        n_rel += 1
      elif part.count:
        assert len(_find(scene, part)) == part.count
        mentioned += part.count
      else:
        assert len(_find(scene, part)) == 1
        mentioned += 1
    assert mentioned == len(scene), (r['caption'], scene)  # A full description.
  assert n_rel > 50


def test_caption_mix_covers_the_grammar(records):
  caps = [r['caption'] for r in records]
  assert any(c.startswith('there is no ') for c in caps)
  assert any(c.startswith('there is a ') for c in caps)
  for word in ('to the left of', 'to the right of', ' above ', ' below ', ' and ', 'two ',
               'three ', 'one '):
    assert any(word in c for c in caps), word
  heldout = S.SyntheticSource(200, split='heldout', image_size=32)
  assert not any(heldout[i]['caption'].startswith('there is') for i in range(200))


def test_text_negatives_are_false_for_the_scene(train, records):
  n_order_swap = 0
  for i, r in enumerate(records):
    scene, claim, _ = train.scene(i)
    negs = r['neg_captions']
    assert 1 <= len(negs) <= 4 and len(set(negs)) == len(negs)
    for neg in negs:
      assert neg != r['caption']
      assert not S.holds(scene, S.parse(neg)), (r['caption'], neg, scene)
    if len(claim) == 1 and isinstance(claim[0], S.Rel):
      rel = claim[0]
      assert S.text((S.Rel(rel.obj, rel.rel, rel.subj),)) in negs  # Relation order swap.
      n_order_swap += 1
    if isinstance(claim[0], S.Exists):
      assert negs == [S.text((claim[0]._replace(positive=not claim[0].positive),))]
  assert n_order_swap > 20
  plain = S.SyntheticSource(10_000, seed=0, split='train', image_size=32, text_negatives=False)
  assert plain[7]['neg_captions'] == []
  assert plain[7]['caption'] == records[7]['caption']
  np.testing.assert_array_equal(plain[7]['image'], records[7]['image'])


def test_vocab_covers_every_caption_without_unk(records, bench):
  path = S.vocab_file()
  with open(path) as f:
    lines = f.read().splitlines()
  assert lines[:5] == ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]']
  assert all(w == w.lower() for w in lines[5:]) and len(set(lines)) == len(lines)
  assert S.vocab_file() == path
  tok = load_tokenizer('synthetic')
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
  assert tok.vocab_size == S.vocab_size() == len(lines)
  texts = [t for r in records for t in [r['caption']] + r['neg_captions']]
  texts += [c[k] for c in bench['attribute'] + bench['counting'] for k in ('caption', 'foil')]
  texts += [t for c in bench['winoground'] for t in c['captions']]
  for t in texts:
    assert pre_caption(t) == t
  ids, mask = tok(texts, max_len=25)
  assert not (ids == tok.unk_id).any(), 'a caption word is missing from the synthetic vocab'
  n_words = np.array([len(t.split()) for t in texts])
  np.testing.assert_array_equal(mask.sum(1), n_words + 2)  # One token per word + [CLS] [SEP].
  assert tok.decode(ids[0]) == texts[0]


def test_grain_reads_the_source(train):
  import grain
  ds = grain.MapDataset.source(train).seed(0).shuffle()
  first = ds[0]
  assert first['image'].shape == (32, 32, 3) and isinstance(first['caption'], str)
  assert first['caption'] == train[first['image_id']]['caption']


def test_bad_input_is_a_clear_error(train):
  with pytest.raises(ValueError, match='max_objects must be in 1..6'):
    S.SyntheticSource(10, max_objects=7)
  with pytest.raises(ValueError, match='image_size must be >= 16'):
    S.SyntheticSource(10, image_size=8)
  with pytest.raises(ValueError, match='split must be a non-empty string'):
    S.SyntheticSource(10, split='')
  with pytest.raises(IndexError, match='out of range'):
    train[10_000]
  with pytest.raises(ValueError, match="'a purple circle' is not in the synthetic grammar"):
    S.parse('a purple circle')
  with pytest.raises(ValueError, match='plural'):
    S.parse('two red circle')
  with pytest.raises(ValueError, match='max_objects must be in 2..6'):
    S.build_benchmark(max_objects=1)
  with pytest.raises(ValueError, match="compositions must be 'train', 'heldout', 'all'"):
    S.SyntheticSource(10, compositions='test')


def test_holds_semantics():
  a = S.Obj('circle', 'red', 'small', 0, 0, 0.17, 0.17)
  b = S.Obj('square', 'blue', 'large', 0, 2, 0.83, 0.17)
  c = S.Obj('circle', 'red', 'large', 2, 2, 0.83, 0.83)
  scene = (a, b, c)
  assert S.holds(scene, 'a small red circle to the left of a large blue square')
  assert not S.holds(scene, 'a large blue square to the left of a small red circle')
  assert S.holds(scene, 'a large red circle below a large blue square')
  assert S.holds(scene, 'two red circles and a large blue square')
  assert not S.holds(scene, 'three red circles')
  assert not S.holds(scene, 'one red circle')
  assert S.holds(scene, 'a red circle and a red circle')       # Two distinct red circles.
  assert not S.holds(scene, 'a small red circle and a small red circle')
  assert S.holds(scene, 'there is no green star') and not S.holds(scene, 'there is no red circle')


# ------------------------------------------------------------------------------------------ suite

def test_benchmark_cases_are_right_and_deterministic(bench):
  assert {k: len(v) for k, v in bench.items()} == {k: 80 for k in S.BENCH_SUBSETS}
  for name in S.PAIRWISE_SUBSETS:
    for c in bench[name]:
      assert c['image'].shape == (32, 32, 3) and c['image'].dtype == np.uint8
      assert c['caption'] != c['foil']
      assert S.holds(c['scene'], c['caption']) and not S.holds(c['scene'], c['foil'])
  for c in bench['attribute']:  # Same words, two attribute values exchanged.
    assert sorted(c['caption'].split()) == sorted(c['foil'].split())
  for c in bench['relation']:
    a, rel, b = S.parse(c['caption'])[0]
    assert S.parse(c['foil'])[0] == S.Rel(b, rel, a)
  assert {c['group'] for c in bench['existence']} == {'present', 'absent'}
  for c in bench['winoground']:
    c0, c1 = c['captions']
    assert sorted(c0.split()) == sorted(c1.split()) and c0 != c1
    assert not np.array_equal(c['images'][0], c['images'][1])
    for k in range(2):
      assert S.holds(c['scenes'][k], c['captions'][k])
      assert not S.holds(c['scenes'][k], c['captions'][1 - k])
  assert {c['tag'] for c in bench['winoground']} == {'relation', 'attribute'}
  caps = [c['caption'] for c in bench['retrieval']]
  assert len(set(caps)) == len(caps)
  again = S.build_benchmark(seed=3, image_size=32, n_per_subset=80, subsets=('relation',))
  assert [c['caption'] for c in again['relation']] == [c['caption'] for c in bench['relation']]
  np.testing.assert_array_equal(again['relation'][9]['image'], bench['relation'][9]['image'])
  other = S.build_benchmark(seed=4, image_size=32, n_per_subset=80, subsets=('relation',))
  assert [c['caption'] for c in other['relation']] != [c['caption'] for c in bench['relation']]


def _oracle(bench):
  """Reads the scene behind each image: 1 if the caption is true, +0.5 for the retrieval caption."""
  scene_of, canon = {}, {}
  for cases in bench.values():
    for c in cases:
      for img, scene in zip(c.get('images', [c.get('image')]), c.get('scenes', [c.get('scene')])):
        scene_of[img.tobytes()] = scene
  for c in bench['retrieval']:
    canon[c['image'].tobytes()] = c['caption']

  def score(images, captions):
    assert images.dtype == np.uint8 and images.ndim == 4 and len(images) == len(captions)
    return np.array([S.holds(scene_of[im.tobytes()], t) + 0.5 * (canon.get(im.tobytes()) == t)
                     for im, t in zip(images, captions)])

  def embed(images, captions):
    vocab = {t: k for k, t in enumerate(canon.values())}
    fi = np.eye(len(vocab))[[vocab[canon[im.tobytes()]] for im in images]]
    return fi, np.eye(len(vocab))[[vocab[t] for t in captions]]

  return score, embed


def test_oracle_scores_100_everywhere(bench):
  score, embed = _oracle(bench)
  for kwargs in (dict(embed=embed), dict(embed=None), dict(embed=embed, k_test=3)):
    m = bench_lib.evaluate(bench, score, threshold=0.5, batch_size=50, **kwargs)
    for key in ('attribute', 'relation', 'counting', 'existence', 'pairwise_mean', 'itm_acc',
                'winoground_text', 'winoground_image', 'winoground_group', 'txt_r1', 'img_r1',
                'r_mean', 'relation/left', 'winoground_group/attribute', 'main_attribute',
                'main_attribute/shape', 'main_object'):
      assert m[key] == 100.0, (kwargs, key, m[key])


def test_constant_scorer_fails_strict_tasks(bench):
  m = bench_lib.evaluate(bench, lambda im, t: np.zeros(len(t)),
                         lambda im, t: (np.ones((len(im), 4)), np.ones((len(t), 4))))
  for key in S.PAIRWISE_SUBSETS + ('winoground_text', 'winoground_image', 'winoground_group',
                                   'txt_r1', 'txt_r10', 'img_r10'):
    assert m[key] == 0.0, key


def test_random_scorer_is_near_chance(bench):
  rng = np.random.default_rng(0)
  big = S.build_benchmark(seed=5, image_size=16, n_per_subset=400,
                          subsets=('attribute', 'relation', 'winoground', 'retrieval'))
  m = bench_lib.evaluate(big, lambda im, t: rng.normal(size=len(t)),
                         lambda im, t: (rng.normal(size=(len(im), 16)), rng.normal(size=(len(t), 16))))
  assert abs(m['attribute'] - 50) < 8 and abs(m['relation'] - 50) < 8
  assert abs(m['winoground_text'] - 25) < 7 and abs(m['winoground_image'] - 25) < 7
  assert abs(m['winoground_group'] - 100 / 6) < 6    # Chance: both diagonal scores the top 2.
  assert m['txt_r10'] < 7 and m['img_r10'] < 7       # Chance 10 / 400 = 2.5 %.


def test_winoground_and_recall_math_on_hand_cases():
  s = np.array([[[2., 1.], [0., 3.]],    # text: 2>0, 3>1 ok; image: 2>1, 3>0 ok.
                [[2., 1.], [2., 3.]],    # text: 2>2 fails (tie); image ok.
                [[1., 2.], [0., 3.]]])   # text ok; image: 1>2 fails.
  assert bench_lib.winoground_scores(s) == pytest.approx(dict(text=200 / 3, image=200 / 3,
                                                              group=100 / 3))
  # 2 images, 3 texts (image 0 has texts 0 and 2).
  i2t = np.array([[0.1, 0.9, 0.5],       # Best gt (text 2) ranks 2nd.
                  [0.3, 0.8, 0.2]])      # gt text 1 ranks 1st.
  r = bench_lib.retrieval_recalls(i2t, i2t.T, [0, 1, 0], ks=(1, 2))
  assert r['txt_r1'] == 50 and r['txt_r2'] == 100
  # t2i: text 0 -> [0.1, 0.3] gt 0 ranks 2nd; text 1 -> [0.9, 0.8] gt 1 2nd; text 2 ranks 1st.
  assert r['img_r1'] == pytest.approx(100 / 3) and r['img_r2'] == 100
  assert r['r_mean'] == pytest.approx((50 + 100 + 100 / 3 + 100) / 4)
  assert bench_lib.pairwise_accuracy(np.array([1., 2., 3.]), np.array([0., 2., 4.])) == \
      pytest.approx(100 / 3)
  with pytest.raises(ValueError, match=r'\[N, 2, 2\]'):
    bench_lib.winoground_scores(np.zeros((3, 4)))


def test_markdown_table(bench):
  score, embed = _oracle(bench)
  m = bench_lib.evaluate(bench, score, embed)
  table = bench_lib.to_markdown(m, bench)
  assert table.splitlines()[0].startswith('| Synthetic fine-grained suite | Score (%)')
  assert '| Winoground-style: text / image / group | 100.0 / 100.0 / 100.0 | 25.0 / 25.0 / 16.7 | 80 |' in table
  assert 'Retrieval image→text R@1 / R@5 / R@10 | 100.0 / 100.0 / 100.0 | 1.2 / 6.2 / 12.5 | 80' in table


def test_config_keys_build_sources():
  from nas_jax import config_lib
  syn = config_lib.base_config().data.synthetic
  train = S.SyntheticSource(50, split='train', **S.source_kwargs(syn, 'train'))
  heldout = S.SyntheticSource(50, split='heldout', **S.source_kwargs(syn, 'heldout'))
  assert (train.p_existence, heldout.p_existence) == (syn.p_existence, 0.0)
  assert train.max_objects == heldout.max_objects == syn.max_objects


def test_horizontal_flip_is_the_left_right_word_swap(train):
  """The pipeline flips images and swaps "left"/"right" in captions and negatives: the mirrored
  scene renders as the flipped image, and the swapped caption (negatives) stay true (false)."""
  import re
  swap = lambda t: re.sub(r'\b(left|right)\b', lambda m: 'right' if m[1] == 'left' else 'left', t)
  for i in range(60):
    scene, claim, _ = train.scene(i)
    mirrored = tuple(o._replace(col=S.GRID - 1 - o.col, x=1.0 - o.x) for o in scene)
    diff = np.abs(S.render(mirrored, 32).astype(int) - np.fliplr(train[i]['image']).astype(int))
    assert diff.max() <= 1
    assert S.holds(mirrored, swap(S.text(claim)))
    assert not any(S.holds(mirrored, swap(n)) for n in train[i]['neg_captions'])


def test_aro_like_subsets_are_macro_averaged_over_groups():
  img = np.zeros((4, 4, 3), np.uint8)
  cases = [dict(image=img, caption='t', foil='f', group=g) for g in ['left'] * 3 + ['above']]
  counting = [dict(image=img, caption='t', foil='f', group=g) for g in ['2'] * 3 + ['3']]

  def score(images, captions):  # [captions..., foils...]: only each subset's first case is right.
    n = len(captions) // 2
    return np.array([1.0] + [0.0] * (n - 1) + [0.5] * n)

  m = bench_lib.evaluate(dict(relation=cases, counting=counting), score)
  assert m['relation/left'] == pytest.approx(100 / 3) and m['relation/above'] == 0.0
  assert m['relation'] == pytest.approx(100 / 6)   # Macro: (33.3 + 0) / 2, not 25.
  assert m['counting'] == 25.0                     # Micro, as VALSE.


def test_heldout_itm_accuracy_metric():
  """Held-out matching: own caption vs the next scene's caption, decided at the threshold."""
  from nas_jax.benchmarks import synthetic as metrics
  bench = S.build_benchmark(seed=3, image_size=32, n_per_subset=12, subsets=("retrieval",))
  truth = {c['image'].tobytes(): c['caption'] for c in bench['retrieval']}
  oracle = lambda imgs, caps: np.array([1.0 if truth[i.tobytes()] == c else -1.0
                                        for i, c in zip(imgs, caps)])
  out = metrics.evaluate(bench, oracle, threshold=0.0)
  assert out['heldout_itm_acc'] == 100.0 and out['heldout_itm_pairwise'] == 100.0
  says_yes = lambda imgs, caps: np.ones(len(caps))
  out = metrics.evaluate(bench, says_yes, threshold=0.0)
  assert (out['heldout_itm_p_match'], out['heldout_itm_p_nonmatch'], out['heldout_itm_acc']) == (100.0, 0.0, 50.0)
  assert out['heldout_itm_pairwise'] == 0.0  # Ties fail.
  assert 'ITM on held-out scenes' in metrics.to_markdown(out, bench)


# ------------------------------------------------------------------------------------------ main object

def test_main_object_foils_change_exactly_the_probed_attribute(bench):
  """main_attribute / main_object: the foil is the caption with only its subject (the main object)
  changed, in exactly the probed attribute (both colour and shape for a similar object)."""
  groups = {'colour': 0, 'shape': 0, 'size': 0}
  main_small = 0
  for name in ('main_attribute', 'main_object'):
    for c in bench[name]:
      scene, caption, foil = c['scene'], S.parse(c['caption']), S.parse(c['foil'])
      assert S.holds(scene, caption) and not S.holds(scene, foil)
      subj, fsubj = S.main_subject(caption), S.main_subject(foil)
      assert S._with_subject(caption, fsubj) == foil      # Nothing but the subject changed.
      changed = {f for f in ('colour', 'shape', 'size') if getattr(subj, f) != getattr(fsubj, f)}
      # The main object: the only object of its kind, and the largest (the others are small).
      (main,) = [o for o in scene if (o.colour, o.shape) == (subj.colour, subj.shape)]
      assert main.size == subj.size and all(o.size == 'small' for o in scene if o is not main)
      if name == 'main_attribute':
        assert changed == {c['group']}
        groups[c['group']] += 1
        main_small += main.size == 'small'
        assert main.size == 'large' or c['group'] == 'size'
      else:
        assert c['group'] == 'object' and changed == {'colour', 'shape'} and main.size == 'large'
        # One of the two kinds is the other's most similar.
        kind, other = (subj.colour, subj.shape), (fsubj.colour, fsubj.shape)
        assert S.similar_kinds(*kind)[0] == other or S.similar_kinds(*other)[0] == kind
  n = len(bench['main_attribute'])
  assert all(abs(v - n / 3) <= 2 for v in groups.values()), groups   # Groups in turn, by pairs.
  assert main_small == groups['size'] / 2   # "large" is the true word half the time.


def test_main_object_pairs_cancel_image_blind_word_preferences():
  """Cases 2j and 2j + 1 exchange the shown and the named value: a scorer that ignores the image
  and adds up word weights wins exactly one of each pair."""
  bench = S.build_benchmark(seed=5, image_size=16, n_per_subset=60, max_objects=2,
                            subsets=('main_attribute', 'main_object'))
  rng = np.random.default_rng(0)
  for trial in range(3):
    # Distinct powers of two: a changed word (or two) always changes the sum; exact in float64.
    weight = dict(zip(S.vocab_words(), 2.0 ** rng.permutation(len(S.vocab_words()))))
    blind = lambda im, t: np.array([sum(weight[w] for w in s.split()) for s in t], np.float64)
    m = bench_lib.evaluate(bench, blind)
    assert m['main_object'] == 50.0
    assert all(m[f'main_attribute/{g}'] == pytest.approx(50.0, abs=100 / 18) for g in S.MAIN_GROUPS)
  value = lambda np_, group: np_[:2] if group == 'object' else getattr(np_, group)
  for name in ('main_attribute', 'main_object'):
    cases = bench[name]
    for a, b in zip(cases[0::2], cases[1::2]):
      g = a['group']
      shown_a, named_a = (value(S.main_subject(S.parse(a[k])), g) for k in ('caption', 'foil'))
      shown_b, named_b = (value(S.main_subject(S.parse(b[k])), g) for k in ('caption', 'foil'))
      assert b['group'] == g and (shown_a, named_a) == (named_b, shown_b)


def test_similar_kinds_are_the_nearest_colour_and_shape():
  kinds = S.similar_kinds('red', 'circle')
  assert len(kinds) == len(set(kinds)) == (len(S.COLOURS) - 1) * (len(S.SHAPES) - 1)
  assert all(c != 'red' and s != 'circle' for c, s in kinds)
  assert kinds[0] == ('yellow', 'square')     # Nearest RGB colour, most overlapping shape.
  assert S.similar_kinds('blue', 'square')[0] == ('green', 'circle')


def test_heldout_compositions_are_disjoint_from_training(train, bench):
  """Train scenes never have a held-out composition; held-out splits and every benchmark scene
  only have those; about HELDOUT_FRACTION of all draws are held out."""
  train_comps = {S.composition(train.scene(i)[0]) for i in range(2000)}
  assert not any(S._heldout_key(c) for c in train_comps)
  bench_comps = set()
  for cases in bench.values():
    for c in cases:
      for scene in c.get('scenes', [c.get('scene')]):
        assert S.is_heldout(scene)
        bench_comps.add(S.composition(scene))
  assert not bench_comps & train_comps
  assert len(bench_comps) > 100 and {len(c[0]) for c in bench_comps} == {1, 2, 3}
  # A scene with two objects' colours exchanged (the attribute-swap foil's scene) is held out too.
  for c in bench['attribute']:
    a, b = c['scene']
    assert S.is_heldout((a._replace(colour=b.colour), b._replace(colour=a.colour)))
  heldout = S.SyntheticSource(300, split='heldout', image_size=32)
  assert all(S.is_heldout(heldout.scene(i)[0]) for i in range(300))
  both = S.SyntheticSource(3000, split='train', compositions='all', image_size=32)
  frac = np.mean([S.is_heldout(both.scene(i)[0]) for i in range(3000)])
  assert abs(frac - S.HELDOUT_FRACTION) < 0.03
  # The partition is a property of the world: the same for every seed.
  other = S.SyntheticSource(300, seed=7, split='train', image_size=32)
  assert not any(S.is_heldout(other.scene(i)[0]) for i in range(300))


def test_main_object_subsets_are_deterministic(bench):
  subsets = ('main_attribute', 'main_object')
  again = S.build_benchmark(seed=3, image_size=32, n_per_subset=80, subsets=subsets)
  other = S.build_benchmark(seed=4, image_size=32, n_per_subset=80, subsets=subsets)
  for name in subsets:
    assert [(c['caption'], c['foil']) for c in again[name]] == \
        [(c['caption'], c['foil']) for c in bench[name]]
    np.testing.assert_array_equal(np.stack([c['image'] for c in again[name]]),
                                  np.stack([c['image'] for c in bench[name]]))
    assert [c['caption'] for c in other[name]] != [c['caption'] for c in bench[name]]


def test_markdown_has_the_main_object_rows(bench):
  score, embed = _oracle(bench)
  table = bench_lib.to_markdown(bench_lib.evaluate(bench, score, embed), bench)
  assert "| Main object's colour / shape / size replaced (macro): pairwise acc | 100.0 | 50.0 | 80 |" in table
  assert '| Main object replaced by a similar one: pairwise acc | 100.0 | 50.0 | 80 |' in table
  assert "per attribute | 100.0 / 100.0 / 100.0 | 50.0 / 50.0 / 50.0 |" in table
