"""The NAS authors' visual-dictionary head, re-implemented in PyTorch from a reading of their code
(github Gavin001201/NAS_ALBEF at 3b80cef: models/sohonecks.py `SimpleVDforPreGate`, its codebook
models/soho_pre_vd.py `SOHO_Pre_VD`). Written for this test, not copied; the parameter and buffer
names are theirs, so the state dict has their keys (prefix 'neck.' in their model).

Forward (no codebook update: their code from c8a6aa0 on never updates it):
  f = ReLU(LayerNorm(Linear(v)))                         linear.0 / linear.1 / linear.2
  code = argmin_j ||f - e_j||^2,  q = f + sg(e_code - f)   vq.embed
  candidates: the 2nd..4th nearest codes of f, p = softmax(1 / (l2-normalised distances + 1e-4))
  e = pos_line(q);  w = softmax(ReLU(LayerNorm(Linear([e; f]))))   gate_fc.0 / gate_fc.1 / gate_fc.2
  tokens = ln(w_0 e + w_1 f + sine_2d)
NVA negative as their HEAD builds it (2857ee8 and later), given one chosen patch per image: every
patch whose code equals the chosen patch's code takes the code drawn (by `torch.multinomial`, one
draw per patch) for the chosen patch; replaced patches become ln(pos_line(f + sg(e_new - f)) + pos)
without the gate; the others keep the positive's token.

Input npz: feats [B, N, C_in] patch features (N a square), chosen [B] int patch index, dims
[C_in, C, m], seed [1]. Output npz: 'sd.<key>' the random state dict; f, code [B, N], q, e, gate
[B, N, 2], pos [N, C], tokens; cand_idx / cand_prob [B*N, 3] of the patches and book_idx /
book_prob [m, 3] with the codebook rows as inputs; neg_code [B, N], replaced [B, N], neg_head
(their HEAD's negative tokens), neg_gated / neg_regated (the replaced patches mixed with f by the
positive's gate weights / by weights recomputed on [pos_line(e_new); f], the rest as the positive).
"""

import math
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

K = 3  # replacement candidates per patch


class CodebookRef(nn.Module):
  """SOHO_Pre_VD's state (buffers embed, cluster_size, cluster_sum, embed_avg) and lookup."""

  def __init__(self, size: int, width: int):
    super().__init__()
    self.register_buffer("embed", torch.randn(size, width))
    self.register_buffer("cluster_size", torch.zeros(size))
    self.register_buffer("cluster_sum", torch.zeros(size))
    self.register_buffer("embed_avg", torch.zeros(size, width))

  def squared_distances(self, x: torch.Tensor) -> torch.Tensor:
    book = self.embed
    return (x.pow(2).sum(-1, keepdim=True) + book.pow(2).sum(-1)[None, :]
            - 2.0 * torch.matmul(x, book.t()))

  def forward(self, x: torch.Tensor):
    """x [P, C] -> straight-through q [P, C], code [P], candidate probabilities and ids [P, K]."""
    dist = self.squared_distances(x)
    code = torch.argmin(dist, dim=-1)
    nearest = self.embed.index_select(0, code)
    q = x + (nearest - x).detach()
    near_dist, near_idx = torch.topk(dist, K + 1, dim=-1, largest=False)
    scaled = F.normalize(near_dist[:, 1:], dim=-1)
    prob = torch.softmax(1.0 / (scaled + 1e-4), dim=-1)
    return q, code, prob, near_idx[:, 1:]


