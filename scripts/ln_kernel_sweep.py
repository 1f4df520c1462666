"""The LayerNorm backward kernel's launch settings (models/layer_norm.py) against XLA's backward of
flax's nn.LayerNorm, at the ViT's [16512, 768] (bfloat16, float32) and the fusion's [6656, 768]:
backward only, µs per call (median of 20 samples of 10 back-to-back calls), GB/s on 3·N·D
elements (read x, dy; write dx) and the largest error against XLA's gradients.

  python3 scripts/ln_kernel_sweep.py          # on a GPU (docs/PERF.md)
  python3 scripts/ln_kernel_sweep.py small    # CPU smoke run: one tiny case, interpret mode
"""
import itertools
import os
import statistics
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from nas_jax.models import layer_norm as ln  # noqa: E402


def timeit(f, args, iters=20, reps=10):
  for _ in range(4):
    jax.block_until_ready(f(*args))
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    for _ in range(reps):
      out = f(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t) / reps * 1e6)
  return statistics.median(times)


def main(small: bool) -> None:
  cases = ([("t", 40, 96, jnp.float32, 1e-6)] if small else
           [("vit", 16512, 768, jnp.bfloat16, 1e-6), ("vit", 16512, 768, jnp.float32, 1e-6),
            ("fusion", 6656, 768, jnp.bfloat16, 1e-12)])
  grid = ([(8192, 512, None)] if small else
          list(itertools.product((4096, 8192, 16384), (264, 528, 1056), (None, 4))))
  for name, n, d, dtype, eps in cases:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, d), np.float32) * 2 + .5).astype(dtype)
    dy = jnp.asarray(rng.standard_normal((n, d), np.float32)).astype(dtype)
    scale, bias = jnp.asarray(1 + .1 * rng.standard_normal(d, np.float32)), jnp.zeros(d)
    module = nn.LayerNorm(epsilon=eps, dtype=dtype)

    @jax.jit
    def xla_backward(x, dy, scale, bias):
      apply = lambda x, s, b: module.apply({"params": {"scale": s, "bias": b}}, x)
      return jax.vjp(apply, x, scale, bias)[1](dy)

    want = xla_backward(x, dy, scale, bias)
    t_xla = timeit(xla_backward, (x, dy, scale, bias))
    nbytes = 3 * n * d * jnp.dtype(dtype).itemsize
    print(f"{name} [{n},{d}] {jnp.dtype(dtype).name}: XLA backward {t_xla:.1f} us "
          f"({nbytes / t_xla / 1e3:.0f} GB/s)", flush=True)
    best = None
    for elements, programs, warps in grid:
      label = f"block_elements={elements} max_programs={programs} warps={warps}"
      try:
        kernel = jax.jit(lambda x, dy, s, e=elements, p=programs, w=warps: ln.layer_norm_backward(
            x, dy, s, epsilon=eps, max_programs=p, block_elements=e, num_warps=w,
            interpret=small))
        got = kernel(x, dy, scale)
        err = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32)))
                        / float(jnp.max(jnp.abs(r.astype(jnp.float32)))))
                  for g, r in zip(got, want))
        t = timeit(kernel, (x, dy, scale))
        print(f"  {label}: {t:.1f} us ({nbytes / t / 1e3:.0f} GB/s) x{t_xla / t:.2f} "
              f"err {err:.1e}", flush=True)
        best = min(best or (t, label), (t, label))
      except Exception as e:  # pylint: disable=broad-except
        print(f"  {label}: FAILED {str(e).splitlines()[0][:200]}", flush=True)
    print(f"  best: {best}", flush=True)


if __name__ == "__main__":
  main(len(sys.argv) > 1 and sys.argv[1] == "small")
