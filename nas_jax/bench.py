r"""Speed of the full NAS training step: `python -m nas_jax.bench --config configs/X.py [...]`.

  python -m nas_jax.bench --config configs/stage2.py --batch 64 --steps 25 --warmup 3
  python -m nas_jax.bench --config configs/stage2.py --config.model.attention=cudnn \
      --batch 64 --stage 1 --json_out runs/bench.jsonl --profile_dir runs/prof
  python -m nas_jax.bench --config configs/demo.py:tiny --batch 16 --steps 3    # CPU smoke test

Random weights, the whole jitted step (momentum update, both forwards, NVA, losses, backward,
AdamW, VD update, enqueue) with the state donated, on a synthetic batch generated on the device (no
input pipeline, no host transfer). After `--warmup` steps, `--steps` steps are timed one by one
(`block_until_ready` after each); then the same number again without a per-step sync
("pipelined", the training loop's situation). The table: compile time, median (min-max) step time,
samples/s, peak device memory, the analytic matmul GFLOP/sample of the step as configured
(`nas_jax/flops.py`) and MFU per device (the rate over all devices / their number / the device
kind's dense bf16 peak: 989 TFLOP/s for H100 and H200; n/a where no peak is known, e.g. CPU) on
that count and on the PyTorch reference's 311.8 GFLOP/sample.

`--profile_dir DIR` also traces `--profile_steps` steps with `jax.profiler` and writes top_ops.md:
the top device ops (by HLO instruction, with the op name of the JAX code that produced it), then
device time by kind of work, by model part, by pass (fwd / bwd / no-grad), and by JAX op with the
layers of a stack summed; ops.json.gz holds every op. Run it with
XLA_FLAGS=--xla_gpu_enable_command_buffer= on GPUs: inside a CUDA graph ops are not seen one by one.
`scripts/bench_suite.sh` runs several variants in one go.
`--scorer_pairs N` measures the ITM re-ranking throughput of `benchmarks/model_scorer.py` instead.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from nas_jax import flops as flops_lib
from nas_jax.data import text as text_lib

GIB = 2.0 ** 30


# ------------------------------------------------------------------------------ config helpers
def apply_stage(config, stage: int | None):
  """Stage 1: VD, no NVA; stage 2: VD + NVA; None: as the config says. Returns a copy."""
  c = config.copy_and_resolve_references() if hasattr(config, "copy_and_resolve_references") \
      else config
  if stage is None:
    return c
  if stage not in (1, 2):
    raise ValueError(f"--stage={stage}: use 1 (VD) or 2 (VD + NVA)")
  with c.unlocked():
    c.stage = stage
    c.nva.enabled = stage == 2
    if stage == 2:
      c.model.use_dictionary = True
  return c


def synthetic_batch(config, batch_size: int, sharding, seed: int = 0) -> dict:
  """A device-resident batch of the data contract: random normalised images, right-padded token
  ids ([CLS] w_1 .. w_n [SEP] [PAD]..; n + 2 uniform in [L/2, L]), distinct image ids."""
  c = config
  res, length, vocab = c.model.vit.image_size, c.data.max_text_len, c.model.bert.vocab_size
  sp = text_lib.special_ids(c.data.vocab)
  if sp["first"] >= vocab:
    raise ValueError(f"model.bert.vocab_size={vocab} leaves no ordinary token ids (first is "
                     f"{sp['first']} for data.vocab={c.data.vocab!r})")

  def text(key):
    k_len, k_tok = jax.random.split(key)
    n = jax.random.randint(k_len, (batch_size, 1), max(length // 2, 2), length + 1)
    pos = jnp.arange(length)[None, :]
    words = jax.random.randint(k_tok, (batch_size, length), sp["first"], vocab)
    ids = jnp.where(pos == 0, sp["cls"], jnp.where(pos == n - 1, sp["sep"], words))
    ids = jnp.where(pos < n, ids, sp["pad"]).astype(jnp.int32)
    return ids, (pos < n).astype(jnp.int32)

  def make(key):
    k_img, k_txt, k_neg = jax.random.split(key, 3)
    ids, mask = text(k_txt)
    batch = {"image": jax.random.normal(k_img, (batch_size, res, res, 3), jnp.float32),
             "text_ids": ids, "text_mask": mask,
             "image_id": jnp.arange(batch_size, dtype=jnp.int32)}
    if c.itm.text_negatives:
      batch["neg_text_ids"], batch["neg_text_mask"] = text(k_neg)
    return batch

  return jax.jit(make, out_shardings=sharding)(jax.random.PRNGKey(seed))


def dtype_label(config) -> str:
  """The compute dtype, with the numerics switches that are not float32: 'bfloat16 (residual
  bfloat16, distances tf32)'."""
  m = config.model
  notes = [f"{name} {value}" for name, value in (
      ("residual", m.get("residual_dtype", "float32")),
      ("distances", m.dictionary.get("distances", "float32"))) if value != "float32"]
  return f"{m.dtype} ({', '.join(notes)})" if notes else m.dtype


