"""model.attention='tokamax': tokamax's attention behind our helper. On CPU tokamax runs its XLA
kernel (its Pallas-Triton one needs a GPU; its numbers there are in docs/PERF.md), so these tests
check what we own: masks become key lengths, gradients, the per-shard call under a mesh, the BERT
through this path, and the error when the extra is not installed."""

import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from nas_jax.models import attention
from nas_jax.models.attention import dot_product_attention
from nas_jax.models.bert import BertModel

tokamax = pytest.importorskip("tokamax")

B, TQ, TK, H, DH = 8, 3, 6, 2, 4


@pytest.fixture(scope="module")
def qkv():
  rng = np.random.default_rng(0)
  return tuple(rng.normal(size=(B, t, H, DH)).astype(np.float32) for t in (TQ, TK, TK))


def _masks():
  lengths = np.array([6, 1, 3, 6, 2, 5, 4, 6], np.int32)
  return lengths, (np.arange(TK)[None, :] < lengths[:, None]).astype(np.int32)


def test_tokamax_equals_xla_with_masks_and_in_gradients(qkv):
  lengths, key_mask = _masks()
  for kw in ({}, {"key_mask": key_mask}, {"key_lengths": lengths}):
    want = dot_product_attention(*qkv, implementation="xla", **kw)
    got = dot_product_attention(*qkv, implementation="tokamax", **kw)
    np.testing.assert_allclose(got, want, atol=1e-5, err_msg=str(list(kw)))

  def loss(impl, q, k, v):
    out = dot_product_attention(q, k, v, key_mask=key_mask, implementation=impl)
    return jnp.sum(out * jnp.arange(out.size, dtype=out.dtype).reshape(out.shape) / out.size)

  want = jax.grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2))(*qkv)
  got = jax.grad(lambda *a: loss("tokamax", *a), argnums=(0, 1, 2))(*qkv)
  for name, g, w in zip("qkv", got, want):
    np.testing.assert_allclose(g, w, atol=1e-5, err_msg=f"d{name}")
  # Masked keys get no gradient.
  assert np.all(np.asarray(got[1])[key_mask == 0] == 0)


def test_kernel_per_backend():
  assert attention.tokamax_implementation("gpu") == "triton"
  assert attention.tokamax_implementation("cpu") == "xla"
  assert attention.tokamax_implementation("tpu") == "xla"


def test_under_a_mesh_the_kernel_sees_one_batch_shard(qkv, monkeypatch):
  """XLA cannot split a Pallas call: under `jax.set_mesh` tokamax is called per batch shard
  (shard_map), and the result equals the unsharded one."""
  seen = []
  real = tokamax.dot_product_attention

  def spy(q, k, v, **kw):
    seen.append((q.shape, k.shape, kw["key_value_seq_lengths"].shape))
    return real(q, k, v, **kw)

  monkeypatch.setattr(tokamax, "dot_product_attention", spy)
  lengths, key_mask = _masks()
  want = dot_product_attention(*qkv, key_mask=key_mask, implementation="tokamax")
  assert seen.pop() == ((B, TQ, H, DH), (B, TK, H, DH), (B,))

  mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  args = [jax.device_put(x, batch) for x in (*qkv, key_mask)]
  fn = jax.jit(lambda q, k, v, m: dot_product_attention(q, k, v, key_mask=m,
                                                        implementation="tokamax"))
  with jax.set_mesh(mesh):
    got = fn(*args)
  assert seen == [((1, TQ, H, DH), (1, TK, H, DH), (1,))]  # 8 rows over 4 × 2 devices.
  assert got.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_allclose(got, want, atol=1e-6)
  # A batch the mesh does not split (the models' 1-row init pass) is one plain call.
  with jax.set_mesh(mesh):
    one = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, implementation="tokamax"))(
        *(x[:1] for x in qkv))
  assert seen[-1] == ((1, TQ, H, DH), (1, TK, H, DH), (1,)) and len(seen) == 2
  np.testing.assert_allclose(one, dot_product_attention(*(x[:1] for x in qkv)), atol=1e-5)


def test_bert_through_tokamax_equals_xla():
  """Text and fusion layers (self-attention with padding, cross-attention to image tokens with a
  padding mask) give the same hidden states through tokamax as through XLA (no dropout)."""
  config = ml_collections.ConfigDict(dict(
      vocab_size=50, hidden_size=32, num_layers=4, fusion_layer=2, num_heads=2,
      intermediate_size=64, max_position_embeddings=16, type_vocab_size=2, layer_norm_eps=1e-12,
      hidden_dropout=0.1, attention_dropout=0.1, pad_token_id=0))
  rng = np.random.default_rng(0)
  mask = np.array([[1] * 8, [1] * 5 + [0] * 3, [1] * 2 + [0] * 6], np.int32)
  ids = np.where(mask == 1, rng.integers(1, 50, (3, 8)), 0).astype(np.int32)
  image = rng.normal(size=(3, 5, 48)).astype(np.float32)
  image_mask = np.array([[1] * 5, [1] * 3 + [0] * 2, [1] * 5], np.int32)
  xla, tk = BertModel(config, attention="xla"), BertModel(config, attention="tokamax")
  params = xla.init(jax.random.PRNGKey(0), ids, mask, image)

  def fuse(model):
    return model.apply(params, model.apply(params, ids, mask, method="text"), mask, image,
                       image_mask, method="fuse")

  np.testing.assert_allclose(fuse(tk), fuse(xla), atol=2e-5)


def test_missing_tokamax_is_one_line_error(qkv, monkeypatch):
  monkeypatch.setitem(sys.modules, "tokamax", None)  # `import tokamax` raises ImportError.
  with pytest.raises(ImportError, match=r"model.attention='tokamax' needs the tokamax package.*"
                                        r"pip install -e '\.\[tokamax\]'"):
    dot_product_attention(*qkv, implementation="tokamax")
