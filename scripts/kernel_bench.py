r"""Kernel microbenchmark: which LayerNorm / attention / GELU implementation is fastest at OUR
shapes (stage 2, batch 64 per GPU), forward + backward, and is it numerically right.

  python3 scripts/kernel_bench.py [--only ln|attn|gelu] [--iters 50] [--reps 10] \
      [--json_out runs/kernels.jsonl] [--small] [--load_tokamax_on_cpu] [--tokamax_FLAG=VALUE]

Each cell is `jax.jit(jax.value_and_grad(loss, has_aux=True))` with
`loss = sum(f(inputs) · cotangent)` for a fixed random cotangent, gradients with respect to every
floating input, and the output returned as well (in the model it feeds the next gemm, so it is
written to memory there too). Compiled once (`compile s`), warmed up, then `--iters` samples of
`--reps` back-to-back calls with `block_until_ready` after the last: µs per call, median and
minimum. Back-to-back calls let the host's dispatch overlap the device's work; the "dispatch
floor" line (an empty jitted call timed the same way) says where a row stops measuring the kernel.

Compared (GPU rows say "n/a on cpu" on a CPU; tokamax rows need `tokamax` installed):

* LayerNorm over [64·258, 768] (ViT, eps 1e-6) and [256·26, 768] (fusion, eps 1e-12), float32 in
  and out as the models run it (their residual stream and LayerNorms are float32) and bfloat16 in
  and out (a bfloat16 residual stream): flax `nn.LayerNorm` (ours) vs `tokamax.layer_norm`
  'xla' and 'triton'. Rate: GB/s on the least traffic of separate forward and backward passes
  (read x, write y; read x and dy, write dx).
* Attention, bfloat16 [B, T, 12, 64]: ViT self-attention (64 × 258, the pad key masked by length),
  text/fusion self-attention (256 × 26, right-padded keys of random length), cross-attention
  (256 × 26 queries against 258 image keys, the pad masked). Ours
  (`nas_jax.models.attention.dot_product_attention`, i.e. `jax.nn.dot_product_attention` 'xla'
  and 'cudnn', called as the models call it) vs `tokamax.dot_product_attention` 'mosaic',
  'triton', 'cudnn', 'xla', 'xla_chunked' with `key_value_seq_lengths`. Rate: TFLOP/s on
  12·B·H·Tq·Tk·Dh (forward's two products, backward's four; padded lengths, no recomputation).
* GELU after the ViT's fc1, [16512, 768] × [768, 3072] + bias in bfloat16: no activation, exact
  GELU (ours) and tanh GELU, as XLA compiles them. Rate: TFLOP/s on the gemms' 6·M·K·N.

Numerics: every cell's output and gradients are compared with a float32 XLA reference computed
at 'highest' matmul precision; `err out` / `err grad` are max |impl − ref| / max |ref| (per array,
the largest over the gradients). The attention inputs put large keys and values at masked
positions, so a kernel that lets a masked key through is off by O(1), not by rounding. `check` is
MISMATCH when an error exceeds 2e-2 (bfloat16 rows) or 1e-3 (float32 rows), or is not finite. The
GELU rows are all XLA's and have no check.

A cell that fails to trace or compile says "unsupported: <reason>", one that fails while running
"error: <reason>"; either way the others go on. `--json_out` appends one JSON object per cell as
it finishes (then one "fastest" object per case). `vs ours` is our row's median over this row's
(> 1: faster than ours); ours is flax's LayerNorm, the exact GELU, and for attention cuDNN where
it runs (what the stage configs use on a GPU), else XLA. The fastest row that does not fail its
check is marked.

tokamax (0.0.17) imports `xprof.cli.tools` at the top of its benchmarking module, which this
script does not use; xprof is a 32 MB wheel with heavy dependencies, so where it is not installed
a stub module stands in for it (printed). tokamax's Triton LayerNorm goes through jax_triton
0.4.1, which reads `triton.backends.nvidia.driver.TMA_TF32` (Triton >= 3.7) and otherwise
disables its whole CUDA backend; on an older Triton the constant is set to Triton's own enum
value (printed). Both shims are for this measurement tool only. tokamax picks its kernels'
configurations by heuristics unless told otherwise: its own flags pass through (`=` form), e.g.
`--tokamax_autotuning_cache_miss_fallback=autotune` (slow: it times every candidate).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import statistics
import sys
import time
import types
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from nas_jax.models import attention as attention_lib  # noqa: E402 (the repository root first)
from nas_jax.models.activations import gelu  # noqa: E402

PARTS = ("ln", "attn", "gelu")
GPU_BACKENDS = ("gpu", "cuda", "rocm")
VIT_EPS, BERT_EPS = 1e-6, 1e-12  # config_lib: vit.layer_norm_eps, bert.layer_norm_eps
HEADS, HEAD_DIM = 12, 64
TOLERANCE = {"bfloat16": 2e-2, "float32": 1e-3}
TOKAMAX_LN = ("xla", "triton")
TOKAMAX_ATTN = ("mosaic", "triton", "cudnn", "xla", "xla_chunked")
TOKAMAX_GPU_ONLY = ("mosaic", "triton", "cudnn")
# Where each tokamax implementation lives: when one is not registered, importing it says why.
TOKAMAX_MODULES = {
    ("ln", "triton"): "tokamax._src.ops.normalization.triton",
    ("attn", "triton"): "tokamax._src.ops.attention.pallas_triton",
    ("attn", "mosaic"): "tokamax._src.ops.attention.pallas_mosaic_gpu",
}
TRITON_TMA_TF32 = 11  # Triton's TMA element-type enum value of tf32 (TMA_ELEMENT_TYPES::TMA_TF32).


@dataclasses.dataclass
class Case:
  """One shape of one part: its inputs, the work it does and its float32 reference.

  `args` are the function's inputs as host arrays, the first `num_diff` differentiated; the
  cotangent is passed last. `ref` computes the same function in float32 (None: no check)."""
  part: str
  name: str
  shape: str
  dtype: str
  args: tuple
  num_diff: int
  cotangent: np.ndarray
  work: float
  unit: str
  ref: Callable | None = None


@dataclasses.dataclass
class Impl:
  """One implementation to time on a case; `unavailable` is the reason it cannot run here."""
  name: str
  fn: Callable | None
  ours: bool = False
  unavailable: str | None = None


def one_line(err: BaseException, limit: int = 200) -> str:
  """`Type: first line of the message` of an exception (the first one inside a group)."""
  while isinstance(err, BaseExceptionGroup) and err.exceptions:
    err = err.exceptions[0]
  lines = [line.strip() for line in str(err).splitlines() if line.strip()]
  text = f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")
  return text if len(text) <= limit else text[:limit - 1] + "…"


def is_gpu(backend: str) -> bool:
  return backend in GPU_BACKENDS


# --------------------------------------------------------------------------------------------
# tokamax: optional, loaded only where it can run.


def stub_xprof() -> bool:
  """Puts an empty `xprof.cli.tools` into sys.modules when xprof is not installed (tokamax
  imports it at the top level for its own profiler timing, which is not used here)."""
  if importlib.util.find_spec("xprof") is not None:
    return False

  def unavailable(*args, **kwargs):
    raise RuntimeError("xprof is a stub here (scripts/kernel_bench.py)")

  for name in ("xprof", "xprof.cli", "xprof.cli.tools"):
    sys.modules[name] = types.ModuleType(name)
  sys.modules["xprof"].cli = sys.modules["xprof.cli"]
  sys.modules["xprof.cli"].tools = sys.modules["xprof.cli.tools"]
  sys.modules["xprof.cli.tools"].get_kernel_stats_tool = types.SimpleNamespace(
      compute_kernel_stats=unavailable)
  print("[kernel_bench] xprof not installed: a stub xprof.cli.tools stands in for it (tokamax "
        "imports it for profiler timing, unused here)")
  return True


def shim_triton_tma_tf32() -> bool:
  """Sets `triton.backends.nvidia.driver.TMA_TF32` where Triton predates it (< 3.7): jax_triton
  0.4.1 imports it and, failing, replaces its whole CUDA backend with stubs. It is only read for
  TMA tensor descriptors that round float32 to tf32."""
  try:
    driver = importlib.import_module("triton.backends.nvidia.driver")
  except Exception:  # No Triton, or no NVIDIA backend: nothing to mend.
    return False
  if hasattr(driver, "TMA_TF32"):
    return False
  driver.TMA_TF32 = TRITON_TMA_TF32
  version = getattr(sys.modules.get("triton"), "__version__", "?")
  print(f"[kernel_bench] triton {version} has no nvidia driver TMA_TF32 (jax_triton 0.4.1 needs "
        f"it): set to {TRITON_TMA_TF32}")
  return True


def load_tokamax(backend: str, on_cpu: bool) -> tuple[Any, str | None]:
  """(tokamax module, None), or (None, why not)."""
  if not is_gpu(backend) and not on_cpu:
    return None, f"n/a on {backend}"
  if importlib.util.find_spec("tokamax") is None:
    return None, "n/a: tokamax not installed"
  stub_xprof()
  if is_gpu(backend):
    shim_triton_tma_tf32()
  try:
    tokamax = importlib.import_module("tokamax")
  except Exception as e:
    return None, f"n/a: import tokamax failed: {one_line(e)}"
  print(f"[kernel_bench] tokamax {tokamax.__version__}")
  return tokamax, None


def tokamax_import_error(part: str, name: str) -> str:
  """Why tokamax did not register implementation `name` of `part` ('' if its module imports)."""
  module = TOKAMAX_MODULES.get((part, name))
  if module is None:
    return ""
  try:
    importlib.import_module(module)
  except Exception as e:
    return f" ({module.rsplit('.', 1)[-1]}: {one_line(e)})"
  return ""


def tokamax_impl(tokamax, why_not: str | None, part: str, name: str, backend: str,
                 build: Callable) -> Impl:
  """Impl 'tokamax <name>', or the reason it cannot run: not on this backend, not loaded, or
  not registered by tokamax (with its module's import error)."""
  label = f"tokamax {name}"
  if name in TOKAMAX_GPU_ONLY and not is_gpu(backend):
    return Impl(label, None, unavailable=f"n/a on {backend}")
  if tokamax is None:
    return Impl(label, None, unavailable=why_not)
  registry = importlib.import_module("tokamax._src.ops.normalization.api" if part == "ln"
                                     else "tokamax._src.ops.attention.api").IMPLEMENTATIONS
  registered = "mosaic_gpu" if name == "mosaic" else name
  if registered not in registry:
    return Impl(label, None, unavailable="unsupported: not registered in tokamax"
                + tokamax_import_error(part, name))
  return Impl(label, build(name))


# --------------------------------------------------------------------------------------------
# Timing and numerics.


def compile_cell(fn: Callable, num_diff: int, args: tuple, precision: str | None = None):
  """The compiled `value_and_grad` of sum(fn(*args) · cotangent), returning the output too."""

  def loss(*inputs):
    out = fn(*inputs[:-1])
    return jnp.sum(out.astype(jnp.float32) * inputs[-1]), out

  step = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(num_diff)), has_aux=True))
  if precision is None:
    return step.lower(*args).compile()
  with jax.default_matmul_precision(precision):
    return step.lower(*args).compile()


