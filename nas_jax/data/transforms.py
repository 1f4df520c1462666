"""Image and caption transforms of ALBEF's pre-training input (numpy / PIL, picklable).

Training (ALBEF `dataset/__init__.py`, `pretrain_transform`):
  RandomResizedCrop(res, scale=(0.2, 1.0), ratio=(3/4, 4/3), bicubic)
  → horizontal flip (p = 0.5; here it also swaps the words "left" and "right" in the caption)
  → RandAugment(N=2, M=7) over ALBEF's op list without colour operations
  → ToTensor + Normalize(mean, std), laid out NHWC.
Evaluation: Resize((res, res), bicubic) → Normalize.

Every random choice comes from a `np.random.Generator` the caller passes in, so a sample's
augmentation is a pure function of (seed, epoch, record index) whatever the number of workers.
Images travel as PIL images until the final `normalize`, which returns float32 [H, W, 3].
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

try:  # ALBEF's own RandAugment warps with OpenCV; it is ~10x faster than PIL's affine transform.
  import cv2
  cv2.setNumThreads(1)    # One sample per thread / worker process already.
except ImportError:       # PIL fallback: same geometry (tests check the two agree).
  cv2 = None

MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)
# x / 255 → (x/255 − mean) / std folded into one multiply-add, and tabulated per channel.
_SCALE = (1.0 / (255.0 * STD)).astype(np.float32)
_OFFSET = (-MEAN / STD).astype(np.float32)
_LUT = (np.arange(256, dtype=np.float32)[None, :] * _SCALE[:, None] + _OFFSET[:, None])


def normalize(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] → float32 [H, W, 3], (x / 255 − mean) / std with ALBEF's (CLIP's) statistics."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    return (image.astype(np.float32) * _SCALE + _OFFSET).astype(np.float32)
  out = np.empty(image.shape, np.float32)
  for k in range(3):      # A table lookup per channel: ~2x faster than float multiply-add.
    out[..., k] = _LUT[k][image[..., k]]
  return out


def normalize_jax(image):
  """`normalize` for uint8 [..., H, W, 3] batches already on the device (data.image_dtype='uint8':
  4x less host memory traffic and host→device bandwidth). Returns float32."""
  import jax.numpy as jnp
  return image.astype(jnp.float32) * jnp.asarray(_SCALE) + jnp.asarray(_OFFSET)


def denormalize(image: np.ndarray) -> np.ndarray:
  """Inverse of `normalize`, back to uint8 (for pictures and tests)."""
  x = (np.asarray(image, np.float32) - _OFFSET) / _SCALE
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------ crop

def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: tuple[float, float] = (0.2, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)
                            ) -> tuple[int, int, int, int]:
  """torchvision's `RandomResizedCrop.get_params`: (left, top, w, h) of the crop.

  Ten tries at an area fraction in `scale` and a log-uniform aspect ratio in `ratio`; if none
  fits, a central crop with the ratio clamped to `ratio`.
  """
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, w, h
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def draft_for_crop(img: Image.Image, box: tuple[int, int, int, int], res: int
                   ) -> tuple[Image.Image, tuple[float, float, float, float]]:
  """Lets libjpeg decode a still-lazy JPEG at 1/2, 1/4 or 1/8 scale when the crop stays ≥ res.

  DCT-domain downscaling makes decoding several times cheaper for large photos; the crop box is
  rescaled to the decoded size. Non-JPEG or already-loaded images are returned unchanged.
  """
  left, top, w, h = box
  if img.format != "JPEG":
    return img, (left, top, left + w, top + h)
  shrink = min(w, h) / res
  if shrink < 2:
    return img, (left, top, left + w, top + h)
  width, height = img.size
  img.draft("RGB", (math.ceil(width / shrink), math.ceil(height / shrink)))  # No-op once loaded.
  sx, sy = img.size[0] / width, img.size[1] / height
  return img, (left * sx, top * sy, (left + w) * sx, (top + h) * sy)


# ------------------------------------------------------------------------------ flip

_LEFT_RIGHT = re.compile(r"\b(left|right)\b")


def swap_left_right(caption: str) -> str:
  """'the dog left of the cat' → 'the dog right of the cat' (whole words, lower-case captions)."""
  return _LEFT_RIGHT.sub(lambda m: "right" if m.group(1) == "left" else "left", caption)


# ------------------------------------------------------------------------------ RandAugment

# ALBEF's RandomAugment(2, 7, augs=[...]) list: its colour operations (Color, Contrast, Solarize,
# Posterize; Invert is absent from ALBEF altogether) are left out for image-text pretraining.
ALBEF_OPS = ("Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
             "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
COLOUR_OPS = ("Color", "Contrast", "Solarize", "Posterize", "Invert")
_MAX_LEVEL = 10
_FILL = (128, 128, 128)


def _enhance_factor(level: float) -> float:
  return level / _MAX_LEVEL * 1.8 + 0.1          # M = 7 → 1.36


def _signed(value: float, rng: np.random.Generator) -> float:
  return -value if rng.random() < 0.5 else value


def _affine(img: Image.Image, forward: tuple[float, ...], use_cv2: bool = True) -> Image.Image:
  """Warps by the 2x3 matrix `forward` (input → output pixel coordinates), bilinear, grey fill.

  This is ALBEF's cv2.warpAffine(img, M) call. PIL's transform takes the output → input map, so
  the fallback inverts the matrix.
  """
  if cv2 is not None and use_cv2:
    w, h = img.size
    out = cv2.warpAffine(np.asarray(img), np.float32(forward).reshape(2, 3), (w, h),
                         borderValue=_FILL, flags=cv2.INTER_LINEAR)
    return Image.fromarray(out)
  a, b, c, d, e, f = forward
  det = a * e - b * d
  inv = (e / det, -b / det, (b * f - c * e) / det, -d / det, a / det, (c * d - a * f) / det)
  return img.transform(img.size, Image.Transform.AFFINE, inv, Image.Resampling.BILINEAR,
                       fillcolor=_FILL)


_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13   # PIL's SMOOTH filter.


def _sharpness_cv2(img: Image.Image, factor: float) -> Image.Image:
  """PIL's ImageEnhance.Sharpness via cv2.filter2D (ALBEF's version): blend with the smoothed
  image, border pixels kept, saturated to [0, 255] (ALBEF's uint8 cast would wrap around)."""
  arr = np.asarray(img)
  smooth = cv2.filter2D(arr, -1, _SMOOTH)
  out = cv2.addWeighted(arr, factor, smooth, 1.0 - factor, 0.0)   # Rounds and saturates.
  out[0], out[-1], out[:, 0], out[:, -1] = arr[0], arr[-1], arr[:, 0], arr[:, -1]
  return Image.fromarray(out)


def _rotation(img: Image.Image, degrees: float) -> tuple[float, ...]:
  """cv2.getRotationMatrix2D((W/2, H/2), degrees, 1): counter-clockwise on screen."""
  w, h = img.size
  cx, cy = w / 2, h / 2
  a, b = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
  return (a, b, (1 - a) * cx - b * cy, -b, a, b * cx + (1 - a) * cy)


def apply_op(img: Image.Image, name: str, level: float, rng: np.random.Generator,
             use_cv2: bool = True) -> Image.Image:
  """One RandAugment op at `level` (0..10), magnitudes as ALBEF's `arg_dict`."""
  if name == "Identity":
    return img
  if name == "AutoContrast":
    return ImageOps.autocontrast(img)
  if name == "Equalize":
    return ImageOps.equalize(img)
  if name == "Brightness":
    return ImageEnhance.Brightness(img).enhance(_enhance_factor(level))
  if name == "Sharpness":
    if cv2 is not None and use_cv2:
      return _sharpness_cv2(img, _enhance_factor(level))
    return ImageEnhance.Sharpness(img).enhance(_enhance_factor(level))
  if name in ("ShearX", "ShearY"):
    s = _signed(level / _MAX_LEVEL * 0.3, rng)    # M = 7 → ±0.21
    m = (1, s, 0, 0, 1, 0) if name == "ShearX" else (1, 0, 0, s, 1, 0)
    return _affine(img, m, use_cv2)
  if name in ("TranslateX", "TranslateY"):
    t = _signed(level / _MAX_LEVEL * 10.0, rng)   # translate_const = 10 → ±7 pixels
    m = (1, 0, -t, 0, 1, 0) if name == "TranslateX" else (1, 0, 0, 0, 1, -t)
    return _affine(img, m, use_cv2)
  if name == "Rotate":
    deg = _signed(level / _MAX_LEVEL * 30.0, rng)  # ±21 degrees about the centre
    return _affine(img, _rotation(img, deg), use_cv2)
  raise ValueError(f"unknown RandAugment op {name!r}; known: {ALBEF_OPS}")


class RandAugment:
  """ALBEF's `RandomAugment(N, M)`: N ops drawn with replacement, each applied with p = 0.5."""

  def __init__(self, num_ops: int = 2, level: float = 7, ops: Sequence[str] = ALBEF_OPS):
    bad = [o for o in ops if o in COLOUR_OPS]
    if bad:
      raise ValueError(f"RandAugment ops {bad} are colour operations, which would contradict "
                       f"the caption's colour words; use ops from {ALBEF_OPS}")
    unknown = [o for o in ops if o not in ALBEF_OPS]
    if unknown:
      raise ValueError(f"unknown RandAugment ops {unknown}; known: {ALBEF_OPS}")
    self.num_ops, self.level, self.ops = num_ops, level, tuple(ops)

  def __call__(self, img: Image.Image, rng: np.random.Generator
               ) -> tuple[Image.Image, list[str]]:
    """Returns the augmented image and the names of the ops actually applied."""
    chosen = rng.integers(0, len(self.ops), size=self.num_ops)
    applied = []
    for k in chosen:
      if rng.random() > 0.5:
        continue
      name = self.ops[int(k)]
      img = apply_op(img, name, self.level, rng)
      applied.append(name)
    return img, applied


# ------------------------------------------------------------------------------ compositions

def to_rgb(img: Image.Image) -> Image.Image:
  return img if img.mode == "RGB" else img.convert("RGB")


class TrainTransform:
  """ALBEF's pre-training image transform plus the caption side of the flip.

  Args:
    image_size: output resolution (square).
    crop: RandomResizedCrop (off for images already at the model's resolution, e.g. synthetic).
    crop_scale: area fraction range of the crop (ALBEF: 0.2–1.0 pre-training, 0.5–1.0 retrieval).
    flip: random horizontal flip with p = 0.5.
    swap_left_right: when flipped, swap "left"/"right" in the caption (and the hard negative).
    randaugment: RandAugment(2, 7) without colour ops.
    jpeg_draft: let libjpeg decode at a reduced scale when the crop allows it (speed).
    normalize: return float32 normalised images (else uint8 [res, res, 3], see normalize_jax).
  """

  def __init__(self, image_size: int, *, crop: bool = True,
               crop_scale: tuple[float, float] = (0.2, 1.0), flip: bool = True,
               swap_left_right: bool = True, randaugment: bool = True, jpeg_draft: bool = True,
               normalize: bool = True):
    self.image_size = image_size
    self.crop, self.crop_scale = crop, tuple(crop_scale)
    self.flip, self.swap_left_right = flip, swap_left_right
    self.randaugment = RandAugment(2, 7) if randaugment else None
    self.jpeg_draft = jpeg_draft
    self.normalize = normalize

  def geometry(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Crop + resize to res × res (bicubic). `img` may still be lazy (not yet decoded)."""
    res = self.image_size
    if self.crop:
      box = random_resized_crop_box(img.size[0], img.size[1], rng, self.crop_scale)
      if self.jpeg_draft:
        img, fbox = draft_for_crop(img, box, res)
      else:
        l, t, w, h = box
        fbox = (l, t, l + w, t + h)
      return to_rgb(img).resize((res, res), Image.Resampling.BICUBIC, box=fbox)
    img = to_rgb(img)
    if img.size != (res, res):
      img = img.resize((res, res), Image.Resampling.BICUBIC)
    return img

  def augment(self, img: Image.Image, captions: Sequence[str], rng: np.random.Generator
              ) -> tuple[np.ndarray, list[str], dict]:
    """Flip (+ caption swap), RandAugment, normalise: everything after `geometry`."""
    flipped = bool(self.flip and rng.random() < 0.5)
    if flipped:
      img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
      if self.swap_left_right:
        captions = [swap_left_right(c) for c in captions]
    ops = []
    if self.randaugment is not None:
      img, ops = self.randaugment(img, rng)
    out = normalize(np.asarray(img)) if self.normalize else np.array(img, np.uint8)
    return out, list(captions), {"flipped": flipped, "ops": ops}

  def __call__(self, img: Image.Image, captions: Sequence[str], rng: np.random.Generator
               ) -> tuple[np.ndarray, list[str], dict]:
    """img: PIL image (any size/mode); captions: cleaned captions (the positive, then negatives).

    Returns: float32 [res, res, 3] normalised image (uint8 with normalize=False), the (possibly swapped) captions, and
    info = {'flipped': bool, 'ops': [applied RandAugment ops]}.
    """
    return self.augment(self.geometry(img, rng), captions, rng)


class EvalTransform:
  """ALBEF's test transform: Resize((res, res), bicubic) (aspect not kept, no crop) → normalise."""

  def __init__(self, image_size: int):
    self.image_size = image_size

  def __call__(self, img: Image.Image) -> np.ndarray:
    res = self.image_size
    img = to_rgb(img)
    if img.size != (res, res):
      img = img.resize((res, res), Image.Resampling.BICUBIC)
    return normalize(np.asarray(img))