def attention_label(config) -> str:
  from nas_jax.models.attention import resolve_implementation
  from nas_jax.models.nas import compute_dtype
  m = config.model
  dtype = compute_dtype(m.dtype)
  text = resolve_implementation(m.attention, dtype)
  vit = resolve_implementation(m.vit_attention or m.attention, dtype)
  return text if vit == text else f"vit {vit}, text {text}"


# ------------------------------------------------------------------------------ profile summary
_HLO_LINE = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")


def hlo_index(hlo_text: str) -> dict[str, dict[str, str]]:
  """instruction name -> {'kind', 'op_name', 'target'} from post-optimisation HLO text."""
  out = {}
  for line in hlo_text.splitlines():
    m = _HLO_LINE.match(line)
    if not m:
      continue
    rest = m.group(2)
    kind = re.search(r"kind=(k\w+)", rest)
    op = re.search(r'op_name="([^"]*)"', rest)
    target = re.search(r'custom_call_target="([^"]*)"', rest)
    opcode = re.search(r"\b([a-z][\w\-]*)\(", rest)
    out[m.group(1)] = {"kind": kind.group(1) if kind else (opcode.group(1) if opcode else ""),
                       "op_name": op.group(1) if op else "",
                       "target": target.group(1) if target else ""}
  return out


def _device_op_totals(trace_path: str) -> dict[str, tuple[float, str]]:
  """hlo_op (or event name) -> (total device microseconds, first kernel name) over a perfetto
  trace. Device tracks are the '/device:...' processes; on CPU the XLA execution threads."""
  with gzip.open(trace_path, "rt") as f:
    data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  procs, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      procs[e["pid"]] = e["args"]["name"]
    if e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e["tid"])] = e["args"]["name"]
  device_pids = {p for p, n in procs.items() if n.startswith("/device:")}

  def on_device(e):
    if device_pids:
      return e["pid"] in device_pids
    return threads.get((e["pid"], e["tid"]), "").startswith("tf_XLAExecute")

  totals: dict[str, tuple[float, str]] = {}
  for e in events:
    if e.get("ph") != "X" or not on_device(e):
      continue
    args = e.get("args") or {}
    if not device_pids and e["name"].startswith("ThunkExecutor"):
      continue  # CPU: the executor's wrapper events enclose the op events.
    key = args.get("hlo_op") or e["name"]
    us, kernel = totals.get(key, (0.0, e["name"]))
    totals[key] = (us + float(e.get("dur", 0.0)), kernel)
  return totals


def summarize_trace(trace_path: str, steps: int, hlo: dict[str, dict[str, str]] | None = None,
                    top: int = 25) -> tuple[list[dict], float]:
  """Top device ops of a `jax.profiler` perfetto trace: rows {op, ms_per_step, share, kind,
  op_name, kernel} by total time, and the device busy time per step (ms)."""
  totals = _device_op_totals(trace_path)
  busy = sum(us for us, _ in totals.values())
  rows = []
  for key, (us, kernel) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]:
    info = (hlo or {}).get(key, {})
    rows.append({"op": key, "ms_per_step": us / 1e3 / steps, "share": us / max(busy, 1e-9),
                 "kind": info.get("target") or info.get("kind", ""),
                 "op_name": info.get("op_name", ""), "kernel": kernel})
  return rows, busy / 1e3 / steps


