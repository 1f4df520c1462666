"""The visual dictionary (VD): quantise ViT patch features against a codebook (NAS paper, sec. 3).

Pipeline for the patch tokens `v_1..v_N` (not the CLS) of each image:

  f_i = ReLU(LayerNorm(Linear(v_i)))                    input projection (switchable)
  h_i = argmin_j ||f_i - d_j||^2                        nearest code (eq. 1)
  q_i = f_i + sg[d_{h_i} - f_i]                         straight-through estimator
  d_j <- g d_j + (1 - g) mean{f_i : h_i = j}            EMA update, codes with n_j > 0 only (eq. 2)
  e_i = Linear(q_i)
  x_i = w_q e_i + w_f f_i,  (w_q, w_f) = softmax(ReLU(LayerNorm(Linear_{2c->2}([e_i; f_i]))))
  tokens_i = LayerNorm(x_i + pos_i)                     pos: fixed 2-D sine/cosine embedding

The gate follows the authors' code (github Gavin001201/NAS_ALBEF, class `SimpleVDforPreGate` in
models/sohonecks.py; every commit but 3753ea8, HEAD 3b80cef included): its input is the
concatenation of the *linearly mapped* quantised feature and the continuous feature; `gate=False`
keeps only the quantised path (`x_i = e_i`). Their names, for checkpoint conversion
(`nas_jax.convert.convert_nas_albef`, docs/CONVERT.md):

  linear.0 -> in_dense   linear.1 -> in_norm   pos_line -> out_dense
  gate_fc.0 -> gate_dense   gate_fc.1 -> gate_norm   ln -> norm
  vq.embed (their codebook module `SOHO_Pre_VD`, models/soho_pre_vd.py) -> batch_stats/codebook

The codebook lives in the Flax collection `batch_stats` (float32), never in `params`: the optimizer
does not see it, and it changes only through eq. 2 when `quantize(..., update=True)` runs under
`apply(..., mutable=['batch_stats'])`. Its statistics (`segment_sum` over all B*N tokens) are
over the global batch: under `jax.jit` with a batch-sharded input XLA inserts the all-reduce.

Choices where the paper is silent (recorded here, switchable where it matters):
  * gamma (`momentum`) defaults to 0.99. The authors' update is not eq. 2: it lives in
    `SOHO_Pre_VD.forward` (not in `SimpleVDforPreGate`) and is a VQ-VAE style EMA of per-code
    counts and sums with Laplace-smoothed counts. Up to their commit 9615d3d its decay is the
    constant 0.4 (the arguments say decay 0.4, max_decay 0.99, but the method that would ramp one
    to the other is never called); in 3753ea8 and 89dd9ca it ramps from 0.2 to 1.0; from c8a6aa0
    to their HEAD 3b80cef the update is commented out and the codebook stays as loaded.
    We implement eq. 2 exactly; momentum=1.0 freezes the codebook as their HEAD does.
  * `init='normal'`: codebook ~ N(0, init_std^2) as the paper (and `SOHO_Pre_VD`'s
    `nn.init.normal_`).
    `init='data'`: the first update first overwrites the codebook with the batch's features (see
    `data_init`), then assigns against it and applies eq. 2, so no step sees the random codebook.
  * Distances use `precision=HIGHEST` so the argmin is the true nearest code on GPUs/TPUs too
    (TF32/bf16 passes would otherwise flip near-ties). `distances='tf32'` (a speed switch,
    `model.dictionary.distances`) computes the [B·N, C] × [C, m] product with TF32 tensor cores on
    NVIDIA GPUs, as PyTorch 1.7-1.11 did by default on Ampere for the authors' float32 `matmul`
    (ALBEF pins PyTorch 1.8; PyTorch >= 1.12 no longer does): codes of near-ties may differ from
    the float32 choice. Elsewhere 'tf32' is 'float32'.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def sincos_2d(grid: tuple[int, int], dim: int) -> Array:
  """Fixed 2-D sine/cosine position embedding, [h*w, dim] float32 (row-major over the grid).

  As `SimpleVDforPreGate.position_encoding_sine` in the authors' code (DETR-style, the same in all
  their commits): the row and column of each patch are
  normalised to (0, 2*pi] as `(index + 1) / size * 2*pi`; the first dim/2 channels encode the row,
  the last dim/2 the column, each as interleaved [sin(p/t_0), cos(p/t_0), sin(p/t_1), ...] with
  t_k = 10000^(2k / (dim/2)).
  """
  h, w = grid
  if dim % 4:
    raise ValueError(f"VisualDictionary dim={dim}: the 2-D position embedding needs dim % 4 == 0")
  half = dim // 2
  eps = 1e-6
  y = (jnp.arange(1, h + 1, dtype=jnp.float32) / (h + eps)) * 2 * math.pi
  x = (jnp.arange(1, w + 1, dtype=jnp.float32) / (w + eps)) * 2 * math.pi
  dim_t = 10000.0 ** (2 * (jnp.arange(half) // 2) / half)

  def encode(p):  # [s] -> [s, half]
    a = p[:, None] / dim_t
    return jnp.stack([jnp.sin(a[:, 0::2]), jnp.cos(a[:, 1::2])], axis=-1).reshape(p.shape[0], half)

  py = jnp.broadcast_to(encode(y)[:, None, :], (h, w, half))
  px = jnp.broadcast_to(encode(x)[None, :, :], (h, w, half))
  return jnp.concatenate([py, px], axis=-1).reshape(h * w, dim)


DISTANCES = ('float32', 'tf32')


def distance_precision(distances: str = 'float32', backend: str | None = None):
  """The product's precision: float32 (HIGHEST), or for 'tf32' TF32 tensor cores on an NVIDIA
  GPU (`backend` defaults to jax.default_backend(); elsewhere float32)."""
  if distances not in DISTANCES:
    raise ValueError(f"model.dictionary.distances={distances!r}: use one of {DISTANCES}")
  if distances == 'tf32' and (backend or jax.default_backend()) in ('gpu', 'cuda'):
    return jax.lax.DotAlgorithmPreset.TF32_TF32_F32
  return jax.lax.Precision.HIGHEST


def pairwise_sq_dist(a: Array, b: Array, distances: str = 'float32') -> Array:
  """||a_i - b_j||^2 as ||a||^2 - 2 a.b + ||b||^2, float32: a [P, C], b [m, C] -> [P, m];
  the product's precision by `distance_precision(distances)`."""
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  ab = jnp.dot(a, b.T, precision=distance_precision(distances))
  return jnp.sum(a * a, -1, keepdims=True) - 2.0 * ab + jnp.sum(b * b, -1)[None, :]


