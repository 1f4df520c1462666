"""Vision Transformer as DeiT / ALBEF define it (ViT-B/16 by default).

Image [B, H, W, 3] → 16×16 patches → linear embedding → `[CLS] + patches` + learned position
embedding → pre-norm blocks (LN → MHSA with qkv bias → residual; LN → MLP with exact GELU →
residual) → final LayerNorm (eps 1e-6). No dropout or drop-path: ALBEF pretrains with rates 0.
The residual stream between the blocks is float32 unless `residual_dtype` says otherwise.

Parameter names follow timm, so converting a DeiT / ALBEF checkpoint is a rename
(`nas_jax/convert.py`); the blocks run as one scanned stack 'blocks' with a leading layer axis
(`scan_layers`) or unrolled as timm's 'blocks_{i}' (the default) (models/layer_stack.py).
`interpolate_pos_embed` resamples the position embedding to another resolution with the same
numbers as ALBEF's (PyTorch bicubic, align_corners=False).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from nas_jax.models import fp8 as fp8_lib
from nas_jax.models import layer_stack
from nas_jax.models.activations import gelu
from nas_jax.models.attention import MultiHeadAttention

def _trunc_normal(std: float = 0.02):
  """timm's trunc_normal_(std=.02); `vit.init_std` changes it (small from-scratch models)."""
  return nn.initializers.truncated_normal(stddev=std)


class PatchEmbed(nn.Module):
  """Non-overlapping P×P patches → D (timm's `patch_embed.proj`, a stride-P conv)."""
  patch_size: int
  hidden_size: int
  dtype: Any = jnp.float32
  init_std: float = 0.02

  def setup(self):
    p = self.patch_size
    self.proj = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID",
                        dtype=self.dtype, kernel_init=_trunc_normal(self.init_std))

  def __call__(self, images: jax.Array) -> jax.Array:
    """[B, H, W, 3] → [B, (H/P)·(W/P), D], patches in row-major order."""
    x = self.proj(images)
    return x.reshape(x.shape[0], -1, x.shape[-1])


