"""BERT as ALBEF splits it: text encoder, fusion encoder and the MLM head, in one module.

    ids ──embed──▶ layers [0, fusion_layer)          (self-attention; the text encoder, t_cls = [:, 0])
        ──fuse───▶ layers [fusion_layer, num_layers) (self-attention → cross-attention to the image
                                                      tokens → FFN; the fusion encoder)
        ──mlm_logits──▶ [B, L, V]                     (dense → GELU → LN → decoder tied to the word
                                                      embeddings + bias)

Post-norm layers exactly as HF/ALBEF's `BertLayer`: each sub-block is
`LayerNorm(x + Dropout(Dense(sub(x))))`. Dropout (`hidden_dropout`, and `attention_dropout` on the
attention probabilities) is active only with `train=True` and draws from the 'dropout' rng stream.
Parameter names follow the HF checkpoint layout so conversion is a rename (`nas_jax/convert.py`).
The text and fusion layers run as two scanned stacks, 'text_layers' and 'fusion_layers' with a
leading layer axis (`scan_layers`), or unrolled as HF's 'layer_{i}' (the default)
(models/layer_stack.py).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from nas_jax.models import fp8 as fp8_lib
from nas_jax.models import layer_stack
from nas_jax.models.activations import gelu
from nas_jax.models.attention import MultiHeadAttention

def _normal(config):
  """BERT's normal(initializer_range) init (0.02; larger helps small from-scratch models)."""
  return nn.initializers.normal(stddev=config.get("initializer_range", 0.02))


def _layer_norm(config, dtype=jnp.float32):
  """BERT's LayerNorm; statistics in float32, the output in `dtype`."""
  return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype)


class DenseResidualNorm(nn.Module):
  """HF's BertSelfOutput / BertOutput: LayerNorm(residual + Dropout(Dense(x))), the sum and the
  output in `residual_dtype` (the residual stream's)."""
  config: ml_collections.ConfigDict
  dtype: Any = jnp.float32
  fp8: bool = False
  residual_dtype: Any = jnp.float32

  def setup(self):
    self.dense = fp8_lib.dense(self.config.hidden_size, fp8=self.fp8, dtype=self.dtype,
                               kernel_init=_normal(self.config))
    self.LayerNorm = _layer_norm(self.config, self.residual_dtype)
    self.dropout = nn.Dropout(self.config.hidden_dropout)

  def __call__(self, x, residual, deterministic: bool):
    x = self.dropout(self.dense(x), deterministic=deterministic)
    return self.LayerNorm(x.astype(self.residual_dtype) + residual.astype(self.residual_dtype))


class BertAttention(MultiHeadAttention):
  """Self- or cross-attention block: 'query', 'key', 'value' and 'output' {'dense', 'LayerNorm'}."""
  config: ml_collections.ConfigDict = None
  residual_dtype: Any = jnp.float32

  def setup(self):
    super().setup()
    self.output = DenseResidualNorm(self.config, dtype=self.dtype, fp8=self.fp8,
                                    residual_dtype=self.residual_dtype)

  def __call__(self, hidden, context=None, *, key_mask=None, deterministic=True):
    """hidden [B, L, D]; context [B, Tk, Dk] for cross-attention (None: self); key_mask [B, Tk]."""
    x = self.attend(hidden, context, key_mask=key_mask, deterministic=deterministic)
    return self.output(x, hidden, deterministic)


class Intermediate(nn.Module):
  config: ml_collections.ConfigDict
  dtype: Any = jnp.float32
  fp8: bool = False

  def setup(self):
    self.dense = fp8_lib.dense(self.config.intermediate_size, fp8=self.fp8, dtype=self.dtype,
                               kernel_init=_normal(self.config))

  def __call__(self, x):
    return gelu(self.dense(x), self.config.get("gelu", "exact"))


class BertLayer(nn.Module):
  """One encoder layer; with `cross_attention` a fusion layer (ALBEF's layers >= fusion_layer).
  `fp8`: every Dense of the layer in FP8 (models/fp8.py)."""
  config: ml_collections.ConfigDict
  cross_attention: bool = False
  dtype: Any = jnp.float32
  attention: str = "xla"
  fp8: bool = False
  residual_dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    make = functools.partial(
        BertAttention, num_heads=c.num_heads, features=c.hidden_size, dtype=self.dtype,
        implementation=self.attention, dropout_rate=c.attention_dropout, fused_qkv=False,
        out_proj=False, kernel_init=_normal(c), config=c, fp8=self.fp8,
        residual_dtype=self.residual_dtype)
    self.attention_block = make(name="attention")
    if self.cross_attention:
      self.crossattention = make()
    self.intermediate = Intermediate(c, dtype=self.dtype, fp8=self.fp8)
    self.output = DenseResidualNorm(c, dtype=self.dtype, fp8=self.fp8,
                                    residual_dtype=self.residual_dtype)

  def __call__(self, hidden, mask, image_tokens=None, image_mask=None, deterministic=True):
    """hidden [B, L, D] in the residual stream's dtype; mask [B, L]; image_tokens [B, Ni, Dv];
    image_mask [B, Ni] or None."""
    x = self.attention_block(hidden, key_mask=mask, deterministic=deterministic)
    if self.cross_attention:
      x = self.crossattention(x, image_tokens, key_mask=image_mask, deterministic=deterministic)
    return self.output(self.intermediate(x), x, deterministic)