def time_calls(call: Callable, args: tuple, iters: int, reps: int, warmup: int) -> list[float]:
  """Seconds per call: `iters` samples of `reps` back-to-back calls, synchronised after each
  sample."""
  for _ in range(warmup):
    jax.block_until_ready(call(*args))
  samples = []
  for _ in range(iters):
    start = time.perf_counter()
    for _ in range(reps):
      out = call(*args)
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - start) / reps)
  return samples


def dispatch_floor(iters: int, reps: int, warmup: int) -> float:
  """µs per call of an empty jitted function, timed like the cells."""
  x = jnp.zeros((8,), jnp.float32)
  call = jax.jit(lambda a: a + 1).lower(x).compile()
  return 1e6 * statistics.median(time_calls(call, (x,), iters, reps, warmup))


def max_rel_error(got, want) -> float:
  """max |got − want| / max |want| over matching arrays (the largest of them; NaN if any is not
  finite), on the host."""
  worst = 0.0
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    scale = float(np.max(np.abs(w)))
    err = float(np.max(np.abs(g - w)))
    err = err / scale if scale > 0 else err
    if not math.isfinite(err):
      return math.nan
    worst = max(worst, err)
  return worst


def to_float32(args: tuple) -> tuple:
  """Host arrays: floating ones cast to float32, others as they are."""
  return tuple(a.astype(np.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a
               for a in args)


def compile_job(fn: Callable, num_diff: int, args: tuple, precision: str | None = None):
  """(compiled step or the exception that stopped it, seconds spent)."""
  start = time.perf_counter()
  try:
    compiled = compile_cell(fn, num_diff, args, precision)
  except Exception as e:
    compiled = e
  return compiled, time.perf_counter() - start


def compile_case(case: Case, impls: list[Impl], args: tuple,
                 ref_args: tuple | None) -> tuple[Any, list]:
  """compile_job results of the reference (None without one) and of every implementation (None
  where unavailable)."""
  jobs = [(impl.fn, case.num_diff, args) for impl in impls if not impl.unavailable]
  # A float32 case whose reference is one of its implementations (ours, for a matmul-free
  # function such as float32 LayerNorm) reuses that compilation.
  same = [i for i, impl in enumerate(impls) if impl.fn is case.ref and not impl.unavailable]
  if case.dtype == "float32" and same:
    ref_args = None
  if ref_args is not None:
    jobs.append((case.ref, case.num_diff, ref_args, "highest"))
  done = [compile_job(*job) for job in jobs]
  ref = done.pop() if ref_args is not None else None
  compiled = iter(done)
  jobs = [None if impl.unavailable else next(compiled) for impl in impls]
  if ref is None and case.ref is not None and same:
    ref = jobs[same[0]]
  return ref, jobs


def reference(ref_job, ref_args: tuple) -> tuple[Any, str | None]:
  """((out, grads) on the host, None), or (None, why the float32 reference failed)."""
  call, _ = ref_job
  if isinstance(call, Exception):
    return None, one_line(call)
  try:
    (_, out), grads = call(*ref_args)
    return jax.device_get((out, grads)), None
  except Exception as e:
    return None, one_line(e)


def run_cell(case: Case, impl: Impl, job, args: tuple, ref, opts: argparse.Namespace) -> dict:
  """Times one implementation on one case (`job`: its compile_job result) and checks it against
  the reference ((out, grads) on the host, or None)."""
  row = {"part": case.part, "case": case.name, "shape": case.shape, "dtype": case.dtype,
         "impl": impl.name, "ours": impl.ours, "status": "ok", "reason": None,
         "compile_s": None, "us_median": None, "us_min": None, "rate": None,
         "unit": case.unit, "err_out": None, "err_grad": None, "check": None}
  if impl.unavailable:
    return {**row, "status": "n/a" if impl.unavailable.startswith("n/a") else "unsupported",
            "reason": impl.unavailable}
  call, row["compile_s"] = job
  if isinstance(call, Exception):
    return {**row, "status": "unsupported", "reason": f"unsupported: {one_line(call)}"}
  try:
    (_, out), grads = jax.block_until_ready(call(*args))
    seconds = time_calls(call, args, opts.iters, opts.reps, opts.warmup)
  except Exception as e:
    return {**row, "status": "error", "reason": f"error: {one_line(e)}"}
  median = statistics.median(seconds)
  row.update(us_median=1e6 * median, us_min=1e6 * min(seconds),
             rate=case.work / median / (1e9 if case.unit == "GB/s" else 1e12))
  if ref is not None:
    ref_out, ref_grads = ref
    row["err_out"] = max_rel_error(out, ref_out)
    row["err_grad"] = max_rel_error(grads, ref_grads)
    tol = TOLERANCE[case.dtype]
    worst = max(row["err_out"], row["err_grad"])
    row["check"] = "ok" if math.isfinite(worst) and worst <= tol else "MISMATCH"
  return row


# --------------------------------------------------------------------------------------------
# The cases.


def _array(rng: np.random.Generator, shape, dtype, scale: float = 1.0,
           offset: float = 0.0) -> np.ndarray:
  """A host array of normal(offset, scale) values in `dtype` (converted on the host: no device
  op to compile)."""
  return (offset + scale * rng.standard_normal(shape, np.float32)).astype(dtype)


def layer_norm_cases(small: bool) -> list[tuple[str, int, int, float]]:
  """(name, rows, width, eps): the ViT's [64·258, 768] and the fusion's [256·26, 768] (`small`:
  a tiny ViT one; the fusion's is the same code with another eps)."""
  if small:
    return [("vit", 2 * 10, 32, VIT_EPS)]
  return [("vit", 64 * 258, 768, VIT_EPS), ("fusion", 256 * 26, 768, BERT_EPS)]


def flax_layer_norm(eps: float, dtype) -> Callable:
  """Our LayerNorm as the models build it: `nn.LayerNorm(epsilon, dtype)` (float32 there)."""
  module = nn.LayerNorm(epsilon=eps, dtype=dtype)
  return lambda x, scale, bias: module.apply({"params": {"scale": scale, "bias": bias}}, x)


def ln_impls(eps: float, dtype, tokamax, why_not, backend) -> list[Impl]:
  impls = [Impl("flax (ours)", flax_layer_norm(eps, dtype), ours=True)]
  for name in TOKAMAX_LN:
    build = lambda n: (lambda x, scale, bias: tokamax.layer_norm(
        x, scale, bias, epsilon=eps, implementation=n))
    impls.append(tokamax_impl(tokamax, why_not, "ln", name, backend, build))
  return impls


def ln_part(opts, tokamax, why_not, backend) -> list[tuple[Case, list[Impl]]]:
  rng = np.random.default_rng(0)
  out = []
  for name, rows, width, eps in layer_norm_cases(opts.small):
    for dtype in (jnp.float32, jnp.bfloat16):
      size = jnp.dtype(dtype).itemsize
      impls = ln_impls(eps, dtype, tokamax, why_not, backend)
      # float32 rows: ours is the reference itself (the same program; LayerNorm has no matmul).
      ref = impls[0].fn if dtype == jnp.float32 else flax_layer_norm(eps, jnp.float32)
      case = Case(
          part="ln", name=name, shape=f"[{rows}, {width}]", dtype=jnp.dtype(dtype).name,
          args=(_array(rng, (rows, width), dtype, 2.0, 0.5),  # x, scale, bias
                _array(rng, (width,), np.float32, 0.1, 1.0),
                _array(rng, (width,), np.float32, 0.1)),
          num_diff=3, cotangent=_array(rng, (rows, width), np.float32),
          work=rows * width * 5 * size, unit="GB/s", ref=ref)
      out.append((case, impls))
  return out


def attention_cases(small: bool) -> list[tuple[str, int, int, int, int, int, str]]:
  """(name, batch, queries, keys, longest valid key count, shortest, how the models mask).

  Lengths as the models pad them: the ViT's 257 tokens padded to 258 with the pad key masked by
  length; texts of 25 tokens padded to 26, right-padded to a random length in [13, 25], masked by
  key mask; cross-attention to 257 image tokens padded to 258, masked by key mask."""
  if small:
    return [("vit self", 2, 10, 10, 9, 9, "lengths"), ("text self", 4, 6, 6, 5, 3, "mask"),
            ("cross", 4, 6, 10, 9, 9, "mask")]
  return [("vit self", 64, 258, 258, 257, 257, "lengths"),
          ("text self", 256, 26, 26, 25, 13, "mask"),
          ("cross", 256, 26, 258, 257, 257, "mask")]


def ours_attention(implementation: str, masking: str) -> Callable:
  """`nas_jax.models.attention.dot_product_attention` as the models call it."""

  def fn(q, k, v, lengths, key_mask):
    if masking == "lengths":
      return attention_lib.dot_product_attention(q, k, v, key_lengths=lengths,
                                                 implementation=implementation)
    return attention_lib.dot_product_attention(q, k, v, key_mask=key_mask,
                                               implementation=implementation)

  return fn


def attn_impls(masking: str, tokamax, why_not, backend) -> list[Impl]:
  cudnn_ok = is_gpu(backend)
  impls = [Impl("jax.nn xla (ours)", ours_attention("xla", masking), ours=not cudnn_ok),
           Impl("jax.nn cudnn (ours)", ours_attention("cudnn", masking), ours=cudnn_ok,
                unavailable=None if cudnn_ok else f"n/a on {backend}")]
  for name in TOKAMAX_ATTN:
    build = lambda n: (lambda q, k, v, lengths, key_mask: tokamax.dot_product_attention(
        q, k, v, key_value_seq_lengths=lengths, implementation=n))
    impls.append(tokamax_impl(tokamax, why_not, "attn", name, backend, build))
  return impls


def attn_part(opts, tokamax, why_not, backend) -> list[tuple[Case, list[Impl]]]:
  rng = np.random.default_rng(1)
  heads, dim = (2, 8) if opts.small else (HEADS, HEAD_DIM)
  out = []
  for name, batch, tq, tk, longest, shortest, masking in attention_cases(opts.small):
    lengths = rng.integers(shortest, longest + 1, size=batch).astype(np.int32)
    valid = np.arange(tk)[None, :] < lengths[:, None]  # [B, Tk]
    # Masked keys get a large key (its logit would dominate) and a large value: a leak shows.
    poison = (~valid)[:, :, None, None]
    q = _array(rng, (batch, tq, heads, dim), jnp.bfloat16)
    k = np.where(poison, 4.0, _array(rng, (batch, tk, heads, dim), np.float32))
    v = np.where(poison, 30.0, _array(rng, (batch, tk, heads, dim), np.float32))
    case = Case(
        part="attn", name=name, shape=f"q [{batch}, {tq}, {heads}, {dim}], kv {tk}",
        dtype="bfloat16",
        args=(q, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), lengths, valid.astype(np.int32)),
        num_diff=3, cotangent=_array(rng, (batch, tq, heads, dim), np.float32),
        work=12.0 * batch * heads * tq * tk * dim, unit="TFLOP/s",
        ref=ours_attention("xla", "lengths"))
    out.append((case, attn_impls(masking, tokamax, why_not, backend)))
  return out


