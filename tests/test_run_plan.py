"""run_plan: a fresh run's steps and schedule, a continuation of another run's schedule, and what a
resumed run does when its config changed the plan."""

import json

import pytest

from nas_jax import config_lib, run_plan


def _config(**overrides):
  c = config_lib.base_config()
  c.data.batch_size = 10
  c.total_steps = 0
  c.num_epochs = 3
  c.optim.update(lr=1e-4, min_lr=1e-5, warmup_steps=5, schedule_steps=0)
  c.itc.alpha_warmup_steps = -1
  for key, value in overrides.items():
    node, *path = key.split(".")
    target = c[node] if path else c
    for p in path[:-1]:
      target = target[p]
    target[path[-1] if path else node] = value
  return c


def test_fresh_plan_from_epochs_and_one_epoch_alpha_ramp():
  plan = run_plan.make_plan(_config(), num_train=105)
  assert plan == run_plan.RunPlan(first_step=0, last_step=30, steps_per_epoch=10,
                                  alpha_warmup_steps=10, lr=1e-4, min_lr=1e-5, warmup_steps=5,
                                  schedule_steps=30)
  longer = run_plan.make_plan(_config(**{"optim.schedule_steps": 50, "total_steps": 7}), 105)
  assert (longer.last_step, longer.schedule_steps) == (7, 50)


def test_continuation_keeps_the_other_runs_schedule():
  stage1 = run_plan.make_plan(_config(), num_train=105)
  stage2 = run_plan.make_plan(_config(**{"optim.lr": 5e-4, "total_steps": 4}), 105,
                              continued=stage1, continued_step=30, continued_dir="runs/stage1")
  assert (stage2.first_step, stage2.last_step, stage2.num_steps) == (30, 34, 4)
  assert (stage2.lr, stage2.warmup_steps, stage2.schedule_steps) == (1e-4, 5, 30)
  assert stage2.continues == "runs/stage1"


def test_replan_is_the_saved_plan_when_nothing_changed():
  c = _config()
  saved = run_plan.make_plan(c, 105)
  assert run_plan.replan(saved, c, 105) == saved
  stage2 = run_plan.make_plan(_config(total_steps=4), 105, saved, 30, "runs/stage1")
  assert run_plan.replan(stage2, _config(total_steps=4), 105) == stage2


def test_replan_follows_a_changed_config_and_names_the_change():
  saved = run_plan.make_plan(_config(total_steps=400), 105)
  new = run_plan.replan(saved, _config(total_steps=7), 105)
  assert (new.first_step, new.last_step) == (0, 7)
  assert run_plan.differences(saved, new) == ["last_step 400 → 7", "schedule_steps 400 → 7"]
  # A continuation keeps its first step and the continued schedule; only its length changes.
  stage1 = run_plan.make_plan(_config(), 105)
  stage2 = run_plan.make_plan(_config(total_steps=4), 105, stage1, 30, "runs/stage1")
  longer = run_plan.replan(stage2, _config(**{"total_steps": 8, "optim.lr": 1.0}), 105)
  assert run_plan.differences(stage2, longer) == ["last_step 34 → 38"]


def test_plan_file_round_trip_and_a_damaged_one_names_the_file(tmp_path):
  plan = run_plan.make_plan(_config(), 105)
  run_plan.write_plan(str(tmp_path), plan)
  assert run_plan.read_plan(str(tmp_path)) == plan
  assert run_plan.read_plan(str(tmp_path / "none")) is None
  (tmp_path / run_plan.PLAN_FILE).write_text(json.dumps({"first_step": 0}))
  with pytest.raises(ValueError, match=r"plan.json is not a run plan .*delete it to plan the run"):
    run_plan.read_plan(str(tmp_path))
