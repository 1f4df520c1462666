r"""Kill trial: interrupt a training run many times, resume it each time, and check that it ends
bit-identical to an uninterrupted run.

  python scripts/kill_trial.py --workdir runs/kill_trial                  # 16 kill -9, 3 SIGTERM/INT
  python scripts/kill_trial.py --workdir runs/kt --kills 4 --signals 1 --steps 60 --every 10 \
      --seed 1 --config configs/demo.py:tiny

What it does (all runs are `python -m nas_jax.train` subprocesses with the same overrides):
  1. <workdir>/reference: one uninterrupted run (its wall time sets the range of kill moments).
  2. <workdir>/trial: runs that are interrupted, each resuming the previous one's workdir:
     - `--kills` with SIGKILL: half at a random moment of the run (start-up, compilation, training,
       a save), half just after an asynchronous save has started (a temporary checkpoint folder
       exists), the moment the issue of a half-written checkpoint can arise;
     - `--signals` with SIGTERM or SIGINT (alternating) at a random moment: the run must save and
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


def wait_for_save(proc: subprocess.Popen, workdir: pathlib.Path, timeout: float) -> bool:
  """Polls until a temporary checkpoint folder exists (a save in progress) or the run ends."""
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if glob.glob(str(workdir / "checkpoints" / "*.orbax-checkpoint-tmp*")):
      return True
    time.sleep(0.005)
  return False


def interrupt(args, workdir: pathlib.Path, how: str, duration: float, rng: random.Random) -> str:
  before = newest_step(workdir)
  proc = start(args, workdir)
  t0 = time.time()
  at_save = False
  if how == "kill@save":
    at_save = wait_for_save(proc, workdir, timeout=3 * duration)
    time.sleep(rng.uniform(0.0, 0.2))
  else:
    time.sleep(rng.uniform(0.0, duration))
  sig = {"kill": signal.SIGKILL, "kill@save": signal.SIGKILL, "term": signal.SIGTERM,
         "int": signal.SIGINT}[how]
  if proc.poll() is None:
    proc.send_signal(sig)
  rc = proc.wait(timeout=600)
  ok = rc == -signal.SIGKILL if sig == signal.SIGKILL else rc == 0
  if proc.returncode == 0 and sig == signal.SIGKILL:
    ok = True   # The run ended before the signal: still a valid trial step.
  return (f"{how:9s} after {time.time() - t0:6.1f}s{' (save in progress)' if at_save else '':19s} "
          f"exit {rc:4d}  newest checkpoint {before} -> {newest_step(workdir)}"
          + ("" if ok else "   UNEXPECTED EXIT STATUS"))


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
  p.add_argument("--log_every", type=int, default=5)
  p.add_argument("--kills", type=int, default=16, help="SIGKILLs (half of them during a save)")
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

  t0 = time.time()
  rc = start(args, reference).wait()
  duration = time.time() - t0
  print(f"reference: {args.steps} steps in {duration:.0f}s (exit {rc}); log {work}/reference.log")
  if rc != 0:
    return 1
  plan = (["kill", "kill@save"] * args.kills)[:args.kills] + \
      (["term", "int"] * args.signals)[:args.signals]
  rng.shuffle(plan)
  trial.mkdir()
  for i, how in enumerate(plan, 1):
    print(f"[{i:2d}/{len(plan)}] " + interrupt(args, trial, how, duration, rng), flush=True)
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
