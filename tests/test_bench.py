"""The speed benchmark CLI on the tiny config, and the analytic FLOP count against a hand count."""

import gzip
import json
import subprocess
import sys

import pytest

from conftest import subprocess_env
from step_utils import ROOT, tiny_config

from nas_jax import bench, flops


def test_flops_match_hand_count_for_tiny_stage2():
  """demo.py:tiny: ViT 32 px / patch 8 (N = 16, T = 17), width 64, 2 layers, MLP 256; BERT width
  64, 2 layers (1 text + 1 fusion), FFN 256, L = 24, V = synthetic; E = 64, Q = 512, m = 64."""
  c = tiny_config(**{"nva.enabled": True})
  v = c.model.bert.vocab_size
  b, q = 16, 512
  # ViT: patch conv 2·16·192·64; per layer 2·17·(4·64² + 2·64·256) + 4·17²·64.
  vit = 2 * 16 * 192 * 64 + 2 * (2 * 17 * (4 * 4096 + 2 * 64 * 256) + 4 * 289 * 64)
  text_layer = 2 * 24 * (4 * 4096 + 2 * 64 * 256) + 4 * 576 * 64
  text = 1 * text_layer
  fusion = text_layer + 2 * 24 * 4096 * 2 + 4 * 17 * 64 * 64 + 4 * 24 * 17 * 64
  mlm = text + fusion + 2 * 24 * 4096 + 2 * 24 * 64 * v
  proj = 2 * 64 * 64 * 2
  sims = 2 * 2 * 64 * (b + q)
  vd = 2 * 16 * 64 * 64 + 2 * 16 * 64 * 64 + 2 * 16 * 128 * 2
  dist = 2 * 16 * 64 * 64
  nva_tokens = 2 * (2 * 16 * 64 * 64) + 2 * 16 * 128 * 2
  nva_select = 2 * 2 * 16 * 64 + 2 * 64 * 64 * 64 / b
  hard_neg = 2 * 2 * 64 * b
  groups = 4
  itm = groups * fusion + groups * 2 * 64 * 2
  momentum = vit + text + proj + mlm
  online = vit + text + proj + vd + nva_tokens + itm + mlm + sims
  want = momentum + 3 * online + sims + hard_neg + dist + nva_select
  got = flops.step_flops(c, b)
  assert got.per_sample == pytest.approx(want, rel=1e-12)
  # Stage 1 drops the NVA parts and one ITM pair group exactly.
  s1 = flops.step_flops(tiny_config(), b)
  assert got.per_sample - s1.per_sample == pytest.approx(
      3 * (nva_tokens + fusion + 2 * 64 * 2) + nva_select, rel=1e-12)
  assert "| **step** |" in got.table()
  # mlm.max_masked = 6: both MLM heads (momentum 1x, online 3x) on 6 of the 24 positions.
  capped = flops.step_flops(tiny_config(**{"nva.enabled": True, "mlm.max_masked": 6}), b)
  assert got.per_sample - capped.per_sample == pytest.approx(
      4 * (2 * 18 * 4096 + 2 * 18 * 64 * v), rel=1e-12)


def test_flops_of_paper_configs_are_near_the_reference():
  """Our count of the paper's stage-2 step lands within 1% of the PyTorch reference's 311.8."""
  from step_utils import load_config
  c2 = load_config("stage2.py", None)
  got = flops.step_flops(c2, 64).gflop_per_sample()
  assert got == pytest.approx(flops.REFERENCE_GFLOP_PER_SAMPLE, rel=0.01)
  albef = flops.step_flops(load_config("stage1.py", "albef"), 64).gflop_per_sample()
  assert albef == pytest.approx(288.5, rel=0.01)       # issue 9's ALBEF row
  assert flops.mfu(311.8e9, 1110.0) == pytest.approx(0.35, abs=0.001)
  with pytest.raises(ValueError, match="num_groups"):
    flops.step_flops(c2, 64, num_groups=3)


def test_mfu_is_per_device_with_the_device_kinds_peak():
  """Two H200s at 1,300 samples/s of 311.8 GFLOP: 20.5 % each, not the whole rate over one GPU's
  peak (41.0 %, the 2-GPU run's bug); no known peak (CPU, TPU) gives n/a."""
  assert flops.peak_tflops("NVIDIA H200") == flops.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
  assert flops.peak_tflops("NVIDIA H100 PCIe") == 756.0
  assert flops.peak_tflops("cpu") is None and flops.peak_tflops("TPU v5 lite") is None
  assert flops.mfu(311.8e9, 1300.0, 989.0, devices=2) == pytest.approx(0.205, abs=0.001)
  row = {"config": "stage2.py", "stage": 2, "batch": 128, "devices": 2, "device": "NVIDIA H200",
         "dtype": "bfloat16", "attention": "cudnn", "remat": False, "compile_s": 60.0,
         "step_ms_median": 98.46, "step_ms_min": 97.0, "step_ms_max": 99.0,
         "samples_per_s": 1300.0, "samples_per_s_pipelined": 1400.0, "peak_gib": 17.0,
         "gflop_per_sample": 312.2, "ref_gflop_per_sample": 311.8, "peak_tflops": 989.0,
         "mfu": flops.mfu(312.2e9, 1300.0, 989.0, 2),
         "mfu_ref": flops.mfu(311.8e9, 1300.0, 989.0, 2)}
  table = bench.markdown_table([row])
  assert "| 2 × NVIDIA H200 |" in table and "| 20.5% | 20.5% |" in table
  assert bench.mfu_line(row) == ("MFU per device: 20.5% (ref count 20.5%) of 989 TFLOP/s, "
                                 "2 × NVIDIA H200")
  cpu = dict(row, devices=1, device="cpu", peak_tflops=None, mfu=None, mfu_ref=None)
  assert bench.markdown_table([cpu]).rstrip().endswith("| n/a | n/a |")
  assert bench.mfu_line(cpu).startswith("MFU per device: n/a (1 × cpu: no dense bf16 peak known")


