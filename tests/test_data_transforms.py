"""ALBEF image transforms: crop geometry, flip ⇔ left/right swap, RandAugment ops, normalisation."""

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from nas_jax.data import transforms as T


def _halves(h=48, w=64):
  """Left half red, right half blue."""
  img = np.zeros((h, w, 3), np.uint8)
  img[:, : w // 2] = (255, 0, 0)
  img[:, w // 2:] = (0, 0, 255)
  return Image.fromarray(img)


def test_normalize_uses_albef_mean_std_and_inverts():
  x = np.array([[[0, 128, 255]]], np.uint8)
  y = T.normalize(x)
  assert y.dtype == np.float32
  expected = (np.array([0, 128, 255]) / 255 - [0.48145466, 0.4578275, 0.40821073]) / \
      [0.26862954, 0.26130258, 0.27577711]
  np.testing.assert_allclose(y[0, 0], expected, rtol=1e-5)
  rand = np.random.default_rng(0).integers(0, 256, (5, 7, 3)).astype(np.uint8)
  np.testing.assert_array_equal(T.denormalize(T.normalize(rand)), rand)


def test_random_resized_crop_box_stays_inside_with_area_and_ratio_in_range():
  rng = np.random.default_rng(0)
  for _ in range(300):
    W, H = int(rng.integers(20, 400)), int(rng.integers(20, 400))
    l, t, w, h = T.random_resized_crop_box(W, H, rng, (0.2, 1.0))
    assert 0 <= l and 0 <= t and l + w <= W and t + h <= H and w > 0 and h > 0
  # On a square image the first try nearly always fits: area fraction in [0.2, 1], ratio in [3/4, 4/3].
  fracs, ratios = [], []
  for _ in range(300):
    l, t, w, h = T.random_resized_crop_box(300, 300, rng, (0.2, 1.0))
    fracs.append(w * h / 300 ** 2)
    ratios.append(w / h)
  assert 0.19 <= min(fracs) and max(fracs) <= 1.0 and np.median(fracs) < 0.7
  assert 0.74 <= min(ratios) and max(ratios) <= 1.35


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_train_transform_output_shape_dtype_range(fmt):
  rng = np.random.default_rng(1)
  src = Image.fromarray(rng.integers(0, 256, (300, 410, 3)).astype(np.uint8))
  buf = io.BytesIO()
  src.save(buf, fmt)
  tr = T.TrainTransform(64)
  lo = ((0 - T.MEAN) / T.STD).min()
  hi = ((1 - T.MEAN) / T.STD).max()
  for _ in range(10):
    img = Image.open(io.BytesIO(buf.getvalue()))   # Lazy, so the JPEG draft path is used.
    out, caps, info = tr(img, ["a cat on the left"], rng)
    assert out.shape == (64, 64, 3) and out.dtype == np.float32
    assert lo - 1e-5 <= out.min() and out.max() <= hi + 1e-5
    assert set(info["ops"]) <= set(T.ALBEF_OPS)
  grey = Image.fromarray(np.zeros((30, 20), np.uint8), mode="L")   # Non-RGB input → RGB out.
  assert tr(grey, ["x"], rng)[0].shape == (64, 64, 3)


def test_jpeg_draft_decodes_smaller_but_crops_the_same_region():
  y, x = np.mgrid[0:800, 0:1000]
  arr = np.stack([x * 255 // 1000, y * 255 // 800, np.full_like(x, 128)], -1).astype(np.uint8)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, "JPEG", quality=95)
  box = (500, 300, 400, 400)   # A 400 px crop → 32 px output: libjpeg may decode at 1/8.
  img = Image.open(io.BytesIO(buf.getvalue()))
  img, fbox = T.draft_for_crop(img, box, 32)
  assert img.size[0] < 1000
  fast = np.asarray(img.convert("RGB").resize((32, 32), Image.Resampling.BICUBIC, box=fbox), np.float32)
  full = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
  slow = np.asarray(full.resize((32, 32), Image.Resampling.BICUBIC, box=(500, 300, 900, 700)), np.float32)
  assert np.abs(fast - slow).mean() < 3.0


def test_flip_swaps_left_right_exactly_when_the_image_is_flipped():
  tr = T.TrainTransform(32, crop=False, randaugment=False)
  flips = 0
  for seed in range(40):
    out, caps, info = tr(_halves(), ["a dog left of a cat", "the right one is red"],
                         np.random.default_rng(seed))
    img = T.denormalize(out)
    left_is_blue = img[:, :12, 2].mean() > 200 and img[:, :12, 0].mean() < 50
    assert left_is_blue == info["flipped"]
    if info["flipped"]:
      flips += 1
      assert caps == ["a dog right of a cat", "the left one is red"]
    else:
      assert caps == ["a dog left of a cat", "the right one is red"]
  assert 10 < flips < 30
  no_swap = T.TrainTransform(32, crop=False, randaugment=False, swap_left_right=False)
  for seed in range(10):
    _, caps, info = no_swap(_halves(), ["a dog left of a cat"], np.random.default_rng(seed))
    assert caps == ["a dog left of a cat"]


def test_swap_left_right_whole_words_only():
  assert T.swap_left_right("left right leftover rightly left") == "right left leftover rightly right"
  assert T.swap_left_right("to the left of the bright lamp") == "to the right of the bright lamp"


def test_randaugment_never_applies_a_colour_op():
  ra = T.RandAugment(2, 7)
  assert set(ra.ops) == set(T.ALBEF_OPS) and not set(ra.ops) & set(T.COLOUR_OPS)
  rng = np.random.default_rng(0)
  img = Image.fromarray(rng.integers(0, 256, (24, 24, 3)).astype(np.uint8))
  counts = {}
  for _ in range(600):
    _, ops = ra(img, rng)
    assert len(ops) <= 2
    for o in ops:
      counts[o] = counts.get(o, 0) + 1
  assert set(counts) == set(T.ALBEF_OPS)     # Every allowed op is used, nothing else.
  assert 550 < sum(counts.values()) < 650      # 2 ops × p=0.5 × 600 draws.
  with pytest.raises(ValueError, match="colour operations"):
    T.RandAugment(2, 7, ops=("Identity", "Color"))
  with pytest.raises(ValueError, match="colour operations"):
    T.RandAugment(2, 7, ops=("Solarize",))


@pytest.mark.parametrize("op", T.ALBEF_OPS)
def test_each_op_keeps_shape_and_dtype_and_magnitude(op):
  rng = np.random.default_rng(3)
  arr = rng.integers(30, 220, (40, 50, 3)).astype(np.uint8)
  out = np.asarray(T.apply_op(Image.fromarray(arr), op, 7, rng))
  assert out.shape == arr.shape and out.dtype == np.uint8
  if op == "Identity":
    np.testing.assert_array_equal(out, arr)
  if op == "Brightness":   # Factor 7/10 · 1.8 + 0.1 = 1.36.
    np.testing.assert_allclose(out.astype(float), np.clip(arr * 1.36, 0, 255), atol=1.0)
  if op == "TranslateX":   # ±7 pixels, grey fill.
    shifted_right = (out[:, :7] == 128).all()
    shifted_left = (out[:, -7:] == 128).all()
    assert shifted_left != shifted_right
    if shifted_left:
      np.testing.assert_array_equal(out[:, :-7], arr[:, 7:])
    else:
      np.testing.assert_array_equal(out[:, 7:], arr[:, :-7])


def test_eval_transform_resizes_to_res_square():
  out = T.EvalTransform(48)(Image.fromarray(np.full((30, 90, 3), 200, np.uint8)))
  assert out.shape == (48, 48, 3) and out.dtype == np.float32
  np.testing.assert_array_equal(T.denormalize(out), 200)


def test_transforms_are_picklable_and_deterministic():
  tr = pickle.loads(pickle.dumps(T.TrainTransform(32)))
  a = tr(_halves(), ["left"], np.random.default_rng(5))
  b = T.TrainTransform(32)(_halves(), ["left"], np.random.default_rng(5))
  np.testing.assert_array_equal(a[0], b[0])
  assert a[1:] == b[1:]


@pytest.mark.parametrize("op", ["ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
                                "Sharpness"])
def test_opencv_and_pil_ops_agree(op):
  pytest.importorskip("cv2")
  y, x = np.mgrid[0:64, 0:80].astype(np.float32)
  arr = np.stack([x * 3, y * 3, (x + y) * 1.5], -1).astype(np.uint8)   # Smooth: bilinear-safe.
  if op == "Sharpness":   # Needs edges to sharpen.
    arr = arr.copy()
    arr[::8] = 255
  img = Image.fromarray(arr)
  a = np.asarray(T.apply_op(img, op, 7, np.random.default_rng(4), use_cv2=True), np.float32)
  b = np.asarray(T.apply_op(img, op, 7, np.random.default_rng(4), use_cv2=False), np.float32)
  inner = (slice(2, -2), slice(2, -2))            # Border pixels differ by edge handling only.
  assert np.abs(a - b)[inner].mean() < 1.0
  assert np.abs(a - arr)[inner].mean() > 2.0      # And the op did change pixels.
