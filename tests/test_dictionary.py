"""Visual dictionary: eq. 2 EMA by hand, straight-through gradient, true nearest code, usage stats."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nas_jax.models.dictionary import VisualDictionary, sincos_2d


def _hand_vd():
  """3 codes of width 4, identity input projection, gamma = 0.9."""
  vd = VisualDictionary(size=3, dim=4, momentum=0.9, input_proj=False, gate=False)
  patches = jnp.array([[[1., 0, 0, 0], [0, 1, 0, 0], [-4, 0, 0, 0], [-7, 0, 0, 0]]])
  variables = nn.Module.init(vd, jax.random.PRNGKey(0), patches)
  codebook = jnp.array([[0., 0, 0, 0], [10, 10, 10, 10], [-5, 0, 0, 0]])
  variables = {**variables, 'batch_stats': {'codebook': codebook}}
  return vd, variables, patches


def test_ema_update_matches_eq2_by_hand():
  vd, variables, patches = _hand_vd()
  aux, new = vd.apply(variables, patches, update=True, method=VisualDictionary.quantize,
                      mutable=['batch_stats'])
  np.testing.assert_array_equal(aux['codes'], [[0, 0, 2, 2]])
  # d0 <- 0.9*0 + 0.1*mean((1,0,0,0),(0,1,0,0)); d1 unused stays; d2 <- 0.9*(-5) + 0.1*(-5.5).
  expected = np.array([[0.05, 0.05, 0, 0], [10, 10, 10, 10], [-5.05, 0, 0, 0]], np.float32)
  np.testing.assert_allclose(new['batch_stats']['codebook'], expected, rtol=1e-6, atol=1e-6)
  # Quantised values are the codebook rows *before* the update.
  np.testing.assert_allclose(aux['q'][0], [[0, 0, 0, 0], [0, 0, 0, 0], [-5, 0, 0, 0], [-5, 0, 0, 0]])
  # Usage: counts (2, 0, 2) -> perplexity 2, 2 codes used; distances 1, 1, 1, 4.
  np.testing.assert_allclose(aux['perplexity'], 2.0, rtol=1e-6)
  assert int(aux['used_codes']) == 2
  np.testing.assert_allclose(aux['commit_dist'], 7 / 4, rtol=1e-6)


def test_no_update_without_flag_and_clear_error_when_immutable():
  vd, variables, patches = _hand_vd()
  _, new = vd.apply(variables, patches, update=False, method=VisualDictionary.quantize,
                    mutable=['batch_stats'])
  np.testing.assert_array_equal(new['batch_stats']['codebook'], variables['batch_stats']['codebook'])
  with pytest.raises(ValueError, match="mutable=\\['batch_stats'\\]"):
    vd.apply(variables, patches, update=True, method=VisualDictionary.quantize)


def test_straight_through_gradient_is_identity():
  vd, variables, patches = _hand_vd()
  w = jax.random.normal(jax.random.PRNGKey(1), patches.shape)

  def loss(p):
    aux = vd.apply(variables, p, update=False, method=VisualDictionary.quantize)
    return jnp.sum(w * aux['q'])

  np.testing.assert_allclose(jax.grad(loss)(patches), w, rtol=1e-6)


def test_assignment_is_true_nearest_code_and_usage_stats():
  vd = VisualDictionary(size=16, dim=8, input_proj=True, init_std=0.5)
  patches = jax.random.normal(jax.random.PRNGKey(2), (3, 4, 12))
  variables = nn.Module.init(vd, jax.random.PRNGKey(3), patches)
  aux = jax.jit(lambda v, p: vd.apply(v, p, update=False, method=VisualDictionary.quantize))(
      variables, patches)
  f = np.asarray(aux['f'], np.float64).reshape(-1, 8)
  d = np.asarray(variables['batch_stats']['codebook'], np.float64)
  brute = ((f[:, None, :] - d[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(np.asarray(aux['codes']).reshape(-1), brute.argmin(-1))
  np.testing.assert_allclose(aux['commit_dist'], brute.min(-1).mean(), rtol=1e-5)
  counts = np.bincount(brute.argmin(-1), minlength=16)
  p = counts[counts > 0] / counts.sum()
  np.testing.assert_allclose(aux['perplexity'], math.exp(-(p * np.log(p)).sum()), rtol=1e-5)
  assert int(aux['used_codes']) == (counts > 0).sum()
  assert (np.asarray(aux['f']) >= 0).all()  # ReLU after the input projection


def test_data_init_fills_codebook_from_first_batch():
  vd = VisualDictionary(size=4, dim=4, momentum=1.0, input_proj=False, init='data')
  patches = jax.random.normal(jax.random.PRNGKey(4), (2, 4, 4))
  variables = nn.Module.init(vd, jax.random.PRNGKey(5), patches)
  assert not bool(variables['batch_stats']['initialized'])
  aux, new = vd.apply(variables, patches, update=True, method=VisualDictionary.quantize,
                      mutable=['batch_stats'])
  # P = 8 features, m = 4 codes: rows 0, 2, 4, 6 of the flattened batch (gamma = 1: no EMA move).
  flat = np.asarray(patches).reshape(8, 4)
  np.testing.assert_allclose(new['batch_stats']['codebook'], flat[[0, 2, 4, 6]], rtol=1e-6)
  assert bool(new['batch_stats']['initialized'])
  assert float(aux['commit_dist']) < float(jnp.mean(jnp.sum(flat ** 2, -1)))
  # A second update must not re-initialise.
  _, again = vd.apply(new, patches[::-1] + 3.0, update=True, method=VisualDictionary.quantize,
                      mutable=['batch_stats'])
  np.testing.assert_allclose(again['batch_stats']['codebook'], flat[[0, 2, 4, 6]], rtol=1e-6)


def test_sincos_2d_hand_values():
  pos = np.asarray(sincos_2d((2, 2), 4))
  # dim/2 = 2 channels per axis, t = (1, 1); row 0 -> pi, row 1 -> 2 pi (same for columns).
  np.testing.assert_allclose(pos[0], [0, -1, 0, -1], atol=1e-5)
  np.testing.assert_allclose(pos[1], [0, -1, 0, 1], atol=1e-5)
  np.testing.assert_allclose(pos[2], [0, 1, 0, -1], atol=1e-5)


@pytest.mark.parametrize('gate', [True, False])
def test_call_shapes_and_grid_errors(gate):
  vd = VisualDictionary(size=8, dim=8, gate=gate, grid=(2, 3))
  patches = jax.random.normal(jax.random.PRNGKey(6), (2, 6, 8))
  variables = nn.Module.init(vd, jax.random.PRNGKey(7), patches)
  (tokens, aux), new = vd.apply(variables, patches, update=True, mutable=['batch_stats'])
  assert tokens.shape == (2, 6, 8) and aux['codes'].shape == (2, 6)
  assert aux['codes'].dtype == jnp.int32
  assert ('gate_dense' in variables['params']) == gate
  np.testing.assert_allclose(np.asarray(tokens).mean(-1), 0, atol=1e-5)  # final LayerNorm
  assert not np.allclose(new['batch_stats']['codebook'], variables['batch_stats']['codebook'])
  with pytest.raises(ValueError, match='not a square grid'):
    nn.Module.init(VisualDictionary(size=8, dim=8), jax.random.PRNGKey(0), patches)


@pytest.mark.parametrize('reuse_gate', [True, False])
def test_negative_tokens_change_only_replaced_patches(reuse_gate):
  vd = VisualDictionary(size=8, dim=8)
  patches = jax.random.normal(jax.random.PRNGKey(8), (2, 4, 8))
  variables = nn.Module.init(vd, jax.random.PRNGKey(9), patches)
  tokens, aux = vd.apply(variables, patches)
  replaced = jnp.array([[True, False, False, True], [False, False, False, False]])
  new_codes = jnp.where(replaced, (aux['codes'] + 1) % 8, aux['codes'])
  neg = vd.apply(variables, aux['q'], aux['f'], new_codes, replaced, reuse_gate=reuse_gate,
                 method=VisualDictionary.negative_tokens)
  np.testing.assert_array_equal(np.asarray(neg)[~np.asarray(replaced)],
                                np.asarray(tokens)[~np.asarray(replaced)])
  assert not np.allclose(np.asarray(neg)[np.asarray(replaced)],
                         np.asarray(tokens)[np.asarray(replaced)], atol=1e-3)


def test_data_init_with_fewer_features_than_codes_gives_distinct_rows():
  vd = VisualDictionary(size=8, dim=4, momentum=1.0, input_proj=False, init='data')
  patches = jax.random.normal(jax.random.PRNGKey(10), (1, 4, 4))
  variables = nn.Module.init(vd, jax.random.PRNGKey(11), patches)
  _, new = vd.apply(variables, patches, update=True, method=VisualDictionary.quantize,
                    mutable=['batch_stats'])
  book = np.asarray(new['batch_stats']['codebook'])
  np.testing.assert_allclose(book[::2], np.asarray(patches)[0], rtol=1e-6)   # rows 0,0,1,1,...
  assert len({tuple(r) for r in book.round(7)}) == 8


def test_update_uses_the_global_batch_when_sharded():
  if jax.device_count() < 8:
    pytest.skip('needs 8 (simulated) devices')
  from jax.sharding import NamedSharding, PartitionSpec as P
  vd = VisualDictionary(size=16, dim=8)
  patches = jax.random.normal(jax.random.PRNGKey(12), (8, 4, 8))
  variables = nn.Module.init(vd, jax.random.PRNGKey(13), patches)
  step = jax.jit(lambda v, p: vd.apply(v, p, update=True, mutable=['batch_stats']))
  (_, aux1), new1 = step(variables, patches)
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  with jax.set_mesh(mesh):
    sharded = jax.device_put(patches, NamedSharding(mesh, P('data')))
    (_, aux8), new8 = step(variables, sharded)
  np.testing.assert_array_equal(aux1['codes'], aux8['codes'])
  np.testing.assert_allclose(new8['batch_stats']['codebook'], new1['batch_stats']['codebook'],
                             rtol=1e-6, atol=1e-6)
  # and the update is eq. 2 over all 32 tokens, not one shard's.
  f = np.asarray(aux1['f']).reshape(-1, 8)
  c = np.asarray(aux1['codes']).reshape(-1)
  book = np.array(variables['batch_stats']['codebook'])
  for j in np.unique(c):
    book[j] = 0.99 * book[j] + 0.01 * f[c == j].mean(0)
  np.testing.assert_allclose(new8['batch_stats']['codebook'], book, rtol=1e-5, atol=1e-6)


def test_negative_tokens_use_the_given_codebook_and_pass_no_gradient_to_inputs():
  vd = VisualDictionary(size=8, dim=8)
  patches = jax.random.normal(jax.random.PRNGKey(14), (1, 4, 8))
  variables = nn.Module.init(vd, jax.random.PRNGKey(15), patches)
  _, aux = vd.apply(variables, patches)
  replaced = jnp.array([[True, True, False, False]])
  codes = jnp.zeros((1, 4), jnp.int32)

  w = jax.random.normal(jax.random.PRNGKey(16), (1, 4, 8))

  def f(q, f, book):   # (a sum of squares would be constant after the final LayerNorm)
    return jnp.sum(w * vd.apply(variables, q, f, codes, replaced, codebook=book,
                                method=VisualDictionary.negative_tokens))

  book = variables['batch_stats']['codebook']
  grads = jax.grad(f, argnums=(0, 1, 2))(aux['q'], aux['f'], book)
  assert all(np.all(np.asarray(g) == 0) for g in grads)
  assert not np.isclose(f(aux['q'], aux['f'], book), f(aux['q'], aux['f'], book + 1.0))


def test_tf32_distances_switch_reaches_the_product(monkeypatch):
  """model.dictionary.distances='tf32': the patch-to-code product runs with TF32 tensor cores on a
  GPU (traced as if on one: the jaxpr's dot carries the TF32 algorithm) and in float32 elsewhere,
  where it assigns the same codes; the NAS model passes the config key down; a bad name is named."""
  from nas_jax.models import dictionary
  from nas_jax.models.nas import NASModel
  from step_utils import tiny_config
  assert dictionary.distance_precision('tf32', 'gpu') == jax.lax.DotAlgorithmPreset.TF32_TF32_F32
  for distances, backend in (('tf32', 'cpu'), ('tf32', 'tpu'), ('float32', 'gpu')):
    assert dictionary.distance_precision(distances, backend) == jax.lax.Precision.HIGHEST
  with pytest.raises(ValueError, match=r"model.dictionary.distances='bf16': use one of"):
    dictionary.distance_precision('bf16')

  vd, variables, patches = _hand_vd()
  run = lambda distances: vd.clone(distances=distances).apply(
      variables, patches, update=False, method=VisualDictionary.quantize)
  np.testing.assert_array_equal(run('tf32')['codes'], run('float32')['codes'])  # CPU: float32.

  c = tiny_config(**{"model.dictionary.distances": "tf32"})
  model = NASModel(c.model)
  images = jnp.zeros((1, c.model.vit.image_size, c.model.vit.image_size, 3))
  tokens = lambda m, images: m.dictionary_tokens(m.encode_image(images)["embeds"])
  variables = model.init(jax.random.PRNGKey(0), images, method=tokens)
  monkeypatch.setattr(dictionary.jax, "default_backend", lambda: "gpu")
  jaxpr = jax.make_jaxpr(lambda v: model.apply(v, images, method=tokens))(variables)
  assert "precision=TF32_TF32_F32" in str(jaxpr)