_PART_OF_METHOD = {"encode_image": "ViT", "encode_text": "text encoder", "fuse": "fusion (ITM + MLM)",
                   "mlm": "MLM (text + fusion + head)", "mlm_logits": "MLM head",
                   "text": "MLM text encoder", "dictionary_tokens": "VD",
                   "tokens_from_codes": "NVA", "itm_logits": "ITM head"}


def op_category(op_name: str, kind: str, kernel: str = "") -> dict[str, str]:
  """Where an HLO op belongs, from its JAX op name and HLO kind / custom-call target.

  Returns {'pass': 'fwd' (online forward, under jvp) | 'bwd' (under transpose) | 'no-grad'
  (momentum forward, optimizer, sampling), 'part': model part or 'optimizer/other',
  'work': 'matmul' | 'attention' | 'conv' | 'elementwise' | 'reduction' | 'copy/other',
  'op': the op name with layer indices replaced by N (for grouping the layers of a stack)}.
  """
  name = op_name.split("jit(train_step)/", 1)[-1]
  pass_ = "bwd" if name.startswith("transpose(") else "fwd" if name.startswith("jvp(") else "no-grad"
  m = re.search(r"NASModel\.(\w+)", name) or re.search(r"\bbert\.(text)\b", name)
  part = _PART_OF_METHOD.get(m.group(1), m.group(1)) if m else (
      "random bits" if re.search(r"threefry|_uniform|_randint|_gumbel|_bernoulli", name)
      else "optimizer/other")
  k = f"{kind} {kernel}".lower()
  if "cublas" in k or "gemm" in k or "matmul" in k:
    work = "matmul"
  elif "fmha" in k or "cudnn$f" in k or "flash" in k:
    work = "attention"
  elif "cudnn$conv" in k or "convolution" in k:
    work = "conv"
  elif "kloop" in k:
    work = "elementwise"
  elif "kinput" in k or "reduce" in k:
    work = "reduction"
  else:
    work = "copy/other"
  op = re.sub(r"(blocks|layer)_\d+", r"\1_N", name)
  return {"pass": pass_, "part": part, "work": work, "op": op}


def group_trace(trace_path: str, steps: int, hlo: dict[str, dict[str, str]],
                by: tuple[str, ...] = ("pass", "part", "work"), top: int = 30) -> list[dict]:
  """Device time per step summed over groups of ops (`op_category` keys in `by`), largest first:
  rows {**group, 'ms_per_step', 'share', 'ops'} (ops = distinct HLO ops in the group)."""
  totals = _device_op_totals(trace_path)
  busy = sum(us for us, _ in totals.values())
  groups: dict[tuple, list] = {}
  for key, (us, kernel) in totals.items():
    info = hlo.get(key, {})
    cat = op_category(info.get("op_name", ""), info.get("target") or info.get("kind", ""), kernel)
    g = groups.setdefault(tuple(cat[b] for b in by), [0.0, 0])
    g[0] += us
    g[1] += 1
  rows = [dict(zip(by, key), ms_per_step=us / 1e3 / steps, share=us / max(busy, 1e-9), ops=n)
          for key, (us, n) in groups.items()]
  return sorted(rows, key=lambda r: -r["ms_per_step"])[:top]


def op_rows(trace_path: str, steps: int, hlo: dict[str, dict[str, str]]) -> list[dict]:
  """Every device op of the trace: {hlo_op, us_per_step, kernel, kind, op_name, **op_category}
  (where 'op' is the grouped JAX op name)."""
  rows = []
  for key, (us, kernel) in _device_op_totals(trace_path).items():
    info = hlo.get(key, {})
    kind = info.get("target") or info.get("kind", "")
    rows.append({**op_category(info.get("op_name", ""), kind, kernel), "hlo_op": key,
                 "us_per_step": us / steps, "kernel": kernel, "kind": kind,
                 "op_name": info.get("op_name", "")})
  return sorted(rows, key=lambda r: -r["us_per_step"])


