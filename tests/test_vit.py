"""ViT: parity with timm's VisionTransformer (DeiT-B/16 architecture, reduced size) through
convert_deit, at the checkpoint's resolution and at a larger one through ALBEF's position-embedding
interpolation (both computed in PyTorch)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from step_utils import assert_fp8_close, assert_grads_close, fp8_runs

from nas_jax import convert
from nas_jax.models import layer_stack
from nas_jax.models.vit import Block, VisionTransformer, interpolate_pos_embed

EMBED, DEPTH, HEADS, PATCH, SMALL, LARGE = 64, 2, 4, 16, 64, 96
# Position-embedding resampling cases: (grid side before, after, width), ALBEF's 224->256->384 among them.
INTERP = {"224_256": (14, 16, 8), "256_384": (16, 24, 4), "up": (4, 6, 16), "down": (6, 4, 16)}

_REF = {}


def vit_config(image_size=SMALL):
  return ml_collections.ConfigDict(dict(
      image_size=image_size, patch_size=PATCH, hidden_size=EMBED, num_layers=DEPTH,
      num_heads=HEADS, mlp_dim=4 * EMBED, layer_norm_eps=1e-6))


def _reference(run_torch):
  """One PyTorch run: the random timm model's state dict and outputs (cached per process)."""
  if not _REF:
    rng = np.random.default_rng(0)
    inputs = {
        "dims": np.array([EMBED, DEPTH, HEADS, PATCH, SMALL, LARGE]),
        "images_small": rng.normal(size=(2, 3, SMALL, SMALL)).astype(np.float32),
        "images_large": rng.normal(size=(2, 3, LARGE, LARGE)).astype(np.float32),
    }
    for name, (old, new, dim) in INTERP.items():
      inputs[f"pe_{name}"] = rng.normal(size=(1, 1 + old * old, dim)).astype(np.float32)
      inputs[f"new_{name}"] = np.array(new)
    out = run_torch("from torch_refs.vit_ref import main\nmain()\n", inputs)
    _REF.update(inputs)
    _REF.update(out)
  return _REF


def _state_dict(ref):
  return {k[3:]: v for k, v in ref.items() if k.startswith("sd.")}


def _nhwc(x):
  return jnp.asarray(x.transpose(0, 2, 3, 1))


def test_interpolate_pos_embed_matches_albef_torch(run_torch):
  ref = _reference(run_torch)
  for name, (old, new, _) in INTERP.items():
    ours = interpolate_pos_embed(ref[f"pe_{name}"], new * new)
    assert ours.shape == ref[f"interp_{name}"].shape
    np.testing.assert_allclose(ours, ref[f"interp_{name}"], atol=1e-5, rtol=0, err_msg=name)
  same = interpolate_pos_embed(ref["pe_up"], 16)  # Same grid: unchanged.
  np.testing.assert_array_equal(same, ref["pe_up"])