def dense_gelu(kind: str | None) -> Callable:
  """x @ w + b, then GELU of `kind` (None: no activation), in the inputs' dtype."""

  def fn(x, w, b):
    y = jnp.dot(x, w) + b
    return y if kind is None else gelu(y, kind)

  return fn


def gelu_part(opts, tokamax, why_not, backend) -> list[tuple[Case, list[Impl]]]:
  del tokamax, why_not, backend
  rng = np.random.default_rng(2)
  m, k, n = (64, 32, 128) if opts.small else (64 * 258, 768, 3072)
  args = (_array(rng, (m, k), jnp.bfloat16), _array(rng, (k, n), jnp.bfloat16, k ** -0.5),
          _array(rng, (n,), jnp.bfloat16, 0.1))
  cotangent = _array(rng, (m, n), np.float32)
  out = []
  for kind, label, ours in ((None, "gemm+bias, no activation", False),
                            ("exact", "gemm+bias+gelu exact (ours)", True),
                            ("tanh", "gemm+bias+gelu tanh", False)):
    # No numerics check: all three are XLA's, and tanh's distance to exact is by design.
    case = Case(part="gelu", name=f"fc1 {kind or 'none'}", shape=f"[{m}, {k}] × [{k}, {n}]",
                dtype="bfloat16", args=args, num_diff=3, cotangent=cotangent,
                work=6.0 * m * k * n, unit="TFLOP/s")
    out.append((case, [Impl(label, dense_gelu(kind), ours=ours)]))
  return out