def group_table(rows: list[dict], by: tuple[str, ...]) -> str:
  head = "| " + " | ".join(by) + " | ms/step | share | HLO ops |"
  lines = [head, "|" + "---|" * (len(by) + 3)]
  for r in rows:
    cells = [str(r[b])[-100:].replace("|", "/") for b in by]
    lines.append("| " + " | ".join(cells) + f" | {r['ms_per_step']:.3f} | "
                 f"{100 * r['share']:.1f}% | {r['ops']} |")
  return "\n".join(lines)


def profile_table(rows: list[dict], busy_ms: float) -> str:
  lines = [f"device busy {busy_ms:.2f} ms/step", "",
           "| # | HLO op | ms/step | share | kind | JAX op name |", "|---|---|---|---|---|---|"]
  for i, r in enumerate(rows, 1):
    name = r["op_name"][-90:].replace("|", "/")
    lines.append(f"| {i} | {r['op'][:40]} | {r['ms_per_step']:.3f} | {100 * r['share']:.1f}% | "
                 f"{r['kind'][:24]} | {name} |")
  return "\n".join(lines)


# ------------------------------------------------------------------------------ the benchmark
def run(config, *, batch: int, steps: int = 25, warmup: int = 3, label: str = "",
        profile_dir: str = "", profile_steps: int = 3, seed: int = 0, compile_only: bool = False,
        log=print) -> dict:
  """Builds, compiles and times the step; returns one result row (see `COLUMNS`).

  compile_only: stop after compiling (row with compile_s only; with JAX's persistent compilation
  cache on, a later run of the same configuration then loads the executable).
  """
  from nas_jax import compilation, objectives, optim, sharding
  from nas_jax import train_step as train_step_lib

  c = config
  if steps < 1 or warmup < 0:
    raise ValueError(f"--steps={steps} must be >= 1 and --warmup={warmup} >= 0")
  objectives.check_queue_size(c.itc.queue_size, batch)
  mesh = sharding.make_mesh(c.mesh)
  sharding.check_batch_size(batch, mesh, "--batch")
  groups = sharding.num_batch_shards(mesh)
  sp = text_lib.special_ids(c.data.vocab)
  built = train_step_lib.setup(
      c, optim.learning_rate_schedule(c.optim.lr, c.optim.min_lr, c.optim.warmup_steps, 10_000),
      token_ids=train_step_lib.TokenIds(pad=sp["pad"], cls=sp["cls"], mask=sp["mask"]),
      num_groups=groups, alpha_warmup_steps=max(c.itc.alpha_warmup_steps, 0), mesh=mesh)
  count = flops_lib.step_flops(c, batch, groups)

  with jax.set_mesh(mesh):
    batch_spec = jax.eval_shape(lambda: synthetic_batch(c, batch, None, seed))
    # The step compiles from shapes while the state is initialised (as in nas_jax.train).
    compiling = compilation.in_background(lambda: built.compile(batch_spec))
    state = built.init(jax.random.PRNGKey(seed))
    data = synthetic_batch(c, batch, sharding.batch_sharding(mesh), seed)
    jax.block_until_ready((state, data))
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    n_arrays = len(jax.tree.leaves(state))
    log(f"[bench] {label or 'config'}: {n_params / 1e6:.1f}M params, {n_arrays} train-state arrays "
        f"(model.scan_layers={c.model.get('scan_layers', False)}, model.stacked_layout="
        f"{c.model.get('stacked_layout', False)}), batch {batch} on {len(mesh.devices.flat)} "
        f"{jax.devices()[0].platform} device(s); compiling ...")

    done = compiling.result()
    compiled, compile_s = done.executable, done.seconds
    log(f"[bench] compiled in {compile_s:.1f} s{' (from the cache)' if done.from_cache else ''}; "
        f"{warmup} warm-up + {steps} timed steps")
    if compile_only:
      return {"config": label, "batch": batch, "compile_s": compile_s, "compile_only": True,
              "state_arrays": n_arrays,
              "xla_flags": os.environ.get("XLA_FLAGS", ""), "device": jax.devices()[0].device_kind}

    for _ in range(warmup):
      state, metrics = compiled(state, data)
    jax.block_until_ready((state, metrics))
    times = []
    for _ in range(steps):
      t = time.perf_counter()
      state, metrics = compiled(state, data)
      jax.block_until_ready((state, metrics))
      times.append(time.perf_counter() - t)
    t = time.perf_counter()
    host = 0.0   # Time inside the calls: the host's dispatch work, plus waiting once the device is
                 # behind (then it approaches the step time: the loop is device-bound).
    for _ in range(steps):
      t_call = time.perf_counter()
      state, metrics = compiled(state, data)
      host += time.perf_counter() - t_call
    jax.block_until_ready((state, metrics))
    pipelined = (time.perf_counter() - t) / steps
    loss = float(metrics["loss"])

    profile = None
    if profile_dir:
      profile = _profile(compiled, state, data, profile_dir, profile_steps, log)
      state = profile.pop("state")

  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  mem = compiled.memory_analysis()
  est = None
  if mem is not None:
    est = sum(getattr(mem, k, 0) or 0 for k in (
        "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")) - (
        getattr(mem, "alias_size_in_bytes", 0) or 0)
  med = statistics.median(times)
  per_sample = count.per_sample
  devices = len(mesh.devices.flat)
  kind = jax.devices()[0].device_kind
  peak_tf = flops_lib.peak_tflops(kind)
  per_device = lambda flops: (None if peak_tf is None
                              else flops_lib.mfu(flops, batch / med, peak_tf, devices))
  row = {
      "config": label, "stage": 2 if c.nva.enabled else 1,
      "batch": batch, "devices": devices, "dtype": dtype_label(c),
      "attention": attention_label(c), "remat": bool(c.model.remat),
      "scan_layers": bool(c.model.get("scan_layers", False)),
      "stacked_layout": bool(c.model.get("stacked_layout", False)),
      "fp8": bool(c.model.get("fp8", False)),
      "state_arrays": n_arrays,
      "compile_s": compile_s, "step_ms_median": 1e3 * med, "step_ms_min": 1e3 * min(times),
      "step_ms_max": 1e3 * max(times), "samples_per_s": batch / med,
      "samples_per_s_pipelined": batch / pipelined,
      "host_ms_per_step": 1e3 * host / steps,
      "peak_gib": peak / GIB if peak is not None else None,
      "compiled_gib": est / GIB if est is not None else None,
      "gflop_per_sample": per_sample / 1e9,
      "ref_gflop_per_sample": flops_lib.REFERENCE_GFLOP_PER_SAMPLE,
      "peak_tflops": peak_tf,
      "mfu": per_device(per_sample),
      "mfu_ref": per_device(flops_lib.REFERENCE_GFLOP_PER_SAMPLE * 1e9),
      "loss": loss, "platform": jax.devices()[0].platform,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "device": kind, "jax": jax.__version__,
  }
  if not np.isfinite(loss):
    log(f"[bench] warning: the loss is not finite ({loss}) on random weights")
  if profile is not None:
    row["profile"] = profile
  return row


