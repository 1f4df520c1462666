"""Orbax checkpoints: train state + data-iterator state + the config, atomic, async, keep last k.

Layout of a workdir:
  <workdir>/checkpoints/<step>/{state, data, config}   orbax (written to a temporary name, then
                                                         renamed: a crash never leaves a half step)
  <workdir>/config.json                                 the config of the run

Readers for other runs (module-level): `find_checkpoint`, `saved_config`, `state_metadata`,
`restore_parts` (some parts of a state, any mesh), `restore_state` (all of it), and `load_params`
(parameters for evaluation, also from a folder made by `python -m nas_jax.convert`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from nas_jax import config_lib

# Keys that must agree between a checkpoint and the config that restores it (shapes depend on them),
# except the switches below them that change numerics or training only.
SHAPE_KEYS = ("model", "itc.queue_size")
NOT_SHAPE_KEYS = ("model.dtype", "model.attention", "model.vit_attention", "model.remat",
                  "model.temp", "model.vit.gelu", "model.bert.gelu", "model.vit.init_std",
                  "model.bert.initializer_range", "model.bert.hidden_dropout",
                  "model.bert.attention_dropout", "model.dictionary.momentum",
                  "model.dictionary.frozen", "model.dictionary.reuse_gate",
                  "model.dictionary.init", "model.dictionary.init_std")


class IncompatibleCheckpointError(ValueError):
  pass


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  """The config as saved with a checkpoint (JSON types: tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def check_compatible(saved: dict, config: ml_collections.ConfigDict, where: str) -> None:
  """Raises a one-line error naming the keys whose values change parameter shapes (keys the
  checkpoint does not have, from an older version, are not compared)."""
  now = config_lib.flat_config(config_to_dict(config))
  old = config_lib.flat_config(saved)
  diffs = []
  for key in sorted(set(now) & set(old)):
    if not any(key == s or key.startswith(s + ".") for s in SHAPE_KEYS) or key in NOT_SHAPE_KEYS:
      continue
    if now[key] != old[key]:
      diffs.append(f"{key}: checkpoint {old[key]!r} vs config {now[key]!r}")
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


def find_checkpoint(path: str) -> tuple[str, int]:
  """(checkpoints root, step) of a training workdir, its checkpoints/ folder or one
  checkpoints/<step> folder (the newest step unless the path names one).

  Raises FileNotFoundError naming the path when it holds no checkpoint.
  """
  full = os.path.abspath(path)
  if not os.path.exists(full):
    raise FileNotFoundError(f"{path}: no such file or directory (pass a training workdir, its "
                            "checkpoints/<step> folder, or a folder written by python -m nas_jax.convert)")
  root, step = full, None
  if os.path.isdir(os.path.join(full, "checkpoints")):
    root = os.path.join(full, "checkpoints")
  elif os.path.basename(full.rstrip("/")).isdigit() and os.path.isdir(os.path.join(full, "state")):
    root, step = os.path.dirname(full), int(os.path.basename(full.rstrip("/")))
  steps = sorted(int(d) for d in os.listdir(root) if d.isdigit()) if os.path.isdir(root) else []
  if step is None and steps:
    step = steps[-1]
  if step is None or step not in steps:
    raise FileNotFoundError(f"{path}: no checkpoint found (looked for step folders in {root}); pass "
                            "a training workdir or a folder written by python -m nas_jax.convert")
  return root, step


def _reader(root: str, state_handler=None) -> ocp.CheckpointManager:
  """A manager over `root` for reading that knows the item types (so metadata reads need no
  probing). `state_handler`: the handler of the 'state' item (default: the standard one)."""
  return ocp.CheckpointManager(
      root, item_handlers={"state": state_handler or ocp.StandardCheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler()},
      options=ocp.CheckpointManagerOptions(create=False))


def saved_config(path: str) -> dict:
  """The config saved with the checkpoint at `path` (see `find_checkpoint`), as a dict."""
  root, step = find_checkpoint(path)
  with _reader(root) as manager:
    return manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]


