"""LayerNorm with a one-pass backward kernel (Pallas, Triton) for GPUs.

`LayerNorm` computes what flax's `nn.LayerNorm` computes, with the same parameters ('scale' [D],
'bias' [D], float32) and the same float32 statistics (the fast variance E[x²] − E[x]²):

    y = (x − μ) · rsqrt(σ² + ε) · scale + bias,   μ, σ² over the last axis        (1)

Its `implementation` says who differentiates it:

* `'xla'` (the default): XLA differentiates (1). On a GPU the backward becomes several passes
  over [N, D]: the row sums Σ g and Σ g·x̂ (g = dy · scale), the column sums for the scale and
  bias gradients, and dx, each of which reads x and dy again (docs/PERF.md).
* `'pallas'`: the same forward; the backward is `layer_norm_backward`, one kernel that reads x and
  dy once per row block, recomputes μ and σ² from x, and writes dx with the per-block partial
  column sums of dy · x̂ and dy (summed afterwards, a [P, D] → [D] reduction):

      x̂ = (x − μ) · r,  r = rsqrt(σ² + ε),  g = dy · scale
      dx = r · (g − mean(g) − x̂ · mean(g · x̂))                                      (2)
      dscale = Σ_rows dy · x̂,  dbias = Σ_rows dy

  On a GPU the kernel is Pallas-Triton; elsewhere (CPU, TPU) the same equations (2) run as XLA ops,
  and tests run the kernel in Pallas' interpret mode. Under a mesh (`jax.set_mesh`) the kernel runs
  once per batch shard (`jax.shard_map`, as XLA cannot partition a Pallas call) and the shards'
  dscale and dbias are summed.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nas_jax.sharding import batch_axes_of_mesh

IMPLEMENTATIONS = ("xla", "pallas")


def check_implementation(name: str) -> None:
  if name not in IMPLEMENTATIONS:
    raise ValueError(f"model.layer_norm={name!r} is not one of {IMPLEMENTATIONS}")


def _stats(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """float32 mean and fast variance max(E[x²] − E[x]², 0) over the last axis, [..., 1] each."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.maximum(jnp.mean(jnp.square(x), axis=-1, keepdims=True) - jnp.square(mean), 0.0)
  return mean, var


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, *, epsilon: float,
               dtype: Any) -> jax.Array:
  """Eq. (1) over the last axis of x [..., D], as flax's nn.LayerNorm computes it; output in
  `dtype`."""
  mean, var = _stats(x)
  y = (x - mean) * (jax.lax.rsqrt(var + epsilon) * scale)
  return (y + bias).astype(dtype)


