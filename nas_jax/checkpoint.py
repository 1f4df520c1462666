"""Orbax checkpoints: train state + data-iterator state + the config, atomic, async, keep last k.

Layout of a workdir:
  <workdir>/checkpoints/<step>/{state, data, config}   orbax (written to a temporary name, then
                                                         renamed: a crash never leaves a half step)
  <workdir>/config.json                                 the config of the run

`load_params(dir)` reads a checkpoint's parameters for evaluation or `init_from`; a directory made by
`python -m nas_jax.convert` (PyTorch → Flax) is read as well.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

# Keys that must agree between a checkpoint and the config that restores it (shapes depend on them).
SHAPE_KEYS = ("model", "itc.queue_size")


class IncompatibleCheckpointError(ValueError):
  pass


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flat(v, key + "."))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def check_compatible(saved: dict, config: ml_collections.ConfigDict, where: str) -> None:
  """Raises a one-line error naming the keys whose values change parameter shapes."""
  now = _flat(config_to_dict(config))
  old = _flat(saved)
  diffs = []
  for key in sorted(set(now) | set(old)):
    if not any(key == s or key.startswith(s + ".") for s in SHAPE_KEYS):
      continue
    if key.startswith("model.dtype") or key.startswith("model.attention") or \
        key.startswith("model.vit_attention") or key.startswith("model.remat"):
      continue  # Numerics switches do not change shapes.
    if key in ("model.bert.hidden_dropout", "model.bert.attention_dropout"):
      continue
    if now.get(key) != old.get(key):
      diffs.append(f"{key}: checkpoint {old.get(key)!r} vs config {now.get(key)!r}")
  if diffs:
    raise IncompatibleCheckpointError(
        f"checkpoint {where} was written with an incompatible config ({'; '.join(diffs)}): "
        f"use a config with the checkpoint's values or a fresh --workdir")


class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` for one workdir."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                             enable_async_checkpointing=async_save,
                                             create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, config: ml_collections.ConfigDict,
           data_iterator: Any = None, *, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state),
             "config": ocp.args.JsonSave(config_to_dict(config))}
    if data_iterator is not None:
      import grain
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def saved_config(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def restore(self, abstract_state: Any, config: ml_collections.ConfigDict,
              data_iterator: Any = None, step: int | None = None) -> tuple[Any, int]:
    """Restores into `abstract_state` (ShapeDtypeStructs with shardings); the data iterator, when
    given, is restored in place so it yields exactly the next batch."""
    step = self.latest_step() if step is None else step
    check_compatible(self.saved_config(step), config, f"{self.directory}/{step}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      import grain
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"], step

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _find_checkpoint_root(path: str) -> tuple[str, int | None]:
  """Accepts a workdir, its checkpoints/ folder, or one step folder."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return os.path.join(path, "checkpoints"), None
  base = os.path.basename(path.rstrip("/"))
  if base.isdigit() and os.path.isdir(os.path.join(path, "state")):
    return os.path.dirname(path), int(base)
  return path, None


def is_converted(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "meta.json")) and any(
      f.endswith(".safetensors") for f in os.listdir(path))


def restore_state_from(path: str, abstract_state: Any, config: ml_collections.ConfigDict) -> tuple[Any, dict]:
  """Reads the train state of another run (e.g. stage 1 for stage 2). Returns (state, saved config)."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"init_from path {path!r} does not exist: pass a training workdir, its "
                            "checkpoints/<step> folder, or a directory made by `python -m nas_jax.convert`")
  root, step = _find_checkpoint_root(path)
  manager = ocp.CheckpointManager(root)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint found under {path!r} (looked in {root})")
  saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  check_compatible(saved, config, f"{root}/{step}")
  state = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state)))["state"]
  manager.close()
  return state, saved


def load_params(path: str, config: ml_collections.ConfigDict | None = None):
  """Parameters (and VD codebook) of a checkpoint, for evaluation.

  Returns (config, params, batch_stats). `config` defaults to the one saved with the checkpoint.
  Restores on this process's first device, whatever mesh or number of processes wrote it.
  """
  from nas_jax import config_lib  # noqa: F401  (keeps the import graph simple for callers)
  from nas_jax.train_step import TrainState

  root, step = _find_checkpoint_root(path)
  if not os.path.isdir(root):
    raise FileNotFoundError(f"checkpoint {path!r} not found: pass a training workdir or a "
                            "checkpoints/<step> folder")
  manager = ocp.CheckpointManager(root)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no checkpoint found under {path!r}")
  saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
  if config is None:
    config = ml_collections.ConfigDict(saved)
  else:
    check_compatible(saved, config, f"{root}/{step}")
  # Restore onto this process's first device whatever mesh / process count wrote it (a bare
  # PyTreeRestore fails on a multi-host checkpoint: its saved shardings name other devices).
  meta = ocp.StandardCheckpointer().metadata(os.path.join(root, str(step), "state")).item_metadata
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
  manager.close()
  state = restored["state"]
  if isinstance(state, TrainState):
    params, batch_stats = state.params, state.batch_stats
  else:
    params, batch_stats = state["params"], state.get("batch_stats", {})
  return config, jax.tree.map(jax.numpy.asarray, params), jax.tree.map(jax.numpy.asarray, batch_stats or {})