class ScanLayer(BertLayer):
  """`BertLayer` as the body of a scanned stack: returns (hidden, None)."""

  def __call__(self, hidden, mask, image_tokens=None, image_mask=None, deterministic=True):
    return super().__call__(hidden, mask, image_tokens, image_mask, deterministic), None


class BertEmbeddings(nn.Module):
  """word + position + token_type(0) → LayerNorm → Dropout; the output in `residual_dtype`."""
  config: ml_collections.ConfigDict
  dtype: Any = jnp.float32
  residual_dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    embed = functools.partial(nn.Embed, features=c.hidden_size, dtype=jnp.float32,
                              embedding_init=_normal(c))
    self.word_embeddings = embed(c.vocab_size)
    self.position_embeddings = embed(c.max_position_embeddings)
    self.token_type_embeddings = embed(c.type_vocab_size)
    self.LayerNorm = _layer_norm(c, self.residual_dtype)
    self.dropout = nn.Dropout(c.hidden_dropout)

  def __call__(self, ids, deterministic: bool):
    length = ids.shape[1]
    if length > self.config.max_position_embeddings:
      raise ValueError(f"text length {length} exceeds bert.max_position_embeddings="
                       f"{self.config.max_position_embeddings}")
    x = (self.word_embeddings(ids) + self.position_embeddings(jnp.arange(length))[None]
         + self.token_type_embeddings(jnp.zeros_like(ids)))
    return self.dropout(self.LayerNorm(x), deterministic=deterministic)


class PredictionTransform(nn.Module):
  config: ml_collections.ConfigDict
  dtype: Any = jnp.float32

  def setup(self):
    self.dense = nn.Dense(self.config.hidden_size, dtype=self.dtype, kernel_init=_normal(self.config))
    self.LayerNorm = _layer_norm(self.config)

  def __call__(self, x):
    return self.LayerNorm(gelu(self.dense(x), self.config.get("gelu", "exact")).astype(jnp.float32))


class LMPredictionHead(nn.Module):
  """transform + decoder tied to the word embeddings + 'bias' [V]."""
  config: ml_collections.ConfigDict
  dtype: Any = jnp.float32

  def setup(self):
    self.transform = PredictionTransform(self.config, dtype=self.dtype)
    self.bias = self.param("bias", nn.initializers.zeros, (self.config.vocab_size,))

  def __call__(self, hidden, word_embeddings):
    """hidden [B, L, D], word_embeddings [V, D] → float32 logits [B, L, V]."""
    x = self.transform(hidden).astype(self.dtype)
    logits = jnp.einsum("bld,vd->blv", x, word_embeddings.astype(self.dtype),
                        preferred_element_type=jnp.float32)
    return logits + self.bias


class MLMHead(nn.Module):
  """HF's `cls` module: holds 'predictions'."""
  config: ml_collections.ConfigDict
  dtype: Any = jnp.float32

  def setup(self):
    self.predictions = LMPredictionHead(self.config, dtype=self.dtype)

  def __call__(self, hidden, word_embeddings):
    return self.predictions(hidden, word_embeddings)


