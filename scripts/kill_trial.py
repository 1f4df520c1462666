r"""Kill trial: interrupt a training run many times, resume it each time, and check that it ends
bit-identical to an uninterrupted run.

  python scripts/kill_trial.py --workdir runs/kill_trial          # 16 kill -9, 3 SIGTERM/SIGINT
  python scripts/kill_trial.py --workdir runs/kt --kills 4 --signals 1 --steps 60 --every 10 \
      --seed 1 --config configs/demo.py:tiny

What it does (all runs are `python -m nas_jax.train` subprocesses with the same overrides):
  1. <workdir>/reference: one uninterrupted run (its start-up time bounds the start-up kills).
  2. <workdir>/trial: runs that are interrupted, each resuming the previous one's workdir:
     - `--kills` with SIGKILL, a third each: at a random moment of a random step (between the
       newest checkpoint and a share of the steps left), just after a save has started (its
       temporary folder exists: a half-written checkpoint), at a random moment of start-up and
       compilation;
     - `--signals` with SIGTERM or SIGINT (alternating) in a random step: the run must save and
       exit 0;
     then one last run to the end.
  3. Compares the final checkpoints of both workdirs: every array of the train state (parameters,
     momentum parameters, optimiser state, queues, VD codebook, PRNG key, step), the data
     iterator's position and the loop counters must be bit-identical; metrics.jsonl of the trial
     must hold each training step once, with the reference's losses.

Prints one line per interruption and a verdict; exits 1 on any difference. Takes about
(kills + signals + 2) × the time of one run (the demo's tiny config: ~1 minute each on 2 cores).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def overrides(args) -> list[str]:
  return ["--config", args.config, f"--config.total_steps={args.steps}",
          f"--config.checkpoint.every={args.every}", "--config.stage2_steps=0",
          "--config.eval.enabled=False", f"--config.log_every={args.log_every}"]


def start(args, workdir: pathlib.Path) -> subprocess.Popen:
  log = open(workdir.parent / f"{workdir.name}.log", "a")
  log.write(f"\n==== {time.strftime('%H:%M:%S')} start\n")
  log.flush()
  return subprocess.Popen([sys.executable, "-m", "nas_jax.train", "--workdir", str(workdir),
                           *overrides(args)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))


def newest_step(workdir: pathlib.Path) -> int | None:
  steps = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
  return max(steps) if steps else None


def logged_step(workdir: pathlib.Path) -> int:
  """The last training step in metrics.jsonl (0 if none)."""
  try:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
  except FileNotFoundError:
    return 0
  steps = [json.loads(line)["step"] for line in lines if '"loss"' in line and line.endswith("}")]
  return max(steps, default=0)


def startup_seconds(workdir: pathlib.Path, default: float) -> float:
  """`startup_s` of the last run that reached its first step (later runs hit the compilation
  cache: their start-up is shorter than the reference's)."""
  try:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
            if '"startup_s"' in line and line.endswith("}")]
  except FileNotFoundError:
    rows = []
  return rows[-1]["startup_s"] if rows else default


def temporary_folders(workdir: pathlib.Path) -> set:
  """(name, inode) of the temporary folders of saves in progress."""
  out = set()
  for path in glob.glob(str(workdir / "checkpoints" / "*.orbax-checkpoint-tmp*")):
    try:
      out.add((os.path.basename(path), os.stat(path).st_ino))
    except FileNotFoundError:
      pass
  return out


def wait_until(proc: subprocess.Popen, condition, timeout: float = 1800) -> bool:
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if condition():
      return True
    time.sleep(0.005)
  return False