def test_bench_cli_on_tiny_config(tmp_path):
  out = tmp_path / "bench.jsonl"
  prof = tmp_path / "prof"
  env = subprocess_env(PYTHONPATH=str(ROOT))
  cmd = [sys.executable, "-m", "nas_jax.bench", "--config", str(ROOT / "configs/demo.py") + ":tiny",
         "--batch", "16", "--steps", "3", "--warmup", "1", "--stage", "2",
         "--config.model.vit_attention=xla", "--json_out", str(out), "--profile_dir", str(prof),
         "--profile_steps", "1"]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  header = next(i for i, l in enumerate(lines) if l.startswith("| config |"))
  cols = [x.strip() for x in lines[header].strip("|").split("|")]
  assert tuple(cols) == bench.COLUMNS
  cells = [x.strip() for x in lines[header + 2].strip("|").split("|")]
  row = dict(zip(cols, cells))
  assert row["config"] == "demo.py:tiny model.vit_attention=xla"
  assert (row["stage"], row["batch"], row["dtype"], row["attention"], row["remat"]) == (
      "2", "16", "float32", "xla", "off")
  assert row["devices"] == "1 × cpu"
  assert row["peak GiB"] == "n/a"                              # CPU has no memory stats
  assert row["MFU / device"] == row["MFU / device (ref count)"] == "n/a"   # No CPU peak.
  assert "[bench] MFU per device: n/a (1 × cpu" in proc.stdout
  assert row["ref GFLOP/sample"] == "311.8"
  c = tiny_config(**{"nva.enabled": True})
  want = flops.step_flops(c, 16).gflop_per_sample()
  assert float(row["GFLOP/sample"]) == pytest.approx(want, abs=0.05)

  rec = json.loads(out.read_text())
  assert rec["step_ms_min"] <= rec["step_ms_median"] <= rec["step_ms_max"]
  assert rec["samples_per_s"] == pytest.approx(16 / (rec["step_ms_median"] / 1e3))
  assert rec["mfu"] is None and rec["mfu_ref"] is None and rec["peak_tflops"] is None
  # The layer stacks unrolled (the default): 2 + 1 + 1 layers.
  assert rec["scan_layers"] is False and 380 < rec["state_arrays"] < 420
  assert rec["compile_s"] > 0 and rec["loss"] > 0
  # The profile: compiled HLO and a top-ops table naming the JAX ops.
  with gzip.open(prof / "train_step.hlo.txt.gz", "rt") as f:
    assert "fusion" in f.read()
  top = (prof / "top_ops.md").read_text()
  assert "| # | HLO op |" in top and "jit(train_step)" in top


def test_dtype_column_names_the_numerics_switches():
  """The table's dtype column says which numerics switches a row ran with."""
  assert bench.dtype_label(tiny_config(**{"model.dtype": "bfloat16"})) == "bfloat16"
  c = tiny_config(**{"model.dtype": "bfloat16", "model.residual_dtype": "bfloat16"})
  assert bench.dtype_label(c) == "bfloat16 (residual bfloat16)"
  c.model.dictionary.distances = "tf32"
  assert bench.dtype_label(c) == "bfloat16 (residual bfloat16, distances tf32)"


def test_bench_rejects_a_batch_that_does_not_fill_the_queue():
  c = tiny_config()
  with pytest.raises(ValueError, match="queue_size=512 must be a positive multiple"):
    bench.run(c, batch=24, steps=1, warmup=0, log=lambda *_: None)
  with pytest.raises(ValueError, match="--stage=3"):
    bench.apply_stage(c, 3)


