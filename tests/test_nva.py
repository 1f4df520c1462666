"""NVA: primary patches are the top-S ones, replacements are k-nearest codes, shared per code,
deterministic per key, jit-compatible, gradient-free."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nas_jax import nva

B, N, C, M, K, RATIO = 3, 16, 8, 12, 3, 0.3


def _inputs(seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  return dict(t_cls=jax.random.normal(ks[0], (B, C)), v_cls=jax.random.normal(ks[1], (B, C)),
              patches=jax.random.normal(ks[2], (B, N, C)),
              codes=jax.random.randint(ks[3], (B, N), 0, 6),   # few codes: many shared
              codebook=jax.random.normal(ks[4], (M, C)))


@functools.lru_cache(maxsize=None)
def _jitted():
  return jax.jit(functools.partial(nva.negative_codes, ratio=RATIO, k=K))


def _run(key, inputs):
  return jax.tree.map(np.asarray, _jitted()(key, **inputs))


def _cos(a, b):
  return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_primary_are_top_s_and_replacements_are_k_nearest():
  x = _inputs()
  out = _run(jax.random.PRNGKey(1), x)
  t, v, p, codes, d = (np.asarray(x[k], np.float64)
                       for k in ('t_cls', 'v_cls', 'patches', 'codes', 'codebook'))
  codes = codes.astype(int)
  s = 0.5 * _cos(t[:, None], p) + 0.5 * _cos(v[:, None], p)
  n_p = math.ceil(RATIO * N)                                      # 5
  np.testing.assert_allclose(out['score'], s, rtol=1e-5, atol=1e-6)
  assert (out['primary'].sum(1) == n_p).all()
  for b in range(B):
    assert set(np.flatnonzero(out['primary'][b])) == set(np.argsort(-s[b])[:n_p])

  dd = ((d[:, None] - d[None]) ** 2).sum(-1)
  np.fill_diagonal(dd, np.inf)
  knn = np.argsort(dd, axis=1)[:, :K]
  for b in range(B):
    primary_codes = set(codes[b][out['primary'][b]])
    # scope='image': exactly the patches carrying a primary code are replaced.
    np.testing.assert_array_equal(out['replaced'][b], np.isin(codes[b], list(primary_codes)))
    np.testing.assert_array_equal(out['codes'][b][~out['replaced'][b]],
                                  codes[b][~out['replaced'][b]])
    for c in primary_codes:
      new = out['codes'][b][codes[b] == c]
      assert len(set(new)) == 1, 'patches sharing a code must share the replacement'
      assert new[0] != c and new[0] in knn[c]


def test_same_key_same_output_other_key_differs():
  x = _inputs()
  a = _run(jax.random.PRNGKey(7), x)
  np.testing.assert_array_equal(a['codes'], _run(jax.random.PRNGKey(7), x)['codes'])
  others = [_run(jax.random.PRNGKey(s), x)['codes'] for s in range(8, 13)]
  assert any((o != a['codes']).any() for o in others)
  for o in others:  # the key changes the draws only, not which patches are replaced
    np.testing.assert_array_equal(o != np.asarray(x['codes']), a['replaced'])


def test_no_gradient_flows():
  x = _inputs()

  def f(t_cls, v_cls, patches, codebook):
    out = nva.negative_codes(jax.random.PRNGKey(0), t_cls=t_cls, v_cls=v_cls, patches=patches,
                             codes=x['codes'], codebook=codebook, ratio=RATIO, k=K)
    # The only float output is S: without stop_gradient it depends on t_cls, v_cls and patches.
    return jnp.sum(out['score'] * jnp.arange(1.0, N + 1)) + jnp.sum(out['replaced'])

  grads = jax.grad(f, argnums=(0, 1, 2, 3))(x['t_cls'], x['v_cls'], x['patches'], x['codebook'])
  for g in grads:
    assert np.all(np.asarray(g) == 0)


def test_nearest_codes_and_probabilities_by_hand():
  codebook = jnp.array([[0.], [1.], [3.], [7.], [15.]])
  idx, dist = nva.nearest_codes(codebook, 2)
  np.testing.assert_array_equal(idx, [[1, 2], [0, 2], [1, 0], [2, 1], [3, 2]])
  np.testing.assert_allclose(dist, [[1, 9], [1, 4], [4, 9], [16, 36], [64, 144]])
  # distances (1, 2, 2): L2 norm 3 -> normalised (1/3, 2/3, 2/3) -> logits 1/(x + 1e-4).
  logits = nva.replacement_logits(jnp.array([1., 2., 2.]))
  np.testing.assert_allclose(logits, 1 / (np.array([1, 2, 2]) / 3 + 1e-4), rtol=1e-6)
  with pytest.raises(ValueError, match='nva.k=5'):
    nva.nearest_codes(codebook, 5)
  assert nva.num_primary(10, 0.3) == 3 and nva.num_primary(256, 0.3) == 77


def test_replacement_frequencies_follow_softmax():
  # 2048 identical images whose only primary code is 0: each image is an independent draw.
  bsz, codebook = 2048, jnp.array([[0., 0], [1, 0], [0, 2], [-2.5, 0], [9, 9]])
  out = nva.negative_codes(
      jax.random.PRNGKey(3), t_cls=jnp.ones((bsz, 2)), v_cls=jnp.ones((bsz, 2)),
      patches=jnp.ones((bsz, 4, 2)), codes=jnp.zeros((bsz, 4), jnp.int32), codebook=codebook,
      ratio=0.25, k=3)
  new = np.asarray(out['codes'])
  assert (new == new[:, :1]).all()      # all four patches carry code 0: one shared replacement
  freq = np.bincount(new[:, 0], minlength=5) / bsz
  dist = np.array([1., 4., 6.25])       # codes 1, 2, 3
  p = np.exp(1 / (dist / np.linalg.norm(dist) + 1e-4))
  p /= p.sum()
  np.testing.assert_allclose(freq[[1, 2, 3]], p, atol=0.035)
  assert freq[0] == 0 and freq[4] == 0


def test_width_mismatch_is_a_clear_error():
  x = _inputs()
  x['t_cls'] = jnp.ones((B, 4))
  with pytest.raises(ValueError, match='same width|one width'):
    nva.negative_codes(jax.random.PRNGKey(0), **x)


def test_scope_primary_replaces_only_primary_patches_and_max_norm():
  x = _inputs()
  out = jax.tree.map(np.asarray, nva.negative_codes(jax.random.PRNGKey(4), **x, ratio=RATIO, k=K,
                                                    scope='primary', norm='max'))
  np.testing.assert_array_equal(out['replaced'], out['primary'])
  codes = np.asarray(x['codes'])
  assert (out['codes'][out['primary']] != codes[out['primary']]).all()
  np.testing.assert_array_equal(out['codes'][~out['primary']], codes[~out['primary']])
  np.testing.assert_allclose(nva.replacement_logits(jnp.array([1., 2., 4.]), 'max'),
                             1 / (np.array([0.25, 0.5, 1.0]) + 1e-4), rtol=1e-6)
  with pytest.raises(ValueError, match="scope='all'"):
    nva.negative_codes(jax.random.PRNGKey(0), **x, scope='all')
