"""The grain training pipeline: raw records → augmented, tokenised, host-local batches.

    range(N) → shuffle (reseeded each epoch) → repeat → (epoch, record) → this process's rows of
      each global batch
      → SampleMaker (load, replace bad samples, augment, tokenise) → batch(drop_remainder)
      → to_iter_dataset(threads, prefetch) → mp_prefetch(workers) → strip counters

Each sample's randomness (caption choice, crop, flip, RandAugment, replacement) comes from a
generator seeded by (seed, epoch, record index), so data are identical whatever the number of
workers or threads, and a restored iterator state resumes on exactly the next batch.

Batch contract (host-local numpy; b = data.batch_size // process_count, L = data.max_text_len):
  image          float32 [b, H, W, 3]  normalised with ALBEF's mean/std (data.image_dtype='uint8':
                                       uint8 pixels; normalise on the device with
                                       transforms.normalize_jax)
  text_ids       int32   [b, L]        [CLS] … [SEP] [PAD]…
  text_mask      int32   [b, L]
  image_id       int32   [b]           same-image key
  neg_text_ids   int32   [b, L]        } only with itm.text_negatives: one text hard negative
  neg_text_mask  int32   [b, L]        } (T_fg) per sample
"""

from __future__ import annotations

import gc
import io
import threading
import time
from typing import Any

import numpy as np
from PIL import Image

from nas_jax.data import sources as sources_lib
from nas_jax.data import transforms as T
from nas_jax.data.sources import make_source
from nas_jax.data.text import pre_caption

__all__ = ["make_source", "make_train_iterator", "close_iterator", "batch_spec", "make_dataset",
           "make_transform", "SampleMaker", "DevicePrefetch", "DataErrorRateExceeded", "data_stats",
           "local_batch_size"]

MAX_ATTEMPTS = 20          # Consecutive bad records before a sample gives up.
_EXAMPLES = 10             # Example bad paths kept for the error message.


class DataErrorRateExceeded(RuntimeError):
  """Too many missing / corrupt images or empty captions: the data, not the model, needs fixing."""


class BadSample(Exception):
  """A record that cannot become a training sample (counted and replaced)."""