class GatedVDRef(nn.Module):
  """SimpleVDforPreGate's submodules (linear, ln, vq, gate_fc, pos_line) and forward."""

  def __init__(self, in_width: int, width: int, size: int):
    super().__init__()
    self.width = width
    self.linear = nn.Sequential(nn.Linear(in_width, width), nn.LayerNorm(width), nn.ReLU())
    self.ln = nn.LayerNorm(width)
    self.vq = CodebookRef(size, width)
    self.gate_fc = nn.Sequential(nn.Linear(2 * width, 2), nn.LayerNorm(2), nn.ReLU())
    self.pos_line = nn.Linear(width, width)

  def sine_2d(self, h: int, w: int) -> torch.Tensor:
    """[h*w, C]: rows then columns, each C/2 channels sin/cos interleaved, positions (i+1)/n*2pi."""
    half = self.width // 2
    periods = torch.tensor([10000.0 ** (2 * (j // 2) / half) for j in range(half)])

    def encode(n):
      angle = (torch.arange(1, n + 1, dtype=torch.float32) / (n + 1e-6) * 2 * math.pi)[:, None]
      angle = angle / periods[None, :]
      out = torch.empty(n, half)
      out[:, 0::2] = torch.sin(angle[:, 0::2])
      out[:, 1::2] = torch.cos(angle[:, 1::2])
      return out

    rows = encode(h)[:, None, :].expand(h, w, half)
    cols = encode(w)[None, :, :].expand(h, w, half)
    return torch.cat([rows, cols], dim=-1).reshape(h * w, self.width)

  def gate(self, e, f):
    return torch.softmax(self.gate_fc(torch.cat([e, f], dim=-1)), dim=-1)

  def forward(self, patches: torch.Tensor, chosen: torch.Tensor, generator: torch.Generator):
    b, n, _ = patches.shape
    side = math.isqrt(n)
    f = self.linear(patches)
    flat = f.reshape(b * n, self.width)
    q, code, prob, cand = self.vq(flat)
    e = self.pos_line(q).reshape(b, n, self.width)
    w = self.gate(e, f)
    mixed = w[..., :1] * e + w[..., 1:] * f
    pos = self.sine_2d(side, side)
    out = dict(f=f, code=code.reshape(b, n), q=q.reshape(b, n, self.width), e=e, gate=w, pos=pos,
               tokens=self.ln(mixed + pos), cand_idx=cand, cand_prob=prob)
    _, _, out["book_prob"], out["book_idx"] = self.vq(self.vq.embed)

    # NVA negative, their HEAD: one draw per patch, the chosen patch's draw is used.
    code = code.reshape(b, n)
    draw = torch.multinomial(prob, 1, generator=generator).reshape(b, n)
    drawn = cand.reshape(b, n, K).gather(2, draw[..., None])[..., 0]
    rows = torch.arange(b)
    replaced = code == code[rows, chosen][:, None]
    neg_code = torch.where(replaced, drawn[rows, chosen][:, None], code)
    book = self.vq.embed.index_select(0, neg_code.reshape(-1))
    e_new = self.pos_line(flat + (book - flat).detach()).reshape(b, n, self.width)
    keep = ~replaced[..., None]
    out.update(neg_code=neg_code, replaced=replaced,
               neg_head=self.ln(torch.where(keep, mixed, e_new) + pos))
    w_new = self.gate(e_new, f)
    for name, weights in (("neg_gated", w), ("neg_regated", w_new)):
      swapped = weights[..., :1] * e_new + weights[..., 1:] * f
      out[name] = self.ln(torch.where(keep, mixed, swapped) + pos)
    return out


def main():
  inp = dict(np.load(sys.argv[1]))
  in_width, width, size = (int(x) for x in inp["dims"])
  torch.manual_seed(int(inp["seed"][0]))
  model = GatedVDRef(in_width, width, size).eval()
  feats = torch.from_numpy(inp["feats"])
  with torch.no_grad():  # Random, non-trivial weights everywhere (LayerNorms included).
    for name, p in model.named_parameters():
      is_norm = name.startswith(("linear.1.", "ln.", "gate_fc.1."))
      p.copy_((1 + 0.2 * torch.randn_like(p)) if is_norm and name.endswith("weight")
              else 0.3 * torch.randn_like(p))
    # Codebook: half near this batch's features (so many codes are used), half random.
    f = model.linear(feats).reshape(-1, width)
    pick = torch.randperm(f.shape[0])[: size // 2]
    model.vq.embed[: size // 2] = f[pick] + 0.05 * torch.randn(size // 2, width)
    model.vq.embed[size // 2:] = 0.5 * torch.randn(size - size // 2, width)
    model.vq.cluster_size.copy_(torch.rand(size))
    model.vq.embed_avg.copy_(torch.randn(size, width))
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():
    out = model(feats, torch.from_numpy(inp["chosen"]).long(), generator)
  result = {f"sd.{k}": v.numpy() for k, v in model.state_dict().items()}
  result.update({k: v.numpy() for k, v in out.items()})
  np.savez(sys.argv[2], **result)


if __name__ == "__main__":
  main()
