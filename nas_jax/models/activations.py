"""GELU as the checkpoints define it, with the tanh approximation as a speed switch.

DeiT/timm and BERT use the exact (erf) GELU. `'tanh'` is the approximation

    gelu(x) = x · ½(1 + tanh(u)),   u = √(2/π)(x + 0.044715x³)                          (1)

(HF's `gelu_new`); it differs by < 1e-3 in absolute value. It exists for speed only
(docs/PERF.md): on GPUs, cuBLAS-Lt can fuse it into the preceding matmul's epilogue, so the
[tokens, 4·D] hidden layer is written once instead of twice.

XLA fuses (1) into the matmul only when every intermediate of (1) has one user. Under autodiff the
backward pass reuses tanh(u), so in a training step the forward GELU stayed a separate pass. The
tanh form therefore has its own backward, which keeps only x (the matmul's output, which cuBLAS-Lt
then writes beside the GELU as its "aux" output) and recomputes the derivative from it:

    gelu'(x) = ½(1 + t) + ½x(1 − t²)·√(2/π)(1 + 3·0.044715x²),   t = tanh(u)           (2)

The same function; the gradient equals autodiff's to rounding (tests/test_activations.py).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

GELU_KINDS = ("exact", "tanh")

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_CUBIC = 0.044715


@jax.custom_vjp
def gelu_tanh(x: jax.Array) -> jax.Array:
  """Eq. (1), as `jax.nn.gelu(x, approximate=True)` computes it (the form XLA's gemm rewriter
  recognises); gradient by eq. (2)."""
  return jax.nn.gelu(x, approximate=True)


def _gelu_tanh_forward(x):
  return gelu_tanh(x), x


def _gelu_tanh_backward(x, dy):
  # Written as √(2/π)·x·(1 + 0.044715x²), in float32: not the forward's expression, so XLA does
  # not merge this tanh with the forward's (which would give that one a second user, and the
  # matmul epilogue would no longer match).
  x32 = x.astype(jnp.float32)
  x_squared = x32 * x32
  t = jnp.tanh(_SQRT_2_OVER_PI * x32 * (1.0 + _CUBIC * x_squared))
  slope = 0.5 * (1.0 + t) + 0.5 * x32 * (1.0 - t * t) * (
      _SQRT_2_OVER_PI * (1.0 + 3.0 * _CUBIC * x_squared))
  return ((dy.astype(jnp.float32) * slope).astype(dy.dtype),)


gelu_tanh.defvjp(_gelu_tanh_forward, _gelu_tanh_backward)


def gelu(x: jax.Array, kind: str = "exact") -> jax.Array:
  """GELU of `kind` ('exact' | 'tanh'; config keys model.vit.gelu and model.bert.gelu)."""
  if kind not in GELU_KINDS:
    raise ValueError(f"gelu kind {kind!r} is not one of {GELU_KINDS} "
                     "(config keys model.vit.gelu / model.bert.gelu)")
  return gelu_tanh(x) if kind == "tanh" else nn.gelu(x, approximate=False)
