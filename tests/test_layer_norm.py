"""model.layer_norm: our LayerNorm computes flax's, and its one-pass backward (eq. 2 of
models/layer_norm.py) gives autodiff's gradients: the Pallas kernel in Pallas' interpreter (the
GPU runs it compiled; its speed is in docs/PERF.md), the same equations as XLA ops (CPU, TPU), per
batch shard under a mesh, and through the ViT and the BERT."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from step_utils import assert_grads_close

from nas_jax import config_lib
from nas_jax.models import layer_norm as ln
from nas_jax.models.bert import BertModel
from nas_jax.models.vit import VisionTransformer


def _inputs(rows: int, width: int, dtype, seed: int = 0):
  """x (mean 0.5, std 2: the statistics matter), dy, scale ~ 1, bias ~ 0."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(0.5 + 2.0 * rng.standard_normal((rows, width), np.float32)).astype(dtype)
  dy = jnp.asarray(rng.standard_normal((rows, width), np.float32)).astype(dtype)
  scale = jnp.asarray(1.0 + 0.1 * rng.standard_normal(width, np.float32))
  bias = jnp.asarray(0.1 * rng.standard_normal(width, np.float32))
  return x, dy, scale, bias


def _flax_vjp(x, dy, scale, bias, eps, dtype):
  """flax's nn.LayerNorm: output, then (dx, dscale, dbias) by autodiff."""
  module = nn.LayerNorm(epsilon=eps, dtype=dtype)
  apply = lambda x, s, b: module.apply({"params": {"scale": s, "bias": b}}, x)
  y, vjp = jax.vjp(apply, x, scale, bias)
  return y, vjp(dy.astype(y.dtype))


