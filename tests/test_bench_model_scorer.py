"""ModelScorer: batched, chunked, sharded scoring equals the model applied pair by pair."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nas_jax.benchmarks import common, model_scorer
from nas_jax.data.text import load_tokenizer
from nas_jax.data.transforms import EvalTransform
from nas_jax.models.nas import NASModel

from step_utils import tiny_config


@pytest.fixture(scope='module')
def tiny():
  c = tiny_config()
  model = NASModel(config=c.model)
  res = c.model.vit.image_size
  ids = jnp.zeros((1, 8), jnp.int32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, res, res, 3)), ids, jnp.ones_like(ids))
  params = dict(variables['params'])
  params['temp'] = jnp.float32(0.07)  # As in a train state: must be ignored.
  return c, model, params, dict(variables.get('batch_stats', {})), load_tokenizer('synthetic')


def _images(tmp_path, n, res):
  rng = np.random.default_rng(0)
  refs = []
  for k in range(n):
    px = rng.integers(0, 256, (res + 5, res - 3, 3), np.uint8)
    if k % 2:
      refs.append(common.ImageRef(key=f'mem{k}', pixels=px))
    else:
      from PIL import Image
      path = tmp_path / f'{k}.png'
      Image.fromarray(px).save(path)
      refs.append(common.ImageRef(str(path), box=(1, 2, res - 4, res) if k == 2 else None))
  return refs


def test_matches_direct_model_and_reuses_images(tiny, tmp_path):
  c, model, params, batch_stats, tok = tiny
  res = c.model.vit.image_size
  refs = _images(tmp_path, 11, res)
  words = ['a red circle', 'a blue square left of a green triangle', 'two small circles',
           'there is no square']
  rng = np.random.default_rng(1)
  pairs = [(refs[int(i)], words[int(t)]) for i, t in zip(rng.integers(0, 11, 37), rng.integers(0, 4, 37))]
  images, texts = [p[0] for p in pairs], [p[1] for p in pairs]
  scorer = model_scorer.ModelScorer(model, params, batch_stats, tok, image_size=res, batch_size=8,
                                    image_chunk=8, max_tokens=16, show_progress=False)
  logits = scorer.itm_logits(images, texts)
  fi, ft = scorer.itc_features(refs, words)
  # A chunk larger than the images present (zero-padded token rows) gives the same logits.
  wide = model_scorer.ModelScorer(model, params, batch_stats, tok, image_size=res, batch_size=8,
                                  image_chunk=24, max_tokens=16, show_progress=False)
  np.testing.assert_allclose(wide.itm_logits(images[:5], texts[:5]), logits[:5], rtol=1e-5, atol=1e-5)

  # Reference: the whole set at once, no batching, chunking or sharding.
  variables = {'params': {k: v for k, v in params.items() if k != 'temp'}, 'batch_stats': batch_stats}
  pixels = jnp.asarray(np.stack([EvalTransform(res)(r.load()) for r in refs]))
  ids, mask = tok(words, 16)

  def ref_fn(m, pixels, ids, mask, ii, tt):
    img = m.encode_image(pixels)
    txt = m.encode_text(ids, mask)
    tokens = m.image_tokens_for_fusion(img['embeds'])
    fused = m.fuse(txt['embeds'][tt], mask[tt], tokens[ii])
    return m.itm_logits(fused), img['feat'], txt['feat']

  ii = np.array([refs.index(r) for r in images])
  tt = np.array([words.index(t) for t in texts])
  want, want_fi, want_ft = model.apply(variables, pixels, ids, mask, ii, tt, method=ref_fn)
  np.testing.assert_allclose(logits, np.asarray(want), rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(fi, np.asarray(want_fi), rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(ft, np.asarray(want_ft), rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(np.linalg.norm(fi, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(scorer.itm_scores(images, texts), logits[:, 1] - logits[:, 0], rtol=1e-6)
  # Mode plumbing on the real scorer: 'itm+itc' = l1 + cosine.
  both = common.score_pairs(scorer, images, texts, 'itm+itc', max_tokens=16)
  np.testing.assert_allclose(both, logits[:, 1] + np.einsum('pd,pd->p', fi[ii], ft[tt]), rtol=1e-4,
                             atol=1e-4)


def test_synthetic_callables_share_equal_images():
  img = np.zeros((2, 4, 4, 3), np.uint8)
  img[1, 0, 0, 0] = 1
  refs = model_scorer.array_refs(np.concatenate([img, img[:1]]))
  assert refs[0] == refs[2] and refs[0] != refs[1] and len({refs[0], refs[1], refs[2]}) == 2
  assert np.asarray(refs[1].load()).shape == (4, 4, 3)
  scorer = common.TableScorer({(refs[0], 'a'): 1.0, (refs[1], 'a'): -1.0})
  score_pairs, _ = model_scorer.synthetic_callables(scorer)
  np.testing.assert_array_equal(score_pairs(np.concatenate([img, img[:1]]), ['a', 'a', 'a']),
                                [1.0, -1.0, 1.0])