def test_profile_summary_groups_device_ops(tmp_path):
  """Device events grouped by hlo_op, busy time per step, op names from the HLO text."""
  events = [
      {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
      {"ph": "X", "pid": 1, "tid": 1, "name": "gemm_a", "dur": 300.0, "args": {"hlo_op": "dot.1"}},
      {"ph": "X", "pid": 1, "tid": 1, "name": "gemm_a", "dur": 100.0, "args": {"hlo_op": "dot.1"}},
      {"ph": "X", "pid": 1, "tid": 2, "name": "loop_fusion", "dur": 100.0,
       "args": {"hlo_op": "fusion.2"}},
      {"ph": "X", "pid": 2, "tid": 1, "name": "host work", "dur": 9999.0},
  ]
  path = tmp_path / "t.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)
  hlo = bench.hlo_index(
      '  %dot.1 = bf16[8,8]{1,0} custom-call(a, b), custom_call_target="__cublas$gemm", '
      'metadata={op_name="jit(train_step)/vit/dot_general"}\n'
      '  ROOT fusion.2 = f32[8]{0} fusion(x), kind=kLoop, calls=%f, metadata={op_name="jit(s)/add"}')
  rows, busy = bench.summarize_trace(str(path), steps=2, hlo=hlo)
  assert busy == pytest.approx(0.25)                           # 500 us over 2 steps
  assert [r["op"] for r in rows] == ["dot.1", "fusion.2"]
  assert rows[0]["ms_per_step"] == pytest.approx(0.2) and rows[0]["share"] == pytest.approx(0.8)
  assert rows[0]["kind"] == "__cublas$gemm" and rows[0]["op_name"].endswith("vit/dot_general")
  assert rows[1]["kind"] == "kLoop"


def test_profile_groups_layers_passes_and_kinds_of_work(tmp_path):
  """The grouped profile: layer indices summed, fwd/bwd/no-grad from jvp/transpose, matmuls apart
  from elementwise kernels, parts named after the model methods."""
  events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}}]
  ops = {  # hlo op -> (us, op_name, hlo text kind)
      "gemm.1": (300.0, "jit(train_step)/jvp(NASModel.encode_image)/vit/blocks_0/mlp/fc1/dot_general",
                 'custom_call_target="__cublas$lt$matmul"'),
      "gemm.2": (100.0, "jit(train_step)/jvp(NASModel.encode_image)/vit/blocks_11/mlp/fc1/dot_general",
                 'custom_call_target="__cublas$lt$matmul"'),
      "fusion.3": (50.0, "jit(train_step)/transpose(jvp(NASModel.fuse))/bert/layer_7/mul",
                   "kind=kLoop"),
      "fusion.4": (40.0, "jit(train_step)/NASModel.encode_image/vit/blocks_3/norm1/reduce_sum",
                   "kind=kInput"),
      "fusion.5": (10.0, "jit(train_step)/jit(tree_bias_correction)/div", "kind=kLoop"),
  }
  hlo_text = ""
  for op, (us, name, kind) in ops.items():
    events.append({"ph": "X", "pid": 1, "tid": 1, "name": op, "dur": us, "args": {"hlo_op": op}})
    hlo_text += f'  %{op} = f32[8]{{0}} fusion(x), {kind}, metadata={{op_name="{name}"}}\n'
  path = tmp_path / "t.json.gz"
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": events}, f)
  hlo = bench.hlo_index(hlo_text)
  rows = bench.group_trace(str(path), steps=1, hlo=hlo, by=("pass", "part", "work"))
  assert [(r["pass"], r["part"], r["work"], r["ops"]) for r in rows] == [
      ("fwd", "ViT", "matmul", 2), ("bwd", "fusion (ITM + MLM)", "elementwise", 1),
      ("no-grad", "ViT", "reduction", 1), ("no-grad", "optimizer/other", "elementwise", 1)]
  assert rows[0]["ms_per_step"] == pytest.approx(0.4) and rows[0]["share"] == pytest.approx(0.8)
  by_op = bench.group_trace(str(path), steps=1, hlo=hlo, by=("op",))
  assert by_op[0]["op"] == "jvp(NASModel.encode_image)/vit/blocks_N/mlp/fc1/dot_general"
  assert by_op[0]["ops"] == 2
  table = bench.group_table(rows, ("pass", "part", "work"))
  assert "| fwd | ViT | matmul | 0.400 | 80.0% | 2 |" in table


def test_scorer_throughput_on_tiny_config():
  """`--scorer_pairs`: the model scorer's ITM re-ranking over in-memory images, pairs/s reported."""
  c = tiny_config()
  row = bench.scorer_throughput(c, pairs=20, captions_per_image=5, batch=8, log=lambda *_: None)
  assert (row["pairs"], row["images"], row["batch"]) == (20, 4, 8)
  assert row["pairs_per_s"] == pytest.approx(20 / row["warm_s"])
  assert row["first_s"] > 0 and row["warm_s"] > 0



def test_bench_suite_rejects_a_malformed_variant():
  """scripts/bench_suite.sh: a variant that is not 'NAME|ENV|ARGS' stops before any compilation,
  naming it; no arguments print the usage."""
  script = str(ROOT / "scripts" / "bench_suite.sh")
  bad = subprocess.run(["bash", script, "/tmp/unused_suite", "no pipes here"],
                       capture_output=True, text=True)
  assert bad.returncode == 2
  assert "variant 'no pipes here' must read 'NAME|ENV|BENCH ARGS'" in bad.stderr
  usage = subprocess.run(["bash", script], capture_output=True, text=True)
  assert usage.returncode == 2 and "scripts/bench_suite.sh OUT_DIR" in usage.stdout
