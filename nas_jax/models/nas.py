"""NASModel: ViT + BERT (text / fusion / MLM head) + ITC projections + ITM head + visual dictionary.

The module is a bag of methods, one per quantity the objectives need; each runs on the online
parameters or, given the momentum tree, on the momentum encoders (`vit`, `bert`, `vision_proj`,
`text_proj` — the parts ALBEF keeps a momentum copy of):

  encode_image(images)                    → {'embeds': [B,1+N,D], 'feat': [B,E] (L2-normalised)}
  encode_text(ids, mask)                  → {'embeds': [B,L,D], 'feat': [B,E]}
  dictionary_tokens(image_embeds, update) → ([B,1+N,D] tokens for fusion, VD aux)   (NAS §3.1)
  nva_tokens(rng, image_embeds, text_cls, aux, settings) → ([B,1+N,D], replaced [B,N])  (NAS §3.2)
  tokens_from_codes(image_embeds, aux, codes, replaced, codebook) → [B,1+N,D]  (its tokens)
  image_tokens_for_fusion(image_embeds)   → VD tokens (use_dictionary) or the ViT tokens (ALBEF)
  fuse(text_embeds, text_mask, image_tokens) → [B,L,D]
  itm_logits(fused) → [B,2] float32;  mlm_logits(fused) → [B,L,V] float32

The ITC temperature is not a Flax parameter of this module: it is the scalar `params['temp']`
beside the module's parameters (ALBEF's `self.temp`), so the momentum tree can be applied with the
same module without carrying it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from nas_jax import nva
from nas_jax.models.attention import resolve_implementation
from nas_jax.models.bert import BertModel
from nas_jax.models.dictionary import VisualDictionary
from nas_jax.models.vit import VisionTransformer

MOMENTUM_KEYS = ("vit", "bert", "vision_proj", "text_proj")


def compute_dtype(name: str, key: str = "model.dtype"):
  """'float32' | 'bfloat16' → the jnp dtype; `key` names the config key in the error."""
  try:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]
  except KeyError:
    raise ValueError(f"config.{key}={name!r}: use 'float32' or 'bfloat16'") from None


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """F.normalize(x, dim=-1) in float32."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def take_positions(hidden: jax.Array, positions: jax.Array) -> jax.Array:
  """hidden [B, L, D] at positions [B, P] (int) → [B, P, D]."""
  return jnp.take_along_axis(hidden, positions[..., None], axis=1)


