"""Scaled dot-product attention shared by the ViT and BERT.

One helper over `jax.nn.dot_product_attention` with a switch for the implementation:

* `'xla'`: runs anywhere. Without dropout it is `jax.nn.dot_product_attention(implementation='xla')`;
  with attention-probability dropout active (BERT's `attention_dropout`, train only) the same math is
  written out here, because the JAX function has no dropout argument.
* `'cudnn'`: the fused cuDNN flash-attention kernel (GPU, bfloat16/float16 only). Its backward pass
  rejects odd sequence lengths, so odd query/key lengths are padded to even here and the padded keys
  masked through `key_value_seq_lengths`. It has no dropout: attention-probability dropout is
  **off** on this path (hidden-state dropout elsewhere is unaffected). A key mask is turned into
  per-example key lengths, so on this path it must be a right-padding mask (ones, then zeros), which
  is what the tokenizer produces.
* `'tokamax'`: `tokamax.dot_product_attention` (the optional extra `pip install -e '.[tokamax]'`),
  its Pallas-Triton flash kernel on a GPU (faster than cuDNN for the text's 26 tokens and the
  fusion's 26 queries × 258 image keys, docs/PERF.md), its XLA one elsewhere. Any length, any
  dtype; key masks become key lengths and attention dropout is off, as on 'cudnn'. Under a mesh
  (`jax.set_mesh`) the kernel runs per batch shard (`shard_map` over the batch axes), since XLA
  cannot partition a Pallas call itself.

Softmax is always computed in float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nas_jax.models import fp8 as fp8_lib
from nas_jax.sharding import BATCH_AXES

IMPLEMENTATIONS = ("xla", "cudnn", "tokamax")


def _check_implementation(implementation: str) -> None:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS} "
                     "(config key model.attention / model.vit_attention)")


def resolve_implementation(name: str, dtype: Any, backend: str | None = None) -> str:
  """The config's attention name → 'xla' | 'cudnn' | 'tokamax'. 'auto' is 'cudnn' on a GPU with
  bfloat16 or float16 compute, else 'xla' (TPU, CPU, float32). `backend` defaults to
  jax.default_backend()."""
  if name != "auto":
    _check_implementation(name)
    return name
  backend = backend or jax.default_backend()
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return "cudnn" if backend in ("gpu", "cuda", "rocm") and half else "xla"


def _attention_with_dropout(q, k, v, mask, dropout_rate, dropout_rng):
  """softmax(q k^T / sqrt(Dh), masked) with dropout on the probabilities, then @ v."""
  scale = 1.0 / np.sqrt(q.shape[-1])
  logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
  probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0).astype(v.dtype)
  return jnp.einsum("bnts,bsnh->btnh", probs, v)


def _import_tokamax():
  try:
    import tokamax  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"model.attention='tokamax' needs the tokamax package ({e}): install it with "
                      "pip install -e '.[tokamax]', or use model.attention='cudnn' or 'xla'") from e
  return tokamax


def tokamax_implementation(backend: str | None = None) -> str:
  """tokamax's kernel for a backend: its Pallas-Triton flash attention on an NVIDIA GPU (faster
  than its Mosaic GPU one at these lengths, docs/PERF.md), its XLA one elsewhere."""
  return "triton" if (backend or jax.default_backend()) in ("gpu", "cuda") else "xla"


def _key_lengths(key_mask: jax.Array | None, key_lengths: jax.Array | None) -> jax.Array | None:
  """[B] int32 number of valid keys from a right-padding mask and/or lengths (None: all valid)."""
  lengths = None
  if key_mask is not None:
    lengths = jnp.sum(key_mask.astype(jnp.int32), axis=-1)
  if key_lengths is not None:
    key_lengths = key_lengths.astype(jnp.int32)
    lengths = key_lengths if lengths is None else jnp.minimum(lengths, key_lengths)
  return lengths


def _batch_axes_of_mesh(batch: int) -> tuple[str, ...]:
  """The batch axes (size > 1) of the mesh set with `jax.set_mesh` that split `batch` rows
  evenly; () outside a mesh or for a batch they do not split (the 1-row init pass)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
  return axes if batch % int(np.prod([mesh.shape[a] for a in axes])) == 0 else ()


