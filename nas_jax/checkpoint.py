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

import concurrent.futures
import contextlib
import copy
import gc
import inspect
import json
import logging
import os
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from nas_jax import config_lib
from nas_jax.models.layer_stack import to_model_layout

log = logging.getLogger("nas_jax.checkpoint")

# Keys that must agree between a checkpoint and the config that restores it (shapes depend on them),
# except the switches below them that change numerics or training only.
SHAPE_KEYS = ("model", "itc.queue_size")
NOT_SHAPE_KEYS = ("model.dtype", "model.attention", "model.vit_attention", "model.remat",
                  "model.temp", "model.vit.gelu", "model.bert.gelu", "model.vit.init_std",
                  "model.bert.initializer_range", "model.bert.hidden_dropout",
                  "model.bert.attention_dropout", "model.dictionary.momentum",
                  "model.dictionary.frozen", "model.dictionary.reuse_gate",
                  "model.dictionary.init", "model.dictionary.init_std", "model.fp8",
                  "model.residual_dtype", "model.dictionary.distances")


class IncompatibleCheckpointError(ValueError):
  pass


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  """The config as saved with a checkpoint (JSON types: tuples become lists)."""
  return json.loads(config.to_json_best_effort())


def check_compatible(saved: dict, config: ml_collections.ConfigDict, where: str,
                     ignore: tuple[str, ...] = ()) -> None:
  """Raises a one-line error naming the keys whose values change parameter shapes (other keys the
  checkpoint does not have, from an older version, are not compared; one without
  `model.scan_layers` has the unrolled layout, as the versions before it)."""
  now = config_lib.flat_config(config_to_dict(config))
  old = config_lib.flat_config(saved)
  old.setdefault("model.scan_layers", False)
  old.setdefault("model.stacked_layout", False)
  diffs = []
  for key in sorted(set(now) & set(old)):
    if (not any(key == s or key.startswith(s + ".") for s in SHAPE_KEYS) or key in NOT_SHAPE_KEYS
        or key in ignore):
      continue
    if now[key] != old[key]:
      diffs.append(f"{key}: checkpoint {old[key]!r} vs config {now[key]!r}")
  if diffs:
    raise IncompatibleCheckpointError(
        f"checkpoint {where} was written with an incompatible config ({'; '.join(diffs)}): "
        f"use a config with the checkpoint's values or a fresh --workdir")


class CheckpointError(Exception):
  """A workdir's checkpoints cannot be used; the message (one line) says which and what to do."""


class NoReadableCheckpointError(CheckpointError):
  pass


# Where unreadable steps are moved (next to checkpoints/) once an older one has been restored, so
# that saving that step number again cannot collide with them. They are never deleted.
UNREADABLE_DIR = "unreadable_checkpoints"


def _one_line(text: str, limit: int = 300) -> str:
  text = " ".join(str(text).split())
  return text if len(text) <= limit else text[:limit - 1] + "…"


def check_step_files(step_dir: str, items: tuple[str, ...]) -> str | None:
  """Cheap integrity checks of one step folder before orbax reads it: None, or what is wrong,
  naming the file (relative to `step_dir`). Checks that the folder is not empty, that each of
  `items` is there, that every JSON file orbax and grain wrote parses, and that every OCDBT
  manifest has its header (a damaged manifest handed to tensorstore can take the process down
  from one of its threads instead of raising)."""
  if not os.path.isdir(step_dir) or not os.listdir(step_dir):
    return "the folder is empty"
  for item in items:
    if not os.path.isdir(os.path.join(step_dir, item)):
      return f"{item}/ is missing"
  json_files = [os.path.join(item, name) for item in items
                for name in sorted(os.listdir(os.path.join(step_dir, item)))
                if name.endswith(".json") or name in ("metadata", "_METADATA")]
  for rel in json_files:
    try:
      with open(os.path.join(step_dir, rel)) as f:
        json.load(f)
    except (OSError, ValueError) as e:
      return f"{rel}: not readable JSON ({_one_line(e, 120)})"
  for item in items:
    for root, _, names in sorted(os.walk(os.path.join(step_dir, item))):
      if "manifest.ocdbt" in names:
        path = os.path.join(root, "manifest.ocdbt")
        problem = _ocdbt_manifest_problem(path)
        if problem:
          return f"{os.path.relpath(path, step_dir)}: {problem}"
  return None


_OCDBT_MAGIC = bytes.fromhex("0cdb3a2a")


