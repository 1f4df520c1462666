"""Starting a run from weights made elsewhere: `config.init_from`.

`init_from` names
  * another run's workdir (or its checkpoints/<step> folder): stage 1 for stage 2, stage 2 for
    fine-tuning; or
  * one or more folders written by `python -m nas_jax.convert`, comma-separated
    (`weights/deit,weights/bert`: DeiT for the ViT, BERT for the text and fusion encoders; or one
    ALBEF / NAS_ALBEF conversion).

What crosses:

  | from                        | params | params_m          | VD codebook | queues, queue_ptr | step, AdamW, schedule |
  |-----------------------------|--------|-------------------|-------------|-------------------|-----------------------|
  | a run, continue_schedule    | yes    | yes               | yes         | yes (+ id queue)  | yes (`run_plan`)      |
  | a run                       | yes    | yes               | yes         | yes (id queue reset) | no: fresh           |
  | a converted ALBEF/NAS_ALBEF | yes    | yes               | NAS_ALBEF   | yes (id queue reset) | no: fresh           |
  | converted DeiT / BERT       | its encoder | = params (ALBEF's copy_params) | no | no    | no: fresh             |

The source's layer stacks are brought to this model's layout (`model.scan_layers`: stacked or one
subtree per layer; `models/layer_stack.to_layout`). Parameters the source lacks keep their fresh
initialisation (e.g. the VD of a NAS run started from
ALBEF weights; BERT's cross-attention) and are listed in the log. The ViT position embedding is
resampled bicubically, as ALBEF's `interpolate_pos_embed`, when the source's resolution differs
from `model.vit.image_size` (the paper's 384-px fine-tuning from 256-px pre-training). The id queue
is reset (to -100) unless the run continues, as ALBEF's retrieval fine-tuning starts it empty: the
source's image ids name other data. A queue whose length differs from `itc.queue_size` is an
error naming both.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from nas_jax import checkpoint as ckpt_lib
from nas_jax import run_plan
from nas_jax.models.layer_stack import to_layout
from nas_jax.models.vit import interpolate_pos_embed

log = logging.getLogger("nas_jax.warm_start")

POS_EMBED = "vit/pos_embed"
QUEUE_KEYS = {"image": "image_queue", "text": "text_queue", "idx": "idx_queue", "ptr": "queue_ptr"}


def split_paths(init_from: str) -> list[str]:
  return [p.strip() for p in init_from.split(",") if p.strip()]


def _check_exists(path: str) -> None:
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"--config.init_from={path!r} does not exist: pass a training workdir (e.g. the stage-1 "
        "run) or folders written by `python -m nas_jax.convert` (comma-separated)")


def continued_plan(init_from: str) -> tuple[run_plan.RunPlan, int, str]:
  """For `continue_schedule`: (the plan of the run `init_from` names, the step of its checkpoint,
  its workdir). Raises ValueError when `init_from` is not one training run with a plan."""
  paths = split_paths(init_from)
  if len(paths) != 1 or ckpt_lib.is_converted(paths[0]):
    raise ValueError(f"config.continue_schedule=True continues another training run, but "
                     f"config.init_from={init_from!r} is not one: pass a training workdir, or set "
                     "--config.continue_schedule=False to start a new schedule")
  _check_exists(paths[0])
  root, step = ckpt_lib.find_checkpoint(paths[0])
  workdir = os.path.dirname(root)
  plan = run_plan.read_plan(workdir)
  if plan is None:
    raise ValueError(f"{workdir} has no {run_plan.PLAN_FILE} (written by runs of this version), so "
                     "its schedule cannot be continued: set --config.continue_schedule=False")
  if step != plan.last_step:
    log.warning("init_from %s: its checkpoint is at step %d, before the end of its plan (%d); "
                "continuing from step %d", workdir, step, plan.last_step, step)
  return plan, step, workdir


# ------------------------------------------------------------------------------------ trees
def _host(x) -> np.ndarray:
  """A numpy copy of a (replicated or fully addressable) array or numpy array."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_data(0)
  return np.asarray(x)