def test_vit_matches_timm_at_checkpoint_resolution(run_torch):
  ref = _reference(run_torch)
  report = convert.Report()
  params = convert.convert_deit(_state_dict(ref), vit_config(SMALL), report=report)
  out = VisionTransformer(vit_config(SMALL)).apply({"params": params}, _nhwc(ref["images_small"]))
  assert out.shape == (2, 1 + (SMALL // PATCH) ** 2, EMBED)
  np.testing.assert_allclose(np.asarray(out), ref["out_small"], atol=1e-4, rtol=0)
  # The unrolled layout (model.scan_layers=False) on the same numbers, one subtree per block.
  unrolled = VisionTransformer(vit_config(SMALL), scan_layers=False).apply(
      {"params": layer_stack.unstack_layers(params)}, _nhwc(ref["images_small"]))
  np.testing.assert_allclose(np.asarray(unrolled), ref["out_small"], atol=1e-4, rtol=0)
  # The classifier head is reported, not silently dropped; nothing else is left over.
  assert set(report.unused) == {"head.weight", "head.bias"}


def test_vit_matches_timm_at_new_resolution_through_interpolation(run_torch):
  ref = _reference(run_torch)
  report = convert.Report()
  params = convert.convert_deit(_state_dict(ref), vit_config(LARGE), report=report)
  np.testing.assert_allclose(params["pos_embed"], ref["pos_large"], atol=1e-5, rtol=0)
  out = VisionTransformer(vit_config(LARGE)).apply({"params": params}, _nhwc(ref["images_large"]))
  assert out.shape == (2, 1 + (LARGE // PATCH) ** 2, EMBED)
  np.testing.assert_allclose(np.asarray(out), ref["out_large"], atol=1e-4, rtol=0)
  assert any("resampled" in n for n in report.notes)


@pytest.mark.parametrize("scan", [True, False], ids=["stacked", "per_layer"])
def test_param_names_are_timm_like(scan):
  """timm's names; the blocks one stack 'blocks' [DEPTH, ...] (scanned) or 'blocks_{i}'."""
  params = jax.eval_shape(VisionTransformer(vit_config(), scan_layers=scan).init, jax.random.key(0),
                          jnp.zeros((1, SMALL, SMALL, 3)))["params"]
  blocks = ["blocks"] if scan else [f"blocks_{i}" for i in range(DEPTH)]
  assert set(params) == {"patch_embed", "cls_token", "pos_embed", "norm", *blocks}
  assert params["patch_embed"]["proj"]["kernel"].shape == (PATCH, PATCH, 3, EMBED)
  assert params["pos_embed"].shape == (1, 1 + (SMALL // PATCH) ** 2, EMBED)
  block = params[blocks[0]]
  layers = (DEPTH,) if scan else ()
  assert set(block) == {"norm1", "attn", "norm2", "mlp"}
  assert set(block["attn"]) == {"qkv", "proj"}
  assert block["attn"]["qkv"]["kernel"].shape == layers + (EMBED, 3 * EMBED)
  assert block["norm1"]["scale"].shape == layers + (EMBED,)


def test_wrong_image_size_is_a_clear_error():
  model = VisionTransformer(vit_config())
  with pytest.raises(ValueError, match=r"expects images \[B, 64, 64, 3\].*got \(1, 3, 64, 64\)"):
    model.init(jax.random.key(0), jnp.zeros((1, 3, SMALL, SMALL)))


_INIT = {}


def _init_small():
  """Random params of the small ViT and a batch of images (initialised once)."""
  if not _INIT:
    images = jnp.asarray(np.random.default_rng(1).normal(size=(2, SMALL, SMALL, 3)), jnp.float32)
    _INIT["images"] = images
    _INIT["params"] = VisionTransformer(vit_config()).init(jax.random.key(0), images)
  return _INIT["params"], _INIT["images"]


def test_cudnn_token_padding_leaves_outputs_unchanged():
  """The cuDNN path pads 1+N (odd) tokens to even and masks the pad. Checked on CPU with the XLA
  kernel standing in for cuDNN: the padded, masked computation equals the unpadded one."""
  from nas_jax.models import attention as attn_lib

  cfg = vit_config()
  params, images = _init_small()
  plain = VisionTransformer(cfg).apply(params, images)

  real = attn_lib.dot_product_attention
  seen = []

  def xla_instead_of_cudnn(q, k, v, **kw):
    seen.append((q.shape[1], kw.get("key_lengths") is not None))
    kw["implementation"] = "xla"
    return real(q, k, v, **kw)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(attn_lib, "dot_product_attention", xla_instead_of_cudnn)
    padded = VisionTransformer(cfg, attention="cudnn").apply(params, images)
  assert seen and all(t == 18 and masked for t, masked in seen)  # 1 + 16 tokens -> 18, masked.
  assert padded.shape == plain.shape
  np.testing.assert_allclose(np.asarray(padded), np.asarray(plain), atol=1e-5, rtol=0)


def test_bfloat16_compute_is_close_and_returns_float32():
  cfg = vit_config()
  params, images = _init_small()
  f32 = VisionTransformer(cfg).apply(params, images)
  bf16 = VisionTransformer(cfg, dtype=jnp.bfloat16).apply(params, images)
  assert bf16.dtype == jnp.float32
  assert jax.tree.all(jax.tree.map(lambda p: p.dtype == jnp.float32, params))
  np.testing.assert_allclose(np.asarray(bf16), np.asarray(f32), atol=0.1, rtol=0)
  assert float(jnp.abs(bf16 - f32).max()) > 0  # bf16 really was used.


def test_bfloat16_residual_stream_between_the_blocks():
  """`model.residual_dtype='bfloat16'`: every block takes and returns its stream in bfloat16; the
  output stays float32 (the final LayerNorm), close to the float32 stream's, and the gradients
  too."""
  from step_utils import layer_stream_dtypes
  cfg = vit_config()
  params, images = _init_small()
  model = lambda residual: VisionTransformer(cfg, dtype=jnp.bfloat16, residual_dtype=residual)
  f32 = model(jnp.float32).apply(params, images)
  bf16 = model(jnp.bfloat16).apply(params, images)
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(bf16), np.asarray(f32), atol=0.1, rtol=0)
  assert float(jnp.abs(bf16 - f32).max()) > 0
  streams = lambda residual: layer_stream_dtypes(
      lambda: model(residual).apply(params, images), Block)
  assert streams(jnp.bfloat16) == [("bfloat16", "bfloat16")] * DEPTH
  assert streams(jnp.float32) == [("float32", "float32")] * DEPTH
  # A fixed random read-out (the sum of squares of LayerNorm outputs is nearly constant: its
  # gradients would be rounding noise). Each gradient within 5 % of float32 compute's, as
  # bfloat16 compute alone is within ~2 %.
  readout = jnp.asarray(np.random.default_rng(5).normal(size=f32.shape), jnp.float32)
  loss = lambda residual, dtype=jnp.bfloat16: lambda p: jnp.sum(
      VisionTransformer(cfg, dtype=dtype, residual_dtype=residual).apply(p, images) * readout)
  got, want = jax.grad(loss(jnp.bfloat16))(params), jax.grad(loss(jnp.float32, jnp.float32))(params)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert float(jnp.linalg.norm(g - w)) <= 0.05 * float(jnp.linalg.norm(w))


def test_remat_gives_the_same_gradients():
  cfg = vit_config()
  params, images = _init_small()
  loss = lambda remat: lambda p: jnp.sum(VisionTransformer(cfg, remat=remat).apply(p, images) ** 2)
  plain, remat = jax.grad(loss(False))(params), jax.grad(loss(True))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4,
                                                       rtol=1e-4), plain, remat)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(plain)) > 1e-3  # Non-trivial.


@pytest.mark.parametrize("remat", [False, True])
def test_scanned_and_unrolled_blocks_give_the_same_outputs_and_gradients(remat):
  """model.scan_layers is a layout switch: the scanned stack and the unrolled blocks compute the
  same function (float32, to 1e-5) and the same gradients, layer by layer."""
  cfg = vit_config()
  per_layer, images = _init_small()
  params = layer_stack.stack_layers(per_layer)
  model = lambda scan: VisionTransformer(cfg, remat=remat, scan_layers=scan)
  np.testing.assert_allclose(np.asarray(model(False).apply(per_layer, images)),
                             np.asarray(model(True).apply(params, images)), atol=1e-5, rtol=0)
  loss = lambda scan: lambda p: jnp.sum(model(scan).apply(p, images) ** 2)
  stacked_grads = layer_stack.unstack_layers(jax.grad(loss(True))(params))
  grads = jax.grad(loss(False))(per_layer)
  assert_grads_close(stacked_grads, grads)


def test_tanh_gelu_switch_is_close_to_exact_and_checked():
  """`vit.gelu='tanh'` (a speed switch) stays within the approximation's error of the exact GELU
  on the same weights; an unknown kind names the config keys."""
  from nas_jax.models.activations import gelu
  params, images = _init_small()
  exact = VisionTransformer(vit_config()).apply(params, images)
  cfg = vit_config()
  cfg.gelu = "tanh"
  tanh = VisionTransformer(cfg).apply(params, images)
  diff = float(jnp.abs(tanh - exact).max())
  assert 0 < diff < 1e-2
  x = jnp.linspace(-6, 6, 1001)
  assert float(jnp.abs(gelu(x, "tanh") - gelu(x, "exact")).max()) < 1e-3
  with pytest.raises(ValueError, match="model.vit.gelu / model.bert.gelu"):
    gelu(x, "erf")


def test_fp8_block_is_close_to_bfloat16_and_so_are_its_gradients():
  """model.fp8: a block's qkv, proj, fc1 and fc2 in FP8 (tolerances: assert_fp8_close)."""
  cfg = vit_config()
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 17, EMBED)), jnp.float32)
  params = jax.jit(Block(cfg).init)(jax.random.key(0), x)
  assert_fp8_close(fp8_runs(lambda dtype, fp8, p, x: Block(cfg, dtype=dtype, fp8=fp8).apply(p, x),
                            params, x))
