"""Analytic matmul FLOP count of one NAS training step, as configured.

Why analytic: XLA's `compiled.cost_analysis()` under-counts (it reported 8-16 GFLOP/sample for a
ViT-B/16 step whose matmuls alone are 141). MFU here is per device:
`flops_per_sample * batch / step_time / devices / peak`, the peak that of the device kind
(`peak_tflops`), with the matmuls (dense layers, convolution, attention scores and mixing,
similarity products) counted and everything elementwise ignored.

Conventions (the usual ones for MFU; the PyTorch reference of issue 9 uses the same):
  * A product [M, K] x [K, N] is 2*M*K*N FLOPs.
  * Parts on the gradient path count 3x their forward (forward + backward for the input gradient
    + backward for the weight gradient); parts computed without gradient count 1x.
  * Attention counts the real token lengths (ViT 1 + N, text L), not the cuDNN padding.
  * Parts that run once per step (NVA's codebook-to-codebook distances) are divided by the batch.

Per sample, with ViT width Dv, depth Lv, MLP width Mv, T = 1 + N tokens (N = (res / p)^2);
BERT width D, FFN width I, text length L, F text layers and Lb - F fusion layers, vocab V;
ITC width E, queue Q, batch B (G device groups, b = B / G); VD size m, code width c = Dv:

  vit_layer      = 2 T (4 Dv^2 + 2 Dv Mv) + 4 T^2 Dv                 (qkv, proj, fc1, fc2; QK^T, AV)
  vit            = 2 N (3 p^2) Dv + Lv vit_layer                      (patch-embedding conv)
  text_layer(L)  = 2 L (4 D^2 + 2 D I) + 4 L^2 D
  fusion_layer   = text_layer(L) + 2 L D^2 (query, output) + 4 Ni Dv D (key, value of the
                   Ni = T image tokens) + 4 L Ni D (scores, mixing)
  mlm_head       = 2 P D^2 + 2 P D V                                  (transform, tied decoder;
                   P = L, or mlm.max_masked when it is smaller)
  itc_sims       = 2 * 2 E (B + Q)                                    (i2t and t2i rows)
  vd             = 2 N Dv c + 2 N c^2 + 2 N (2c)(2)   trained         (in_dense, out_dense, gate)
  vd_distances   = 2 N m c                            no grad
  nva_tokens     = 2 (2 N c^2) + 2 N (2c)(2)          trained         (out_dense on q_neg and q)
  nva_select     = 2 * 2 N Dv (cosines) + 2 m^2 c / B no grad

Step = momentum forward (ViT, text, MLM: text + fusion + head; 1x)
     + online (ViT, text, projections, VD, k ITM fusion passes, ITM head, MLM; 3x)
     + ITC similarities (online 3x, momentum-target 1x) + hard-negative sims + VD distances (1x).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from nas_jax import objectives

REFERENCE_GFLOP_PER_SAMPLE = 311.8   # the authors' PyTorch NAS step (issue 9), fwd + bwd
PEAK_TFLOPS = 989.0                  # H100 SXM dense bf16 data-sheet peak
# Dense bf16 data-sheet peak of one device, TFLOP/s, by a part of `jax.Device.device_kind` (first
# match wins: the PCIe / NVL variants before the SXM parts). Others (CPU, TPU): no MFU.
DEVICE_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
)


@dataclasses.dataclass(frozen=True)
class Part:
  """One counted computation: forward FLOPs per sample and how many times it runs (3 or 1)."""
  name: str
  forward: float
  factor: int

  @property
  def total(self) -> float:
    return self.forward * self.factor


@dataclasses.dataclass(frozen=True)
class FlopCount:
  parts: tuple[Part, ...]

  @property
  def per_sample(self) -> float:
    return sum(p.total for p in self.parts)

  def gflop_per_sample(self) -> float:
    return self.per_sample / 1e9

  def by_name(self) -> dict[str, float]:
    """name -> total FLOPs per sample (names may repeat across online / momentum: summed)."""
    out: dict[str, float] = {}
    for p in self.parts:
      out[p.name] = out.get(p.name, 0.0) + p.total
    return out

  def table(self) -> str:
    """Markdown table of the parts (GFLOP per sample)."""
    rows = ["| part | fwd GFLOP/sample | x | total GFLOP/sample |", "|---|---|---|---|"]
    for p in self.parts:
      rows.append(f"| {p.name} | {p.forward / 1e9:.3f} | {p.factor} | {p.total / 1e9:.3f} |")
    rows.append(f"| **step** | | | **{self.gflop_per_sample():.2f}** |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------- building blocks
def vit_forward(vit: ml_collections.ConfigDict) -> float:
  n = (vit.image_size // vit.patch_size) ** 2
  t, dv = 1 + n, vit.hidden_size
  layer = 2 * t * (4 * dv * dv + 2 * dv * vit.mlp_dim) + 4 * t * t * dv
  patch = 2 * n * (3 * vit.patch_size ** 2) * dv
  return patch + vit.num_layers * layer


def text_layer(bert: ml_collections.ConfigDict, length: int) -> float:
  d = bert.hidden_size
  return 2 * length * (4 * d * d + 2 * d * bert.intermediate_size) + 4 * length * length * d


def text_forward(bert: ml_collections.ConfigDict, length: int) -> float:
  return bert.fusion_layer * text_layer(bert, length)


def fusion_forward(bert: ml_collections.ConfigDict, length: int, image_tokens: int,
                   image_width: int) -> float:
  d = bert.hidden_size
  cross = 2 * length * d * d * 2 + 4 * image_tokens * image_width * d + 4 * length * image_tokens * d
  return (bert.num_layers - bert.fusion_layer) * (text_layer(bert, length) + cross)


def mlm_head_forward(bert: ml_collections.ConfigDict, length: int) -> float:
  d = bert.hidden_size
  return 2 * length * d * d + 2 * length * d * bert.vocab_size


# ------------------------------------------------------------------------------- the step
def step_flops(config: ml_collections.ConfigDict, batch_size: int | None = None,
               num_groups: int = 1) -> FlopCount:
  """Matmul FLOPs of `train_step.make_train_step(config, ...)` per sample (see module docstring).

  batch_size: global batch B (default config.data.batch_size); num_groups: device-local slices
  the ITM hard negatives are drawn in (the step's `num_groups`).
  """
  c = config
  vit, bert = c.model.vit, c.model.bert
  b = int(batch_size or c.data.batch_size)
  if b <= 0 or b % num_groups:
    raise ValueError(f"batch_size={b} must be a positive multiple of num_groups={num_groups}")
  length = c.data.max_text_len
  n = (vit.image_size // vit.patch_size) ** 2
  t, dv, d, e = 1 + n, vit.hidden_size, bert.hidden_size, c.model.embed_dim
  q = c.itc.queue_size
  use_vd, use_nva, mlm = c.model.use_dictionary, c.nva.enabled, c.mlm.enabled
  m, code = c.model.dictionary.size, dv

  proj = 2 * dv * e + 2 * d * e                     # vision_proj, text_proj
  image = vit_forward(vit)
  text = text_forward(bert, length)
  fusion = fusion_forward(bert, length, t, dv)
  # mlm.max_masked: the heads run on that many positions per text (train_step.mlm_head_rows).
  head_rows = objectives.resolve_max_masked(c.mlm.max_masked, length, c.mlm.prob) or length
  mlm_fwd = text + fusion + mlm_head_forward(bert, head_rows) if mlm else 0.0
  groups = 3 + int(use_nva) + int(c.itm.text_negatives)

  parts = [
      # Momentum model, no gradient.
      Part("momentum vit", image, 1),
      Part("momentum text", text, 1),
      Part("momentum projections", proj, 1),
  ]
  if mlm:
    parts.append(Part("momentum mlm (text + fusion + head)", mlm_fwd, 1))
  parts += [
      Part("vit", image, 3),
      Part("text", text, 3),
      Part("projections", proj, 3),
      Part("itc sims (online, incl. queue)", 2 * 2 * e * (b + q), 3),
      Part("itc sims (momentum targets, incl. queue)", 2 * 2 * e * (b + q), 1),
      Part("itm hard-negative sims", 2 * 2 * e * (b // num_groups), 1),
  ]
  if use_vd:
    gate = 2 * n * (2 * code) * 2 if c.model.dictionary.gate else 0
    in_proj = 2 * n * dv * code if c.model.dictionary.input_proj else 0
    parts += [Part("vd (in/out dense, gate)", in_proj + 2 * n * code * code + gate, 3),
              Part("vd distances", 2 * n * m * code, 1)]
  if use_nva:
    dense_passes = 2 if (c.model.dictionary.gate and c.model.dictionary.reuse_gate) else 1
    gate = 2 * n * (2 * code) * 2 if c.model.dictionary.gate else 0
    parts += [Part("nva negative tokens", dense_passes * 2 * n * code * code + gate, 3),
              Part("nva selection (cosines, code neighbours)", 2 * 2 * n * dv + 2 * m * m * code / b,
                   1)]
  if c.itm.text_negatives:
    parts.append(Part("text (hard-negative captions)", text, 3))
  parts += [Part(f"itm fusion ({groups} pair groups)", groups * fusion, 3),
            Part("itm head", groups * 2 * d * 2, 3)]
  if mlm:
    parts.append(Part("mlm (text + fusion + head)", mlm_fwd, 3))
  return FlopCount(tuple(parts))


def peak_tflops(device_kind: str) -> float | None:
  """Dense bf16 peak of one device of this kind ('NVIDIA H200' → 989), None if not known."""
  for part, peak in DEVICE_PEAK_TFLOPS:
    if part.lower() in device_kind.lower():
      return peak
  return None


def mfu(flops_per_sample: float, samples_per_second: float, peak_tflops: float = PEAK_TFLOPS,
        devices: int = 1) -> float:
  """Model FLOPs utilisation per device in [0, 1]: the whole run's rate over `devices` devices of
  `peak_tflops` each."""
  return flops_per_sample * samples_per_second / devices / (peak_tflops * 1e12)