def interrupt(args, workdir: pathlib.Path, how: str, remaining: int, startup: float,
              rng: random.Random) -> str:
  """One interrupted run. how: 'kill@startup' (a random moment of start-up and compilation),
  'kill@save' (just after a save has started), '<kill|term|int>@step' (a random moment of a
  random step between the newest checkpoint and a share of the steps left)."""
  signum = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "int": signal.SIGINT}[how.split("@")[0]]
  before = newest_step(workdir) or 0
  stale = temporary_folders(workdir)   # Left by a killed save: the next run removes them.
  log = workdir.parent / f"{workdir.name}.log"
  offset = log.stat().st_size if log.exists() else 0
  # metrics.jsonl still holds the previous run's rows until this run has restored and trimmed it.
  training = lambda: b"first step done" in log.read_bytes()[offset:]  # noqa: E731
  proc = start(args, workdir)
  t0 = time.time()
  where = ""
  if how.endswith("@startup"):
    time.sleep(rng.uniform(0.0, startup_seconds(workdir, startup)))
    where = f"at {time.time() - t0:.1f}s"
  elif how.endswith("@save"):
    if wait_until(proc, lambda: temporary_folders(workdir) - stale):
      time.sleep(rng.uniform(0.0, 0.2))
      where = "during a save"
  else:
    span = max(args.every + 1, (args.steps - before - 1) // max(remaining, 1))
    target = rng.randint(before + 1, max(before + 1, min(args.steps - 1, before + span)))
    if wait_until(proc, lambda: training() and logged_step(workdir) >= target):
      where = f"after step {target}"
  if proc.poll() is None:
    proc.send_signal(signum)
  rc = proc.wait(timeout=600)
  expected = (-signal.SIGKILL,) if signum == signal.SIGKILL else (0,)
  note = "" if rc in expected or not where else "   UNEXPECTED EXIT STATUS"
  return (f"{how:13s} {where or '(the run ended first)':22s} exit {rc:4d}  newest checkpoint "
          f"{before} -> {newest_step(workdir)}{note}")


def load_final(workdir: pathlib.Path):
  """(flat {path: array} of the train state, data-iterator JSON files, loop JSON) of the newest
  checkpoint."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  step_dir = workdir / "checkpoints" / str(newest_step(workdir))
  meta = ocp.StandardCheckpointer().metadata(step_dir / "state").item_metadata
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
  state = ocp.StandardCheckpointer().restore(step_dir / "state", target)
  flat = {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}
  data = {p.name: json.loads(p.read_text()) for p in sorted((step_dir / "data").glob("*.json"))}
  loop = step_dir / "loop" / "metadata"
  return flat, data, json.loads(loop.read_text()) if loop.exists() else None


def training_rows(workdir: pathlib.Path) -> list[dict]:
  rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  return [r for r in rows if "loss" in r]


def compare(reference: pathlib.Path, trial: pathlib.Path, steps: int) -> list[str]:
  import numpy as np
  problems = []
  if newest_step(trial) != steps or newest_step(reference) != steps:
    problems.append(f"final checkpoints: reference {newest_step(reference)}, trial "
                    f"{newest_step(trial)}, expected {steps}")
    return problems
  (ref, ref_data, ref_loop), (got, got_data, got_loop) = load_final(reference), load_final(trial)
  if sorted(ref) != sorted(got):
    problems.append("the train states have different structures")
  for key in sorted(set(ref) & set(got)):
    if ref[key].shape != got[key].shape or not np.array_equal(ref[key], got[key], equal_nan=True):
      diff = (np.max(np.abs(ref[key].astype(np.float64) - got[key].astype(np.float64)))
              if ref[key].shape == got[key].shape else "shape")
      problems.append(f"state{key} differs (max |diff| {diff})")
  if ref_data != got_data:
    problems.append(f"data iterator: reference {ref_data} vs trial {got_data}")
  if ref_loop != got_loop:
    problems.append(f"loop counters: reference {ref_loop} vs trial {got_loop}")
  ref_rows, got_rows = training_rows(reference), training_rows(trial)
  got_steps = [r["step"] for r in got_rows]
  if got_steps != [r["step"] for r in ref_rows]:
    dup = len(got_steps) - len(set(got_steps))
    problems.append(f"metrics.jsonl: {len(got_steps)} training rows ({dup} duplicated steps), "
                    f"reference {len(ref_rows)}")
  elif any(a["loss"] != b["loss"] for a, b in zip(ref_rows, got_rows)):
    problems.append("metrics.jsonl: losses differ from the reference")
  return problems


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="holds reference/, trial/ and their logs")
  p.add_argument("--config", default="configs/demo.py:tiny")
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--every", type=int, default=20, help="checkpoint.every")
  p.add_argument("--log_every", type=int, default=1, help="1: kills can target any step")
  p.add_argument("--kills", type=int, default=16,
                 help="SIGKILLs: a third each in a step, during a save, during start-up")
  p.add_argument("--signals", type=int, default=3, help="SIGTERMs / SIGINTs")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  work = pathlib.Path(args.workdir).resolve()
  reference, trial = work / "reference", work / "trial"
  for d in (reference, trial):
    if d.exists() and any(d.iterdir()):
      print(f"error: {d} is not empty: choose a new --workdir", file=sys.stderr)
      return 2
  work.mkdir(parents=True, exist_ok=True)
  rng = random.Random(args.seed)

  rc = start(args, reference).wait()
  first_row = json.loads((reference / "metrics.jsonl").read_text().splitlines()[0])
  startup = first_row.get("startup_s", 60.0)
  print(f"reference: {args.steps} steps, start-up {startup:.0f}s (exit {rc}); "
        f"log {work}/reference.log")
  if rc != 0:
    return 1
  kills = (["kill@step", "kill@save", "kill@startup"] * args.kills)[:args.kills]
  plan = kills + (["term@step", "int@step"] * args.signals)[:args.signals]
  rng.shuffle(plan)
  trial.mkdir()
  for i, how in enumerate(plan, 1):
    line = interrupt(args, trial, how, len(plan) - i + 1, startup, rng)
    print(f"[{i:2d}/{len(plan)}] {line}", flush=True)
  rc = start(args, trial).wait()
  print(f"final run: exit {rc}; log {work}/trial.log")
  problems = compare(reference, trial, args.steps) if rc == 0 else [f"final run exited {rc}"]
  for line in problems:
    print("DIFFERENT:", line)
  print("bit-identical to the uninterrupted run" if not problems else
        f"{len(problems)} difference(s)")
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