def code_statistics(feats: Array, codes: Array, size: int) -> tuple[Array, Array]:
  """Eq. 2's statistics: per-code feature sums [m, C] and counts n_j [m] (float32, no gradient).

  feats [..., C], codes int [...] (the same leading shape). Sums of several batches add up, so
  micro-batches of gradient accumulation give the whole batch's statistics.
  """
  flat = jax.lax.stop_gradient(feats).astype(jnp.float32).reshape(-1, feats.shape[-1])
  codes = codes.reshape(-1)
  counts = jax.ops.segment_sum(jnp.ones(codes.shape, jnp.float32), codes, num_segments=size)
  return jax.ops.segment_sum(flat, codes, num_segments=size), counts


def ema_from_statistics(codebook: Array, sums: Array, counts: Array, momentum: float) -> Array:
  """Paper eq. 2: d_j <- g d_j + (1-g) sums_j / n_j for codes with n_j > 0; others unchanged."""
  mean = sums / jnp.maximum(counts, 1.0)[:, None]
  updated = momentum * codebook + (1.0 - momentum) * mean
  return jnp.where((counts > 0)[:, None], updated, codebook)


def ema_update(codebook: Array, feats: Array, codes: Array, momentum: float) -> Array:
  """Paper eq. 2 from one batch: codebook [m, C] float32, feats [P, C], codes int [P]."""
  sums, counts = code_statistics(feats, codes, codebook.shape[0])
  return ema_from_statistics(codebook, sums, counts, momentum)


