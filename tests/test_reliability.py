"""Reliability of training (docs/RELIABILITY.md): config validation, restore falling back past
unreadable checkpoints, the non-finite loss policy, metrics.jsonl after resumes, the progress
log, shared memory of data workers, and kill -9 in the middle of a save."""

import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import subprocess_env
from step_utils import ROOT, RUN_OVERRIDES, tiny_config

# The tiny demo, as tests/test_train_cli.py runs it (same compiled step), with a checkpoint every
# 2 steps: the reference run leaves checkpoints 2, 4 and 6.
BASE = {**RUN_OVERRIDES, "checkpoint.every": 2}


def _cfg(**overrides):
  return tiny_config(**{**BASE, **overrides})


def _rows(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]


def _train_rows(workdir):
  return [r for r in _rows(workdir) if "loss" in r]


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_same_run(got_params, want_params, wd, ref_wd, steps=6):
  """Bit-identical parameters, and metrics.jsonl holding each of steps 1..`steps` once with the
  reference run's loss and ITM accuracy."""
  for a, b in zip(_leaves(want_params), _leaves(got_params)):
    np.testing.assert_array_equal(a, b)
  got, want = _train_rows(wd), _train_rows(ref_wd)
  assert [row["step"] for row in got] == list(range(1, steps + 1))
  for g, w in zip(got, want):
    assert (g["loss"], g["itm_acc"]) == (w["loss"], w["itm_acc"]), (g, w)


# Session scope: a whole run, made once per xdist worker however it interleaves modules.
@pytest.fixture(scope="session")
def reference(tmp_path_factory):
  """An uninterrupted 6-step run: (config, workdir, final params)."""
  from nas_jax import checkpoint, train
  c = _cfg()
  wd = tmp_path_factory.mktemp("reference")
  r = train.train(c, str(wd), devices=jax.devices()[:1])
  assert r.final_step == 6 and sorted(os.listdir(wd / "checkpoints")) == ["2", "4", "6"]
  _, params, _ = checkpoint.load_params(str(wd), c)
  return c, wd, params


def _copy(reference, tmp_path) -> pathlib.Path:
  wd = tmp_path / "wd"
  shutil.copytree(reference[1], wd)
  return wd


# ============================================================================ config validation
@pytest.mark.parametrize("key, value, message", [
    ("nonfinite", "skp", r"config.nonfinite='skp': use one of 'stop', 'skip'"),
    ("data.batch_size", -4, r"config.data.batch_size=-4: must be an integer >= 1"),
    ("itc.queue_size", 500, r"config.itc.queue_size=500: must be a multiple of "
                            r"data.batch_size=32 .*queue_size=512"),
    ("nva.ratio", 0.0, r"config.nva.ratio=0.0: must be in \(0, 1\]"),
    ("nva.ratio", 1.5, r"config.nva.ratio=1.5"),
    ("nva.scope", "all", r"config.nva.scope='all': use one of 'image', 'primary'"),
    ("nva.norm", "l1", r"'l2', 'max'"),
    ("model.dtype", "fp16", r"config.model.dtype='fp16': use one of 'float32', 'bfloat16'"),
    ("model.residual_dtype", "float16",
     r"config.model.residual_dtype='float16': use one of 'float32', 'bfloat16'"),
    ("model.attention", "flash", r"'xla', 'cudnn', 'tokamax', 'auto'"),
    ("model.vit_attention", "flash", r"config.model.vit_attention='flash': use one of '', 'xla'"),
    ("model.vit.gelu", "fast", r"config.model.vit.gelu='fast': use one of 'exact', 'tanh'"),
    ("model.dictionary.init", "zeros", r"'normal', 'data'"),
    ("model.dictionary.distances", "bf16",
     r"config.model.dictionary.distances='bf16': use one of 'float32', 'tf32'"),
    ("data.source", "coco", r"config.data.source='coco': use one of 'synthetic', 'albef_json'"),
    ("data.augment", "heavy", r"'auto', 'full', 'flip', 'none'"),
    ("data.image_dtype", "float16", r"'float32', 'uint8'"),
    ("eval.score", "cosine", r"config.eval.score='cosine': use one of '', 'itm_p', 'itm'"),
    ("accum_steps", 0, r"config.accum_steps=0: must be an integer >= 1"),
    ("nonfinite_max_skips", 0, r"config.nonfinite_max_skips=0: must be an integer >= 1"),
    ("data.image_size", 48, r"config.data.image_size=48: differs from model.vit.image_size=32"),
    ("nva.k", 64, r"config.nva.k=64: need 1 <= k < model.dictionary.size=64"),
    ("checkpoint.keep", 0, r"config.checkpoint.keep=0"),
])
def test_validate_names_key_value_and_choices(key, value, message):
  from nas_jax import config_lib
  with pytest.raises(config_lib.ConfigError, match=message) as e:
    config_lib.validate(_cfg(**{key: value}))
  assert "\n" not in str(e.value)