def _ocdbt_manifest_problem(path: str) -> str | None:
  """What is wrong with an OCDBT manifest's header (magic number, then its own length as a
  little-endian uint64), or None."""
  with open(path, "rb") as f:
    head = f.read(12)
  size = os.path.getsize(path)
  if len(head) < 12 or head[:4] != _OCDBT_MAGIC:
    return "not an OCDBT manifest (bad header)"
  declared = int.from_bytes(head[4:12], "little")
  if declared != size:
    return f"truncated or padded OCDBT manifest ({size} bytes, its header says {declared})"
  return None


def describe_read_error(exc: BaseException, step_dir: str) -> str:
  """One line for an exception raised while orbax read `step_dir`: the innermost message of the
  chain (tensorstore names the array and file there), paths relative to the step folder."""
  messages = []
  while exc is not None and len(messages) < 10:
    text = str(exc).split("See full TensorStore details")[0].split(" [tensorstore_spec")[0]
    if text.strip():
      messages.append(f"{type(exc).__name__}: {text}")
    exc = exc.__cause__ or exc.__context__
  text = messages[-1] if messages else "unknown error"
  return _one_line(text.replace(step_dir.rstrip("/") + "/", "").replace(step_dir, "."))


@contextlib.contextmanager
def _quiet_abandoned_reads():
  """orbax reads a checkpoint's arrays in many coroutines; when one fails, the others are
  abandoned, and each prints a long "Exception ignored in: <coroutine ...>" traceback (or "Event
  loop is closed") when it is garbage-collected, typically at exit. The failure itself is reported
  in one line by the caller: collect them here, silently."""
  previous = sys.unraisablehook

  def hook(unraisable):
    if (inspect.iscoroutine(unraisable.object)
        or "Event loop is closed" in str(unraisable.exc_value)):
      return
    previous(unraisable)

  sys.unraisablehook = hook
  try:
    yield
  finally:
    gc.collect()
    sys.unraisablehook = previous


