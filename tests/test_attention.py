"""The attention helper: the math against a float64 reference, masks, dropout, the cuDNN guard
rails, and the projection layouts of MultiHeadAttention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nas_jax.models.attention import MultiHeadAttention, dot_product_attention

B, TQ, TK, H, DH = 2, 3, 5, 2, 4


def reference(q, k, v, valid):
  """float64 softmax(q k^T / sqrt(Dh) over valid keys) v; q [B,Tq,H,Dh], valid [B,Tk] bool."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(valid[:, None, None, :], logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", probs, v)


@pytest.fixture(scope="module")
def qkv():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(B, TQ, H, DH)).astype(np.float32)
  k = rng.normal(size=(B, TK, H, DH)).astype(np.float32)
  v = rng.normal(size=(B, TK, H, DH)).astype(np.float32)
  return q, k, v


def test_matches_reference_without_and_with_masks(qkv):
  q, k, v = qkv
  everything = np.ones((B, TK), bool)
  np.testing.assert_allclose(dot_product_attention(q, k, v), reference(q, k, v, everything),
                             atol=1e-5)
  key_mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], np.int32)
  expected = reference(q, k, v, key_mask.astype(bool))
  np.testing.assert_allclose(dot_product_attention(q, k, v, key_mask=key_mask), expected, atol=1e-5)
  lengths = np.array([5, 2], np.int32)
  np.testing.assert_allclose(dot_product_attention(q, k, v, key_lengths=lengths), expected,
                             atol=1e-5)
  # Both given: the intersection.
  both = dot_product_attention(q, k, v, key_mask=key_mask, key_lengths=np.array([3, 5], np.int32))
  np.testing.assert_allclose(both, reference(q, k, v, np.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]],
                                                               bool)), atol=1e-5)
  # A non-prefix mask works on 'xla' too.
  holes = np.array([[1, 0, 1, 0, 1], [0, 1, 1, 1, 0]], np.int32)
  np.testing.assert_allclose(dot_product_attention(q, k, v, key_mask=holes),
                             reference(q, k, v, holes.astype(bool)), atol=1e-5)


def test_bfloat16_inputs_keep_dtype_and_accuracy(qkv):
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in qkv)
  out = dot_product_attention(q, k, v)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             reference(*qkv, np.ones((B, TK), bool)), atol=5e-2)


def test_dropout_scales_kept_probabilities_and_respects_masks(qkv, monkeypatch):
  q, k, v = qkv
  key_mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], np.int32)
  expected = reference(q, k, v, key_mask.astype(bool))
  rate, rng = 0.25, jax.random.key(0)
  # Evaluation ignores the rate.
  np.testing.assert_allclose(
      dot_product_attention(q, k, v, key_mask=key_mask, dropout_rate=rate, deterministic=True),
      expected, atol=1e-5)
  # Training drops probabilities: the output changes, and with another key changes differently.
  a = dot_product_attention(q, k, v, key_mask=key_mask, dropout_rate=rate, deterministic=False,
                            dropout_rng=rng)
  b = dot_product_attention(q, k, v, key_mask=key_mask, dropout_rate=rate, deterministic=False,
                            dropout_rng=jax.random.key(1))
  assert np.abs(np.asarray(a) - expected).max() > 1e-2
  assert np.abs(np.asarray(a - b)).max() > 1e-2
  # Keeping everything, the dropout path is the attention scaled by 1 / (1 - rate): kept
  # probabilities are rescaled, masked keys stay at zero.
  monkeypatch.setattr(jax.random, "bernoulli", lambda key, p, shape: jnp.ones(shape, bool))
  kept = dot_product_attention(q, k, v, key_mask=key_mask, dropout_rate=rate, deterministic=False,
                               dropout_rng=rng)
  np.testing.assert_allclose(kept, expected / (1 - rate), atol=1e-5)


def test_dropout_without_rng_is_an_error(qkv):
  with pytest.raises(ValueError, match="no dropout_rng"):
    dot_product_attention(*qkv, dropout_rate=0.1, deterministic=False)


def test_bad_arguments_are_clear_errors(qkv):
  q, k, v = qkv
  with pytest.raises(ValueError, match=r"'flash' is not one of \('xla', 'cudnn', 'tokamax'\)"):
    dot_product_attention(q, k, v, implementation="flash")
  with pytest.raises(ValueError, match="cuDNN attention needs bfloat16.*model.dtype='bfloat16'"):
    dot_product_attention(q, k, v, implementation="cudnn")
  with pytest.raises(ValueError, match=r"key_mask has shape \(2, 4\), expected .* \(2, 5\)"):
    dot_product_attention(q, k, v, key_mask=np.ones((B, TK - 1)))