class Mlp(nn.Module):
  hidden_size: int
  mlp_dim: int
  dtype: Any = jnp.float32
  init_std: float = 0.02
  gelu: str = "exact"
  fp8: bool = False

  def setup(self):
    dense = lambda n: fp8_lib.dense(n, fp8=self.fp8, dtype=self.dtype,
                                    kernel_init=_trunc_normal(self.init_std))
    self.fc1 = dense(self.mlp_dim)
    self.fc2 = dense(self.hidden_size)

  def __call__(self, x):
    return self.fc2(gelu(self.fc1(x), self.gelu))


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm1(x)); x + mlp(norm2(x)).

  `key_lengths` [B] masks padded tokens (only used when the tokens were padded for cuDNN).
  `fp8`: its Dense layers (qkv, proj, fc1, fc2) in FP8 (models/fp8.py).
  """
  config: ml_collections.ConfigDict
  dtype: Any = jnp.float32
  attention: str = "xla"
  fp8: bool = False

  def setup(self):
    c = self.config
    norm = functools.partial(nn.LayerNorm, epsilon=c.layer_norm_eps, dtype=jnp.float32)
    self.norm1 = norm()
    self.attn = MultiHeadAttention(num_heads=c.num_heads, features=c.hidden_size, dtype=self.dtype,
                                   implementation=self.attention, fused_qkv=True, out_proj=True,
                                   kernel_init=_trunc_normal(c.get("init_std", 0.02)), fp8=self.fp8)
    self.norm2 = norm()
    self.mlp = Mlp(c.hidden_size, c.mlp_dim, dtype=self.dtype, init_std=c.get("init_std", 0.02),
                   gelu=c.get("gelu", "exact"), fp8=self.fp8)

  def __call__(self, x: jax.Array, key_lengths: jax.Array | None = None) -> jax.Array:
    """x [B, T, D] in the residual stream's dtype, which the block keeps (LayerNorm statistics
    are float32 whatever it is)."""
    x = x + self.attn(self.norm1(x), key_lengths=key_lengths).astype(x.dtype)
    return x + self.mlp(self.norm2(x)).astype(x.dtype)


class ScanBlock(Block):
  """`Block` as the body of the scanned stack: returns (x, None)."""

  def __call__(self, x: jax.Array, key_lengths: jax.Array | None = None):
    return super().__call__(x, key_lengths), None


class VisionTransformer(nn.Module):
  """ViT image encoder.

  Attributes:
    config: `config.model.vit` (image_size, patch_size, hidden_size, num_layers, num_heads,
      mlp_dim, layer_norm_eps).
    dtype: compute dtype (bfloat16 on accelerators); params and LayerNorms stay float32.
    attention: 'xla' or 'cudnn'. With 'cudnn' the 1+N tokens are padded to an even length before the
      blocks (the kernel's backward rejects odd lengths), masked as keys, and removed at the end.
    remat: rematerialise each block in the backward pass.
    scan_layers: the blocks as one scanned stack, params 'blocks' [L, ...] (`model.scan_layers`),
      else unrolled, params 'blocks_{i}' (models/layer_stack.py). Same function either way.
    fp8: the blocks' Dense layers in FP8 (`model.fp8`, models/fp8.py); the patch embedding stays in
      `dtype`. Same parameters either way.
    residual_dtype: the residual stream between the blocks (`model.residual_dtype`): float32, or
      bfloat16 for half the memory traffic of the residual adds and LayerNorms. The output is
      float32 either way. Same parameters either way.
  """
  config: ml_collections.ConfigDict
  dtype: Any = jnp.float32
  attention: str = "xla"
  remat: bool = False
  scan_layers: bool = False
  fp8: bool = False
  residual_dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    if c.image_size % c.patch_size:
      raise ValueError(f"vit.image_size={c.image_size} is not a multiple of "
                       f"vit.patch_size={c.patch_size}")
    self.num_patches = (c.image_size // c.patch_size) ** 2
    std = c.get("init_std", 0.02)
    self.patch_embed = PatchEmbed(c.patch_size, c.hidden_size, dtype=self.dtype, init_std=std)
    self.cls_token = self.param("cls_token", _trunc_normal(std), (1, 1, c.hidden_size))
    self.pos_embed = self.param("pos_embed", _trunc_normal(std), (1, 1 + self.num_patches, c.hidden_size))
    if self.scan_layers:
      stack = layer_stack.scanned(ScanBlock, c.num_layers, remat=self.remat)
      self.blocks = stack(c, dtype=self.dtype, attention=self.attention, fp8=self.fp8)
    else:
      block = nn.remat(Block) if self.remat else Block
      self.blocks = [block(c, dtype=self.dtype, attention=self.attention, fp8=self.fp8)
                     for _ in range(c.num_layers)]
    self.norm = nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=jnp.float32)

  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    """Encodes normalised images.

    Args:
      images: float [B, H, W, 3] (NHWC), H = W = config.image_size.
      train: unused (the ViT has no dropout); kept for a uniform interface.

    Returns:
      [B, 1 + N, D] float32 tokens after the final LayerNorm; [:, 0] is v_cls, [:, 1:] the
      N = (H/P)² patch tokens v_1..v_N in row-major order.
    """
    del train
    c = self.config
    if images.ndim != 4 or images.shape[1:] != (c.image_size, c.image_size, 3):
      raise ValueError(f"ViT expects images [B, {c.image_size}, {c.image_size}, 3] (NHWC, "
                       f"vit.image_size={c.image_size}), got {images.shape}")
    x = self.patch_embed(images.astype(self.dtype))
    batch, tokens = x.shape[0], 1 + x.shape[1]
    cls = jnp.broadcast_to(self.cls_token, (batch, 1, c.hidden_size)).astype(x.dtype)
    x = (jnp.concatenate([cls, x], axis=1).astype(jnp.float32)
         + self.pos_embed).astype(self.residual_dtype)
    key_lengths = None
    if self.attention == "cudnn" and tokens % 2:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 0)))
      key_lengths = jnp.full((batch,), tokens, jnp.int32)
    if self.scan_layers:
      x, _ = self.blocks(x, key_lengths)
    else:
      for blk in self.blocks:
        x = blk(x, key_lengths)
    return self.norm(x[:, :tokens])


def _bicubic_matrix(n_in: int, n_out: int, a: float = -0.75) -> np.ndarray:
  """[n_out, n_in] weights of PyTorch's 1-D bicubic resize (align_corners=False, no antialias).

  Source coordinate (i + 0.5)·n_in/n_out − 0.5; Keys cubic kernel with a = −0.75; the four taps
  are clamped to the border (PyTorch's `upsample_bicubic2d`).
  """
  def cubic(t):
    t = abs(t)
    if t <= 1:
      return ((a + 2) * t - (a + 3)) * t * t + 1
    if t < 2:
      return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return 0.0

  w = np.zeros((n_out, n_in), np.float64)
  scale = n_in / n_out
  for i in range(n_out):
    x = (i + 0.5) * scale - 0.5
    x0 = math.floor(x)
    t = x - x0
    for j in range(-1, 3):
      w[i, min(max(x0 + j, 0), n_in - 1)] += cubic(j - t)
  return w


def interpolate_pos_embed(pos_embed: np.ndarray, num_patches_new: int,
                          num_extra_tokens: int = 1) -> np.ndarray:
  """Resamples a ViT position embedding to another number of patches (ALBEF's
  `interpolate_pos_embed`: the extra (CLS) rows are kept, the square grid is resized bicubically).

  Args:
    pos_embed: [1, E + N, D], E = num_extra_tokens, N a square number.
    num_patches_new: N', a square number (e.g. (384/16)² = 576).
    num_extra_tokens: leading non-grid rows (1 for the CLS token).

  Returns:
    float32 [1, E + N', D]; the input unchanged (as float32) when N' = N.
  """
  pos_embed = np.asarray(pos_embed, np.float32)
  n_old = pos_embed.shape[1] - num_extra_tokens
  old, new = math.isqrt(n_old), math.isqrt(num_patches_new)
  if old * old != n_old or new * new != num_patches_new:
    raise ValueError(f"position embedding grids must be square: {n_old} -> {num_patches_new} patches")
  if old == new:
    return pos_embed
  grid = pos_embed[0, num_extra_tokens:].reshape(old, old, -1).astype(np.float64)
  w = _bicubic_matrix(old, new)
  grid = np.einsum("ih,jw,hwd->ijd", w, w, grid).reshape(1, new * new, -1)
  return np.concatenate([pos_embed[:, :num_extra_tokens], grid.astype(np.float32)], axis=1)
