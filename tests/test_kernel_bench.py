"""scripts/kernel_bench.py on CPU with tiny shapes: every part's rows, finite times for the XLA
rows, the GPU-only rows marked n/a, numerics checked against the float32 reference."""

import importlib.util
import json
import math
import sys

import jax

from step_utils import ROOT


def _load_script():
  """scripts/kernel_bench.py as a module (once: its dataclasses need it in sys.modules)."""
  if "kernel_bench" not in sys.modules:
    spec = importlib.util.spec_from_file_location("kernel_bench",
                                                  ROOT / "scripts" / "kernel_bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernel_bench"] = module
    spec.loader.exec_module(module)
  return sys.modules["kernel_bench"]


def test_kernel_bench_small_on_cpu(tmp_path, capsys):
  kernel_bench = _load_script()
  out = tmp_path / "kernels.jsonl"
  rows = kernel_bench.main(["--small", "--iters", "2", "--json_out", str(out)])
  printed = capsys.readouterr().out
  timed = {(r["part"], r["case"], r["dtype"], r["impl"]) for r in rows if r["status"] == "ok"}
  assert timed == {
      *{("ln", "vit", dtype, "flax (ours)") for dtype in ("float32", "bfloat16")},
      *{("attn", case, "bfloat16", "jax.nn xla (ours)")
        for case in ("vit self", "text self", "cross")},
      ("gelu", "fc1 none", "bfloat16", "gemm+bias, no activation"),
      ("gelu", "fc1 exact", "bfloat16", "gemm+bias+gelu exact (ours)"),
      ("gelu", "fc1 tanh", "bfloat16", "gemm+bias+gelu tanh")}
  for r in rows:
    if r["status"] == "ok":
      assert math.isfinite(r["us_median"]) and r["us_median"] > 0 and math.isfinite(r["rate"])
      if r["part"] != "gelu":  # Against the float32 reference; masked keys are poisoned.
        assert r["check"] == "ok", r
    else:  # cuDNN and tokamax on a CPU.
      assert (r["status"], r["reason"]) == ("n/a", "n/a on cpu"), r
      assert r["impl"] == "jax.nn cudnn (ours)" or r["impl"].startswith("tokamax "), r
  # Every implementation has its row: 1 LN case × 2 dtypes, 3 attention cases.
  assert sum(r["impl"] == "tokamax triton" for r in rows) == 2 + 3
  assert sum(r["impl"] == "tokamax mosaic" for r in rows) == 3
  table = [line for line in printed.splitlines() if line.startswith("| ")]
  assert len(table) == 1 + len(rows)  # The header, then one line per row.
  assert sum("n/a on cpu" in line for line in table) == sum(r["status"] == "n/a" for r in rows)
  assert sum("fastest" in line for line in table) == 2 + 3 + 1
  assert "dispatch floor" in printed
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  assert lines[0]["part"] == "floor"
  assert [line["impl"] for line in lines if "status" in line] == [r["impl"] for r in rows]
  assert len([line for line in lines if line["part"] == "fastest"]) == 2 + 3 + 1


def test_one_line_reason_and_relative_error():
  """A failing cell's reason is one line (the first exception of a group); the error is relative
  to the reference's largest magnitude, NaN when not finite."""
  kernel_bench = _load_script()
  group = ExceptionGroup("all implementations failed",
                         [NotImplementedError("Mosaic GPU not supported.\nmore detail")])
  assert kernel_bench.one_line(group) == "NotImplementedError: Mosaic GPU not supported."
  assert kernel_bench.max_rel_error([[1.0, 2.0]], [[1.0, 4.0]]) == 0.5
  assert math.isnan(kernel_bench.max_rel_error([float("nan")], [1.0]))


def test_a_kernel_that_lets_masked_keys_through_is_flagged():
  """The attention inputs poison the masked keys: attention without the mask is far off."""
  kernel_bench = _load_script()
  opts = kernel_bench.parse_args(["--small", "--iters", "1", "--reps", "1", "--warmup", "0"])
  case, _ = kernel_bench.attn_part(opts, None, "n/a on cpu", "cpu")[0]
  leaky = kernel_bench.Impl(
      "no mask", lambda q, k, v, lengths, mask: jax.nn.dot_product_attention(q, k, v))
  args = jax.device_put(case.args + (case.cotangent,))
  ref_args = jax.device_put(kernel_bench.to_float32(case.args) + (case.cotangent,))
  ref_job, (job,) = kernel_bench.compile_case(case, [leaky], args, ref_args)
  ref, failed = kernel_bench.reference(ref_job, ref_args)
  assert failed is None
  row = kernel_bench.run_cell(case, leaky, job, args, ref, opts)
  assert row["status"] == "ok" and row["check"] == "MISMATCH" and row["err_out"] > 0.5
