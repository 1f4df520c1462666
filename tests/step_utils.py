"""Shared helpers for tests of the NAS step: a tiny config, a fixed synthetic batch, a built step."""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str = "demo.py", arg: str | None = "tiny"):
  spec = importlib.util.spec_from_file_location(f"cfg_{name[:-3]}", ROOT / "configs" / name)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


# The tiny demo as the whole-run tests train it (test_train_cli, test_reliability,
# test_scale_multiprocess): 6 steps, no evaluation, 8 fixed ITM groups. One config, so the runs
# share their compiled programs (the persistent compilation cache) and conftest's eight_device_run.
RUN_OVERRIDES = {"eval.enabled": False, "stage2_steps": 0, "total_steps": 6, "log_every": 1,
                 "checkpoint.every": 0, "itm.hard_negative_groups": 8,
                 "checkpoint.async_save": False}


def tiny_config(**overrides):
  """The demo's tiny config (32 px, 2+2 layers, width 64), with `a.b=value` style overrides."""
  c = load_config()
  c.unlock()
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  c.lock()
  return c


def fixed_batch(config, batch_size: int | None = None, seed: int = 0) -> dict:
  """One batch of the synthetic world, through the real tokenizer and normalisation."""
  from nas_jax.data import synthetic
  from nas_jax.data.text import load_tokenizer
  from nas_jax.data.transforms import normalize

  b = batch_size or config.data.batch_size
  src = synthetic.SyntheticSource(b, seed=seed, split="train", image_size=config.data.image_size)
  recs = [src[i] for i in range(b)]
  tok = load_tokenizer(config.data.vocab)
  ids, mask = tok([r["caption"] for r in recs], config.data.max_text_len)
  neg_ids, neg_mask = tok([r["neg_captions"][0] for r in recs], config.data.max_text_len)
  images = np.stack([normalize(r["image"]) for r in recs]).astype(np.float32)
  return {"image": images, "text_ids": ids, "text_mask": mask,
          "image_id": np.arange(b, dtype=np.int32),
          "neg_text_ids": neg_ids, "neg_text_mask": neg_mask}


def build(config, *, num_groups: int = 1, alpha_warmup_steps: int = 4, seed: int = 0,
          init: bool = True):
  """(model, tx, schedule, initial state, un-jitted step fn) for `config`; init=False: the
  state's jax.ShapeDtypeStructs instead (no initialisation to compile)."""
  from nas_jax import optim, train_step
  from nas_jax.data.text import load_tokenizer

  total = config.total_steps if config.total_steps > 0 else 100
  schedule = optim.learning_rate_schedule(config.optim.lr, config.optim.min_lr,
                                          config.optim.warmup_steps, total)
  built = train_step.setup(config, schedule,
                           token_ids=train_step.TokenIds.of(load_tokenizer(config.data.vocab)),
                           num_groups=num_groups, alpha_warmup_steps=alpha_warmup_steps)
  state = built.init(jax.random.PRNGKey(seed)) if init else built.abstract_state
  return built.model, built.tx, schedule, state, built.step


def assert_params_close(got, want, atol: float) -> None:
  """Leaf-by-leaf allclose of two parameter trees, except the attention *key* biases: softmax is
  invariant to them, so their gradient is pure rounding noise, which AdamW (a ~lr-sized step
  whatever the gradient's scale) turns into values that differ between reduction orders."""
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got)):
    name = jax.tree_util.keystr(path)
    a, b = np.asarray(a), np.asarray(b)
    if name.endswith("['key']['bias']"):
      continue
    if name.endswith("['qkv']['bias']"):   # [q | k | v]
      d = a.shape[-1] // 3
      keep = np.r_[0:d, 2 * d:3 * d]
      a, b = a[..., keep], b[..., keep]
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=atol, err_msg=name)


def assert_grads_close(got, want, rtol: float = 1e-5) -> None:
  """Two gradient trees of the same structure agree to `rtol` of the largest gradient (which must
  not vanish: a test of zero gradients proves nothing)."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(want))
  assert scale > 1e-3
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol,
                                                       atol=rtol * scale), got, want)


# The FP8 switch (model.fp8) against bfloat16 and float32: (compute dtype, fp8).
FP8_MODES = {"fp8": ("bfloat16", True), "bf16": ("bfloat16", False), "f32": ("float32", False)}


def relative_error(got, want) -> float:
  """‖got − want‖ / ‖want‖ over all leaves of two trees of the same structure, in float32."""
  pairs = list(zip(jax.tree.leaves(got), jax.tree.leaves(want)))
  num = sum(float(np.sum((np.asarray(a, np.float32) - np.asarray(b, np.float32)) ** 2))
            for a, b in pairs)
  return (num / sum(float(np.sum(np.asarray(b, np.float32) ** 2)) for _, b in pairs)) ** 0.5


def fp8_runs(apply, *args) -> dict:
  """{mode: (output, gradients of sum(tanh(output)) w.r.t. args)} for each of FP8_MODES, where
  `apply(dtype, fp8, *args)` runs the module; one compilation for the three."""
  import jax.numpy as jnp

  def run(mode):
    dtype, fp8 = FP8_MODES[mode]
    loss = lambda *a: (lambda out: (jnp.sum(jnp.tanh(out)), out))(apply(jnp.dtype(dtype), fp8, *a))
    (_, out), grads = jax.value_and_grad(loss, argnums=tuple(range(len(args))), has_aux=True)(*args)
    return out, grads

  return jax.jit(lambda *a: {mode: run(mode) for mode in FP8_MODES})(*args)


def assert_fp8_close(runs: dict) -> None:
  """FP8 (float8_e4m3fn operands: 3 mantissa bits, each entry rounded by up to 2^-4 of itself)
  moves a layer's output by well under 2^-4 RMS from bfloat16, and by more than 4× what bfloat16
  (8 bits, 5 more than e4m3: ~32× finer) moves it from float32: the switch really computes in FP8.
  Both errors are diluted alike by the residual stream, so the ratio holds for any init scale.
  Gradients (float8_e5m2 output gradients: 2 mantissa bits, up to 2^-3) are finite and within
  15 % RMS of bfloat16's (measured: 2 % for the parameters, 8 % for cross-attention's inputs)."""
  (out8, grads8), (out16, grads16), (out32, _) = (runs[m] for m in ("fp8", "bf16", "f32"))
  assert relative_error(out8, out16) < 2 ** -4
  assert relative_error(out8, out32) > 4 * relative_error(out16, out32)
  assert all(bool(np.all(np.isfinite(np.asarray(g)))) for g in jax.tree.leaves(grads8))
  for got, want in zip(grads8, grads16):   # per argument: parameters, inputs
    assert relative_error(got, want) < 0.15


def layer_stream_dtypes(run, layer_type) -> list[tuple[str, str]]:
  """Calls `run()` and records, for every call of a `layer_type` module, the dtype of the
  residual stream it received (its first argument) and the one it returned (the first element
  where it returns a scan body's (carry, output))."""
  import flax.linen as nn
  seen = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, layer_type) and context.method_name == "__call__":
      stream = out[0] if isinstance(out, tuple) else out
      seen.append((str(args[0].dtype), str(stream.dtype)))
    return out

  with nn.intercept_methods(record):
    run()
  return seen