def tokamax_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                      lengths: jax.Array | None) -> jax.Array:
  """tokamax's attention of q [B, Tq, H, Dh] over k, v [B, Tk, H, Dh], keys >= lengths[b]
  masked; per batch shard under a mesh."""
  tokamax = _import_tokamax()
  impl = tokamax_implementation()
  q, k, v = (jnp.asarray(x) for x in (q, k, v))  # tokamax type-checks for jax Arrays.
  if lengths is None:
    lengths = jnp.full((q.shape[0],), k.shape[1], jnp.int32)

  def attend(q, k, v, lengths):
    return tokamax.dot_product_attention(q, k, v, key_value_seq_lengths=lengths,
                                         implementation=impl)

  axes = _batch_axes_of_mesh(q.shape[0])
  if not axes:
    return attend(q, k, v, lengths)
  spec = jax.sharding.PartitionSpec(axes)
  return jax.shard_map(attend, in_specs=(spec,) * 4, out_specs=spec,
                       check_vma=False)(q, k, v, lengths)


def _pad_axis1(x: jax.Array, length: int) -> jax.Array:
  return jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          key_mask: jax.Array | None = None,
                          key_lengths: jax.Array | None = None,
                          implementation: str = "xla",
                          dropout_rate: float = 0.0,
                          deterministic: bool = True,
                          dropout_rng: jax.Array | None = None) -> jax.Array:
  """Multi-head attention `softmax(q k^T / sqrt(Dh)) v` over already-projected heads.

  Args:
    q: [B, Tq, H, Dh] queries.
    k, v: [B, Tk, H, Dh] keys and values (same dtype as q).
    key_mask: optional bool/int [B, Tk], 1 = attend to that key. On 'cudnn' it must be a
      right-padding mask (it becomes `key_value_seq_lengths = key_mask.sum(-1)`).
    key_lengths: optional int [B], number of valid keys (keys at index >= length are masked).
      Cheaper than `key_mask` on cuDNN; may be combined with it on 'xla'.
    implementation: 'xla', 'cudnn' or 'tokamax'.
    dropout_rate: attention-probability dropout, applied on 'xla' only when not deterministic.
      On 'cudnn' and 'tokamax' it is ignored (the kernels have none; documented choice: dropout
      off).
    deterministic: True in evaluation; no dropout.
    dropout_rng: PRNG key, required when dropout is applied.

  Returns:
    [B, Tq, H, Dh] in q's dtype.
  """
  _check_implementation(implementation)
  batch, tq, _, _ = q.shape
  tk = k.shape[1]
  if key_mask is not None and key_mask.shape != (batch, tk):
    raise ValueError(f"key_mask has shape {key_mask.shape}, expected [batch, keys] = {(batch, tk)}")

  if implementation == "cudnn":
    if q.dtype not in (jnp.bfloat16, jnp.float16):
      raise ValueError(f"cuDNN attention needs bfloat16 or float16 inputs, got {q.dtype}: set "
                       "model.dtype='bfloat16' or use model.attention='xla'")
    lengths = _key_lengths(key_mask, key_lengths)
    # The cuDNN backward pass rejects odd lengths: pad to even and mask the pad.
    tq_even, tk_even = tq + tq % 2, tk + tk % 2
    if tk_even != tk:
      k, v = _pad_axis1(k, tk_even), _pad_axis1(v, tk_even)
      if lengths is None:
        lengths = jnp.full((batch,), tk, jnp.int32)
    if tq_even != tq:
      q = _pad_axis1(q, tq_even)
    out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths,
                                       implementation="cudnn")
    return out[:, :tq]
  if implementation == "tokamax":
    return tokamax_attention(q, k, v, _key_lengths(key_mask, key_lengths))

  mask = None
  if key_mask is not None:
    mask = key_mask.astype(bool)[:, None, None, :]  # [B, 1, 1, Tk] broadcasts over heads, queries.
  if key_lengths is not None:
    by_length = (jnp.arange(tk)[None, :] < key_lengths[:, None])[:, None, None, :]
    mask = by_length if mask is None else mask & by_length
  if dropout_rate > 0.0 and not deterministic:
    if dropout_rng is None:
      raise ValueError("attention dropout is active (deterministic=False) but no dropout_rng given")
    return _attention_with_dropout(q, k, v, mask, dropout_rate, dropout_rng)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


