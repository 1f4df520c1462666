"""GELU as the checkpoints define it, with the tanh approximation as a speed switch.

DeiT/timm and BERT use the exact (erf) GELU. `'tanh'` is the approximation
0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))) (HF's `gelu_new`); it differs by < 1e-3 in absolute value.
It exists for speed only (docs/PERF.md): on GPUs, cuBLAS-Lt can fuse it into the preceding
matmul's epilogue, so the [tokens, 4·D] hidden layer is written once instead of twice.
"""

from __future__ import annotations

import flax.linen as nn
import jax

GELU_KINDS = ("exact", "tanh")


def gelu(x: jax.Array, kind: str = "exact") -> jax.Array:
  """GELU of `kind` ('exact' | 'tanh'; config keys model.vit.gelu and model.bert.gelu)."""
  if kind not in GELU_KINDS:
    raise ValueError(f"gelu kind {kind!r} is not one of {GELU_KINDS} "
                     "(config keys model.vit.gelu / model.bert.gelu)")
  return nn.gelu(x, approximate=kind == "tanh")