def _profile(compiled, state, data, profile_dir: str, steps: int, log) -> dict:
  import glob
  os.makedirs(profile_dir, exist_ok=True)
  hlo_text = compiled.as_text()
  with gzip.open(os.path.join(profile_dir, "train_step.hlo.txt.gz"), "wt") as f:
    f.write(hlo_text)
  before = set(glob.glob(os.path.join(profile_dir, "**", "perfetto_trace.json.gz"), recursive=True))
  with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
    for _ in range(steps):
      state, metrics = compiled(state, data)
    jax.block_until_ready((state, metrics))
  new = sorted(set(glob.glob(os.path.join(profile_dir, "**", "perfetto_trace.json.gz"),
                             recursive=True)) - before)
  if not new:
    log("[bench] profiler wrote no perfetto trace")
    return {"state": state}
  hlo = hlo_index(hlo_text)
  rows, busy = summarize_trace(new[-1], steps, hlo)
  with gzip.open(os.path.join(profile_dir, "ops.json.gz"), "wt") as f:
    json.dump(op_rows(new[-1], steps, hlo), f)
  group = lambda by, top: group_table(group_trace(new[-1], steps, hlo, by=by, top=top), by)
  table = "\n\n".join([
      profile_table(rows, busy),
      "By kind of work:\n\n" + group(("work",), 10),
      "By model part:\n\n" + group(("part",), 20),
      "By pass, model part and kind of work:\n\n" + group(("pass", "part", "work"), 60),
      "By JAX op, layers of a stack summed (op names with blocks_N / layer_N):\n\n"
      + group(("pass", "work", "op"), 80)])
  with open(os.path.join(profile_dir, "top_ops.md"), "w") as f:
    f.write(table + "\n")
  log(table)
  return {"state": state, "busy_ms": busy, "top": rows, "trace": new[-1]}