class NASModel(nn.Module):
  config: ml_collections.ConfigDict  # the `model` section of nas_jax/config_lib.py

  def setup(self):
    c = self.config
    dtype = compute_dtype(c.dtype)
    scan = c.get("scan_layers", False)  # Absent from configs saved before the switch: unrolled.
    fp8 = c.get("fp8", False)           # Likewise.
    residual = compute_dtype(c.get("residual_dtype", "float32"), key="model.residual_dtype")
    vit_attention = resolve_implementation(c.vit_attention or c.attention, dtype)
    self.vit = VisionTransformer(config=c.vit, dtype=dtype, remat=c.remat, scan_layers=scan,
                                 fp8=fp8, attention=vit_attention, residual_dtype=residual)
    self.bert = BertModel(config=c.bert, dtype=dtype, remat=c.remat, scan_layers=scan, fp8=fp8,
                          attention=resolve_implementation(c.attention, dtype),
                          residual_dtype=residual)
    self.vision_proj = nn.Dense(c.embed_dim, dtype=dtype)
    self.text_proj = nn.Dense(c.embed_dim, dtype=dtype)
    self.itm_head = nn.Dense(2, dtype=jnp.float32)
    if c.use_dictionary:
      grid = c.vit.image_size // c.vit.patch_size
      d = c.dictionary
      self.dictionary = VisualDictionary(
          size=d.size, dim=c.vit.hidden_size, momentum=d.momentum, gate=d.gate,
          input_proj=d.input_proj, init=d.init, init_std=d.init_std, dtype=dtype, grid=(grid, grid),
          distances=d.get("distances", "float32"))  # Absent from configs saved before it existed.

  # ------------------------------------------------------------------ unimodal encoders
  def encode_image(self, images: jax.Array, *, train: bool = False) -> dict:
    embeds = self.vit(images, train=train)
    return {"embeds": embeds, "feat": l2_normalize(self.vision_proj(embeds[:, 0]))}

  def encode_text(self, ids: jax.Array, mask: jax.Array, *, train: bool = False) -> dict:
    embeds = self.bert.text(ids, mask, train=train)
    return {"embeds": embeds, "feat": l2_normalize(self.text_proj(embeds[:, 0]))}

  # ------------------------------------------------------------------ visual dictionary
  def dictionary_tokens(self, image_embeds: jax.Array, *, update: bool = False):
    """[v_cls; VD(v_1..v_N)] — what the fusion encoder attends to for ITM (NAS §3.1)."""
    tokens, aux = self.dictionary(image_embeds[:, 1:], update=update)
    return jnp.concatenate([image_embeds[:, :1], tokens.astype(image_embeds.dtype)], axis=1), aux

  def codebook(self) -> jax.Array:
    return self.dictionary.codebook()

  def tokens_from_codes(self, image_embeds: jax.Array, aux: dict, codes: jax.Array,
                        replaced: jax.Array, codebook: jax.Array) -> jax.Array:
    """Tokens of the NVA negative I_fg: replaced patches take their new code's dictionary entry,
    the others keep their quantised feature; then the same VD head (`VisualDictionary.negative_tokens`).

    `codebook` [m, C] is the dictionary the codes were assigned with (read before this step's
    update, which inside one `apply` is already visible in the variable).
    """
    tokens = self.dictionary.negative_tokens(aux["q"], aux["f"], codes, replaced,
                                             reuse_gate=self.config.dictionary.reuse_gate,
                                             codebook=codebook)
    return jnp.concatenate([image_embeds[:, :1], tokens.astype(image_embeds.dtype)], axis=1)

  def nva_tokens(self, rng: jax.Array, image_embeds: jax.Array, text_cls: jax.Array, aux: dict,
                 settings) -> tuple[jax.Array, jax.Array]:
    """The NVA negative I_fg of every pair (NAS §3.2): `nva.negative_codes` picks the primary
    patches and their replacement codes from `aux` (the VD aux of `dictionary_tokens`: codes and
    the codebook they index), then `tokens_from_codes` builds its tokens.

    image_embeds [B, 1+N, D] (v_cls and the patches), text_cls [B, D] (the caption's t_cls),
    settings: `nva.Settings`. Returns (tokens [B, 1+N, D], replaced bool [B, N]).
    """
    neg = nva.negative_codes(rng, t_cls=text_cls, v_cls=image_embeds[:, 0],
                             patches=image_embeds[:, 1:], codes=aux["codes"],
                             codebook=aux["codebook"], ratio=settings.ratio, lam=settings.lam,
                             k=settings.k, scope=settings.scope, norm=settings.norm)
    tokens = self.tokens_from_codes(image_embeds, aux, neg["codes"], neg["replaced"],
                                    aux["codebook"])
    return tokens, neg["replaced"]

  def image_tokens_for_fusion(self, image_embeds: jax.Array) -> jax.Array:
    if self.config.use_dictionary:
      return self.dictionary_tokens(image_embeds, update=False)[0]
    return image_embeds

  # ------------------------------------------------------------------ fusion and heads
  def fuse(self, text_embeds: jax.Array, text_mask: jax.Array, image_tokens: jax.Array, *,
           train: bool = False) -> jax.Array:
    """Fusion encoder (`BertModel.fuse`): [B, L, D] text, [B, L] mask, [B, Ni, Dv] → [B, L, D]."""
    return self.bert.fuse(text_embeds, text_mask, image_tokens, train=train)

  def itm_logits(self, fused: jax.Array) -> jax.Array:
    return self.itm_head(fused[:, 0].astype(jnp.float32))

  def mlm_logits(self, fused: jax.Array) -> jax.Array:
    return self.bert.mlm_logits(fused)

  def mlm(self, ids: jax.Array, mask: jax.Array, image_embeds: jax.Array, *,
          train: bool = False, positions: jax.Array | None = None) -> jax.Array:
    """The full BERT on (masked) text with cross-attention to the continuous image tokens → logits
    [B, L, V], or [B, P, V] at positions [B, P] only (`take_positions`)."""
    hidden = self.fuse(self.bert.text(ids, mask, train=train), mask, image_embeds, train=train)
    return self.mlm_logits(hidden if positions is None else take_positions(hidden, positions))

  def __call__(self, images, ids, mask, *, train: bool = False):
    """Touches every parameter (used by `init`)."""
    img = self.encode_image(images, train=train)
    txt = self.encode_text(ids, mask, train=train)
    if self.config.use_dictionary:
      tokens, _ = self.dictionary_tokens(img["embeds"], update=False)
    else:
      tokens = img["embeds"]
    fused = self.fuse(txt["embeds"], mask, tokens, train=train)
    return self.itm_logits(fused), self.mlm_logits(fused), img["feat"], txt["feat"]
