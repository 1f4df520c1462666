"""timm VisionTransformer (DeiT-B/16 architecture, reduced size) and ALBEF's position-embedding
interpolation, computed in PyTorch.

Input npz: images_small [B,3,S,S], images_large [B,3,L,L], dims [embed, depth, heads, patch, S, L],
pe_<name> arrays [1, 1+n*n, D] with new_<name> the target grid side.
Output npz: 'sd.<key>' the random state dict (DeiT-style, with a classifier head), out_small /
out_large the final-LayerNorm tokens of the model at S and at L px (pos_embed interpolated as ALBEF
does), pos_large the interpolated pos_embed, and interp_<name> for every pe_<name>.
"""

import functools
import sys

import numpy as np
import torch

from torch_refs.timm_import import import_timm


def albef_interpolate(pos_embed: torch.Tensor, new_size: int, extra: int = 1) -> torch.Tensor:
  """ALBEF models/vit.py interpolate_pos_embed: extra rows kept, grid resized bicubic."""
  dim = pos_embed.shape[-1]
  old = int((pos_embed.shape[-2] - extra) ** 0.5)
  if old == new_size:
    return pos_embed
  grid = pos_embed[:, extra:].reshape(-1, old, old, dim).permute(0, 3, 1, 2)
  grid = torch.nn.functional.interpolate(grid, size=(new_size, new_size), mode="bicubic",
                                         align_corners=False)
  grid = grid.permute(0, 2, 3, 1).flatten(1, 2)
  return torch.cat((pos_embed[:, :extra], grid), dim=1)


def main():
  inp = dict(np.load(sys.argv[1]))
  import_timm()
  from timm.models.vision_transformer import VisionTransformer

  embed, depth, heads, patch, small, large = (int(x) for x in inp["dims"])
  make = functools.partial(
      VisionTransformer, patch_size=patch, embed_dim=embed, depth=depth, num_heads=heads,
      mlp_ratio=4, qkv_bias=True, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6),
      num_classes=10, class_token=True, global_pool="token")
  torch.manual_seed(0)
  model = make(img_size=small).eval()
  with torch.no_grad():  # Random, non-trivial values everywhere (LayerNorms included).
    for name, p in model.named_parameters():
      if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
        p.copy_(1 + 0.2 * torch.randn_like(p))
      elif name in ("pos_embed", "cls_token"):
        p.copy_(0.5 * torch.randn_like(p))
      else:
        p.copy_(0.1 * torch.randn_like(p))
  sd = {k: v.detach().clone() for k, v in model.state_dict().items()}

  big = make(img_size=large).eval()
  sd_large = dict(sd)
  sd_large["pos_embed"] = albef_interpolate(sd["pos_embed"], large // patch)
  big.load_state_dict(sd_large)

  out = {f"sd.{k}": v.numpy() for k, v in sd.items()}
  with torch.no_grad():
    out["out_small"] = model.forward_features(torch.from_numpy(inp["images_small"])).numpy()
    out["out_large"] = big.forward_features(torch.from_numpy(inp["images_large"])).numpy()
  out["pos_large"] = sd_large["pos_embed"].numpy()
  for key in inp:
    if key.startswith("pe_"):
      name = key[3:]
      out[f"interp_{name}"] = albef_interpolate(torch.from_numpy(inp[key]),
                                                int(inp[f"new_{name}"])).numpy()
  np.savez(sys.argv[2], **out)


if __name__ == "__main__":
  main()