COLUMNS = ("config", "stage", "batch", "devices", "dtype", "attention", "remat", "compile s",
           "step ms median (min–max)", "samples/s", "pipelined samples/s", "peak GiB", "GFLOP/sample", "ref GFLOP/sample",
           "MFU / device", "MFU / device (ref count)")


def _percent(x) -> str:
  return "n/a" if x is None else f"{100 * x:.1f}%"


def mfu_line(row: dict) -> str:
  """'MFU per device: 21.2% (ref count 21.2%) of 989 TFLOP/s, 2 × NVIDIA H200', or why n/a."""
  devices = f"{row.get('devices', 1)} × {row.get('device', '?')}"
  if row.get("peak_tflops") is None:
    return f"MFU per device: n/a ({devices}: no dense bf16 peak known, flops.DEVICE_PEAK_TFLOPS)"
  return (f"MFU per device: {_percent(row['mfu'])} (ref count {_percent(row['mfu_ref'])}) of "
          f"{row['peak_tflops']:.0f} TFLOP/s, {devices}")


def markdown_table(rows: list[dict]) -> str:
  """The result rows as a Markdown table with `COLUMNS`."""
  lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
  for r in rows:
    peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "n/a"
    devices = f"{r.get('devices', 1)} × {r.get('device', '?')}"
    cells = [r["config"], str(r["stage"]), str(r["batch"]), devices, r["dtype"], r["attention"],
             "on" if r["remat"] else "off", f"{r['compile_s']:.1f}",
             f"{r['step_ms_median']:.2f} ({r['step_ms_min']:.2f}–{r['step_ms_max']:.2f})",
             f"{r['samples_per_s']:.1f}", f"{r['samples_per_s_pipelined']:.1f}", peak, f"{r['gflop_per_sample']:.1f}",
             f"{r['ref_gflop_per_sample']:.1f}", _percent(r.get("mfu")), _percent(r.get("mfu_ref"))]
    lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
  return "\n".join(lines)