def test_numerics_switches_may_change_on_resume_shapes_may_not():
  """A run saved with the float32 residual stream, exact GELU and bf16 matmuls can be resumed or
  continued with any of those switched (same parameters); a width change is refused by name."""
  from nas_jax import checkpoint
  saved = checkpoint.config_to_dict(_cfg())
  checkpoint.check_compatible(saved, _cfg(**{"model.residual_dtype": "bfloat16",
                                             "model.vit.gelu": "tanh", "model.bert.gelu": "tanh",
                                             "model.fp8": True,
                                             "model.dictionary.distances": "tf32"}),
                              "a float32-stream run")
  with pytest.raises(checkpoint.IncompatibleCheckpointError, match=r"model.embed_dim"):
    checkpoint.check_compatible(saved, _cfg(**{"model.embed_dim": 32}), "a width-64 run")


def test_nva_needs_the_dictionary():
  from nas_jax import config_lib
  with pytest.raises(config_lib.ConfigError, match="config.nva.enabled=True: needs config.model."
                                                   "use_dictionary=True"):
    config_lib.validate(_cfg(**{"nva.enabled": True, "model.use_dictionary": False}))


def test_workdir_that_is_a_file_or_under_one(tmp_path):
  from nas_jax import config_lib, train
  f = tmp_path / "file"
  f.write_text("x")
  with pytest.raises(config_lib.ConfigError, match=r"--workdir '.*file' is a file"):
    train.prepare_workdir(str(f))
  with pytest.raises(config_lib.ConfigError, match=r"--workdir '.*file/sub' cannot be written"):
    train.prepare_workdir(str(f / "sub"))