class Checkpointer:
  """Orbax `CheckpointManager` for one workdir: saves (async, atomic, keep last k) with their
  durations, and a restore that falls back to the newest checkpoint that reads completely.

  Items of a step folder: state (TrainState), config (JSON), data (the grain iterator's position,
  when given), loop (small JSON counters of the training loop, e.g. skipped updates).

  snapshot (with async_save, one process): `save` copies the state on the device (one jitted
  copy, dispatched without waiting), notes the data iterator's position, and hands both to a
  writer thread that runs orbax's save: the device → host transfer (seconds for a full model)
  overlaps the next training steps instead of stalling them. Every other method first waits for
  the writer to have handed its save to orbax, so orbax's manager is only used by one thread at a
  time.
  """

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True,
               snapshot: bool = False):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    self.restored_loop: dict = {}   # The `loop` item of the step restore() returned.
    self._lock = threading.Lock()
    self._in_flight: dict | None = None   # The save not yet complete (or not yet noticed).
    self._completed: list[dict] = []      # Complete saves not yet returned by poll_saves().
    self._async = async_save
    self._snapshot = snapshot and async_save and jax.process_count() == 1
    self._writer: concurrent.futures.ThreadPoolExecutor | None = None
    self._handoff: concurrent.futures.Future | None = None   # The writer's call of orbax's save.
    async_options = (ocp.AsyncOptions(post_finalization_callback=self._written)
                     if async_save else None)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep,
                                             enable_async_checkpointing=async_save,
                                             async_options=async_options,
                                             cleanup_tmp_directories=True,
                                             create=True))

  def latest_step(self) -> int | None:
    self._join_handoff()
    return self.manager.latest_step()

  # -------------------------------------------------------------- save
  def save(self, step: int, state: Any, config: ml_collections.ConfigDict,
           data_iterator: Any = None, *, force: bool = False, loop: dict | None = None) -> bool:
    """Starts saving `step`; poll_saves() reports it once it is complete. Returns once the arrays
    are copied off the devices (async_save: the files are written in the background), or, with
    `snapshot`, once a device-side copy is dispatched. False: orbax's policy skipped the step."""
    t0 = time.time()
    self._join_handoff()
    if self._in_flight is not None:   # orbax waits for the previous save anyway: report it.
      self.manager.wait_until_finished()
      self._finish_in_flight()
    if not force and not self.manager.should_save(step):
      return False
    data = None
    if data_iterator is not None:
      data = _IteratorPosition(copy.deepcopy(data_iterator.get_state()))
    args = _save_args(state if not self._snapshot else _device_copy(state), config, data, loop)
    if self._snapshot:
      if self._writer is None:
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
      self._handoff = self._writer.submit(self.manager.save, step, args=args, force=True)
      saved = True
    else:
      saved = self.manager.save(step, args=args, force=force)
    if saved:
      now = time.time()
      with self._lock:
        self._in_flight = dict(step=int(step), start=t0, blocking=now - t0,
                               written=None if self._async else now)
    return saved

  def _join_handoff(self) -> None:
    """Waits until the writer thread has handed the last snapshot to orbax (its errors raise)."""
    handoff, self._handoff = self._handoff, None
    if handoff is not None:
      handoff.result()

  def _written(self) -> None:
    """orbax's post-finalization callback (background thread): the files are all written."""
    with self._lock:
      if self._in_flight is not None:
        self._in_flight["written"] = time.time()

  def _finish_in_flight(self) -> None:
    with self._lock:
      s, self._in_flight = self._in_flight, None
    if s is None:
      return
    total = max((s["written"] or time.time()) - s["start"], s["blocking"])
    self._completed.append(dict(step=s["step"], checkpoint_save_s=total,
                                checkpoint_blocking_s=s["blocking"]))
    log.info("checkpoint step %d saved in %.2fs (training blocked %.2fs): %s", s["step"], total,
             s["blocking"], os.path.join(self.directory, str(s["step"])))

  def poll_saves(self, wait: bool = False) -> list[dict]:
    """Saves completed since the last call, each once: [{'step', 'checkpoint_save_s' (from the
    save call until the checkpoint was complete), 'checkpoint_blocking_s' (how long the caller was
    blocked)}]. wait: first wait for the save in flight."""
    if wait:
      self.wait()
    elif self._handoff is not None and not self._handoff.done():
      return []   # Still handing over: not complete, and orbax's manager is the writer's.
    self._join_handoff()
    if self._in_flight is not None and not self.manager.is_saving_in_progress():
      self._finish_in_flight()
    out, self._completed = self._completed, []
    return out

  # -------------------------------------------------------------- restore
  def saved_config(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

  def _read_step(self, step: int, abstract_state: Any, config: ml_collections.ConfigDict,
                 data_iterator: Any) -> tuple[Any, str | None]:
    """(restored items, None) or (None, why the step cannot be read)."""
    step_dir = os.path.join(self.directory, str(step))
    items = ("state", "config") + (("data",) if data_iterator is not None else ())
    problem = check_step_files(step_dir, items)
    if problem is not None:
      return None, problem
    try:
      saved = self.saved_config(step)
    except Exception as e:  # noqa: BLE001 — any failure to read makes the step unusable.
      return None, describe_read_error(e, step_dir)
    check_compatible(saved, config, step_dir)   # A config mismatch is the user's to fix: raise.
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      import grain
      args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    if os.path.isdir(os.path.join(step_dir, "loop")):
      args["loop"] = ocp.args.JsonRestore()
    with _quiet_abandoned_reads():
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        return {name: restored[name] for name in args}, None
      except Exception as e:  # noqa: BLE001
        problem = describe_read_error(e, step_dir)
    return None, problem

  def restore(self, abstract_state: Any, config: ml_collections.ConfigDict,
              data_iterator: Any = None, step: int | None = None) -> tuple[Any, int]:
    """Restores into `abstract_state` (ShapeDtypeStructs with shardings); the data iterator, when
    given, is restored in place so it yields exactly the next batch.

    Without `step`: the newest checkpoint that reads completely. Each newer one that does not is
    named in a warning (file and reason) and, once an older one loaded, moved to
    <workdir>/unreadable_checkpoints/ (never deleted) so that saving its step again works.
    Raises NoReadableCheckpointError when none reads, IncompatibleCheckpointError when the config
    changes parameter shapes.
    """
    steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      raise NoReadableCheckpointError(f"no checkpoint in {self.directory}")
    unreadable = []
    for i, s in enumerate(steps):
      restored, problem = self._read_step(s, abstract_state, config, data_iterator)
      if jax.process_count() > 1:   # All processes must resume from the same step.
        from jax.experimental import multihost_utils
        ok = multihost_utils.process_allgather(np.int32(problem is None))
        if problem is None and not np.all(ok):
          problem, restored = "unreadable on another process", None
      if problem is None:
        break
      later = "; trying the previous one" if i + 1 < len(steps) else ""
      log.warning("checkpoint step %d cannot be read: %s: %s%s", s,
                  os.path.join(self.directory, str(s)), problem, later)
      unreadable.append(s)
    else:
      raise NoReadableCheckpointError(
          f"no checkpoint in {self.directory} can be read (steps {', '.join(map(str, steps))}; "
          "the reasons are logged above): restore a good copy of one, or move the folder away "
          "to start from scratch")
    if unreadable:
      self._set_aside(unreadable, restored_step=s)
    self.restored_loop = dict(restored.get("loop") or {})
    return restored["state"], s

  def _set_aside(self, steps: list[int], restored_step: int) -> None:
    """Moves unreadable steps newer than the restored one to <workdir>/unreadable_checkpoints."""
    steps = [s for s in steps if s > restored_step]
    if not steps:
      return
    barrier = None
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      barrier = multihost_utils.sync_global_devices
      barrier("nas_jax_set_aside_start")
    if jax.process_index() == 0:
      for s in steps:
        src = os.path.join(self.directory, str(s))
        dest = os.path.join(self.workdir, UNREADABLE_DIR, str(s))
        n = 1
        while os.path.exists(dest):
          n += 1
          dest = os.path.join(self.workdir, UNREADABLE_DIR, f"{s}.{n}")
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.replace(src, dest)
        log.warning("moved the unreadable checkpoint step %d to %s (kept for inspection); "
                    "resuming from step %d", s, dest, restored_step)
    if barrier is not None:
      barrier("nas_jax_set_aside_done")
    self.manager.reload()

  def wait(self) -> None:
    self._join_handoff()
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.wait()
    if self._writer is not None:
      self._writer.shutdown()
    if self._in_flight is not None:
      self._finish_in_flight()
    self.manager.close()


def _save_args(state: Any, config: ml_collections.ConfigDict, data: Any,
               loop: dict | None) -> ocp.args.Composite:
  """The items of one step folder (see `Checkpointer`)."""
  items = {"state": ocp.args.StandardSave(state),
           "config": ocp.args.JsonSave(config_to_dict(config))}
  if data is not None:
    import grain
    items["data"] = grain.checkpoint.CheckpointSave(data)
  if loop is not None:
    items["loop"] = ocp.args.JsonSave(dict(loop))
  return ocp.args.Composite(**items)


@jax.jit
def _device_copy(tree: Any) -> Any:
  """A copy of `tree` in new device buffers (same shardings): the next step may donate the
  originals while a writer thread still reads the copy."""
  return jax.tree.map(jnp.copy, tree)


def _iterator_base():
  import grain
  return grain.DatasetIterator


class _IteratorPosition(_iterator_base()):
  """A data iterator's position, fixed when the save starts (the live iterator moves on while
  the checkpoint is written); grain's checkpoint handler saves it as the iterator's state."""

  def __init__(self, state: Any):
    super().__init__()
    self._state = state

  def __next__(self):
    raise StopIteration

  def get_state(self) -> Any:
    return self._state

  def set_state(self, state: Any) -> None:
    self._state = state


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
  """A manager over `root` for reading that knows every item's type (so metadata reads need no
  probing, and orbax does not warn about the items it could not restore). `state_handler`: the
  handler of the 'state' item (default: the standard one)."""
  import grain
  return ocp.CheckpointManager(
      root, item_handlers={"state": state_handler or ocp.StandardCheckpointHandler(),
                           "config": ocp.JsonCheckpointHandler(),
                           "loop": ocp.JsonCheckpointHandler(),
                           "data": grain.checkpoint.CheckpointHandler()},
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
    config = config or saved
    return config, put(to_model_layout(tree["params"], config)), put(tree.get("batch_stats", {}))
  saved = saved_config(path)
  if config is None:
    config = ml_collections.ConfigDict(saved)
  else:   # The layer layout may differ: the parameters are brought to the config's below.
    check_compatible(saved, config, path, ignore=("model.scan_layers", "model.stacked_layout"))
  meta = state_metadata(path)
  target = {part: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                               meta[part])
            for part in ("params", "batch_stats") if meta.get(part)}
  restored = restore_parts(path, target)
  return (config, to_model_layout(restored["params"], config),
          restored.get("batch_stats", {}) or {})
