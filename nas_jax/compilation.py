"""Start-up time: a persistent compilation cache in the workdir, and compilation that runs while
the state is being initialised or restored (docs/PERF.md, "Start-up").

The full stage-2 step takes ~2 minutes to compile on a GPU machine and the jitted initialisation
about one more. The step's compilation needs only shapes and shardings (`train_step.Setup.compile`),
so `in_background` runs it in a thread beside the initialisation; `use_workdir_cache` lets a
resumed or restarted run load the executables instead of compiling them again.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import threading
import time
from typing import Any, Callable

import jax

CACHE_DIR = "jax_cache"   # Inside the workdir.
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"

_set_by_us: str | None = None   # The cache folder use_workdir_cache chose last (None: not ours).
_hits_by_thread: collections.Counter = collections.Counter()
_listening = False
_lock = threading.Lock()


def use_workdir_cache(workdir: str, enabled: bool = True) -> str | None:
  """Points JAX's persistent compilation cache at <workdir>/jax_cache and returns that folder.

  Leaves the cache as it is, and returns None, when `enabled` is False, when the user chose a
  cache (JAX_COMPILATION_CACHE_DIR or jax.config's jax_compilation_cache_dir), and in a
  multi-process run (each host would need its own folder; the user's cache setting applies).
  """
  global _set_by_us
  current = jax.config.jax_compilation_cache_dir
  if not enabled or (current and current != _set_by_us) or jax.process_count() > 1:
    return None
  path = os.path.join(os.path.abspath(workdir), CACHE_DIR)
  if current != path:
    from jax.experimental.compilation_cache import compilation_cache
    compilation_cache.reset_cache()   # JAX decides once per process whether a cache is used.
    compilation_cache.set_cache_dir(path)
    _set_by_us = path
  return path


@dataclasses.dataclass(frozen=True)
class Compiled:
  """What `in_background` delivers: the compiled executable, the seconds it took and whether JAX
  loaded it from the persistent compilation cache."""
  executable: Any
  seconds: float
  from_cache: bool


def _on_event(event: str, *args, **kwargs) -> None:
  if event == _CACHE_HIT_EVENT:
    with _lock:
      _hits_by_thread[threading.get_ident()] += 1


def _listen_for_cache_hits() -> None:
  global _listening
  with _lock:
    if not _listening:
      jax.monitoring.register_event_listener(_on_event)
      _listening = True


def in_background(compile_fn: Callable[[], Any], name: str = "compile") -> concurrent.futures.Future:
  """Runs `compile_fn()` (e.g. `lambda: setup.compile(batch_spec)`) in a daemon thread; the
  future's result is a `Compiled`, or the exception it raised. XLA compiles outside the GIL, so
  the caller's own work (the jitted initialisation, a checkpoint restore) proceeds meanwhile.
  A daemon thread: a run that fails before it needs the result does not wait for it."""
  _listen_for_cache_hits()
  future: concurrent.futures.Future = concurrent.futures.Future()

  def work():
    me = threading.get_ident()
    with _lock:
      _hits_by_thread[me] = 0
    t0 = time.perf_counter()
    try:
      executable = compile_fn()
    except BaseException as e:  # noqa: BLE001 — handed to the caller through the future.
      future.set_exception(e)
      return
    with _lock:
      hits = _hits_by_thread.pop(me, 0)
    future.set_result(Compiled(executable, time.perf_counter() - t0, hits > 0))

  threading.Thread(target=work, name=name, daemon=True).start()
  return future