def open_image(image: Any) -> Image.Image:
  """Path, encoded bytes or uint8 [H, W, 3] array → a (possibly still lazy) PIL image."""
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise BadSample(f"array image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
    return Image.fromarray(image)
  if isinstance(image, (bytes, bytearray, memoryview)):
    return Image.open(io.BytesIO(image))
  with open(image, "rb") as f:
    data = f.read()
  return Image.open(io.BytesIO(data))


def make_transform(config) -> T.TrainTransform:
  """The training image transform `config.data` asks for.

  data.augment: 'auto' (= 'flip' for synthetic images already at the model's resolution, else
  'full'), 'full' (RandomResizedCrop + flip + RandAugment if data.randaugment), 'flip', 'none'.
  """
  d = config.data
  mode = d.augment
  if mode == "auto":
    mode = "flip" if d.source == "synthetic" else "full"
  if mode not in ("full", "flip", "none"):
    raise ValueError(f"config.data.augment={d.augment!r}: use 'auto', 'full', 'flip' or 'none'")
  if d.image_dtype not in ("float32", "uint8"):
    raise ValueError(f"config.data.image_dtype={d.image_dtype!r}: use 'float32' or 'uint8'")
  return T.TrainTransform(
      d.image_size, crop=mode == "full", crop_scale=(d.crop_scale_min, 1.0),
      flip=mode != "none", swap_left_right=d.flip_swaps_left_right,
      randaugment=mode == "full" and d.randaugment, normalize=d.image_dtype == "float32")


class SampleMaker:
  """(epoch, record index) → one training sample; bad records are replaced and counted.

  A record is bad when its image is missing, truncated or not an image, or when it has no
  non-empty string caption (or, with text negatives, no hard negative). It is replaced by a record
  drawn from the sample's own generator, so the replacement is deterministic. Once at least
  `min_records` records were read, an error rate above `max_error_rate` raises
  DataErrorRateExceeded listing example paths; so does a run of MAX_ATTEMPTS bad records in a row.
  """

  def __init__(self, source, transform: T.TrainTransform, tokenizer, *, seed: int,
               max_text_len: int, max_words: int = 30, text_negatives: bool = False,
               max_error_rate: float = 0.01, min_records: int = 1000, timing: bool = False):
    self.source, self.transform, self.tokenizer = source, transform, tokenizer
    self.seed, self.max_text_len, self.max_words = int(seed), max_text_len, max_words
    self.text_negatives = text_negatives
    self.max_error_rate, self.min_records = max_error_rate, min_records
    self.records = 0
    self.errors = 0
    self.examples: list[str] = []
    self.timing = timing
    self.seconds = dict(read=0.0, decode=0.0, augment=0.0, tokenize=0.0)
    self._lock = threading.Lock()

  def __getstate__(self):
    state = dict(self.__dict__)
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  # -------------------------------------------------------------- captions
  def _clean(self, captions, what: str) -> list[str]:
    out = [pre_caption(c, self.max_words) for c in captions if isinstance(c, str) and c.strip()]
    out = [c for c in out if c]
    if not out:
      raise BadSample(f"no non-empty string {what}")
    return out

  # -------------------------------------------------------------- one sample
  def _make(self, record: dict, rng: np.random.Generator) -> dict:
    t0 = time.perf_counter()
    captions = self._clean(record["captions"], "caption")
    texts = [captions[int(rng.integers(len(captions)))]]
    if self.text_negatives:
      negs = self._clean(record.get("neg_captions", ()), "text hard negative")
      texts.append(negs[int(rng.integers(len(negs)))])
    try:
      img = open_image(record["image"])
      t1 = time.perf_counter()
      img = self.transform.geometry(img, rng)   # Decodes (lazily, maybe at reduced scale).
    except BadSample:
      raise
    except FileNotFoundError:
      raise BadSample("file not found") from None
    except Exception as e:  # noqa: BLE001 — PIL raises OSError, SyntaxError, ValueError, bombs…
      raise BadSample(f"unreadable image ({type(e).__name__}: {e})") from None
    t2 = time.perf_counter()
    image, texts, _ = self.transform.augment(img, texts, rng)
    t3 = time.perf_counter()
    ids, mask = self.tokenizer(texts, self.max_text_len)
    t4 = time.perf_counter()
    if self.timing:
      s = self.seconds
      s["read"] += t1 - t0
      s["decode"] += t2 - t1   # Decode + crop + resize: PIL fuses them (draft mode, box resize).
      s["augment"] += t3 - t2
      s["tokenize"] += t4 - t3
    out = dict(image=image, text_ids=ids[0], text_mask=mask[0],
               image_id=np.int32(record["image_id"]))
    if self.text_negatives:
      out["neg_text_ids"], out["neg_text_mask"] = ids[1], mask[1]
    return out

  def __call__(self, element: tuple[int, int]) -> dict:
    epoch, index = int(element[0]), int(element[1])
    rng = np.random.default_rng((self.seed, epoch, index))
    for attempt in range(MAX_ATTEMPTS):
      record = self.source[index]
      try:
        sample = self._make(record, rng)
      except BadSample as e:
        self._count(f"{record.get('path', index)}: {e}")
        index = int(rng.integers(len(self.source)))
        continue
      self._count(None)
      sample["_replaced"] = np.int32(attempt)
      return sample
    raise DataErrorRateExceeded(
        f"{MAX_ATTEMPTS} bad records in a row; examples:\n  " + "\n  ".join(self.examples)
        + "\nCheck config.data.paths and config.data.image_root.")

  def _count(self, error: str | None) -> None:
    with self._lock:
      self.records += 1
      if error is None:
        return
      self.errors += 1
      if len(self.examples) < _EXAMPLES and error not in self.examples:
        self.examples.append(error)
      records, errors = self.records, self.errors
    if records >= self.min_records and errors > self.max_error_rate * records:
      raise DataErrorRateExceeded(
          f"{errors} of {records} records read were bad ({errors / records:.1%} > "
          f"config.data.max_error_rate={self.max_error_rate:.1%}); examples:\n  "
          + "\n  ".join(self.examples)
          + "\nFix or drop these files (python -m nas_jax.data.prepare skips them), check "
          "config.data.image_root, or raise config.data.max_error_rate.")


class _EpochAndIndex:
  """map_with_index: global position p, record r → (epoch p // N, r). Picklable."""

  def __init__(self, n: int):
    self.n = n

  def __call__(self, position: int, record: int) -> tuple[int, int]:
    return position // self.n, record


class _ProcessRows:
  """Local position k → the global stream's record for it: local batch j of process p is rows
  [p·b, (p+1)·b) of global batch j, so the processes' batches stacked in process order are exactly
  the one-process batch (runs agree whatever the number of hosts). Picklable."""

  def __init__(self, parent, process_index: int, process_count: int, local_batch: int):
    self.parent, self.p, self.count, self.b = parent, process_index, process_count, local_batch

  def __call__(self, k: int):
    j, r = divmod(k, self.b)
    return self.parent[(j * self.count + self.p) * self.b + r]


# Samples (all processes' workers are separate; this counts what this process received).
_STATS = dict(samples=0, replaced=0)


class _StripCounters:
  """Main-process map: drops the per-sample replacement counter after adding it to _STATS."""

  def __call__(self, batch: dict) -> dict:
    replaced = batch.pop("_replaced")
    _STATS["samples"] += int(replaced.shape[0])
    _STATS["replaced"] += int((replaced > 0).sum())
    return batch


def data_stats() -> dict:
  """{'samples': n, 'replaced': n} delivered to this process so far (bad records replaced)."""
  return dict(_STATS)


def local_batch_size(config, process_count: int) -> int:
  b = config.data.batch_size
  if b % process_count:
    raise ValueError(f"config.data.batch_size={b} is not divisible by the {process_count} "
                     "processes: each host loads an equal share of the global batch")
  return b // process_count


def _ensure_absl_flags() -> None:
  # grain's worker processes read absl flags; outside absl.app.run they are not parsed yet.
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_dataset(config, tokenizer, *, source=None, process_index: int = 0,
                 process_count: int = 1, seed: int | None = None,
                 num_epochs: int | None = None):
  """The grain MapDataset of host-local batches (before to_iter_dataset) and its SampleMaker."""
  import grain

  d = config.data
  source = sources_lib.make_source(config, "train") if source is None else source
  text_negatives = bool(config.itm.text_negatives)
  if text_negatives and not getattr(source, "has_negatives", False):
    raise ValueError(f"config.itm.text_negatives=True but source {d.source!r} has no text hard "
                     "negatives: use 'negclip_tsv', prepared shards of it, or 'synthetic'")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  b = local_batch_size(config, process_count)
  n = len(source)
  if n == 0:
    raise ValueError(f"source {d.source!r} ({tuple(d.paths)}) holds no records")
  seed = config.seed if seed is None else seed
  maker = SampleMaker(source, make_transform(config), tokenizer, seed=seed,
                      max_text_len=d.max_text_len, max_words=d.max_words,
                      text_negatives=text_negatives, max_error_rate=d.max_error_rate,
                      min_records=d.error_rate_min_records)
  ds = grain.MapDataset.range(n).shuffle(seed=seed % 2**32).repeat(num_epochs)
  ds = ds.map_with_index(_EpochAndIndex(n))
  if num_epochs is not None:   # Whole global batches only: equal length on every process.
    ds = ds[:len(ds) // (b * process_count) * (b * process_count)]
  if process_count > 1:
    ds = grain.MapDataset.range(len(ds) // process_count).map(
        _ProcessRows(ds, process_index, process_count, b))
  ds = ds.map(maker).batch(b, drop_remainder=True)
  return ds, maker


def make_train_iterator(config, tokenizer, *, process_index: int = 0, process_count: int = 1,
                        seed: int | None = None, num_epochs: int | None = None, source=None):
  """Host-local training batches (see the module docstring) as a checkpointable grain iterator.

  Args:
    config: the full config (reads config.data, config.itm.text_negatives, config.seed).
    tokenizer: nas_jax.data.text.Tokenizer (picklable, runs in the workers).
    process_index, process_count: this host's shard (jax.process_index() / process_count()).
    seed: shuffle/augmentation seed (default config.seed).
    num_epochs: None repeats forever (the trainer stops at its step count).
    source: a raw-record source overriding config.data.source (tests, notebooks).

  Returns:
    grain DatasetIterator; `get_state()`/`set_state()` and grain.checkpoint.CheckpointSave /
    CheckpointRestore resume it on exactly the next batch.
  """
  import grain

  d = config.data
  ds, _ = make_dataset(config, tokenizer, source=source, process_index=process_index,
                       process_count=process_count, seed=seed, num_epochs=num_epochs)
  threads = max(1, d.read_threads)   # Each thread builds whole batches; buffer ≥ threads.
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                            prefetch_buffer_size=max(threads, d.prefetch)))
  if d.num_workers > 0:
    _ensure_absl_flags()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers,
                                                     per_worker_buffer_size=max(1, d.prefetch)))
  return iter(it.map(_StripCounters()))