class BertModel(nn.Module):
  """Text encoder + fusion encoder + MLM head.

  Attributes:
    config: `config.model.bert` (vocab_size, hidden_size, num_layers, fusion_layer, num_heads,
      intermediate_size, max_position_embeddings, type_vocab_size, layer_norm_eps, hidden_dropout,
      attention_dropout, pad_token_id). `fusion_layer = num_layers` gives a plain text BERT.
    dtype: compute dtype; params, LayerNorms, softmax and MLM logits stay float32.
    attention: 'xla' or 'cudnn' (see models/attention.py; cuDNN has no attention dropout).
    remat: rematerialise each layer in the backward pass.
    scan_layers: text layers and fusion layers as two scanned stacks, params 'text_layers' and
      'fusion_layers' [n, ...] (`model.scan_layers`), else unrolled, params 'layer_{i}'
      (models/layer_stack.py). Same function either way; dropout masks differ (rngs per layer).
    fp8: the text and fusion layers' Dense layers in FP8 (`model.fp8`, models/fp8.py); the
      embeddings and the MLM head stay in `dtype`. Same parameters either way.
    residual_dtype: the residual stream between the layers, i.e. the post-norm LayerNorms'
      outputs (`model.residual_dtype`): float32, or bfloat16 for half the memory traffic of the
      residual adds and LayerNorms. Same parameters either way.

  Masks are int/bool [B, L] with 1 on real tokens. Hidden states returned are float32.
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
    if not 0 <= c.fusion_layer <= c.num_layers:
      raise ValueError(f"bert.fusion_layer={c.fusion_layer} must lie in [0, num_layers="
                       f"{c.num_layers}]")
    self.embeddings = BertEmbeddings(c, dtype=self.dtype, residual_dtype=self.residual_dtype)
    if self.scan_layers:
      def stack(count: int, cross: bool):
        # `deterministic` (argument 5, counting self) is static under remat: it selects dropout.
        scanned = layer_stack.scanned(ScanLayer, count, remat=self.remat, static_argnums=(5,))
        return scanned(c, cross_attention=cross, dtype=self.dtype, attention=self.attention,
                       fp8=self.fp8, residual_dtype=self.residual_dtype)

      if c.fusion_layer > 0:
        self.text_layers = stack(c.fusion_layer, False)
      if c.num_layers > c.fusion_layer:
        self.fusion_layers = stack(c.num_layers - c.fusion_layer, True)
    else:
      layer = nn.remat(BertLayer, static_argnums=(5,)) if self.remat else BertLayer
      self.layer = [layer(c, cross_attention=i >= c.fusion_layer, dtype=self.dtype,
                          attention=self.attention, fp8=self.fp8,
                          residual_dtype=self.residual_dtype) for i in range(c.num_layers)]
    self.cls = MLMHead(c, dtype=self.dtype)

  def embed(self, ids: jax.Array, *, train: bool = False) -> jax.Array:
    """ids int [B, L] → [B, L, D] embeddings (after LayerNorm and dropout)."""
    return self.embeddings(ids, deterministic=not train)

  def _layers(self, fusion: bool, x, mask, image_tokens, image_mask, deterministic: bool):
    """The text (fusion=False) or fusion layers on x [B, L, D]; an empty stack returns x."""
    c = self.config
    if self.scan_layers:
      count = c.num_layers - c.fusion_layer if fusion else c.fusion_layer
      if count:
        stack = self.fusion_layers if fusion else self.text_layers
        x, _ = stack(x, mask, image_tokens, image_mask, deterministic)
      return x
    for layer in (self.layer[c.fusion_layer:] if fusion else self.layer[:c.fusion_layer]):
      # Every argument positional: remat's static_argnums.
      x = layer(x, mask, image_tokens, image_mask, deterministic)
    return x

  def _even_length(self, x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cuDNN attention needs even lengths: pad [B, L, D] and its mask [B, L] by one masked row
    here, once, rather than q, k and v in every layer (docs/PERF.md)."""
    if self.attention != "cudnn" or x.shape[1] % 2 == 0:
      return x, mask
    return (jnp.pad(x, ((0, 0), (0, 1), (0, 0))),
            jnp.pad(mask, ((0, 0), (0, 1))))

  def text(self, ids: jax.Array, mask: jax.Array, *, train: bool = False) -> jax.Array:
    """Text encoder: ids, mask [B, L] → [B, L, D] after layer fusion_layer − 1 (t_cls = [:, 0])."""
    length = ids.shape[1]
    x, mask = self._even_length(self.embed(ids, train=train), mask)
    x = self._layers(False, x, mask, None, None, not train)
    return x[:, :length].astype(jnp.float32)

  def fuse(self, hidden: jax.Array, mask: jax.Array, image_tokens: jax.Array,
           image_mask: jax.Array | None = None, *, train: bool = False) -> jax.Array:
    """Fusion encoder.

    Args:
      hidden: [B, L, D] text-encoder output.
      mask: [B, L] text padding mask.
      image_tokens: [B, Ni, Dv] image tokens attended to by cross-attention (continuous ViT tokens,
        or NAS's dictionary tokens).
      image_mask: optional [B, Ni], 1 = attend; None attends to all.
      train: enables dropout.

    Returns:
      [B, L, D] float32; [:, 0] feeds the ITM head.
    """
    length = hidden.shape[1]
    x, mask = self._even_length(hidden.astype(self.residual_dtype), mask)
    # Keys/values of every fusion layer read the image tokens in the compute dtype: cast once.
    image_tokens = image_tokens.astype(self.dtype)
    if self.attention == "cudnn" and image_tokens.shape[1] % 2:
      rows = x.shape[0]
      if image_mask is None:
        image_mask = jnp.ones((rows, image_tokens.shape[1]), jnp.int32)
      image_tokens, image_mask = self._even_length(image_tokens, image_mask)
    x = self._layers(True, x, mask, image_tokens, image_mask, not train)
    return x[:, :length].astype(jnp.float32)

  def mlm_logits(self, hidden: jax.Array) -> jax.Array:
    """[B, L, D] → float32 [B, L, V] (decoder weight = word embeddings)."""
    return self.cls(hidden, self.embeddings.word_embeddings.embedding)

  def __call__(self, ids, mask, image_tokens, *, train: bool = False) -> jax.Array:
    """text then fuse; also creates every parameter (including the MLM head) at init."""
    x = self.fuse(self.text(ids, mask, train=train), mask, image_tokens, train=train)
    if self.is_initializing():
      self.mlm_logits(x[:, :1])
    return x
