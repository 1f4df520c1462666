"""Which steps a run trains and on which learning-rate schedule: `RunPlan`.

A fresh run trains steps [0, N) on its own schedule: warm-up from `optim.min_lr` to `optim.lr` over
`optim.warmup_steps`, then cosine to `optim.min_lr` at step max(N, `optim.schedule_steps`) (N from
`total_steps`, or `num_epochs` × steps per epoch). The distillation weight α ramps over `itc.alpha_warmup_steps`
(-1: one epoch, as ALBEF).

A run with `continue_schedule=True` and `init_from=<another run>` continues that run: its step
counter starts at the other run's last checkpoint step S and it trains [S, S + N) on the other
run's schedule (its lr, min_lr, warm-up and length) and α ramp. This is how the paper trains:
stage 1 (29 epochs) and stage 2 (1 epoch, + NVA) are one schedule, so stage 2 runs where stage 1's
cosine ended (≈ 1e-5) with stage 1's AdamW moments, not after a new warm-up (docs/RECIPE.md). To
have the continuation finish the cosine instead, give stage 1 `optim.schedule_steps` = both
stages' steps.

The plan is written to `<workdir>/plan.json` when a run starts and read back when it resumes, so a
resumed run trains the same steps on the same schedule even if the run it continued is gone. A
resumed run whose config changes the plan (say, a larger `total_steps` to train on) follows the
config, keeping the step and schedule it continued, and says what changed (`replan`).
"""

from __future__ import annotations

import dataclasses
import json
import os

import ml_collections

PLAN_FILE = "plan.json"


@dataclasses.dataclass(frozen=True)
class RunPlan:
  first_step: int          # state.step when the run starts: 0, or the step of the run it continues
  last_step: int           # the run ends when state.step reaches it
  steps_per_epoch: int
  alpha_warmup_steps: int  # α ramps 0 → itc.alpha over steps [0, alpha_warmup_steps)
  lr: float                # the schedule: min_lr → lr over warmup_steps, cosine to min_lr at
  min_lr: float            # schedule_steps, min_lr after it
  warmup_steps: int
  schedule_steps: int
  continues: str = ""      # the run directory this one continues ("" for a fresh run)

  @property
  def num_steps(self) -> int:
    return self.last_step - self.first_step

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=1) + "\n"


def make_plan(config: ml_collections.ConfigDict, num_train: int,
              continued: RunPlan | None = None, continued_step: int = 0,
              continued_dir: str = "") -> RunPlan:
  """The plan of a run of `config` over `num_train` samples per epoch.

  continued: the plan of the run this one continues (`continue_schedule`), whose last checkpoint
  is at `continued_step`; its schedule and α ramp are kept and this run's steps follow that step.
  """
  steps_per_epoch = max(num_train // config.data.batch_size, 1)
  num_steps = (config.total_steps if config.total_steps > 0
               else config.num_epochs * steps_per_epoch)
  if continued is not None:
    return dataclasses.replace(continued, first_step=continued_step,
                               last_step=continued_step + num_steps,
                               steps_per_epoch=steps_per_epoch, continues=continued_dir)
  warm = config.itc.alpha_warmup_steps
  return RunPlan(first_step=0, last_step=num_steps, steps_per_epoch=steps_per_epoch,
                 alpha_warmup_steps=warm if warm >= 0 else steps_per_epoch,
                 lr=config.optim.lr, min_lr=config.optim.min_lr,
                 warmup_steps=config.optim.warmup_steps,
                 schedule_steps=max(config.optim.schedule_steps, num_steps))


def replan(saved: RunPlan, config: ml_collections.ConfigDict, num_train: int) -> RunPlan:
  """The plan of a resumed run that started with `saved`, as `config` gives it now: `saved` itself
  when nothing changed. A continuation keeps the step and schedule it recorded."""
  if saved.continues:
    return make_plan(config, num_train, saved, saved.first_step, saved.continues)
  return make_plan(config, num_train)


def differences(old: RunPlan, new: RunPlan) -> list[str]:
  """['last_step 400 → 7', ...] for the fields that differ."""
  return [f"{f.name} {getattr(old, f.name)} → {getattr(new, f.name)}"
          for f in dataclasses.fields(RunPlan) if getattr(old, f.name) != getattr(new, f.name)]


def read_plan(workdir: str) -> RunPlan | None:
  """The plan saved in `workdir`, or None when it has none."""
  path = os.path.join(workdir, PLAN_FILE)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return RunPlan(**json.load(f))
  except (ValueError, TypeError) as e:
    raise ValueError(f"{path} is not a run plan ({e}): restore it from a backup or delete it to "
                     "plan the run again from its config") from None


def write_plan(workdir: str, plan: RunPlan) -> None:
  """Writes `<workdir>/plan.json` atomically."""
  path = os.path.join(workdir, PLAN_FILE)
  with open(path + ".tmp", "w") as f:
    f.write(plan.to_json())
  os.replace(path + ".tmp", path)