def usage_from_counts(counts: Array) -> tuple[Array, Array]:
  """(perplexity exp(-sum p log p) with p = n / sum(n), number of used codes int32) of counts [m]."""
  p = counts / jnp.maximum(counts.sum(), 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return jnp.exp(entropy), jnp.sum(counts > 0).astype(jnp.int32)


def code_usage(codes: Array, size: int) -> tuple[Array, Array, Array]:
  """Counts n_j [m] (float32), perplexity and used codes (int32) of a batch's codes."""
  flat = codes.reshape(-1)
  counts = jax.ops.segment_sum(jnp.ones(flat.shape, jnp.float32), flat, num_segments=size)
  return (counts,) + usage_from_counts(counts)


def data_init(feats: Array, size: int, std: float) -> Array:
  """Codebook [m, C] from a batch's features [P, C] (init='data').

  Row j is feature floor(j * P / m): evenly strided over the flattened (image, patch) order, so
  every image contributes. When P < m rows repeat; repeated rows get a fixed-key N(0, (1e-3 std)^2)
  jitter (std = the features' standard deviation) so no two codes are identical.
  """
  p = feats.shape[0]
  idx = (jnp.arange(size) * p) // size
  rows = feats[idx].astype(jnp.float32)
  if p < size:
    repeated = jnp.concatenate([jnp.zeros((1,), bool), idx[1:] == idx[:-1]])
    jitter = jax.random.normal(jax.random.PRNGKey(0), rows.shape, jnp.float32)
    scale = 1e-3 * jnp.maximum(jnp.std(feats.astype(jnp.float32)), 1e-6)
    rows = rows + jnp.where(repeated[:, None], scale * jitter, 0.0)
  return rows


class VisualDictionary(nn.Module):
  """Visual dictionary. Patches [B, N, C_in] -> tokens [B, N, dim] and an aux dict.

  Attributes:
    size: m, number of codes (2048).
    dim: c, the code width and output width (768).
    momentum: gamma of eq. 2.
    gate: learned mix of quantised and continuous features (authors' code); False: quantised only.
    input_proj: Linear -> LayerNorm -> ReLU before quantisation; False: f = patches (needs
      C_in == dim).
    init: 'normal' or 'data' (see module docstring).
    init_std: standard deviation of the 'normal' codebook.
    dtype: compute dtype of the Linear layers (statistics, distances and LayerNorms are float32).
    distances: 'float32' or 'tf32', the patch-to-code product's precision (module docstring).
    grid: patch grid (h, w) for the position embedding; None: square, h = w = sqrt(N).

  Note: the field `init` (named as the config key `model.dictionary.init`) shadows `Module.init`
  on this class. Inside a parent module nothing changes; to initialise a VisualDictionary on its
  own call `nn.Module.init(vd, rng, patches)`.
  """
  size: int = 2048
  dim: int = 768
  momentum: float = 0.99
  gate: bool = True
  input_proj: bool = True
  init: str = 'normal'
  init_std: float = 1.0
  dtype: Any = jnp.float32
  grid: tuple[int, int] | None = None
  distances: str = 'float32'

  def setup(self):
    if self.init not in ('normal', 'data'):
      raise ValueError(f"model.dictionary.init={self.init!r}: use 'normal' or 'data'")
    distance_precision(self.distances)  # A bad name fails here, not at the first call.
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, name=name,
                                     kernel_init=nn.initializers.xavier_normal())
    if self.input_proj:
      self.in_dense = dense(self.dim, 'in_dense')
      self.in_norm = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name='in_norm')
    self.out_dense = dense(self.dim, 'out_dense')
    if self.gate:
      self.gate_dense = dense(2, 'gate_dense')
      self.gate_norm = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name='gate_norm')
    self.norm = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name='norm')
    self.code_var = self.variable(
        'batch_stats', 'codebook',
        lambda: self.init_std * jax.random.normal(self.make_rng('params'), (self.size, self.dim),
                                                  jnp.float32))
    if self.init == 'data':
      self.ready_var = self.variable('batch_stats', 'initialized', lambda: jnp.zeros((), jnp.bool_))

  def codebook(self) -> Array:
    """The current codebook, [m, dim] float32."""
    return self.code_var.value

  def project(self, patches: Array) -> Array:
    """Input projection f = ReLU(LayerNorm(Linear(v))) (or identity), float32 [B, N, dim]."""
    if not self.input_proj:
      if patches.shape[-1] != self.dim:
        raise ValueError(f"VisualDictionary(input_proj=False) needs patch width == dim={self.dim}, "
                         f"got {patches.shape[-1]}: enable model.dictionary.input_proj")
      return patches.astype(jnp.float32)
    return nn.relu(self.in_norm(self.in_dense(patches).astype(jnp.float32)))

  def quantize(self, patches: Array, *, update: bool) -> dict[str, Array]:
    """Nearest-code assignment (eq. 1), straight-through, and optionally the EMA update (eq. 2).

    Args:
      patches: [B, N, C_in] patch tokens v_1..v_N (no CLS).
      update: apply eq. 2 (and the 'data' initialisation) to `batch_stats/codebook`; needs
        `mutable=['batch_stats']`. Ignored while the module is initialising.
    Returns:
      f [B, N, dim] float32 continuous features; q [B, N, dim] float32 straight-through quantised
      features (value d_{h_i}, gradient identity to f); codes int32 [B, N]; perplexity (scalar) and
      used_codes (int32 scalar) of this batch's code usage; commit_dist: mean ||f_i - d_{h_i}||^2;
      codebook [m, dim]: the codebook the codes index (before this call's eq. 2 update, after
      the 'data' initialisation).
    """
    b, n, _ = patches.shape
    f = self.project(patches)
    flat = f.reshape(b * n, self.dim)
    codebook = self.code_var.value
    do_update = update and not self.is_initializing()
    if do_update and not self.is_mutable_collection('batch_stats'):
      raise ValueError("VisualDictionary.quantize(update=True) needs "
                       "apply(..., mutable=['batch_stats'])")
    if do_update and self.init == 'data':
      fresh = data_init(jax.lax.stop_gradient(flat), self.size, self.init_std)
      codebook = jnp.where(self.ready_var.value, codebook, fresh)
      self.ready_var.value = jnp.ones((), jnp.bool_)

    dist = pairwise_sq_dist(jax.lax.stop_gradient(flat), codebook, self.distances)  # [B*N, m]
    codes = jnp.argmin(dist, axis=-1).astype(jnp.int32)
    nearest = jnp.take(codebook, codes, axis=0)                          # [B*N, dim]
    q = flat + jax.lax.stop_gradient(nearest - flat)
    _, perplexity, used = code_usage(codes, self.size)
    commit = jnp.mean(jnp.sum(jnp.square(jax.lax.stop_gradient(flat) - nearest), -1))

    if do_update:
      self.code_var.value = ema_update(codebook, flat, codes, self.momentum)
    return dict(f=f, q=q.reshape(b, n, self.dim), codes=codes.reshape(b, n),
                perplexity=perplexity, used_codes=used, commit_dist=commit, codebook=codebook)

  def embed(self, q: Array, f: Array, *, gate_q: Array | None = None) -> Array:
    """Post-quantisation tokens [B, N, dim] (in `dtype`): Linear, gate, + 2-D position, LayerNorm.

    Args:
      q: [B, N, dim] quantised features (e.g. `quantize()['q']`, or codebook rows for an NVA
        negative).
      f: [B, N, dim] continuous features mixed in by the gate.
      gate_q: optional [B, N, dim]: compute the gate weights from [Linear(gate_q); f] instead of
        [Linear(q); f]. `negative_tokens(reuse_gate=True)` passes the positive's q, so the NVA
        negative mixes the replacement code with the original f by the positive's gate weights.
    """
    _, n, _ = q.shape
    e = self.out_dense(q)
    if self.gate:
      g_in = e if gate_q is None else self.out_dense(gate_q)
      logits = self.gate_dense(jnp.concatenate([g_in, f.astype(g_in.dtype)], axis=-1))
      w = jax.nn.softmax(nn.relu(self.gate_norm(logits.astype(jnp.float32))), axis=-1)
      x = w[..., :1] * e.astype(jnp.float32) + w[..., 1:] * f.astype(jnp.float32)
    else:
      x = e.astype(jnp.float32)
    x = x + sincos_2d(self._grid(n), self.dim)[None]
    return self.norm(x)

  def negative_tokens(self, q: Array, f: Array, codes: Array, replaced: Array, *,
                      reuse_gate: bool = True, codebook: Array | None = None) -> Array:
    """Tokens [B, N, dim] of the NVA negative image I_fg (step 4 of nas_jax/nva.py).

    Replaced patches take the codebook row of their new code (`nva.negative_codes(...)['codes']`),
    the others keep q, so their tokens equal the positive's. A replaced patch becomes
    LayerNorm(w_q Linear(d_new) + w_f f + pos): with reuse_gate=True the gate weights are the
    positive's (from [Linear(q); f]), with reuse_gate=False they are recomputed on
    [Linear(d_new); f]; f is the original continuous feature.
    No gradient reaches q, f or the codebook (the encoder learns nothing through the negative's
    construction); the VD head's own parameters (Linear, gate, LayerNorm) do get the gradient of
    whatever loss uses these tokens.
    The authors' code (docs/CONVERT.md, "The authors' code") never built it quite so: their
    commits 5523459 and 9615d3d mixed the *raw* code (no Linear) with f by the positive's gate
    weights for every patch; from c8a6aa0 to d60efef (v72) a replaced patch is
    LayerNorm(d_new + pos), from 2857ee8 (v75) to their HEAD 3b80cef LayerNorm(Linear(d_new) +
    pos), without the gate, the other patches keeping their positive tokens (as ours); and from
    c8a6aa0 on their pretraining detaches the negative tokens entirely.
    codebook: the [m, dim] codebook the codes index; default the current one. Pass the codebook
    read *before* `quantize(update=True)` when called after the update in the same apply.
    """
    q, f = jax.lax.stop_gradient(q), jax.lax.stop_gradient(f)
    book = self.code_var.value if codebook is None else codebook
    rows = jnp.take(jax.lax.stop_gradient(book), codes, axis=0).astype(q.dtype)
    q_neg = jnp.where(replaced[..., None], rows, q)
    return self.embed(q_neg, f, gate_q=q if reuse_gate else None)

  def _grid(self, n: int) -> tuple[int, int]:
    if self.grid is not None:
      if self.grid[0] * self.grid[1] != n:
        raise ValueError(f"VisualDictionary grid={self.grid} does not match {n} patches")
      return tuple(self.grid)
    side = math.isqrt(n)
    if side * side != n:
      raise ValueError(f"VisualDictionary got {n} patches, not a square grid: set grid=(h, w)")
    return side, side

  def __call__(self, patches: Array, *, update: bool = False) -> tuple[Array, dict[str, Array]]:
    """tokens [B, N, dim] = embed(q, f) and the aux dict of `quantize`."""
    aux = self.quantize(patches, update=update)
    return self.embed(aux['q'], aux['f']), aux
