"""`python -m nas_jax.metrics_writer --summary`: a run's start-up, rate and checkpoint stalls."""

import json

from nas_jax import metrics_writer


def _write(path, rows):
  path.mkdir()
  (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_summary_reads_startup_rate_and_saves(tmp_path, capsys):
  _write(tmp_path / "a", [
      {"step": 1, "loss": 9.0, "startup_s": 130.5},
      {"step": 20, "loss": 8.0, "samples_per_s": 800.0},
      {"step": 40, "loss": 7.0, "samples_per_s": 900.0},
      {"step": 40, "checkpoint_save_s": 6.0, "checkpoint_blocking_s": 5.5},
      {"step": 60, "loss": 6.5, "samples_per_s": 860.0},
      {"step": 60, "checkpoint_save_s": 4.0, "checkpoint_blocking_s": 0.25},
      {"step": 60, "eval/itm_acc": 0.5},
  ])
  s = metrics_writer.summarize(str(tmp_path / "a"))
  assert s["startup_s"] == 130.5 and s["samples_per_s"] == 860.0
  assert (s["saves"], s["blocking_s"], s["save_s"]) == (2, 5.5, 5.0)
  assert (s["last_step"], s["loss"]) == (60, 6.5)
  metrics_writer.main(["--summary", str(tmp_path / "a"), str(tmp_path / "missing")])
  table = capsys.readouterr().out.splitlines()
  assert table[2].endswith("| 130.5 | 860.0 | 2 | 5.50 | 5.00 | 60 | 6.5000 |")
  assert table[3].endswith("| – | – | 0 | – | – | – | – |")
