"""FP8 matmuls for the transformer layers' Dense layers (`model.fp8`; docs/PERF.md "FP8 switch").

`dense(features, fp8=..., ...)` is the one constructor of every Dense inside a ViT block or a BERT
text / fusion layer (q/k/v or fused qkv, attention output, MLP / FFN, cross-attention). With
`fp8=True` its matmul is `dot_general` below; with `fp8=False` it is a plain `nn.Dense`. Either way
the Dense has the same parameters ('kernel', 'bias', float32), so parameter trees, checkpoints,
conversions and the optimizer do not see the switch.

The scheme, per matmul y = x @ w (x [..., K], w [K, N]), with per-tensor *current* scaling (the
scale comes from the tensor itself, at every call; nothing is carried between steps):

  forward   x, w → float8_e4m3fn (3 mantissa bits, max 448), each scaled so its largest |entry|
            lands on 448; y = (x8 @ w8) · s_x · s_w in the compute dtype.
  backward  the output gradient g → float8_e5m2 (2 mantissa bits, more range), scaled the same way;
            dx = (g8 @ w8ᵀ) · s_g · s_w and dw = (x8ᵀ @ g8) · s_x · s_g, from the forward's x8, w8.

The operands of all three products are float8 arrays in the HLO, which XLA's GPU compiler lowers to
cuBLASLt FP8 gemms on Hopper (sm90); elsewhere (CPU) the product is computed from the same float8
values in higher precision, so the numbers are what FP8 rounding gives.

Why not `flax.linen.fp8_ops.Fp8DirectDotGeneralOp`: its scales come from amax *histories* (delayed
scaling) kept in a '_overwrite_with_gradient' variable collection (six arrays per Dense, 1,024-long
histories) that the train step would have to carry, update from the gradients and checkpoint;
applied without that collection it fails. Current scaling needs no state.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

E4M3 = jnp.float8_e4m3fn   # activations and weights
E5M2 = jnp.float8_e5m2     # gradients


def _quantize(x: jax.Array, fp8_dtype) -> tuple[jax.Array, jax.Array]:
  """x → (x / s as `fp8_dtype`, s), s = max|x| / the format's largest finite value (1 for an
  all-zero x), a float32 scalar."""
  fp8_max = float(jnp.finfo(fp8_dtype).max)
  amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
  scale = jnp.where(amax > 0, amax / fp8_max, 1.0)
  # The clip only guards against the division's rounding: e4m3fn has no infinity, so an overflowing
  # value would become NaN.
  scaled = jnp.clip(x.astype(jnp.float32) / scale, -fp8_max, fp8_max)
  return scaled.astype(fp8_dtype), scale


def _scaled_dot(a8: jax.Array, b8: jax.Array, scale: jax.Array, dimension_numbers,
                out_dtype) -> jax.Array:
  """(a8 · b8) · scale in out_dtype, the product taken directly on the float8 operands."""
  y = lax.dot_general(a8, b8, dimension_numbers, preferred_element_type=out_dtype)
  return y * scale.astype(out_dtype)


def _forward_dims(x: jax.Array):
  """x [..., K] @ w [K, N]: what nn.Dense passes to its dot_general."""
  return ((x.ndim - 1,), (0,)), ((), ())


@jax.custom_vjp
def _matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  return _matmul_fwd(x, w)[0]


def _matmul_fwd(x, w):
  x8, sx = _quantize(x, E4M3)
  w8, sw = _quantize(w, E4M3)
  y = _scaled_dot(x8, w8, sx * sw, _forward_dims(x), x.dtype)
  return y, (x8, sx, w8, sw)


def _matmul_bwd(residuals, g):
  x8, sx, w8, sw = residuals
  g8, sg = _quantize(g, E5M2)
  # dx [..., K] = g [..., N] · w [K, N] over N; dw [K, N] = x [..., K] · g [..., N] over the leading
  # (token) axes. Both come out in g's dtype, which is x's and w's (nn.Dense promotes both).
  dx = _scaled_dot(g8, w8, sg * sw, (((g.ndim - 1,), (1,)), ((), ())), g.dtype)
  leading = tuple(range(x8.ndim - 1))
  dw = _scaled_dot(x8, g8, sx * sg, ((leading, leading), ((), ())), g.dtype)
  return dx, dw


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers, precision=None,
                preferred_element_type=None) -> jax.Array:
  """`lax.dot_general` as nn.Dense calls it (inputs [..., K] times kernel [K, N]), in FP8.

  `precision` is ignored (FP8 has one); the result is in the inputs' dtype."""
  del precision
  if dimension_numbers != _forward_dims(lhs) or rhs.ndim != 2:
    raise ValueError(f"the FP8 dot_general supports nn.Dense's [..., K] x [K, N] only, got "
                     f"{lhs.shape} x {rhs.shape} with dimension_numbers={dimension_numbers}")
  if lhs.dtype != rhs.dtype:
    raise ValueError(f"the FP8 dot_general needs inputs and kernel in one dtype (nn.Dense promotes "
                     f"them), got {lhs.dtype} and {rhs.dtype}")
  y = _matmul(lhs, rhs)
  return y if preferred_element_type is None else y.astype(preferred_element_type)


def dense(features: int, *, fp8: bool, **kwargs: Any) -> nn.Dense:
  """nn.Dense(features, **kwargs) of a transformer layer; its matmul in FP8 when `fp8`."""
  return nn.Dense(features, dot_general=dot_general if fp8 else None, **kwargs)
