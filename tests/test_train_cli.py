"""`nas_jax.train`: exact resume, SIGTERM, sharded = single-device, and clear errors on bad input."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import subprocess_env
from step_utils import ROOT, RUN_OVERRIDES, tiny_config


def _cfg(**overrides):
  return tiny_config(**{**RUN_OVERRIDES, **overrides})


def _losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: (r["loss"], r["loss_itc"], r["loss_mlm"], r["loss_itm"]) for r in rows
          if "loss" in r}   # Training rows (not the checkpoint or evaluation rows).


def _params(workdir, config):
  from nas_jax import checkpoint
  _, params, batch_stats = checkpoint.load_params(str(workdir), config)
  return jax.tree.leaves(params) + jax.tree.leaves(batch_stats)


# Session scope: a whole run, made once per xdist worker however it interleaves modules.
@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
  from nas_jax import train
  c = _cfg()
  wd = tmp_path_factory.mktemp("full")
  result = train.train(c, str(wd), devices=jax.devices()[:1])
  assert result.final_step == 6 and not result.interrupted
  return c, wd


def test_resume_is_exact(uninterrupted, tmp_path, caplog):
  """3 steps, stop (as on SIGTERM), resume 3 steps = 6 uninterrupted steps: same batches (same
  losses at every step) and the same parameters. The resumed run's step is the program the
  first run compiled: it comes from the persistent compilation cache, compiled beside the
  restore."""
  from nas_jax import train
  c, full = uninterrupted
  r1 = train.train(c, str(tmp_path), devices=jax.devices()[:1], interrupt_after=3)
  assert r1.interrupted and r1.final_step == 3
  caplog.clear()
  with caplog.at_level("INFO", logger="nas_jax.train"):
    r2 = train.train(c, str(tmp_path), devices=jax.devices()[:1])
  assert r2.final_step == 6 and not r2.interrupted
  assert re.search(r"train step loaded from the compilation cache in [\d.]+s \(beside the "
                   r"restore\)", caplog.text), caplog.text
  want, got = _losses(full), _losses(tmp_path)
  assert sorted(got) == sorted(want) == list(range(1, 7))
  for step in want:
    np.testing.assert_allclose(got[step], want[step], rtol=1e-5, err_msg=f"step {step}")
  for a, b in zip(_params(full, c), _params(tmp_path, c)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_eight_devices_same_losses_as_one(uninterrupted, eight_device_run):
  c, full = uninterrupted
  assert eight_device_run[0] == c
  want, got = _losses(full), _losses(eight_device_run[1])
  assert sorted(got) == sorted(want) == list(range(1, 7))
  for step in want:
    np.testing.assert_allclose(got[step], want[step], rtol=2e-4, atol=2e-5, err_msg=f"step {step}")


def test_batch_not_divisible_by_devices(tmp_path):
  from nas_jax import train
  c = _cfg(**{"data.batch_size": 36, "itc.queue_size": 36 * 4, "itm.hard_negative_groups": 0})
  with pytest.raises(ValueError, match=r"data.batch_size=36 is not divisible by the 8"):
    train.train(c, str(tmp_path), devices=jax.devices()[:8])


@pytest.fixture
def compile_on_demand(monkeypatch):
  """train() compiles its step in a daemon thread beside the initialisation. A run that fails
  before its first step leaves that thread compiling, taking a core from the tests after it; here
  the step compiles only if the run asks for it."""
  from nas_jax import compilation
  in_background = compilation.in_background

  class Deferred:
    def __init__(self, *args, **kwargs):
      self.args, self.kwargs, self.future = args, kwargs, None

    def result(self, timeout=None):
      self.future = self.future or in_background(*self.args, **self.kwargs)
      return self.future.result(timeout)

  monkeypatch.setattr(compilation, "in_background", Deferred)


def test_missing_init_from(tmp_path, compile_on_demand):
  from nas_jax import train
  c = _cfg(init_from=str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="init_from.*does not exist"):
    train.train(c, str(tmp_path / "wd"), devices=jax.devices()[:1])


def test_incompatible_checkpoint(uninterrupted, compile_on_demand):
  from nas_jax import checkpoint, train
  c, full = uninterrupted
  c2 = _cfg(**{"model.embed_dim": 32})
  with pytest.raises(checkpoint.IncompatibleCheckpointError,
                     match=r"model.embed_dim: checkpoint 64 vs config 32"):
    train.train(c2, str(full), devices=jax.devices()[:1])


def test_init_from_another_stage(uninterrupted, tmp_path):
  """Stage 2 continues stage 1: its step counter (6 → 7), parameters, codebook and queues."""
  from nas_jax import train
  c, full = uninterrupted
  assert not train.stage2_config(c, str(full)).continue_schedule   # demo: stage2_lr restarts
  c = c.copy_and_resolve_references()
  c.stage2_lr = 0.0
  c2 = train.stage2_config(c, str(full))
  assert c2.nva.enabled and c2.init_from == str(full) and c2.continue_schedule
  c2.unlock()
  c2.total_steps = 1
  c2.lock()
  r = train.train(c2, str(tmp_path), devices=jax.devices()[:1])
  assert r.final_step == 7
  assert "nva_replaced_frac" in json.loads(open(tmp_path / "metrics.jsonl").readline())


def _cli(args, **kw):
  env = subprocess_env()
  return subprocess.run([sys.executable, "-m", "nas_jax.train", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, **kw)


def test_unknown_config_key_is_an_error(tmp_path):
  proc = _cli(["--config", "configs/demo.py:tiny", "--workdir", str(tmp_path),
               "--config.optim.learning_rate=1e-3"], timeout=120)
  assert proc.returncode != 0
  assert "learning_rate" in proc.stderr and "lr" in proc.stderr  # Names the key, suggests 'lr'.


@pytest.mark.parametrize("args, message", [
    (["--config.nonfinite=skp"], "error: config.nonfinite='skp': use one of 'stop', 'skip'"),
    (["--config.data.batch_size=-4"],
     "error: config.data.batch_size=-4: must be an integer >= 1 (the global batch)"),
    (["--workdir={file}"], "error: --workdir '{file}' is a file, not a directory: pass a "
                           "directory"),
])
def test_bad_input_is_a_one_line_error(args, message, tmp_path):
  """Bad values are refused at start-up (before any step, nothing written) in one line."""
  f = tmp_path / "file"
  f.write_text("")
  wd = tmp_path / "wd"
  proc = _cli(["--config", "configs/demo.py:tiny", "--workdir", str(wd)]
              + [a.format(file=f) for a in args], timeout=300)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [message.format(file=f)], proc.stderr
  assert not (wd / "checkpoints").exists()


def test_main_keeps_the_traceback_of_a_bug(monkeypatch, capsys):
  """Only input errors become one `error:` line; a ValueError from a bug keeps its traceback."""
  from absl import flags
  from nas_jax import train
  monkeypatch.setattr(flags, "FLAGS", type("Flags", (), {"config": _cfg(), "workdir": "/nowhere"}))
  monkeypatch.setattr(train.logging, "basicConfig", lambda **kw: None)
  monkeypatch.setattr(train.sharding, "initialize_distributed", lambda: None)

  def raises(error):
    def run(*args, **kwargs):
      raise error
    return run

  monkeypatch.setattr(train, "train", raises(ValueError("a bug")))
  with pytest.raises(ValueError, match="a bug"):
    train.main([])
  monkeypatch.setattr(train, "train", raises(train.ConfigError("config.x=1: use 2")))
  with pytest.raises(SystemExit) as e:
    train.main([])
  assert e.value.code == 1 and capsys.readouterr().err == "error: config.x=1: use 2\n"


@pytest.mark.slow
def test_sigterm_saves_and_resumes(tmp_path):
  """SIGTERM mid-run: the step finishes, a checkpoint is written, the process exits 0, and a new
  run in the same workdir resumes from it and completes. Both use the workdir's compilation cache
  (the default when JAX_COMPILATION_CACHE_DIR is not set; the resumed run's program differs, its
  schedule is shorter, so test_resume_is_exact asserts a cache hit)."""
  args = ["--config", "configs/demo.py:tiny", "--workdir", str(tmp_path),
          "--config.eval.enabled=False", "--config.stage2_steps=0", "--config.total_steps=400",
          "--config.log_every=1", "--config.checkpoint.every=0"]
  env = subprocess_env()
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  # The output goes to a file: an unread pipe fills up and blocks the run mid-step.
  log_path = pathlib.Path(tmp_path) / "out.txt"
  with open(log_path, "w") as log:
    proc = subprocess.Popen([sys.executable, "-m", "nas_jax.train", *args], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, text=True)
  metrics = pathlib.Path(tmp_path) / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
    assert proc.poll() is None, log_path.read_text()
    time.sleep(0.5)
  assert time.time() < deadline, "no 3 metrics rows in 240 s: " + log_path.read_text()[-3000:]
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=240)
  out = log_path.read_text()
  assert proc.returncode == 0, out
  # The warning starts its own line: it does not run into the progress bar's text.
  assert re.search(r"(^|[\r\n])\d\d:\d\d:\d\d WARNING SIGTERM received: saving step", out), out
  assert "first step done" in out and "checkpoint step" in out and " saved in " in out
  assert "train step compiled in" in out and "(beside the initialisation)" in out
  cache = pathlib.Path(tmp_path) / "jax_cache"
  assert f"compilation cache: {cache}" in out and any(cache.iterdir())
  steps = sorted(int(p.name) for p in (pathlib.Path(tmp_path) / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert steps and 3 <= steps[-1] < 400
  done = steps[-1]
  resumed = subprocess.run(
      [sys.executable, "-m", "nas_jax.train", *args[:-4], "--config.eval.enabled=False",
       "--config.stage2_steps=0", f"--config.total_steps={done + 2}", "--config.log_every=1"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  assert "resumed from" in resumed.stdout and f"at step {done}" in resumed.stdout
  assert f"compilation cache: {cache}" in resumed.stdout
  # The smaller total_steps is the new plan, said in a warning; the run ends there.
  assert "the config changes the plan of this run (last_step 400 → " in resumed.stdout
  assert json.loads((pathlib.Path(tmp_path) / "plan.json").read_text())["last_step"] == done + 2
  assert max(int(p.name) for p in (pathlib.Path(tmp_path) / "checkpoints").iterdir()
             if p.name.isdigit()) == done + 2


def test_init_from_converted_pytorch_weights(uninterrupted, tmp_path):
  """`init_from` a `nas_jax.convert` folder: its tensors replace the initial ones, the momentum
  encoders start as copies, and parts it lacks keep their initialisation."""
  from nas_jax import checkpoint, convert, train
  c, full = uninterrupted
  _, params, _ = checkpoint.load_params(str(full), c)
  bert = jax.tree.map(lambda x: np.asarray(x) + 0.5, params["bert"])
  convert.save_converted(tmp_path / "conv", {"params": {"bert": bert}}, {"source": "test"})
  c2 = _cfg(init_from=str(tmp_path / "conv"), **{"optim.lr": 1e-12, "optim.min_lr": 1e-12})
  train.train(c2, str(tmp_path / "wd"), devices=jax.devices()[:1], interrupt_after=1)
  _, got, _ = checkpoint.load_params(str(tmp_path / "wd"), c2)
  for a, b in zip(jax.tree.leaves(bert), jax.tree.leaves(got["bert"])):
    np.testing.assert_allclose(np.asarray(b), a, atol=1e-5)
  # The ViT was not in the folder: it is the fresh initialisation, not stage 1's weights.
  assert any(np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
             for a, b in zip(jax.tree.leaves(params["vit"]), jax.tree.leaves(got["vit"])))


def test_preemption_guard_keeps_a_sigterm_from_startup_and_ctrl_c_aborts_it():
  """A scheduler's SIGTERM during start-up (compilation) is kept for the loop (one step, a save,
  exit 0); a Ctrl-C before the loop aborts at once, and a second one in the loop too."""
  from nas_jax import train

  def send(signum):
    os.kill(os.getpid(), signum)
    time.sleep(0.01)   # The handler runs between bytecodes of this thread.

  with train.PreemptionGuard() as guard:
    send(signal.SIGTERM)
    assert guard.requested == "SIGTERM"
    with pytest.raises(KeyboardInterrupt):
      send(signal.SIGINT)
    guard.requested, guard.loop_started = None, True
    send(signal.SIGINT)
    assert guard.requested == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
      send(signal.SIGINT)
  assert signal.getsignal(signal.SIGTERM) != guard._handle   # Restored on exit.
