"""The data benchmark CLI runs end to end on a tiny generated corpus and prints its table."""

from nas_jax.data import bench


def test_bench_reports_both_paths_and_the_core_arithmetic(tmp_path, capsys):
  results = bench.main(["--make_corpus", "6", "--corpus_dir", str(tmp_path), "--image_size", "32",
                        "--batch_size", "2", "--samples", "4", "--batches", "1", "--workers", "0",
                        "--prepare_workers", "0", "--max_side", "128"])
  assert [r["path"] for r in results] == ["raw JPEG", "prepared"]
  for r in results:
    assert r["images_per_s"] > 0 and r["one_core"] > 0
    assert set(r["ms"]) == {"read", "decode", "augment", "tokenize", "other"}
  raw, prep = results
  assert prep["kib"] < raw["kib"]          # Bounded, re-encoded images are smaller.
  out = capsys.readouterr().out
  assert "| raw JPEG |" in out and "| prepared |" in out
  assert "8 GPUs x 1100 samples/s = 8,800 images/s" in out
  assert bench.cores_needed(275.0) == 32.0