def layer_norm_backward_reference(x: jax.Array, dy: jax.Array, scale: jax.Array, *,
                                  epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Eq. (2) as XLA ops: x, dy [N, D] → dx [N, D] (x's dtype), dscale, dbias [D] float32."""
  mean, var = _stats(x)
  r = jax.lax.rsqrt(var + epsilon)
  xhat = (x.astype(jnp.float32) - mean) * r
  dy = dy.astype(jnp.float32)
  g = dy * scale.astype(jnp.float32)
  dx = r * (g - jnp.mean(g, -1, keepdims=True) - xhat * jnp.mean(g * xhat, -1, keepdims=True))
  return dx.astype(x.dtype), jnp.sum(dy * xhat, 0), jnp.sum(dy, 0)


def _next_power_of_2(n: int) -> int:
  return 1 << (n - 1).bit_length()


def _backward_kernel(x_ref, dy_ref, scale_ref, dx_ref, dscale_ref, dbias_ref, *, epsilon: float,
                     block_rows: int, blocks_per_program: int):
  """One program: `blocks_per_program` blocks of `block_rows` rows, all D columns (padded to a
  power of two and masked, as Triton's tensors need). Writes dx for its rows and its partial
  column sums (row `program_id` of dscale_ref / dbias_ref, [P, D])."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  n_rows, n_cols = x_ref.shape
  program = pl.program_id(0)
  cols = jnp.arange(_next_power_of_2(n_cols))
  col_mask = cols < n_cols
  scale = plgpu.load(scale_ref.at[cols], mask=col_mask, other=0.0).astype(jnp.float32)

  def block(i, sums):
    dscale, dbias = sums
    rows = (program * blocks_per_program + i) * block_rows + jnp.arange(block_rows)
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    at = (rows[:, None], cols[None, :])
    x = plgpu.load(x_ref.at[at], mask=mask, other=0.0).astype(jnp.float32)
    dy = plgpu.load(dy_ref.at[at], mask=mask, other=0.0).astype(jnp.float32)
    mean = jnp.sum(x, axis=1, keepdims=True) / n_cols
    var = jnp.maximum(jnp.sum(x * x, axis=1, keepdims=True) / n_cols - mean * mean, 0.0)
    r = jax.lax.rsqrt(var + epsilon)
    xhat = jnp.where(mask, (x - mean) * r, 0.0)
    g = dy * scale[None, :]
    mean_g = jnp.sum(g, axis=1, keepdims=True) / n_cols
    mean_gx = jnp.sum(g * xhat, axis=1, keepdims=True) / n_cols
    dx = r * (g - mean_g - xhat * mean_gx)
    plgpu.store(dx_ref.at[at], dx.astype(dx_ref.dtype), mask=mask)
    return dscale + jnp.sum(dy * xhat, axis=0), dbias + jnp.sum(dy, axis=0)

  zeros = jnp.zeros(cols.shape, jnp.float32)
  dscale, dbias = jax.lax.fori_loop(0, blocks_per_program, block, (zeros, zeros))
  out = (program, cols)
  plgpu.store(dscale_ref.at[out], dscale, mask=col_mask)
  plgpu.store(dbias_ref.at[out], dbias, mask=col_mask)


def layer_norm_backward(x: jax.Array, dy: jax.Array, scale: jax.Array, *, epsilon: float,
                        interpret: bool = False, max_programs: int = 512,
                        block_elements: int = 8192, num_warps: int | None = None
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Eq. (2) in one Pallas-Triton kernel: x, dy [N, D] → dx [N, D] (x's dtype), dscale, dbias [D]
  float32. Blocks of rows with ≤ `block_elements` padded elements each; at most `max_programs`
  programs, so the partial sums [P, D] stay small beside x. `interpret`: Pallas' interpreter
  (CPU tests)."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
  n_rows, n_cols = x.shape
  padded = _next_power_of_2(n_cols)
  block_rows = max(1, min(block_elements // padded, _next_power_of_2(n_rows)))
  blocks = -(-n_rows // block_rows)
  blocks_per_program = -(-blocks // max_programs)
  programs = -(-blocks // blocks_per_program)
  num_warps = num_warps or min(8, max(1, block_rows * padded // 1024))
  kernel = functools.partial(_backward_kernel, epsilon=epsilon, block_rows=block_rows,
                             blocks_per_program=blocks_per_program)
  partial = jax.ShapeDtypeStruct((programs, n_cols), jnp.float32)
  dx, dscale, dbias = pl.pallas_call(
      kernel, grid=(programs,),
      out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype), partial, partial),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps),
      interpret=interpret, name="layer_norm_backward")(x, dy, scale)
  return dx, jnp.sum(dscale, axis=0), jnp.sum(dbias, axis=0)


def backward_mode() -> str:
  """How `layer_norm_fused_backward` differentiates: 'triton' (the kernel) on an NVIDIA GPU, else
  'xla' (eq. 2 as XLA ops). Tests set 'interpret' (the kernel in Pallas' interpreter)."""
  return "triton" if jax.default_backend() in ("gpu", "cuda") else "xla"


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm_fused_backward(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                              dtype: Any) -> jax.Array:
  """Eq. (1) over the last axis of x [..., D], whose gradient is eq. (2): one kernel
  (`layer_norm_backward`) on a GPU, XLA ops elsewhere (`backward_mode`)."""
  return layer_norm(x, scale, bias, epsilon=epsilon, dtype=dtype)


def _fused_forward(x, scale, bias, epsilon, dtype):
  return layer_norm(x, scale, bias, epsilon=epsilon, dtype=dtype), (x, scale)


def _fused_backward(epsilon, dtype, residuals, dy):
  del dtype
  x, scale = residuals
  mode = backward_mode()

  def rows(x, dy, scale):  # x, dy [..., D] → dx [..., D], dscale, dbias [D].
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, x.shape[-1])
    if mode == "xla":
      dx, dscale, dbias = layer_norm_backward_reference(x2, dy2, scale, epsilon=epsilon)
    else:
      dx, dscale, dbias = layer_norm_backward(x2, dy2, scale, epsilon=epsilon,
                                              interpret=mode == "interpret")
    return dx.reshape(x.shape), dscale, dbias

  axes = batch_axes_of_mesh(x.shape[0]) if x.ndim > 1 and mode != "xla" else ()
  if axes:  # XLA cannot partition a Pallas call: one call per batch shard, sums over shards.
    def shard(x, dy, scale):
      dx, dscale, dbias = rows(x, dy, scale)
      return dx, jax.lax.psum(dscale, axes), jax.lax.psum(dbias, axes)

    batch, whole = jax.sharding.PartitionSpec(axes), jax.sharding.PartitionSpec()
    dx, dscale, dbias = jax.shard_map(
        shard, in_specs=(batch, batch, whole), out_specs=(batch, whole, whole),
        check_vma=False)(x, dy, scale)
  else:
    dx, dscale, dbias = rows(x, dy, scale)
  return dx, dscale.astype(scale.dtype), dbias.astype(scale.dtype)


layer_norm_fused_backward.defvjp(_fused_forward, _fused_backward)


class LayerNorm(nn.Module):
  """flax's `nn.LayerNorm` over the last axis (eq. 1; parameters 'scale', 'bias' [D] float32),
  with its backward from XLA ('xla') or from one kernel ('pallas', eq. 2).

  Attributes:
    epsilon: added to the variance.
    dtype: the output's dtype (statistics are float32 whatever it is).
    implementation: 'xla' | 'pallas' (`model.layer_norm`).
  """
  epsilon: float = 1e-6
  dtype: Any = jnp.float32
  implementation: str = "xla"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    check_implementation(self.implementation)
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    if self.implementation == "pallas":
      return layer_norm_fused_backward(x, scale, bias, self.epsilon, np.dtype(self.dtype))
    return layer_norm(x, scale, bias, epsilon=self.epsilon, dtype=self.dtype)
