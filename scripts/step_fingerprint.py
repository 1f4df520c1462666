r"""Shows that a refactor changes nothing: the training step's program (StableHLO, without source
locations) and, with --run, its float32 losses and parameters after 3 steps, on the tests'
configurations: the demo's tiny stage 1, + NVA and text negatives with the id queue, + gradient
accumulation (2 micro-batches), plain ALBEF (no VD), a frozen codebook.

  python scripts/step_fingerprint.py --out /tmp/before.npz [--run]      # on the old code
  python scripts/step_fingerprint.py --compare /tmp/before.npz [--run]  # on the new code

Identical programs compute bitwise identical results (same compiler input); --run checks it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import jax
import numpy as np
from flax import traverse_util

VARIANTS = {
    "stage1": {},
    "nva_nta_idq": {"nva.enabled": True, "itm.text_negatives": True, "itc.use_id_queue": True},
    "accum2": {"accum_steps": 2, "nva.enabled": True},
    "albef": {"model.use_dictionary": False},
    "frozen": {"model.dictionary.frozen": True, "model.dictionary.init": "normal",
               "nva.enabled": True},
}


def fingerprint(steps: int = 3, run: bool = False) -> dict[str, np.ndarray]:
  from step_utils import build, fixed_batch, tiny_config
  out = {}
  for name, overrides in VARIANTS.items():
    c = tiny_config(**overrides)
    _, _, _, state, step = build(c, num_groups=2)
    step = jax.jit(step)
    batch = fixed_batch(c)
    program = re.sub(r"#?loc\d*(\([^)]*\))?", "", step.lower(state, batch).as_text())
    out[f"{name}/program"] = np.frombuffer(program.encode(), np.uint8)
    if not run:
      continue
    for i in range(steps):
      state, metrics = step(state, batch)
      for k, v in metrics.items():
        out[f"{name}/metrics/{i}/{k}"] = np.asarray(v)
    for part in ("params", "params_m", "batch_stats", "queues"):
      flat = traverse_util.flatten_dict(jax.device_get(getattr(state, part)) or {}, sep="/")
      for k, v in flat.items():
        out[f"{name}/{part}/{k}"] = np.asarray(v)
    for i, leaf in enumerate(jax.tree.leaves(state.opt_state)):
      out[f"{name}/opt_state/{i}"] = np.asarray(leaf)
  return out


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out")
  p.add_argument("--compare")
  p.add_argument("--run", action="store_true", help="also run 3 steps (minutes on a CPU)")
  args = p.parse_args()
  now = fingerprint(run=args.run)
  if args.out:
    np.savez(args.out, **now)
    print(f"wrote {len(now)} arrays to {args.out}")
  if args.compare:
    with np.load(args.compare) as f:
      before = {k: f[k] for k in f.files}
    if not args.run:
      before = {k: v for k, v in before.items() if k.endswith("/program")}
    missing, extra = sorted(set(before) - set(now)), sorted(set(now) - set(before))
    diffs = [k for k in sorted(set(before) & set(now))
             if before[k].shape != now[k].shape or not np.array_equal(before[k], now[k])]
    for k in diffs[:20]:
      if k.endswith("/program"):
        print(f"differs: {k} (the step's program)")
      else:
        print(f"differs: {k}  max |Δ| = {np.max(np.abs(before[k].astype(np.float64) - now[k])) if before[k].shape == now[k].shape else 'shape'}")
    print(f"{len(before)} arrays before, {len(now)} now: {len(diffs)} differ, {len(missing)} missing "
          f"({missing[:5]}), {len(extra)} new ({extra[:5]})")
    print("identical" if not (diffs or missing) else "DIFFERENT")
    return 0 if not (diffs or missing) else 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