def close_iterator(iterator) -> None:
  """Stops the data workers and frees their shared memory before the caller moves on.

  With data.num_workers > 0, batches arrive in shared-memory blocks that grain unlinks from a
  background thread once the arrays are garbage; at interpreter exit that thread's last requests
  are lost and Python's resource tracker reports "leaked shared_memory objects". Call this after
  dropping the references to the last batch: it closes the iterator, collects the garbage and
  waits for grain's pending deletions.
  """
  close = getattr(iterator, "close", None)
  if close is not None:
    close()
  gc.collect()
  try:
    from grain._src.python.ipc.shared_memory_array import SharedMemoryArray
    pool = SharedMemoryArray._del_thread_pool   # One FIFO thread (process_prefetch's setting).
  except (ImportError, AttributeError):   # Another grain version: nothing we know to wait for.
    return
  if pool is not None:
    pool.apply(int)   # Returns once the deletions queued before it have run.


def _dataset_iterator_base():
  import grain
  return grain.DatasetIterator


class DevicePrefetch(_dataset_iterator_base()):
  """Keeps `size` batches already handed to `put` (e.g. host → global device arrays) ahead of the
  training step, so the host→device copies overlap the step. A checkpoint stays exact:
  `get_state()` is the wrapped iterator's state *before* the oldest batch not yet returned, so a
  restore replays the buffered batches. Works with grain.checkpoint.CheckpointSave/Restore.

    it = DevicePrefetch(make_train_iterator(c, tok), lambda b: sharding.host_to_global(b, mesh))
  """

  def __init__(self, iterator, put, size: int = 2):
    super().__init__()
    if size < 1:
      raise ValueError(f"DevicePrefetch size must be >= 1, got {size}")
    self._it, self._put, self._size = iterator, put, size
    self._buffer: list[tuple[Any, Any]] = []   # (state before the batch, put(batch))

  def _fill(self) -> None:
    while len(self._buffer) < self._size:
      state = self._it.get_state()
      try:
        batch = next(self._it)
      except StopIteration:
        return
      self._buffer.append((state, self._put(batch)))

  def __next__(self):
    self._fill()
    if not self._buffer:
      raise StopIteration
    _, batch = self._buffer.pop(0)
    self._fill()
    return batch

  def get_state(self):
    return self._buffer[0][0] if self._buffer else self._it.get_state()

  def set_state(self, state) -> None:
    self._buffer.clear()
    self._it.set_state(state)

  def close(self) -> None:
    self._buffer.clear()
    if hasattr(self._it, "close"):
      self._it.close()


def batch_spec(config) -> dict:
  """Shapes and dtypes of one GLOBAL batch: dict of jax.ShapeDtypeStruct."""
  import jax

  d = config.data
  b, res, L = d.batch_size, d.image_size, d.max_text_len
  spec = dict(image=jax.ShapeDtypeStruct((b, res, res, 3), np.dtype(d.image_dtype)),
              text_ids=jax.ShapeDtypeStruct((b, L), np.int32),
              text_mask=jax.ShapeDtypeStruct((b, L), np.int32),
              image_id=jax.ShapeDtypeStruct((b,), np.int32))
  if config.itm.text_negatives:
    spec["neg_text_ids"] = jax.ShapeDtypeStruct((b, L), np.int32)
    spec["neg_text_mask"] = jax.ShapeDtypeStruct((b, L), np.int32)
  return spec