# ============================================================================ checkpoint fallback
def _restore(c, workdir):
  """Checkpointer(workdir).restore into the tiny model's abstract state, with a data iterator:
  (state, step, iterator)."""
  from nas_jax import checkpoint, optim, sharding
  from nas_jax.data import pipeline
  from nas_jax.data.text import load_tokenizer
  from nas_jax.models.nas import NASModel
  from nas_jax.train_step import init_state
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
  tx, _ = optim.make_optimizer(c.optim, c.total_steps)
  abstract = jax.eval_shape(lambda r: init_state(c, NASModel(config=c.model), tx, r),
                            jax.random.PRNGKey(0))
  shardings = sharding.state_shardings(abstract, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  it = pipeline.make_train_iterator(c, load_tokenizer(c.data.vocab))
  ckpt = checkpoint.Checkpointer(str(workdir), async_save=False)
  try:
    with jax.set_mesh(mesh):
      state, step = ckpt.restore(abstract, c, it)
  finally:
    ckpt.close()
  return state, step, it


def _truncate_largest_array_file(step_dir):
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
  biggest = max(files, key=lambda p: p.stat().st_size)
  with open(biggest, "r+b") as f:
    f.truncate(biggest.stat().st_size // 2)


def _garble(path):
  path.write_bytes(b"\x00garbled{")


def _truncate(path):
  path.write_bytes(path.read_bytes()[:-8])


CORRUPTIONS = {
    # name: (how, what the warning must name)
    "truncated array file": (_truncate_largest_array_file, r'ValueError: OUT_OF_RANGE: Error '
                             r'reading "\S+" in OCDBT database at local file "state/"'),
    "manifest.ocdbt": (lambda d: _garble(d / "state" / "manifest.ocdbt"),
                       r"state/manifest.ocdbt: not an OCDBT manifest \(bad header\)"),
    "truncated manifest.ocdbt": (lambda d: _truncate(d / "state" / "manifest.ocdbt"),
                                 r"state/manifest.ocdbt: truncated or padded OCDBT manifest"),
    "_METADATA": (lambda d: _garble(d / "state" / "_METADATA"),
                  r"state/_METADATA: not readable JSON"),
    "data iterator JSON": (lambda d: (d / "data" / "process_0-of-1.json").write_text(""),
                           r"data/process_0-of-1.json: not readable JSON"),
    "config JSON": (lambda d: _garble(d / "config" / "metadata"),
                    r"config/metadata: not readable JSON"),
    "empty step folder": (lambda d: [shutil.rmtree(d), d.mkdir()], r"the folder is empty"),
}


# Session scope: a whole run, made once per xdist worker however it interleaves modules.
@pytest.fixture(scope="session")
def clean_restore_of_step_4(reference, tmp_path_factory):
  """Step 4's state and the batch its data iterator yields next, from an intact copy."""
  wd = tmp_path_factory.mktemp("clean")
  shutil.copytree(reference[1], wd, dirs_exist_ok=True)
  shutil.rmtree(wd / "checkpoints" / "6")
  state, step, it = _restore(reference[0], wd)
  assert step == 4
  return state, next(it)


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_restore_falls_back_past_an_unreadable_checkpoint(corruption, reference, tmp_path, caplog,
                                                          clean_restore_of_step_4):
  """The newest checkpoint (6) is damaged: restore warns naming the step and the file, loads
  step 4 exactly (state and data position), and moves 6 aside without deleting anything."""
  corrupt, names = CORRUPTIONS[corruption]
  wd = _copy(reference, tmp_path)
  corrupt(wd / "checkpoints" / "6")
  files_before = sorted(str(p.relative_to(wd / "checkpoints" / "6"))
                        for p in (wd / "checkpoints" / "6").rglob("*"))
  with caplog.at_level(logging.WARNING, logger="nas_jax.checkpoint"):
    state, step, it = _restore(reference[0], wd)
  assert step == 4
  warning = next(r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage())
  assert f"checkpoint step 6 cannot be read: {wd}/checkpoints/6: " in warning
  assert re.search(names, warning), warning
  assert "\n" not in warning and len(warning) < 500
  # Kept, out of orbax's way: saving step 6 again cannot collide with it.
  assert sorted(os.listdir(wd / "checkpoints")) == ["2", "4"]
  kept = wd / "unreadable_checkpoints" / "6"
  assert sorted(str(p.relative_to(kept)) for p in kept.rglob("*")) == files_before
  want_state, want_batch = clean_restore_of_step_4
  for a, b in zip(_leaves(want_state), _leaves(state)):
    np.testing.assert_array_equal(a, b)
  for k, v in next(it).items():
    np.testing.assert_array_equal(v, want_batch[k])


def test_no_readable_checkpoint_is_one_line_and_moves_nothing(reference, tmp_path):
  from nas_jax import checkpoint
  wd = _copy(reference, tmp_path)
  for step in ("2", "4", "6"):
    _garble(wd / "checkpoints" / step / "config" / "metadata")
  with pytest.raises(checkpoint.NoReadableCheckpointError) as e:
    _restore(reference[0], wd)
  msg = str(e.value)
  assert "\n" not in msg
  assert f"no checkpoint in {wd}/checkpoints can be read (steps 6, 4, 2" in msg
  assert "move the folder away" in msg
  assert sorted(os.listdir(wd / "checkpoints")) == ["2", "4", "6"]
  assert not (wd / "unreadable_checkpoints").exists()


def test_resume_past_an_unreadable_checkpoint_matches_the_uninterrupted_run(reference, tmp_path):
  """Newest checkpoint (6) truncated: the run resumes from 4, trains 5 and 6, saves 6 again, and
  ends bit-identical to the uninterrupted run; metrics.jsonl holds each step once."""
  from nas_jax import checkpoint, train
  c, ref_wd, ref_params = reference
  wd = _copy(reference, tmp_path)
  _truncate_largest_array_file(wd / "checkpoints" / "6")
  r = train.train(c, str(wd), devices=jax.devices()[:1])
  assert r.final_step == 6
  assert (wd / "unreadable_checkpoints" / "6").is_dir()
  assert sorted(os.listdir(wd / "checkpoints")) == ["2", "4", "6"]
  _, params, _ = checkpoint.load_params(str(wd), c)
  _assert_same_run(params, ref_params, wd, ref_wd)
  saves = [row["step"] for row in _rows(wd) if "checkpoint_save_s" in row]
  assert saves == [2, 4, 6]


# ============================================================================ metrics.jsonl
def test_truncate_rows_keeps_steps_up_to_the_resumed_one(tmp_path):
  from nas_jax.metrics_writer import MetricWriter, truncate_rows
  path = tmp_path / "metrics.jsonl"
  rows = [{"step": s, "loss": s} for s in (1, 2, 3, 4)] + [{"step": 4, "eval/x": 1}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')  # Torn line.
  assert truncate_rows(str(path), 2) == 4
  assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2]
  w = MetricWriter(str(tmp_path), resume_step=1, tensorboard=False)
  w.write(2, {"loss": 7.0, "bad": float("nan")})
  w.close()
  got = _rows(tmp_path)
  assert [(r["step"], r.get("loss")) for r in got] == [(1, 1), (2, 7.0)]
  assert got[1]["bad"] == "nan" and got[1]["time"] > 1.7e9


# ============================================================================ non-finite loss
def _poison(monkeypatch, steps):
  """Makes the batches of `steps` (1-based, counted from this run's first step) all-NaN images."""
  from nas_jax import sharding
  real, calls = sharding.host_to_global, []

  def host_to_global(batch, mesh):
    calls.append(1)
    if len(calls) in steps:
      batch = dict(batch, image=np.full_like(batch["image"], np.nan))
    return real(batch, mesh)

  monkeypatch.setattr(sharding, "host_to_global", host_to_global)


@pytest.mark.parametrize("every, bad, newest", [(1, 4, 3), (2, 3, 2)])
def test_nonfinite_stop_saves_nothing_after_the_bad_step(every, bad, newest, tmp_path, monkeypatch):
  """Default policy: the error names the bad step and the newest *complete* checkpoint (async
  saves finish first), no state after the bad step is saved, and its metrics are logged."""
  from nas_jax import checkpoint, train
  _poison(monkeypatch, {bad})
  c = _cfg(**{"checkpoint.every": every, "checkpoint.async_save": True})
  with pytest.raises(train.NonFiniteLossError) as e:
    train.train(c, str(tmp_path), devices=jax.devices()[:1])
  msg = str(e.value)
  assert f"loss is not finite at step {bad} (loss=nan" in msg
  assert f"the newest complete checkpoint is step {newest} in {tmp_path}/checkpoints" in msg
  steps = sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit())
  assert steps[-1] == newest and not [p for p in os.listdir(tmp_path / "checkpoints")
                                      if "tmp" in p]
  _, params, _ = checkpoint.load_params(str(tmp_path), c)
  assert all(np.isfinite(x).all() for x in _leaves(params))
  rows = _train_rows(tmp_path)
  assert rows[-1]["step"] == bad and rows[-1]["loss"] == "nan"


@pytest.mark.slow
def test_nonfinite_skip_counts_and_stops_after_max_in_a_row(tmp_path, monkeypatch):
  """'skip': an isolated bad step is skipped and counted; nonfinite_max_skips in a row stop the
  run with an error; checkpoints keep finite parameters and the counters."""
  from nas_jax import checkpoint, train
  _poison(monkeypatch, {2, 4, 5, 6})
  c = _cfg(**{"nonfinite": "skip", "nonfinite_max_skips": 3})
  with pytest.raises(train.NonFiniteLossError,
                     match=r"3 updates in a row were skipped, the last at step 6 \(config."
                           r"nonfinite_max_skips=3\): training diverged; the newest complete "
                           r"checkpoint is step 4"):
    train.train(c, str(tmp_path), devices=jax.devices()[:1])
  rows = {r["step"]: r for r in _train_rows(tmp_path)}
  assert [rows[s]["skipped_updates"] for s in range(1, 7)] == [0, 1, 1, 2, 3, 4]
  assert rows[2]["loss"] == "nan" and rows[3]["loss"] != "nan"
  _, params, _ = checkpoint.load_params(str(tmp_path), c)
  assert all(np.isfinite(x).all() for x in _leaves(params))
  loop = json.loads((tmp_path / "checkpoints" / "4" / "loop" / "metadata").read_text())
  assert loop == {"skipped_updates": 2, "consecutive_skips": 1}


# ============================================================================ progress log
class _Rows:
  def __init__(self):
    self.rows = []

  def write(self, step, metrics, prefix=""):
    self.rows.append((step, dict(metrics)))


def test_progress_log_rates_exclude_startup():
  """The first row has startup_s (start-up + compile) and no throughput; later rates, and the
  bar's clock, start when the first step has completed."""
  from nas_jax import run_plan, train
  clock = iter([100.0, 101.0, 103.0])
  rows = _Rows()
  plan = run_plan.RunPlan(first_step=0, last_step=10, steps_per_epoch=10, alpha_warmup_steps=0,
                          lr=1e-4, min_lr=1e-5, warmup_steps=1, schedule_steps=10)
  p = train.ProgressLog(rows, plan=plan, start=4, batch_size=8, log_every=2, desc="t",
                        t_start=10.0, enabled=False)
  p.clock = lambda: next(clock)
  m = {"loss": 1.0, "itm_acc": 0.5}
  p.step_done(5, m)
  p.step_done(6, m)           # Logged (6 % 2 == 0): 1 step in 1 s.
  p.step_done(7, m, force_row=True)
  assert rows.rows[0] == (5, {**m, "startup_s": 90.0})
  assert rows.rows[1] == (6, {**m, "samples_per_s": 8.0})
  assert rows.rows[2] == (7, {**m, "samples_per_s": 4.0})


# ============================================================================ data workers
def test_data_workers_leave_no_shared_memory(tmp_path):
  """With data workers, batches come in shared memory; close_iterator frees it before exit (no
  'leaked shared_memory objects' warning from Python's resource tracker)."""
  script = """
import sys
sys.path[:0] = ["tests", "."]
import jax
from step_utils import tiny_config
from nas_jax import sharding
from nas_jax.data import pipeline
from nas_jax.data.text import load_tokenizer

def run():   # As train() does: batches go to the device (zero-copy on CPU), locals, then close.
  c = tiny_config(**{"data.num_workers": 2})
  it = pipeline.make_train_iterator(c, load_tokenizer(c.data.vocab))
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
  for _ in range(3):
    batch = jax.block_until_ready(sharding.host_to_global(next(it), mesh))
  batch = None
  pipeline.close_iterator(it)

if __name__ == "__main__":   # The workers are spawned: they import this file.
  run()
  print("done")
"""
  (tmp_path / "run.py").write_text(script)
  env = subprocess_env()
  proc = subprocess.run([sys.executable, str(tmp_path / "run.py")], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "done" in proc.stdout, proc.stderr
  assert "leaked shared_memory" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


# ============================================================================ kill -9 mid-save
# Runs `python -m nas_jax.train` with os.rename patched to SIGKILL the process at the moment orbax
# commits step KILL_AT_STEP (its files are all written, the temporary folder not yet renamed).
KILL_DRIVER = """
import os, runpy, signal, sys
real_rename = os.rename
def rename(src, dst, *a, **k):
  name, src_name = os.path.basename(str(dst)), os.path.basename(str(src))
  if name == os.environ["KILL_AT_STEP"] and "tmp" in src_name:
    os.kill(os.getpid(), signal.SIGKILL)
  return real_rename(src, dst, *a, **k)
os.rename = rename
sys.argv[0] = "nas_jax.train"
runpy.run_module("nas_jax.train", run_name="__main__", alter_sys=True)
"""


def _cli_args(workdir):
  return (["--config", "configs/demo.py:tiny", "--workdir", str(workdir)]
          + [f"--config.{k}={v}" for k, v in {**BASE, "checkpoint.async_save": True}.items()])


@pytest.mark.slow
def test_kill_9_mid_save_resumes_bit_identical(tmp_path):
  """SIGKILL while the async save of step 4 commits: step 4 is not a checkpoint, the rerun
  resumes from 2 and ends bit-identical to an uninterrupted run (same command, run alongside),
  metrics.jsonl holds each step once, and no shared memory leaks. (The reference is a CLI run too:
  this process's 1-of-8-device runs differ from a 1-device process in the last bits.)"""
  from nas_jax import checkpoint
  ref_wd, wd = tmp_path / "reference", tmp_path / "killed"
  env = subprocess_env(KILL_AT_STEP="4")
  run = lambda *cmd: subprocess.Popen([sys.executable, *cmd], cwd=ROOT, env=env,  # noqa: E731
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  reference = run("-m", "nas_jax.train", *_cli_args(ref_wd))
  # The killed run starts once the reference has compiled its programs: it loads them from the
  # compilation cache instead of compiling them a second time alongside.
  ref_out = ""
  for line in reference.stdout:
    ref_out += line
    if "train step compiled" in line or "train step loaded" in line:
      break
  killed = run("-c", KILL_DRIVER, *_cli_args(wd))
  killed_out = killed.communicate(timeout=600)[0]
  ref_out += reference.communicate(timeout=600)[0]
  assert reference.returncode == 0, ref_out[-4000:]
  assert killed.returncode == -9, killed_out[-4000:]
  names = os.listdir(wd / "checkpoints")
  assert "2" in names and "4" not in names and any(n.startswith("4.") for n in names), names
  resumed = run("-m", "nas_jax.train", *_cli_args(wd))
  out = resumed.communicate(timeout=600)[0]
  assert resumed.returncode == 0, out[-4000:]
  assert "at step 2" in out and "leaked shared_memory" not in out
  c = _cfg()
  _, want, _ = checkpoint.load_params(str(ref_wd), c)
  _, got, _ = checkpoint.load_params(str(wd), c)
  _assert_same_run(got, want, wd, ref_wd)