class MultiHeadAttention(nn.Module):
  """Projections to heads + `dot_product_attention` (+ optional output projection).

  Parameter layout (so PyTorch checkpoints convert by renaming):
    fused_qkv=True  (timm ViT): 'qkv' Dense(3D) whose output splits as [q | k | v], each
                                [H, Dh] head-major; `out_proj` adds 'proj' Dense(D).
    fused_qkv=False (HF BERT):  'query', 'key', 'value' Dense(D); key/value read `inputs_kv`,
                                whose width may differ (cross-attention to image tokens).

  Attributes:
    num_heads: H; `features` must be divisible by it.
    features: D, the query/output width.
    dtype: compute dtype (params float32).
    implementation: 'xla' | 'cudnn' | 'tokamax' (see `dot_product_attention`).
    dropout_rate: attention-probability dropout (train only, 'xla' only).
    fused_qkv, out_proj: layout switches above.
    kernel_init: initializer of the projection kernels.
    fp8: the projections' matmuls in FP8 (`model.fp8`, models/fp8.py).
  """
  num_heads: int
  features: int
  dtype: Any = jnp.float32
  implementation: str = "xla"
  dropout_rate: float = 0.0
  fused_qkv: bool = False
  out_proj: bool = True
  kernel_init: Any = nn.initializers.lecun_normal()
  fp8: bool = False

  def setup(self):
    if self.features % self.num_heads:
      raise ValueError(f"width {self.features} is not divisible by num_heads={self.num_heads}")
    dense = lambda n: fp8_lib.dense(n, fp8=self.fp8, dtype=self.dtype, kernel_init=self.kernel_init)
    if self.fused_qkv:
      self.qkv = dense(3 * self.features)
    else:
      self.query = dense(self.features)
      self.key = dense(self.features)
      self.value = dense(self.features)
    if self.out_proj:
      self.proj = dense(self.features)

  def attend(self, inputs_q: jax.Array, inputs_kv: jax.Array | None = None, *,
             key_mask: jax.Array | None = None, key_lengths: jax.Array | None = None,
             deterministic: bool = True) -> jax.Array:
    """inputs_q [B, Tq, D], inputs_kv [B, Tk, Dkv] (None = self-attention) -> [B, Tq, D]."""
    heads = self.num_heads
    split = lambda x: x.reshape(x.shape[:2] + (heads, self.features // heads))
    if self.fused_qkv:
      if inputs_kv is not None:
        raise ValueError("fused qkv projection is self-attention only")
      # One [D, 3D] product; the slices below are copied anyway (the fused-attention kernel takes
      # no strided operands), and that copy absorbs the bias add. Three [D, D] products measured
      # 0.25 ms/step slower on the H100: each needs its own bias-add pass (docs/PERF.md).
      qkv = self.qkv(inputs_q)
      qkv = qkv.reshape(qkv.shape[:2] + (3, heads, self.features // heads))
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    else:
      inputs_kv = inputs_q if inputs_kv is None else inputs_kv
      q, k, v = split(self.query(inputs_q)), split(self.key(inputs_kv)), split(self.value(inputs_kv))
    use_dropout = self.dropout_rate > 0.0 and not deterministic and self.implementation == "xla"
    out = dot_product_attention(
        q, k, v, key_mask=key_mask, key_lengths=key_lengths, implementation=self.implementation,
        dropout_rate=self.dropout_rate, deterministic=not use_dropout,
        dropout_rng=self.make_rng("dropout") if use_dropout else None)
    out = out.reshape(out.shape[:2] + (self.features,))
    return self.proj(out) if self.out_proj else out

  def __call__(self, inputs_q, inputs_kv=None, *, key_mask=None, key_lengths=None,
               deterministic=True):
    return self.attend(inputs_q, inputs_kv, key_mask=key_mask, key_lengths=key_lengths,
                       deterministic=deterministic)
