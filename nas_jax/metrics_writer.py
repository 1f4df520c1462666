"""Metrics a person looks at: one JSON line per logged step and TensorBoard scalars (no TensorFlow)."""

from __future__ import annotations

import json
import math
import os
from typing import Mapping

import numpy as np


class MetricWriter:
  """Writes `<workdir>/metrics.jsonl` and TensorBoard event files under `<workdir>/tb`.

  Only process 0 writes (`enabled=False` elsewhere).
  """

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._file = open(self.path, "a", buffering=1)
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tb"))
      except ImportError:  # tensorboardX is optional for library use.
        self._tb = None

  def write(self, step: int, metrics: Mapping[str, float], prefix: str = "") -> None:
    if not self.enabled:
      return
    row = {"step": int(step)}
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
