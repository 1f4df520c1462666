"""Metrics a person looks at: one JSON line per logged step and TensorBoard scalars (no TensorFlow).

`<workdir>/metrics.jsonl` rows: {"step": n, "time": unix seconds, <metric>: value, ...}. A step
can have up to three rows: training ("loss", ...), evaluation ("eval/..." keys) and a completed
checkpoint save ("checkpoint_save_s", ...). A resumed run first drops the rows of steps after the
step it resumes from (`resume_step`), so after any number of interruptions each step's rows appear
once, as an uninterrupted run would have written them.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Mapping

import numpy as np


def truncate_rows(path: str, last_step: int) -> int:
  """Keeps the rows of `path` whose step is <= last_step (and drops a torn last line that a
  killed process left); atomic. Returns the number of rows dropped."""
  if not os.path.exists(path):
    return 0
  kept, dropped = [], 0
  with open(path) as f:
    for line in f:
      try:
        row = json.loads(line)
        keep = int(row["step"]) <= last_step
      except (ValueError, KeyError, TypeError):
        keep = False
      if keep:
        kept.append(line if line.endswith("\n") else line + "\n")
      else:
        dropped += 1
  if dropped:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(kept)
    os.replace(tmp, path)
  return dropped


class MetricWriter:
  """Writes `<workdir>/metrics.jsonl` and TensorBoard event files under `<workdir>/tb`.

  Only process 0 writes (`enabled=False` elsewhere). resume_step: the step the run starts from;
  rows (and TensorBoard scalars) of later steps, left by an interrupted run, are removed first.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True,
               resume_step: int | None = None):
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    if resume_step is not None:
      truncate_rows(self.path, resume_step)
    self._file = open(self.path, "a", buffering=1)
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
        purge = None if resume_step is None else resume_step + 1
        self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=purge)
      except ImportError:  # tensorboardX is optional for library use.
        self._tb = None

  def write(self, step: int, metrics: Mapping[str, float], prefix: str = "") -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "time": round(time.time(), 3)}
    for k, v in metrics.items():
      v = float(np.asarray(v))
      row[prefix + k] = v if math.isfinite(v) else str(v)
      if self._tb is not None and math.isfinite(v):
        self._tb.add_scalar(prefix + k, v, int(step))
    self._file.write(json.dumps(row) + "\n")

  def close(self) -> None:
    if not self.enabled:
      return
    self._file.close()
    if self._tb is not None:
      self._tb.close()


# ============================================================================ reading runs back
def read_rows(workdir: str) -> list[dict]:
  """Every row of `<workdir>/metrics.jsonl` in file order ([] when there is none)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def summarize(workdir: str) -> dict:
  """A run as a user times it: `startup_s` (process start to the end of the first step),
  `samples_per_s` (median of the logged training rows after the first), the checkpoint saves
  (`saves`, the largest `blocking_s` and the median `save_s`), the last step and its loss."""
  rows = read_rows(workdir)
  train = [r for r in rows if "loss" in r]
  saves = [r for r in rows if "checkpoint_save_s" in r]
  rates = [r["samples_per_s"] for r in train if "samples_per_s" in r]
  return {
      "run": workdir,
      "startup_s": next((r["startup_s"] for r in train if "startup_s" in r), None),
      "samples_per_s": float(np.median(rates)) if rates else None,
      "saves": len(saves),
      "blocking_s": max((r["checkpoint_blocking_s"] for r in saves), default=None),
      "save_s": float(np.median([r["checkpoint_save_s"] for r in saves])) if saves else None,
      "last_step": train[-1]["step"] if train else None,
      "loss": train[-1]["loss"] if train else None,
  }


def summary_table(workdirs: list[str]) -> str:
  """`summarize` of each run as one markdown table."""
  fmt = lambda v, spec: "–" if v is None else format(v, spec)
  lines = ["| run | start-up s | samples/s (median) | saves | training blocked s (max) | "
           "save s (median) | last step | loss |", "|---|---|---|---|---|---|---|---|"]
  for w in workdirs:
    s = summarize(w)
    lines.append(f"| {w} | {fmt(s['startup_s'], '.1f')} | {fmt(s['samples_per_s'], '.1f')} | "
                 f"{s['saves']} | {fmt(s['blocking_s'], '.2f')} | {fmt(s['save_s'], '.2f')} | "
                 f"{fmt(s['last_step'], 'd')} | {fmt(s['loss'], '.4f')} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  """`python -m nas_jax.metrics_writer --summary WORKDIR...`: the runs' summary table."""
  import argparse
  p = argparse.ArgumentParser(prog="python -m nas_jax.metrics_writer", description=main.__doc__)
  p.add_argument("--summary", nargs="+", required=True, metavar="WORKDIR")
  print(summary_table(p.parse_args(argv).summary))


if __name__ == "__main__":
  main()
