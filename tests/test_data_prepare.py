"""Prepared ArrayRecord shards: summary of written/skipped, bounded JPEGs, reading them back."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from nas_jax import config_lib
from nas_jax.data import pipeline, prepare, sources, text
from test_data_fixtures import make_albef_corpus, make_negclip_images


def test_prepare_skips_bad_records_and_bounds_image_size(tmp_path, capsys):
  corpus = make_albef_corpus(tmp_path / "raw")
  out = tmp_path / "prepared"
  summary = prepare.main(["--json", corpus["json"], "--image_root", corpus["image_root"],
                          "--out", str(out), "--max_side", "64", "--records_per_shard", "5",
                          "--workers", "0", "--no_progress"])
  assert summary["written"] == corpus["num_good"] == 12
  assert summary["skipped"] == {"file not found": 1, "unreadable image (OSError)": 1,
                                "unreadable image (UnidentifiedImageError)": 1,
                                "no non-empty string caption": 2}
  assert summary["shards"] == 3
  printed = capsys.readouterr().out
  assert "| written" in printed and "missing.jpg" in printed and "truncated.jpg" in printed
  assert json.loads((out / "meta.json").read_text())["written"] == 12

  src = sources.PreparedSource([str(out)])
  raw = sources.AlbefJsonSource([corpus["json"]], corpus["image_root"])
  assert len(src) == 12
  for i in range(12):
    rec = src[i]
    img = Image.open(io.BytesIO(rec["image"]))
    assert img.format == "JPEG" and max(img.size) <= 64
    assert rec["path"] == raw[i]["path"] and rec["image_id"] == raw[i]["image_id"]
    assert rec["captions"] == [c for c in raw[i]["captions"] if c]   # The empty one dropped.
    orig = Image.open(raw[i]["image"]).convert("RGB")
    if max(orig.size) <= 64 and Image.open(raw[i]["image"]).format == "JPEG":
      assert rec["image"] == open(raw[i]["image"], "rb").read()     # Small JPEGs kept as is.
    else:
      small = np.asarray(orig.resize(img.size, Image.Resampling.BICUBIC), np.float32)
      assert np.abs(np.asarray(img, np.float32) - small).mean() < 8

  c = config_lib.base_config()
  c.data.update(dict(source="prepared", paths=(str(out),), batch_size=4, image_size=32,
                     max_text_len=16, read_threads=1, max_error_rate=0.0))
  it = pipeline.make_train_iterator(c, text.load_tokenizer("synthetic"), num_epochs=1)
  batches = list(it)
  assert len(batches) == 3 and batches[0]["image"].shape == (4, 32, 32, 3)
  assert sorted(np.concatenate([b["image_id"] for b in batches]).tolist()) == \
      sorted(raw[i]["image_id"] for i in range(12))


def test_prepare_refuses_a_non_empty_output_and_keeps_negatives(tmp_path, samples_dir):
  tsv = samples_dir / "NegCLIP" / "valid_neg_clip.sample.tsv"
  make_negclip_images(tsv, tmp_path / "img")
  out = tmp_path / "neg"
  s = prepare.main(["--negclip_tsv", str(tsv), "--image_root", str(tmp_path / "img"),
                    "--out", str(out), "--workers", "0", "--no_progress"])
  assert s["written"] == 12 and s["has_negatives"]
  src = sources.PreparedSource([str(out)])
  assert src.has_negatives
  assert src[0]["neg_captions"] == ["A umbrella holding a flowered child and petting a yak .",
                                    "A child petting a flowered umbrella and holding a yak ."]
  with pytest.raises(FileExistsError, match="already holds 1 shards"):
    prepare.main(["--negclip_tsv", str(tsv), "--out", str(out), "--workers", "0"])


def test_prepare_cli_bad_input_is_one_line(tmp_path, capsys):
  """`python -m nas_jax.data.prepare`: a non-empty or file --out, or a missing input file, ends
  with one `error:` line and exit status 2 instead of a traceback."""
  corpus = make_albef_corpus(tmp_path / "raw")
  out = tmp_path / "out"
  args = ["--json", corpus["json"], "--image_root", corpus["image_root"], "--workers", "0",
          "--no_progress"]
  assert prepare.cli(args + ["--out", str(out)]) == 0
  capsys.readouterr()
  f = tmp_path / "file"
  f.write_text("")
  for bad, message in [
      (["--out", str(out)], f"error: {out} already holds 1 shards: choose an empty --out"),
      (["--out", str(f)], f"error: {f} is a file: choose a directory for --out"),
      (["--json", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o2")],
       f"error: annotation file {str(tmp_path / 'missing.json')!r} does not exist"),
  ]:
    argv = (bad if bad[0] == "--json" else args + bad)
    assert prepare.cli(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(message) and "Traceback" not in "\n".join(err), err
