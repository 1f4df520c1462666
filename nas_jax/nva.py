"""Negative Visual Augmentation (NVA): a token-level negative image I_fg per pair (NAS paper, sec. 3).

For image b with patch features v_i [N, C], CLS v_cls and its caption's t_cls:
  1. S_i = lam * cos(t_cls, v_i) + (1 - lam) * cos(v_cls, v_i)
  2. the ceil(ratio * N) patches of highest S are the "primary subject";
  3. for each code c carried by a primary patch, draw ONE replacement r(c) from the k codebook
     entries nearest to d_c (c excluded) with probability softmax(1 / normalised distance);
     every patch of the image carrying c gets r(c) (`scope='image'`, as the authors' code replaces
     every patch that carries the chosen patch's code; `scope='primary'` replaces only the primary
     patches, the paper's "ratio of visual token replacement");
  4. replaced patches take the replacement's dictionary embedding, the rest keep their tokens.
Everything is computed without gradient, with static shapes and `jax.random`, and jit-compatible.

What this module returns are codes; the caller builds the tokens (step 4) with the dictionary:

    q_neg = jnp.where(out['replaced'][..., None], codebook[out['codes']], q)   # rest: exactly q
    tokens_neg = vd.embed(q_neg, f, gate_q=q)         # authors' released code, see below
    tokens_neg = vd.embed(q_neg, f)                   # alternative: gate recomputed on [q_neg; f]

`gate_q=q` mixes a replaced patch's Linear(d_r) with its original continuous feature f_i by the
gate weights (w_q, w_f) of the *positive* token. The authors' code (github Gavin001201/NAS_ALBEF,
`SimpleVDforPreGate.forward` in models/sohonecks.py) changed over time, and no commit does exactly
this: 5523459 and 9615d3d gave every patch `w_q * d + w_f * f_i` with the positive's weights but the
raw code d (no Linear; f_i detached in 9615d3d); c8a6aa0 to d60efef (v72) give a replaced patch
the raw d_r without gate, 2857ee8 (v75) to their HEAD 3b80cef Linear(d_r) without gate, the other
patches keeping their positive tokens; their pretraining detaches the negative from c8a6aa0 on.
The differences, commit by commit: docs/CONVERT.md, "The authors' code".

"Normalised distance" follows the authors' code (`SOHO_Pre_VD.forward`, models/soho_pre_vd.py):
the k squared Euclidean distances to the candidates are L2-normalised as a vector
(`F.normalize`), and the logits are 1 / (normalised + 1e-4) (`norm='l2'`); `norm='max'` divides by
the largest of the k instead. Where the authors measure distances from the patch feature f_i to
the codes (their candidates are the 2nd..4th nearest codes of each patch), the paper's "the k
entries nearest to d_c" measures them between codebook entries (`nearest_codes`), which is what we
do: the candidates depend on the code only, so patches sharing a code share candidates. The two
agree when f_i equals its code.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from nas_jax.models.dictionary import pairwise_sq_dist

Array = jax.Array

_EPS = 1e-4   # authors' 1 / (d + 1e-4)


@dataclasses.dataclass(frozen=True)
class Settings:
  """The NVA hyper-parameters of `negative_codes` (config section `nva`)."""
  ratio: float = 0.3
  lam: float = 0.5
  k: int = 3
  scope: str = 'primary'
  norm: str = 'l2'

  @classmethod
  def of(cls, nva_config) -> "Settings":
    return cls(ratio=nva_config.ratio, lam=nva_config.lam, k=nva_config.k,
               scope=nva_config.scope, norm=nva_config.norm)


def num_primary(num_patches: int, ratio: float) -> int:
  """ceil(ratio * N), robust to float error (0.3 * 10 = 3.0000000000000004 -> 3, not 4)."""
  if not 0.0 < ratio <= 1.0:
    raise ValueError(f"nva.ratio={ratio}: must be in (0, 1]")
  return max(1, min(num_patches, math.ceil(ratio * num_patches - 1e-9)))


def nearest_codes(codebook: Array, k: int) -> tuple[Array, Array]:
  """The k nearest codebook entries of every entry, itself excluded.

  Args:
    codebook: [m, C].
    k: candidates per code, 1 <= k < m.
  Returns:
    idx int32 [m, k] (nearest first) and dist float32 [m, k], the squared Euclidean distances.
  """
  m = codebook.shape[0]
  if not 1 <= k < m:
    raise ValueError(f"nva.k={k}: need 1 <= k < dictionary size {m}")
  d = jnp.maximum(pairwise_sq_dist(codebook, codebook), 0.0)
  d = jnp.where(jnp.eye(m, dtype=bool), jnp.inf, d)
  neg, idx = jax.lax.top_k(-d, k)
  return idx.astype(jnp.int32), -neg


def replacement_logits(dist: Array, norm: str = 'l2') -> Array:
  """Logits [..., k] of the replacement draw: 1 / (normalised distance + 1e-4).

  norm='l2': distances divided by their L2 norm over the k candidates (authors' `F.normalize`);
  norm='max': divided by the largest of the k.
  """
  dist = dist.astype(jnp.float32)
  if norm == 'l2':
    scale = jnp.linalg.norm(dist, axis=-1, keepdims=True)
  elif norm == 'max':
    scale = jnp.max(dist, axis=-1, keepdims=True)
  else:
    raise ValueError(f"NVA norm={norm!r}: use 'l2' or 'max'")
  return 1.0 / (dist / jnp.maximum(scale, 1e-12) + _EPS)


def _cosine(a: Array, b: Array) -> Array:
  """cos(a_b, b_{b,i}): a [B, C], b [B, N, C] -> [B, N] float32."""
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-8)
  b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), 1e-8)
  return jnp.einsum('bc,bnc->bn', a, b, precision=jax.lax.Precision.HIGHEST)


def negative_codes(rng: Array, *, t_cls: Array, v_cls: Array, patches: Array, codes: Array,
                   codebook: Array, ratio: float = 0.3, lam: float = 0.5, k: int = 3,
                   scope: str = 'image', norm: str = 'l2',
                   neighbours: tuple[Array, Array] | None = None) -> dict[str, Array]:
  """Codes of the NVA negative image for every pair (steps 1-3 above).

  Args:
    rng: PRNG key.
    t_cls: [B, C] text CLS features (raw text-encoder output; same width as the patches).
    v_cls: [B, C] image CLS features (raw ViT output).
    patches: [B, N, C] raw ViT patch features v_1..v_N.
    codes: int [B, N] the VD codes of the patches.
    codebook: [m, C_vd] the VD codebook.
    ratio, lam, k: the paper's 0.3, 0.5, 3 (config nva.*).
    scope: 'image' (every patch of the image carrying a primary code) or 'primary'.
    norm: normalisation of the candidate distances ('l2' as the authors, or 'max').
    neighbours: optional precomputed `nearest_codes(codebook, k)` (to share it across calls).
  Returns:
    codes int32 [B, N]: replacement codes where replaced, the original elsewhere;
    replaced bool [B, N]; primary bool [B, N] (exactly ceil(ratio * N) per image);
    score float32 [B, N]: S of step 1.
  No gradient flows to any input.
  """
  t_cls, v_cls, patches, codebook = jax.tree.map(jax.lax.stop_gradient,
                                                 (t_cls, v_cls, patches, codebook))
  b, n, c = patches.shape
  if t_cls.shape[-1] != c or v_cls.shape[-1] != c:
    raise ValueError(f"NVA needs t_cls, v_cls and patches of one width; got {t_cls.shape[-1]}, "
                     f"{v_cls.shape[-1]}, {c}: pass the raw encoder features, not projections")
  if scope not in ('image', 'primary'):
    raise ValueError(f"NVA scope={scope!r}: use 'image' or 'primary'")
  codes = codes.astype(jnp.int32)
  n_p = num_primary(n, ratio)

  score = lam * _cosine(t_cls, patches) + (1.0 - lam) * _cosine(v_cls, patches)   # [B, N]
  _, top = jax.lax.top_k(score, n_p)                                             # [B, n_p]
  rows = jnp.arange(b)[:, None]
  primary = jnp.zeros((b, n), bool).at[rows, top].set(True)

  nbr_idx, nbr_dist = neighbours if neighbours is not None else nearest_codes(codebook, k)
  slot_codes = jnp.take_along_axis(codes, top, axis=1)                           # [B, n_p]
  logits = replacement_logits(nbr_dist, norm)[slot_codes]                        # [B, n_p, k]
  choice = jax.random.categorical(rng, logits, axis=-1)                          # [B, n_p]
  repl = jnp.take_along_axis(nbr_idx[slot_codes], choice[..., None], axis=-1)[..., 0]
  # One draw per (image, code): every slot takes the draw of the first slot with its code.
  first = jnp.argmax(slot_codes[:, :, None] == slot_codes[:, None, :], axis=-1)  # [B, n_p]
  repl = jnp.take_along_axis(repl, first, axis=1)

  match = codes[:, :, None] == slot_codes[:, None, :]                            # [B, N, n_p]
  if scope == 'primary':
    match = match & primary[:, :, None]
  replaced = jnp.any(match, axis=-1)
  new = jnp.take_along_axis(repl, jnp.argmax(match, axis=-1), axis=1)
  return dict(codes=jnp.where(replaced, new, codes).astype(jnp.int32), replaced=replaced,
              primary=primary, score=score)
