"""AdamW with linear warm-up and cosine decay, as ALBEF/NAS train.

Weight decay (0.02) applies to matrices and embeddings only — not to biases, LayerNorm scales or the
temperature (timm's `add_weight_decay`, which ALBEF's optimizer factory uses, skips every parameter
with fewer than two dimensions).
"""

from __future__ import annotations

import jax
import ml_collections
import optax

from nas_jax.models import layer_stack


def learning_rate_schedule(lr: float, min_lr: float, warmup_steps: int,
                           total_steps: int) -> optax.Schedule:
  """min_lr → lr linearly over `warmup_steps`, then cosine to min_lr at `total_steps` (and min_lr
  after it: a run that continues another one past its end trains at min_lr)."""
  warmup = min(warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=min_lr, peak_value=lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=min_lr)


def plan_schedule(plan) -> optax.Schedule:
  """The schedule of a `run_plan.RunPlan` (its own, or the one of the run it continues)."""
  return learning_rate_schedule(plan.lr, plan.min_lr, plan.warmup_steps, plan.schedule_steps)


def decay_mask(params):
  """True where AdamW decays: leaves of rank > 1 per layer (a stacked layer's bias [L, D] is a
  bias: models/layer_stack.py)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: len(layer_stack.layer_shape(path, p.shape)) > 1, params)


def make_optimizer(optim: ml_collections.ConfigDict, schedule: optax.Schedule | int):
  """Returns (optax transformation, schedule). `schedule`: an optax schedule, or a number of steps
  for `optim`'s own warm-up + cosine schedule over that many steps."""
  if isinstance(schedule, int):
    schedule = learning_rate_schedule(optim.lr, optim.min_lr, optim.warmup_steps, schedule)
  parts = []
  if optim.grad_clip and optim.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip))
  parts.append(optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                           weight_decay=optim.weight_decay, mask=decay_mask))
  return optax.chain(*parts), schedule