PART_BUILDERS = {"ln": ln_part, "attn": attn_part, "gelu": gelu_part}


# --------------------------------------------------------------------------------------------
# Report.


def _fmt(value, spec: str) -> str:
  return "–" if value is None else format(value, spec)


def mark_fastest(rows: list[dict]) -> None:
  """Per (part, case group): `vs_ours` for every timed row and `fastest` on the quickest row
  whose numerics pass. GELU rows are one group (the activations are the alternatives)."""
  groups: dict[tuple, list[dict]] = {}
  for row in rows:
    key = (row["part"], "fc1" if row["part"] == "gelu" else row["case"], row["dtype"])
    groups.setdefault(key, []).append(row)
  for group in groups.values():
    timed = [r for r in group if r["us_median"] is not None]
    ours = next((r for r in timed if r["ours"]), None)
    for r in timed:
      r["vs_ours"] = ours["us_median"] / r["us_median"] if ours else None
    passing = [r for r in timed if r["check"] in ("ok", None)]
    if passing:
      min(passing, key=lambda r: r["us_median"])["fastest"] = True


def table(rows: list[dict]) -> str:
  """The markdown table of all cells."""
  head = ("| part | case | shape | dtype | implementation | compile s | µs median | µs min "
          "| rate | err out | err grad | check | vs ours | note |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    rate = "–" if r["rate"] is None else f"{r['rate']:.1f} {r['unit']}"
    name = f"**{r['impl']}**" if r.get("fastest") else r["impl"]
    vs = "–" if r.get("vs_ours") is None else f"{r['vs_ours']:.2f}×"
    note = r["reason"] or ("fastest" if r.get("fastest") else "")
    lines.append(
        f"| {r['part']} | {r['case']} | {r['shape']} | {r['dtype']} | {name} "
        f"| {_fmt(r['compile_s'], '.1f')} | {_fmt(r['us_median'], '.1f')} "
        f"| {_fmt(r['us_min'], '.1f')} | {rate} | {_fmt(r['err_out'], '.1e')} "
        f"| {_fmt(r['err_grad'], '.1e')} | {r['check'] or '–'} | {vs} | {note} |")
  return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only", choices=PARTS, help="run one part (default: all)")
  p.add_argument("--iters", type=int, default=50, help="timed samples per cell (median, min)")
  p.add_argument("--reps", type=int, default=10, help="back-to-back calls per sample")
  p.add_argument("--warmup", type=int, default=3, help="untimed calls after compiling")
  p.add_argument("--small", action="store_true", help="tiny shapes (a CPU smoke run)")
  p.add_argument("--json_out", help="append one JSON object per cell to this file")
  p.add_argument("--load_tokamax_on_cpu", action="store_true",
                 help="load tokamax on a CPU too (runs its 'xla' implementations: checks our "
                      "calls of its API)")
  opts, extra = p.parse_known_args(argv)
  # tokamax's own absl flags (e.g. --tokamax_autotuning_cache_miss_fallback=autotune) are let
  # through: tokamax reads them from sys.argv itself.
  unknown = [a for a in extra
             if not a.split("=", 1)[0].lstrip("-").startswith(("tokamax_", "notokamax_"))]
  if unknown:
    p.error(f"unrecognized arguments: {' '.join(unknown)}")
  return opts


def measure(opts: argparse.Namespace, tokamax, why_not: str | None, backend: str,
            rows: list[dict], record: Callable[[dict], None]) -> None:
  """Every cell of the selected parts, each row appended to `rows` and given to `record` as it
  is measured (an interruption keeps them)."""
  for part in ([opts.only] if opts.only else PARTS):
    for case, impls in PART_BUILDERS[part](opts, tokamax, why_not, backend):
      args = jax.device_put(case.args + (case.cotangent,))
      ref_args = None
      if case.ref is not None:
        ref_args = jax.device_put(to_float32(case.args) + (case.cotangent,))
      ref_job, jobs = compile_case(case, impls, args, ref_args)
      ref = None
      if ref_job is not None:
        ref, failed = reference(ref_job, ref_args)
        if failed:  # No check then; the timings still stand.
          print(f"[kernel_bench] {part} {case.name}: float32 reference failed: {failed}")
      for impl, job in zip(impls, jobs):
        row = run_cell(case, impl, job, args, ref, opts)
        rows.append(row)
        print(f"[kernel_bench] {part} {case.name} {case.dtype} {impl.name}: "
              f"{_fmt(row['us_median'], '.1f')} µs {row['check'] or ''} {row['reason'] or ''}",
              flush=True)
        record(row)


def main(argv: list[str] | None = None) -> list[dict]:
  opts = parse_args(argv)
  backend = jax.default_backend()
  device = jax.devices()[0].device_kind
  tokamax, why_not = load_tokamax(backend, opts.load_tokamax_on_cpu)
  meta = {"device": device, "backend": backend, "jax": jax.__version__,
          "tokamax": getattr(tokamax, "__version__", None), "iters": opts.iters,
          "reps": opts.reps, "small": opts.small}
  print(f"[kernel_bench] {device} ({backend}), jax {jax.__version__}, "
        f"{opts.iters} samples × {opts.reps} calls")
  floor = dispatch_floor(opts.iters, opts.reps, opts.warmup)
  print(f"[kernel_bench] dispatch floor: {floor:.1f} µs per call (an empty jitted call)")
  sink = open(opts.json_out, "a") if opts.json_out else None

  def record(row: dict) -> None:  # Written as measured: a crash later keeps what was measured.
    if sink:
      sink.write(json.dumps({**meta, **row}) + "\n")
      sink.flush()

  record({"part": "floor", "us_median": floor})
  rows = []
  try:
    measure(opts, tokamax, why_not, backend, rows, record)
  except KeyboardInterrupt:  # gpu_measure.sh's time cap (SIGINT): report what was measured.
    print("[kernel_bench] interrupted: the table has the cells measured so far")
  mark_fastest(rows)
  for row in rows:
    if row.get("fastest"):
      record({"part": "fastest", "of": row["part"], "case": row["case"], "dtype": row["dtype"],
              "impl": row["impl"], "us_median": row["us_median"], "vs_ours": row["vs_ours"]})
  if sink:
    sink.close()
  print()
  print(table(rows))
  return rows


if __name__ == "__main__":
  main()