def merge_tree(target: Any, source: Mapping, what: str, notes: list[str]) -> Any:
  """`target` (a tree of arrays, the fresh init) with every leaf that `source` has at the same
  '/'-path replaced by the source's value, in the target's dtype and sharding.

  A position embedding of another resolution is interpolated; any other shape mismatch is a
  ValueError naming the key. Leaves only the target has are kept; the count of loaded, kept and
  unused leaves goes to `notes`.
  """
  flat_t = traverse_util.flatten_dict(dict(target), sep="/")
  flat_s = traverse_util.flatten_dict(dict(source), sep="/") if source else {}
  out, fresh = {}, []
  for key, leaf in flat_t.items():
    if key not in flat_s:
      out[key], _ = leaf, fresh.append(key)
      continue
    value = flat_s[key]
    if tuple(value.shape) != tuple(leaf.shape):
      if key.endswith(POS_EMBED) and value.ndim == 3 and value.shape[2] == leaf.shape[2]:
        value = interpolate_pos_embed(_host(value), leaf.shape[1] - 1)
        notes.append(f"{what}: {key} interpolated from {flat_s[key].shape[1] - 1} to "
                     f"{leaf.shape[1] - 1} patches (bicubic, as ALBEF)")
      else:
        raise ValueError(f"init_from {what}: {key} has shape {tuple(value.shape)}, the model "
                         f"expects {tuple(leaf.shape)}: the config and the checkpoint disagree on "
                         "the model's sizes")
    if isinstance(value, jax.Array) and value.sharding == leaf.sharding:
      out[key] = value.astype(leaf.dtype)
    else:
      out[key] = jax.device_put(np.asarray(_host(value), leaf.dtype), leaf.sharding)
  unused = sorted(set(flat_s) - set(flat_t))
  notes.append(f"{what}: {len(flat_t) - len(fresh)}/{len(flat_t)} tensors loaded"
               + (f"; kept fresh: {_short(fresh)}" if fresh else "")
               + (f"; not in this model: {_short(unused)}" if unused else ""))
  return traverse_util.unflatten_dict(out, sep="/")


def _short(keys: list[str]) -> str:
  tops = sorted({"/".join(k.split("/")[:3]) for k in keys})
  return ", ".join(tops[:6]) + (f" … ({len(keys)} tensors)" if len(tops) > 6 else f" ({len(keys)} tensors)")


def merge_queues(queues: dict, source: Mapping, what: str, notes: list[str], *,
                 keep_ids: bool) -> dict:
  """The image/text queues and pointer (and the id queue when `keep_ids`) of `source`
  ({'image','text','idx','ptr'}) into `queues`, in their dtypes and shardings."""
  queues = dict(queues)
  if "image" not in source:
    return queues
  rows, want = int(source["image"].shape[0]), int(queues["image"].shape[0])
  if rows != want:
    raise ValueError(f"init_from {what}: its queues hold {rows} features but config.itc.queue_size"
                     f"={want}: set --config.itc.queue_size={rows}")
  names = ("image", "text", "ptr") + (("idx",) if keep_ids and "idx" in source else ())
  for name in names:
    q = queues[name]
    queues[name] = jax.device_put(np.asarray(_host(source[name]), q.dtype).reshape(q.shape),
                                  q.sharding)
  notes.append(f"{what}: queues of {rows} carried, queue_ptr {int(_host(source['ptr']))}"
               + ("" if "idx" in names else ", id queue reset"))
  return queues


