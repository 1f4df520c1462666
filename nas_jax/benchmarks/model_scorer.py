"""The model-backed `Scorer`: NASModel pair scores and ITC features, batched, jitted, data-parallel.

How a call to `itm_logits(images, texts)` runs:
  1. distinct images in first-seen order; the pairs sorted by image (stable), distinct texts
     tokenised once (`max_tokens`, padded: one static shape per token limit);
  2. images are loaded and resized (ALBEF eval: Resize((res, res), bicubic)) by a thread pool, one
     chunk of `image_chunk` images ahead of the device, and sent as uint8; the CLIP mean/std
     normalisation runs on the device;
  3. each chunk is encoded once: ViT → fusion tokens (VD tokens when `use_dictionary`, else the ViT
     tokens) [C, 1+N, D], kept on device and replicated; its ITC features go to a host cache;
  4. the chunk's pairs run in batches of `batch_size` (sharded over the mesh axis 'data'):
     text encoder → fusion with the gathered image tokens → ITM logits [B, 2].
So every image is encoded once per call whatever the number of its captions, and only three
functions are compiled (image encoder, text features, pair ITM) per token limit.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from nas_jax.benchmarks import common
from nas_jax.models import layer_stack


def _encode_image(m, images):
  from nas_jax.data.transforms import normalize_jax
  out = m.encode_image(normalize_jax(images), train=False)
  return m.image_tokens_for_fusion(out['embeds']), out['feat']


def _text_feat(m, ids, mask):
  return m.encode_text(ids, mask, train=False)['feat']


def _itm_pairs(m, image_tokens, idx, ids, mask):
  text = m.encode_text(ids, mask, train=False)['embeds']
  fused = m.fuse(text, mask, image_tokens[idx], train=False)
  return m.itm_logits(fused)


def data_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A 1-D ('data',) mesh over this process's devices (or the given ones). Evaluation runs as one
  process per host: host arrays go to local devices with `device_put`."""
  devices = list(devices if devices is not None else jax.local_devices())
  return jax.make_mesh((len(devices),), ('data',), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


class ModelScorer(common.ScorerBase):
  """Scores pairs with a NASModel.

  Args:
    model: `NASModel(config=config.model)`.
    params, batch_stats: the checkpoint's trees (`params['temp']`, if present, is ignored).
    tokenizer: `nas_jax.data.text.Tokenizer` (texts arrive already cleaned by the benchmark).
    image_size: the eval resolution (the model's `vit.image_size`).
    batch_size: pairs / images / texts per device step (rounded up to a multiple of the devices).
    image_chunk: distinct images encoded and kept on device at once (a multiple of batch_size).
    max_tokens: default token limit when a call gives none.
    mesh: a mesh with a 'data' axis (default: all local devices).
    workers: image-loading threads (default: the CPU count, at most 32).
  """

  def __init__(self, model, params, batch_stats, tokenizer, *, image_size: int,
               batch_size: int = 128, image_chunk: int = 512, max_tokens: int = 40,
               mesh: jax.sharding.Mesh | None = None, workers: int = 0, show_progress: bool = True):
    self.mesh = mesh or data_mesh()
    n = self.mesh.shape['data']
    self.batch_size = -(-batch_size // n) * n
    self.image_chunk = max(self.batch_size, -(-image_chunk // self.batch_size) * self.batch_size)
    self.tokenizer, self.max_tokens = tokenizer, max_tokens
    self.image_size = image_size
    self.show_progress = show_progress
    self.desc = 'scoring'  # Progress-bar label; the CLI sets it per benchmark.
    self._rep = NamedSharding(self.mesh, P())
    self._data = NamedSharding(self.mesh, P('data'))
    # A train state's params may be stacked while the model's layers are unrolled
    # (model.stacked_layout): the model gets its own layout.
    params = layer_stack.to_model_layout(
        {k: v for k, v in dict(params).items() if k != 'temp'}, model.config)
    variables = {'params': params}
    if batch_stats:
      variables['batch_stats'] = batch_stats
    self.variables = jax.device_put(variables, self._rep)
    self._enc_img = jax.jit(lambda v, x: model.apply(v, x, method=_encode_image),
                            out_shardings=(self._rep, self._rep))
    self._enc_txt = jax.jit(lambda v, i, m: model.apply(v, i, m, method=_text_feat))
    self._itm = jax.jit(lambda v, t, idx, i, m: model.apply(v, t, idx, i, m, method=_itm_pairs))
    self._pool = concurrent.futures.ThreadPoolExecutor(workers or min(32, os.cpu_count() or 8))
    self._feat_cache: dict[common.ImageRef, np.ndarray] = {}

  # ------------------------------------------------------------------------------ host side
  def _load(self, ref: common.ImageRef) -> np.ndarray:
    """ALBEF's eval transform up to the uint8 resize: Resize((res, res), bicubic); the
    normalisation (CLIP mean/std) runs on the device, so 4x fewer bytes cross the host."""
    from PIL import Image
    img = ref.load()
    res = self.image_size
    if img.size != (res, res):
      img = img.resize((res, res), Image.Resampling.BICUBIC)
    return np.asarray(img, np.uint8)

  def _chunks(self, refs: Sequence[common.ImageRef]) -> Iterator[np.ndarray]:
    """[C, res, res, 3] uint8 arrays of consecutive chunks, the next one loading meanwhile."""
    starts = list(range(0, len(refs), self.image_chunk))

    def submit(s):
      return [self._pool.submit(self._load, r) for r in refs[s:s + self.image_chunk]]

    pending = submit(starts[0]) if starts else None
    for k in range(len(starts)):
      current = pending
      pending = submit(starts[k + 1]) if k + 1 < len(starts) else None
      yield np.stack([f.result() for f in current])

  def _tokens(self, texts: Sequence[str], max_tokens: int | None) -> tuple[np.ndarray, np.ndarray]:
    return self.tokenizer(list(texts), max_tokens or self.max_tokens)

  def _pad(self, x: np.ndarray, n: int) -> np.ndarray:
    if len(x) == n:
      return x
    pad = np.zeros((n - len(x),) + x.shape[1:], x.dtype)
    return np.concatenate([x, pad])

  def _bar(self, total: int, what: str):
    if not self.show_progress:
      return None
    try:
      from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
      return None
    return tqdm(total=total, desc=f'{self.desc} ({what})', unit=what.split()[-1], leave=False,
                dynamic_ncols=True)

  # ------------------------------------------------------------------------------ device side
  def _encode_chunk(self, pixels: np.ndarray) -> tuple[jax.Array, list[jax.Array]]:
    """Fusion tokens [image_chunk, 1+N, D] (replicated, zero rows past len(pixels)) and the ITC
    features of each batch (device arrays, [batch_size, E]). Only batches holding images run."""
    b = self.batch_size
    toks, feats = [], []
    for s in range(0, len(pixels), b):
      part = pixels[s:s + b]
      t, f = self._enc_img(self.variables, jax.device_put(self._pad(part, b), self._data))
      toks.append(t)
      feats.append(f)
    rows = len(toks) * b
    if rows < self.image_chunk:  # Keep one static shape for the pair step.
      pad = np.zeros((self.image_chunk - rows,) + toks[0].shape[1:], toks[0].dtype)
      toks.append(jax.device_put(pad, self._rep))
    return jnp.concatenate(toks), feats

  def itm_logits(self, images, texts, *, max_tokens=None) -> np.ndarray:
    if len(images) != len(texts):
      raise ValueError(f'{len(images)} images but {len(texts)} texts')
    out = np.zeros((len(images), 2), np.float32)
    if not len(images):
      return out
    uimg, img_idx = common.unique(images)
    utxt, txt_idx = common.unique(texts)
    ids, mask = self._tokens(utxt, max_tokens)
    order = np.argsort(img_idx, kind='stable')
    bounds = np.searchsorted(img_idx[order], np.arange(0, len(uimg) + self.image_chunk,
                                                       self.image_chunk))
    bar = self._bar(len(images), 'pairs')
    b = self.batch_size
    for c, pixels in enumerate(self._chunks(uimg)):
      tokens, feats = self._encode_chunk(pixels)
      sel = order[bounds[c]:bounds[c + 1]]
      pending = []
      for s in range(0, len(sel), b):
        p = sel[s:s + b]
        local = self._pad(img_idx[p] - c * self.image_chunk, b).astype(np.int32)
        t = txt_idx[p]
        logits = self._itm(self.variables, tokens, jax.device_put(local, self._data),
                           jax.device_put(self._pad(ids[t], b), self._data),
                           jax.device_put(self._pad(mask[t], b), self._data))
        pending.append((p, logits))
      # Host reads only after the chunk's work is queued, so the device never waits on them.
      feats = np.concatenate([np.asarray(f) for f in feats])[:len(pixels)]
      for k, f in enumerate(feats):
        self._feat_cache.setdefault(uimg[c * self.image_chunk + k], f)
      for p, logits in pending:  # Fetch after dispatching the chunk: the device stays busy.
        out[p] = np.asarray(logits, np.float32)[:len(p)]
        if bar is not None:
          bar.update(len(p))
    if bar is not None:
      bar.close()
    return out

  def itc_features(self, images, texts, *, max_tokens=None):
    fi = ft = None
    if images is not None:
      todo = [r for r in dict.fromkeys(images) if r not in self._feat_cache]
      bar = self._bar(len(todo), 'images')
      for c, pixels in enumerate(self._chunks(todo)):
        _, feats = self._encode_chunk(pixels)
        for k, row in enumerate(np.concatenate([np.asarray(f) for f in feats])[:len(pixels)]):
          self._feat_cache[todo[c * self.image_chunk + k]] = row
        if bar is not None:
          bar.update(len(pixels))
      if bar is not None:
        bar.close()
      fi = np.stack([self._feat_cache[r] for r in images]) if len(images) else np.zeros((0, 0), np.float32)
    if texts is not None:
      ids, mask = self._tokens(texts, max_tokens)
      feats = []
      for s in range(0, len(texts), self.batch_size):
        f = self._enc_txt(self.variables, jax.device_put(self._pad(ids[s:s + self.batch_size], self.batch_size), self._data),
                          jax.device_put(self._pad(mask[s:s + self.batch_size], self.batch_size), self._data))
        feats.append(f)
      ft = (np.concatenate([np.asarray(f) for f in feats])[:len(texts)] if feats
            else np.zeros((0, 0), np.float32))
    return fi, ft

  def clear_cache(self) -> None:
    self._feat_cache.clear()


# ---------------------------------------------------------------------------------------- synthetic

def array_refs(images: np.ndarray) -> list[common.ImageRef]:
  """In-memory ImageRefs for uint8 [n, H, W, 3] images, keyed by content (equal images share a key,
  so the scorer encodes them once)."""
  refs = []
  for img in np.asarray(images):
    key = hashlib.sha1(np.ascontiguousarray(img).tobytes()).hexdigest() + str(img.shape)
    refs.append(common.ImageRef(key=f'array:{key}', pixels=img))
  return refs


def synthetic_callables(scorer: common.Scorer, mode: str = 'itm', max_tokens: int | None = None):
  """(score_pairs, embed) in the form `nas_jax.benchmarks.synthetic.evaluate` takes."""

  def score_pairs(images: np.ndarray, captions: Sequence[str]) -> np.ndarray:
    return common.score_pairs(scorer, array_refs(images), list(captions), mode, max_tokens=max_tokens)

  def embed(images: np.ndarray, captions: Sequence[str]):
    return scorer.itc_features(array_refs(images), list(captions), max_tokens=max_tokens)

  return score_pairs, embed