def state_metadata(path: str) -> dict:
  """Shapes and dtypes of the saved train state, a dict tree of orbax ArrayMetadata
  ({'params', 'params_m', 'batch_stats', 'opt_state', 'queues', 'step', 'rng'})."""
  root, step = find_checkpoint(path)
  with _reader(root) as manager:
    return dict(manager.item_metadata(step)["state"])


def restore_parts(path: str, target: dict) -> dict:
  """Restores only some top-level parts of a saved train state.

  target: {part: tree of jax.ShapeDtypeStruct (with shardings)} for parts among 'params',
  'params_m', 'batch_stats', 'queues', 'step', shaped as saved (see `state_metadata`).
  Returns {part: tree of jax.Array}, whatever mesh or number of processes wrote the checkpoint.
  """
  root, step = find_checkpoint(path)
  restore_args = jax.tree.map(
      lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype),
      target)
  with _reader(root, ocp.PyTreeCheckpointHandler()) as manager:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True)))["state"]
  return dict(restored)


def restore_state(path: str, abstract_state: Any, config: ml_collections.ConfigDict) -> Any:
  """The whole train state of another run, into `abstract_state` (same shapes: the config's
  shape keys must agree, checked first). For continuing its schedule (stage 2 after stage 1)."""
  root, step = find_checkpoint(path)
  check_compatible(saved_config(path), config, f"{root}/{step}")
  with _reader(root) as manager:
    return manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))["state"]


def is_converted(path: str) -> bool:
  """Whether `path` is a folder written by `python -m nas_jax.convert`."""
  return os.path.isdir(path) and os.path.isfile(os.path.join(path, "meta.json")) and any(
      f.endswith(".safetensors") for f in os.listdir(path))


def _converted_config(path: str) -> ml_collections.ConfigDict:
  """The full config of a converted checkpoint: the defaults with the model section it was
  converted for (meta.json). A conversion of one encoder (DeiT, BERT) is not a whole model."""
  from nas_jax import convert
  meta = convert.read_meta(path)
  if "model_config" not in meta or meta.get("source") in ("deit", "bert"):
    raise FileNotFoundError(
        f"{path} holds a conversion of one encoder ({meta.get('source', '?')}), not a whole model: "
        "use it as --config.init_from of a training run, or evaluate an ALBEF / NAS_ALBEF conversion")
  config = config_lib.base_config()
  known = config_lib.flat_config(config.model.to_dict())
  config.model.update_from_flattened_dict(
      {k: v for k, v in config_lib.flat_config(meta["model_config"]).items() if k in known})
  config.data.image_size = config.model.vit.image_size
  config.data.vocab = ""  # ALBEF / NAS checkpoints use bert-base-uncased's vocabulary: eval --vocab.
  return config


def load_params(path: str, config: ml_collections.ConfigDict | None = None):
  """Parameters and VD codebook of a checkpoint, for evaluation.

  `path`: a training workdir, its checkpoints/<step> folder, or a `python -m nas_jax.convert`
  folder of a whole model (ALBEF, NAS_ALBEF). Returns (config, params, batch_stats); `config`
  defaults to the one saved with the checkpoint (for a converted folder: the defaults with the
  model section of its meta.json). Restores on this process's first device, whatever mesh or
  number of processes wrote it.
  """
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  if is_converted(path):
    from nas_jax import convert
    saved = _converted_config(path)
    if config is not None:
      model_only = dict(saved.to_dict(), itc=dict(queue_size=config.itc.queue_size))
      check_compatible(model_only, config, path)
    tree = convert.load_converted(path)
    put = lambda t: jax.tree.map(lambda x: jax.device_put(x, device), t)
    return config or saved, put(tree["params"]), put(tree.get("batch_stats", {}))
  saved = saved_config(path)
  if config is None:
    config = ml_collections.ConfigDict(saved)
  else:
    check_compatible(saved, config, path)
  meta = state_metadata(path)
  target = {part: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                               meta[part])
            for part in ("params", "batch_stats") if meta.get(part)}
  restored = restore_parts(path, target)
  return config, restored["params"], restored.get("batch_stats", {}) or {}