def _close(got, want, rtol, what):
  """|got − want| ≤ rtol · max|want| (float32 comparison)."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert np.abs(want).max() > 1e-3, what
  np.testing.assert_allclose(got, want, rtol=0, atol=rtol * np.abs(want).max(), err_msg=what)


@pytest.mark.parametrize("in_dtype, out_dtype", [
    (jnp.float32, jnp.float32), (jnp.bfloat16, jnp.float32), (jnp.bfloat16, jnp.bfloat16)])
def test_forward_is_flax_layer_norm_bit_for_bit(in_dtype, out_dtype):
  x, dy, scale, bias = _inputs(12, 96, in_dtype)
  x = x.reshape(3, 4, 96)  # Any leading shape.
  want, _ = _flax_vjp(x, dy.reshape(3, 4, 96), scale, bias, 1e-12, out_dtype)
  got = ln.layer_norm(x, scale, bias, epsilon=1e-12, dtype=out_dtype)
  assert got.dtype == want.dtype == out_dtype
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


# (rows, width, dtype, max_programs): widths that are and are not powers of two; rows that fill
# no whole block; several blocks per program with a last program that runs past the rows.
KERNEL_CASES = [(37, 768, jnp.float32, 512), (20, 96, jnp.bfloat16, 512),
                (1030, 768, jnp.bfloat16, 512), (203, 40, jnp.float32, 3)]


@pytest.mark.parametrize("rows, width, dtype, max_programs", KERNEL_CASES)
def test_kernel_gives_autodiffs_gradients(rows, width, dtype, max_programs):
  x, dy, scale, bias = _inputs(rows, width, dtype)
  _, (dx_want, ds_want, db_want) = _flax_vjp(x, dy, scale, bias, 1e-6, dtype)
  got = ln.layer_norm_backward(x, dy, scale, epsilon=1e-6, interpret=True,
                               max_programs=max_programs)
  reference = ln.layer_norm_backward_reference(x, dy, scale, epsilon=1e-6)
  assert got[0].shape == x.shape and got[0].dtype == x.dtype
  assert got[1].shape == got[2].shape == (width,)
  # dx is rounded to x's dtype; the float32 sums over rows agree to float32 rounding.
  dx_rtol = 1e-5 if dtype == jnp.float32 else 8e-3
  for name, g, r, w in zip(("dx", "dscale", "dbias"), got, reference, (dx_want, ds_want, db_want)):
    _close(g, w, dx_rtol if name == "dx" else 1e-5, f"kernel {name}")
    _close(r, w, dx_rtol if name == "dx" else 1e-5, f"reference {name}")


@pytest.mark.parametrize("mode", ["interpret", "xla"])
def test_module_gradients_equal_xlas_through_either_backward(mode, monkeypatch):
  """LayerNorm(implementation='pallas') has flax's parameters, output and (to rounding) gradients,
  with the backward as the kernel ('interpret') or as XLA ops ('xla')."""
  monkeypatch.setattr(ln, "backward_mode", lambda: mode)
  x, dy, _, _ = _inputs(2 * 9, 48, jnp.float32)
  x, dy = x.reshape(2, 9, 48), dy.reshape(2, 9, 48)
  module = lambda impl: ln.LayerNorm(epsilon=1e-12, implementation=impl)
  params = module("pallas").init(jax.random.key(0), x)
  flax_params = nn.LayerNorm(epsilon=1e-12).init(jax.random.key(0), x)
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, flax_params)
  params = jax.tree.map(lambda p: p + 0.1 * jnp.arange(p.size, dtype=p.dtype) / p.size, params)

  def loss(impl):
    return lambda p, x: jnp.sum(module(impl).apply(p, x) * dy)

  np.testing.assert_array_equal(module("pallas").apply(params, x), module("xla").apply(params, x))
  want = jax.grad(loss("xla"), argnums=(0, 1))(params, x)
  got = jax.grad(loss("pallas"), argnums=(0, 1))(params, x)
  assert_grads_close(got, want)


def test_under_a_mesh_the_kernel_sees_one_batch_shard(monkeypatch):
  """XLA cannot split a Pallas call: under `jax.set_mesh` the backward runs per batch shard
  (shard_map), its dscale / dbias summed over the shards, and equals the unsharded one."""
  monkeypatch.setattr(ln, "backward_mode", lambda: "interpret")
  seen = []
  real = ln.layer_norm_backward

  def spy(x, dy, scale, **kw):
    seen.append(x.shape)
    return real(x, dy, scale, **kw)

  monkeypatch.setattr(ln, "layer_norm_backward", spy)
  x, dy, scale, bias = _inputs(8 * 5, 24, jnp.float32)
  x, dy = x.reshape(8, 5, 24), dy.reshape(8, 5, 24)
  norm = lambda x, s, b: ln.layer_norm_fused_backward(x, s, b, 1e-6, np.dtype("float32"))
  grads = lambda x, s, b, dy: jax.grad(lambda x, s, b: jnp.sum(norm(x, s, b) * dy),
                                       argnums=(0, 1, 2))(x, s, b)
  want = grads(x, scale, bias, dy)
  assert seen.pop() == (40, 24)

  mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  batch = NamedSharding(mesh, P(("data", "fsdp")))
  with jax.set_mesh(mesh):
    got = jax.jit(grads)(jax.device_put(x, batch), scale, bias, jax.device_put(dy, batch))
  assert seen == [(5, 24)]  # One row of the 8 per device, traced once.
  assert_grads_close(got, want)


def test_vit_and_bert_compute_the_same_through_the_kernel(monkeypatch):
  """model.layer_norm='pallas' in both encoders: the same outputs and (to rounding) the same
  gradients as 'xla', every LayerNorm's backward through the kernel."""
  monkeypatch.setattr(ln, "backward_mode", lambda: "interpret")
  vit = ml_collections.ConfigDict(dict(image_size=32, patch_size=16, hidden_size=32,
                                       num_layers=2, num_heads=2, mlp_dim=64, layer_norm_eps=1e-6))
  images = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  model = lambda impl: VisionTransformer(vit, layer_norm=impl)
  params = model("xla").init(jax.random.key(0), images)
  np.testing.assert_array_equal(model("pallas").apply(params, images),
                                model("xla").apply(params, images))
  loss = lambda impl: lambda p: jnp.sum(jnp.sin(model(impl).apply(p, images)))
  assert_grads_close(jax.grad(loss("pallas"))(params), jax.grad(loss("xla"))(params))

  bert = ml_collections.ConfigDict(dict(
      vocab_size=50, hidden_size=32, num_layers=2, fusion_layer=1, num_heads=2,
      intermediate_size=64, max_position_embeddings=16, type_vocab_size=2, layer_norm_eps=1e-12,
      hidden_dropout=0.0, attention_dropout=0.0, pad_token_id=0))
  ids = jnp.array([[2, 7, 9, 4, 0], [2, 5, 3, 0, 0]])
  mask = (ids > 0).astype(jnp.int32)
  image = jax.random.normal(jax.random.key(2), (2, 3, 32))
  text_model = lambda impl: BertModel(bert, layer_norm=impl)
  params = text_model("xla").init(jax.random.key(0), ids, mask, image)
  apply = lambda impl, p: text_model(impl).apply(p, ids, mask, image)
  np.testing.assert_array_equal(apply("pallas", params), apply("xla", params))
  loss = lambda impl: lambda p: jnp.sum(jnp.sin(apply(impl, p)))
  assert_grads_close(jax.grad(loss("pallas"))(params), jax.grad(loss("xla"))(params))


def test_backward_mode_per_backend():
  assert ln.backward_mode() == ("triton" if jax.default_backend() == "gpu" else "xla")


def test_unknown_implementation_is_named():
  with pytest.raises(ValueError,
                     match=r"model.layer_norm='apex' is not one of \('xla', 'pallas'\)"):
    ln.LayerNorm(implementation="apex").init(jax.random.key(0), jnp.ones((2, 4)))
  c = config_lib.base_config()
  c.model.layer_norm = "apex"
  with pytest.raises(config_lib.ConfigError, match=r"config.model.layer_norm='apex': use one of "
                                                   r"'xla', 'pallas'"):
    config_lib.validate(c)