def test_cudnn_path_pads_odd_lengths_and_masks_through_lengths(qkv, monkeypatch):
  """The cuDNN branch (checked on CPU by recording what it hands to jax): odd lengths padded to
  even, the key mask turned into key_value_seq_lengths, the output cut back to Tq."""
  calls = []
  real = jax.nn.dot_product_attention

  def fake(q, k, v, *, key_value_seq_lengths=None, implementation=None, **kw):
    calls.append((q.shape, k.shape, np.asarray(key_value_seq_lengths), implementation))
    return real(q, k, v, key_value_seq_lengths=key_value_seq_lengths, implementation="xla")

  monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in qkv)
  key_mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], np.int32)
  out = dot_product_attention(q, k, v, key_mask=key_mask, implementation="cudnn",
                              dropout_rate=0.1, deterministic=False)  # Dropout: off on cuDNN.
  (q_shape, k_shape, lengths, impl), = calls
  assert impl == "cudnn" and q_shape[1] == 4 and k_shape[1] == 6
  np.testing.assert_array_equal(lengths, [5, 3])
  assert out.shape == (B, TQ, H, DH)
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             reference(*qkv, key_mask.astype(bool)), atol=5e-2)


def test_multi_head_attention_layouts(qkv):
  rng = np.random.default_rng(1)
  d = H * DH
  x = rng.normal(size=(B, TQ, d)).astype(np.float32)
  ctx = rng.normal(size=(B, TK, 6)).astype(np.float32)  # Cross-attention input of another width.

  fused = MultiHeadAttention(num_heads=H, features=d, fused_qkv=True, out_proj=True)
  p = fused.init(jax.random.key(0), x)["params"]
  assert p["qkv"]["kernel"].shape == (d, 3 * d) and p["proj"]["kernel"].shape == (d, d)
  proj = x @ p["qkv"]["kernel"] + p["qkv"]["bias"]  # [q | k | v], each [H, Dh] head-major.
  q, k, v = (proj[..., i * d:(i + 1) * d].reshape(B, TQ, H, DH) for i in range(3))
  expected = reference(q, k, v, np.ones((B, TQ), bool)).reshape(B, TQ, d)
  expected = expected @ p["proj"]["kernel"] + p["proj"]["bias"]
  np.testing.assert_allclose(fused.apply({"params": p}, x), expected, atol=1e-5)

  cross = MultiHeadAttention(num_heads=H, features=d, fused_qkv=False, out_proj=False)
  p = cross.init(jax.random.key(0), x, ctx)["params"]
  assert set(p) == {"query", "key", "value"} and p["key"]["kernel"].shape == (6, d)
  dense = lambda name, inp: (inp @ p[name]["kernel"] + p[name]["bias"])
  q = dense("query", x).reshape(B, TQ, H, DH)
  k = dense("key", ctx).reshape(B, TK, H, DH)
  v = dense("value", ctx).reshape(B, TK, H, DH)
  key_mask = np.array([[1, 1, 1, 1, 0], [1, 0, 0, 0, 0]], np.int32)
  expected = reference(q, k, v, key_mask.astype(bool)).reshape(B, TQ, d)
  np.testing.assert_allclose(cross.apply({"params": p}, x, ctx, key_mask=key_mask), expected,
                             atol=1e-5)
  with pytest.raises(ValueError, match="self-attention only"):
    fused.apply(fused.init(jax.random.key(0), x), x, ctx)


def test_module_dropout_uses_the_dropout_stream(monkeypatch):
  d = H * DH
  x = np.random.default_rng(2).normal(size=(B, TQ, d)).astype(np.float32)
  mha = MultiHeadAttention(num_heads=H, features=d, dropout_rate=0.5)
  p = mha.init(jax.random.key(0), x)
  ev = mha.apply(p, x)
  tr = mha.apply(p, x, deterministic=False, rngs={"dropout": jax.random.key(1)})
  assert np.abs(np.asarray(tr - ev)).max() > 1e-3
  # On cuDNN attention dropout is off: training needs no rng and equals evaluation.
  real = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, "dot_product_attention",
                      lambda *a, implementation=None, **kw: real(*a, implementation="xla", **kw))
  cudnn = MultiHeadAttention(num_heads=H, features=d, dropout_rate=0.5, implementation="cudnn",
                             dtype=jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(cudnn.apply(p, x, deterministic=False)),
                                np.asarray(cudnn.apply(p, x)))


def test_auto_implementation_picks_cudnn_only_on_gpu_with_half_precision():
  from nas_jax.models.attention import resolve_implementation
  assert resolve_implementation("auto", jnp.bfloat16, backend="gpu") == "cudnn"
  assert resolve_implementation("auto", jnp.float16, backend="cuda") == "cudnn"
  assert resolve_implementation("auto", jnp.float32, backend="gpu") == "xla"   # cuDNN needs bf16
  assert resolve_implementation("auto", jnp.bfloat16, backend="tpu") == "xla"
  assert resolve_implementation("auto", jnp.bfloat16) == "xla"                 # this CPU
  assert resolve_implementation("cudnn", jnp.float32) == "cudnn"              # explicit wins
  with pytest.raises(ValueError, match="model.attention / model.vit_attention"):
    resolve_implementation("flash", jnp.bfloat16)