# ------------------------------------------------------------------------------------ sources
def _from_converted(path: str, state, config, notes: list[str]):
  from nas_jax import convert
  tree = convert.load_converted(path)
  params = merge_tree(state.params, to_layout(tree.get("params", {}), config), path, notes)
  params_m = state.params_m
  if "params_m" in tree:
    params_m = merge_tree(state.params_m, to_layout(tree["params_m"], config),
                          path + " (momentum)", notes)
  batch_stats = state.batch_stats
  if tree.get("batch_stats") and state.batch_stats:
    batch_stats = merge_tree(state.batch_stats, tree["batch_stats"], path + " (VD)", notes)
    if "initialized" in batch_stats.get("dictionary", {}):   # init='data' must not overwrite it
      dic = dict(batch_stats["dictionary"])
      dic["initialized"] = jax.device_put(np.ones((), bool), dic["initialized"].sharding)
      batch_stats = dict(batch_stats, dictionary=dic)
  source_queues = {name: tree["queues"][key] for name, key in QUEUE_KEYS.items()
                   if key in tree.get("queues", {})}
  queues = merge_queues(state.queues, source_queues, path, notes, keep_ids=False)
  return state.replace(params=params, params_m=params_m, batch_stats=batch_stats, queues=queues), \
      "params_m" in tree


def _from_run(path: str, state, abstract_state, config, notes: list[str]):
  meta = ckpt_lib.state_metadata(path)
  replicated = abstract_state.step.sharding
  wanted = {"params": abstract_state.params, "params_m": abstract_state.params_m,
            "batch_stats": abstract_state.batch_stats, "queues": abstract_state.queues}

  def target(part):
    """Shapes as saved; the model's sharding where the path and shape agree, else replicated."""
    want = traverse_util.flatten_dict(dict(wanted[part]), sep="/") if wanted[part] else {}
    flat = traverse_util.flatten_dict(dict(meta[part]), sep="/")
    return traverse_util.unflatten_dict({
        k: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=want[k].sharding
                                if k in want and tuple(want[k].shape) == tuple(m.shape) else replicated)
        for k, m in flat.items()}, sep="/")

  parts = [p for p in wanted if meta.get(p)]
  restored = ckpt_lib.restore_parts(path, {p: target(p) for p in parts})
  params = merge_tree(state.params, to_layout(restored["params"], config), path, notes)
  params_m = merge_tree(state.params_m, to_layout(restored.get("params_m", {}), config),
                        path + " (momentum)", notes)
  batch_stats = state.batch_stats
  if restored.get("batch_stats") and state.batch_stats:
    batch_stats = merge_tree(state.batch_stats, restored["batch_stats"], path + " (VD)", notes)
  queues = merge_queues(state.queues, restored.get("queues", {}), path, notes, keep_ids=False)
  return state.replace(params=params, params_m=params_m, batch_stats=batch_stats, queues=queues)


def warm_start(config: ml_collections.ConfigDict, state, abstract_state):
  """`state` (freshly initialised, sharded) with what `config.init_from` provides (table above).

  With `config.continue_schedule` the source run's whole state is taken but the PRNG key (the new
  run's seed decides dropout, masking and negatives); the caller plans the steps and the
  schedule with `continued_plan`. Returns (state, notes for the log).
  """
  paths = split_paths(config.init_from)
  for p in paths:
    _check_exists(p)
  notes: list[str] = []
  if config.continue_schedule:
    continued_plan(config.init_from)  # Validates: one run with a plan.
    other = ckpt_lib.restore_state(paths[0], abstract_state, config)
    notes.append(f"{paths[0]}: continuing at step {int(jax.device_get(other.step))} with its "
                 "parameters, AdamW state, codebook and queues")
    return other.replace(rng=state.rng), notes
  runs = [p for p in paths if not ckpt_lib.is_converted(p)]
  if runs and len(paths) > 1:
    raise ValueError(f"config.init_from={config.init_from!r}: a training run ({runs[0]}) cannot be "
                     "combined with other sources; pass it alone")
  if runs:
    return _from_run(runs[0], state, abstract_state, config, notes), notes
  has_momentum = False
  for p in paths:
    state, m = _from_converted(p, state, config, notes)
    has_momentum |= m
  if not has_momentum:  # ALBEF's copy_params: the momentum encoders start as the online ones.
    state = state.replace(params_m=jax.tree.map(
        jnp.copy, {k: state.params[k] for k in state.params_m}))
    notes.append("momentum encoders = the loaded online encoders (no momentum copy in the source)")
  return state, notes
