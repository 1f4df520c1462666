"""Random state dicts with the key names and shapes PyTorch checkpoints have: timm / DeiT ViT,
Hugging Face BERT (`bert.` prefix + MLM head), and salesforce/ALBEF's `model_pretrain` /
`model_retrieval`, sized by a nas_jax model config (Linear weights [out, in], as torch stores them).
"""

from __future__ import annotations

import numpy as np


class StateDictMaker:
  """Fills `self.sd` with N(0, 1) float32 tensors (the tied MLM decoder copies its source)."""

  def __init__(self, model_config, seed: int = 0):
    self.m = model_config
    self.rng = np.random.default_rng(seed)
    self.sd: dict[str, np.ndarray] = {}

  def t(self, key: str, *shape: int) -> None:
    self.sd[key] = self.rng.normal(size=shape).astype(np.float32)

  def linear(self, prefix: str, n_in: int, n_out: int) -> None:
    self.t(prefix + "weight", n_out, n_in)
    self.t(prefix + "bias", n_out)

  def norm(self, prefix: str, n: int, names=("weight", "bias")) -> None:
    self.t(prefix + names[0], n)
    self.t(prefix + names[1], n)

  def vit(self, p: str = "", image_size: int | None = None, extra: int = 1) -> None:
    """timm VisionTransformer keys (DeiT; `extra=2` adds the distillation token's position row)."""
    v = self.m.vit
    d, patch = v.hidden_size, v.patch_size
    grid = (image_size or v.image_size) // patch
    self.t(p + "cls_token", 1, 1, d)
    self.t(p + "pos_embed", 1, extra + grid * grid, d)
    self.t(p + "patch_embed.proj.weight", d, 3, patch, patch)
    self.t(p + "patch_embed.proj.bias", d)
    for i in range(v.num_layers):
      b = f"{p}blocks.{i}."
      self.norm(b + "norm1.", d)
      self.linear(b + "attn.qkv.", d, 3 * d)
      self.linear(b + "attn.proj.", d, d)
      self.norm(b + "norm2.", d)
      self.linear(b + "mlp.fc1.", d, v.mlp_dim)
      self.linear(b + "mlp.fc2.", v.mlp_dim, d)
    self.norm(p + "norm.", d)

  def deit(self, image_size: int = 224) -> dict[str, np.ndarray]:
    """A DeiT / timm classifier checkpoint at `image_size` (its 1000-class head included)."""
    self.vit("", image_size)
    self.linear("head.", self.m.vit.hidden_size, 1000)
    return self.sd

  def attention(self, p: str, kv_width: int, ln_names=("weight", "bias")) -> None:
    dt = self.m.bert.hidden_size
    self.linear(p + "self.query.", dt, dt)
    self.linear(p + "self.key.", kv_width, dt)
    self.linear(p + "self.value.", kv_width, dt)
    self.linear(p + "output.dense.", dt, dt)
    self.norm(p + "output.LayerNorm.", dt, ln_names)

  def bert(self, p: str, cross: bool = True, ln_names=("weight", "bias")) -> None:
    b = self.m.bert
    dt, e = b.hidden_size, p + "embeddings."
    self.sd[e + "position_ids"] = np.arange(b.max_position_embeddings, dtype=np.int64)[None]
    self.t(e + "word_embeddings.weight", b.vocab_size, dt)
    self.t(e + "position_embeddings.weight", b.max_position_embeddings, dt)
    self.t(e + "token_type_embeddings.weight", b.type_vocab_size, dt)
    self.norm(e + "LayerNorm.", dt, ln_names)
    for i in range(b.num_layers):
      l = f"{p}encoder.layer.{i}."
      self.attention(l + "attention.", dt, ln_names)
      if cross and i >= b.fusion_layer:
        self.attention(l + "crossattention.", self.m.vit.hidden_size, ln_names)
      self.linear(l + "intermediate.dense.", dt, b.intermediate_size)
      self.linear(l + "output.dense.", b.intermediate_size, dt)
      self.norm(l + "output.LayerNorm.", dt, ln_names)

  def mlm_head(self, p: str, word_key: str, ln_names=("weight", "bias")) -> None:
    b, c = self.m.bert, p + "predictions."
    self.t(c + "bias", b.vocab_size)
    self.linear(c + "transform.dense.", b.hidden_size, b.hidden_size)
    self.norm(c + "transform.LayerNorm.", b.hidden_size, ln_names)
    self.sd[c + "decoder.weight"] = self.sd[word_key].copy()   # Tied.
    self.sd[c + "decoder.bias"] = self.sd[c + "bias"].copy()

  def hf_bert(self) -> dict[str, np.ndarray]:
    """bert-base-uncased's `BertForPreTraining` layout: `bert.*` without cross-attention, the MLM
    head `cls.predictions.*` and the next-sentence head."""
    self.bert("bert.", cross=False)
    self.linear("bert.pooler.dense.", self.m.bert.hidden_size, self.m.bert.hidden_size)
    self.mlm_head("cls.", "bert.embeddings.word_embeddings.weight")
    self.linear("cls.seq_relationship.", self.m.bert.hidden_size, 2)
    return self.sd

  def albef(self, kind: str = "pretrain", queue_size: int = 12,
            image_size: int | None = None) -> dict[str, np.ndarray]:
    """Every key of salesforce/ALBEF's model_pretrain (`kind='pretrain'`) or model_retrieval
    state dict: online and momentum encoders, projections, ITM head, temperature, queues."""
    e, dv, dt = self.m.embed_dim, self.m.vit.hidden_size, self.m.bert.hidden_size
    for tag in ("", "_m"):
      self.vit(f"visual_encoder{tag}.", image_size)
      if kind == "pretrain":   # text_encoder = BertForMaskedLM (no pooler)
        self.bert(f"text_encoder{tag}.bert.")
        self.mlm_head(f"text_encoder{tag}.cls.",
                      f"text_encoder{tag}.bert.embeddings.word_embeddings.weight")
      else:                    # text_encoder = BertModel(add_pooling_layer=False)
        self.bert(f"text_encoder{tag}.")
      self.linear(f"vision_proj{tag}.", dv, e)
      self.linear(f"text_proj{tag}.", dt, e)
    self.linear("itm_head.", dt, 2)
    self.sd["temp"] = np.array(0.07, np.float32)
    for name in ("image_queue", "text_queue"):
      q = self.rng.normal(size=(e, queue_size)).astype(np.float32)
      self.sd[name] = q / np.linalg.norm(q, axis=0, keepdims=True)
    self.sd["queue_ptr"] = np.array([4], np.int64)
    if kind == "retrieval":
      self.sd["idx_queue"] = np.arange(queue_size, dtype=np.int64)[None] - 100
    return self.sd