# ------------------------------------------------------------------------------ scorer throughput
def scorer_throughput(config, *, pairs: int, captions_per_image: int = 5, batch: int = 256,
                      seed: int = 0, log=print) -> dict:
  """Pairs/s of `ModelScorer.itm_logits` (ITM re-ranking) with random weights, in-memory images.

  Two passes; the second (compiled, warm) is reported, with the images' host load + transform
  included as in a benchmark run.
  """
  from nas_jax.benchmarks import common, model_scorer
  from nas_jax.data.text import load_tokenizer
  from nas_jax.models.nas import NASModel

  c = config
  res = c.model.vit.image_size
  model = NASModel(config=c.model)
  ids = jnp.zeros((1, 8), jnp.int32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, res, res, 3)), ids,
                                  jnp.ones_like(ids))
  rng = np.random.default_rng(seed)
  n_img = max(1, pairs // captions_per_image)
  refs = [common.ImageRef(key=f"img{i}", pixels=rng.integers(0, 256, (res, res, 3), np.uint8))
          for i in range(n_img)]
  tok = load_tokenizer(c.data.vocab or "synthetic")
  words = [w for w in tok.vocab_words()[:2000] if w.isalpha()] if hasattr(tok, "vocab_words") \
      else "a man woman dog red blue riding on the table under near small large car".split()
  texts = [" ".join(rng.choice(words, 12)) for _ in range(n_img * captions_per_image)]
  images = [refs[i // captions_per_image] for i in range(len(texts))]
  scorer = model_scorer.ModelScorer(model, variables["params"], variables.get("batch_stats", {}),
                                    tok, image_size=res, batch_size=batch,
                                    image_chunk=max(batch, 512), max_tokens=c.eval.max_text_len,
                                    show_progress=False)
  seconds = []
  for _ in range(2):
    scorer.clear_cache()
    t = time.perf_counter()
    logits = scorer.itm_logits(images, texts)
    seconds.append(time.perf_counter() - t)
  if not np.all(np.isfinite(logits)):
    raise FloatingPointError("scorer produced non-finite ITM logits")
  row = {"pairs": len(texts), "images": n_img, "batch": scorer.batch_size,
         "dtype": c.model.dtype, "attention": attention_label(c),
         "first_s": seconds[0], "warm_s": seconds[1], "pairs_per_s": len(texts) / seconds[1],
         "device": jax.devices()[0].device_kind}
  log(f"[bench] ITM re-ranking: {row['pairs']} pairs ({n_img} images) in {seconds[1]:.2f} s warm "
      f"= {row['pairs_per_s']:.0f} pairs/s (first pass {seconds[0]:.1f} s, incl. compile)")
  return row


# ------------------------------------------------------------------------------ CLI
def _label(argv: list[str]) -> str:
  cfg = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if cfg is None and "--config" in argv:
    cfg = argv[argv.index("--config") + 1]
  name = os.path.basename(cfg or "config")
  overrides = [a[len("--config."):] for a in argv if a.startswith("--config.")]
  return " ".join([name] + overrides)


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  config = apply_stage(f.config, f.stage)
  label = f.label or _label(sys.argv)
  try:
    if f.scorer_pairs > 0:
      row = scorer_throughput(config, pairs=f.scorer_pairs, batch=f.batch)
      row["config"] = label
    else:
      row = run(config, batch=f.batch, steps=f.steps, warmup=f.warmup, label=label,
                profile_dir=f.profile_dir, profile_steps=f.profile_steps, seed=config.seed,
                compile_only=f.compile_only)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if f.json_out:
    os.makedirs(os.path.dirname(os.path.abspath(f.json_out)), exist_ok=True)
    with open(f.json_out, "a") as fh:
      slim = {k: v for k, v in row.items() if k != "profile"}
      if "profile" in row:
        slim["profile_busy_ms"] = row["profile"].get("busy_ms")
      fh.write(json.dumps(slim) + "\n")
  if row.get("compile_only"):
    print(f"[bench] compile only: {row['compile_s']:.1f} s")
  elif f.scorer_pairs <= 0:
    print(f"[bench] pipelined (no per-step sync): {row['samples_per_s_pipelined']:.1f} samples/s; "
          f"loss {row['loss']:.3f}; compiled estimate "
          + (f"{row['compiled_gib']:.2f} GiB" if row["compiled_gib"] is not None else "n/a")
          + f"; {row['state_arrays']} train-state arrays; {row['host_ms_per_step']:.1f} ms per "
          "step inside the calls (dispatch, or waiting for the device)")
    print(f"[bench] {mfu_line(row)}")
    print(markdown_table([row]))


def cli():
  from absl import app, flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/stage2.py",
                                  lock_config=True)
  flags.DEFINE_integer("batch", 64, "Global batch size.")
  flags.DEFINE_integer("steps", 25, "Timed steps (>= 20 for reported numbers).")
  flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
  flags.DEFINE_integer("stage", None, "1: VD; 2: VD + NVA; default: as the config.")
  flags.DEFINE_string("json_out", "", "Append the result row as one JSON line to this file.")
  flags.DEFINE_string("profile_dir", "", "Trace a few steps with jax.profiler into this folder.")
  flags.DEFINE_integer("profile_steps", 3, "Steps traced with --profile_dir.")
  flags.DEFINE_bool("compile_only", False, "Only compile (fills JAX's compilation cache).")
  flags.DEFINE_integer("scorer_pairs", 0, "> 0: measure ITM re-ranking pairs/s instead.")
  flags.DEFINE_string("label", "", "Name of the row (default: config file and overrides).")
  flags.mark_flags_as_required(["config"])
  app.run(main)


if __name__ == "__main__":
  cli()
