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
