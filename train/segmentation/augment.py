"""mmsegmentation's training and test transforms, in NumPy and PIL.

The PASCAL-Context pipeline of mmsegmentation
(``configs/_base_/datasets/pascal_context_59.py``), one function per step,
each drawing from the ``numpy.random.Generator`` it is given (so a batch is
a function of its seed):

- :func:`random_resize`: ``RandomResize(scale=(520, 520), ratio_range=(0.5,
  2.0), keep_ratio=True)``: a ratio ``r ~ U[0.5, 2]``, then the largest
  size of the image's aspect that fits in ``520r x 520r``;
- :func:`random_crop`: ``RandomCrop(480, cat_max_ratio=0.75)``: up to 10
  draws of the crop's corner, kept once no class covers 75 % or more of the
  crop's labelled pixels (and there are two classes at least);
- :func:`random_flip`: horizontal, probability 1/2;
- :func:`photometric_distortion`: ``PhotoMetricDistortion``'s defaults:
  brightness +- 32, contrast and saturation x U[0.5, 1.5], hue +- 18 degrees
  (of OpenCV's 180), each with probability 1/2, contrast first or last;
- :func:`pad`: to the crop size, image 0, label 255 (ignored).

Images are uint8 ``[H, W, 3]`` RGB, labels uint8 ``[H, W]``. Resizing uses
PIL (bilinear for images, nearest for labels) where mmseg uses OpenCV: the
interpolated values differ by rounding, not in kind.
"""

import numpy as np
from matplotlib import colors
from PIL import Image

IGNORE = 255


def resize_pair(image: np.ndarray, label, size: tuple[int, int]):
  """``(image, label)`` at ``size = (h, w)``; ``label`` may be None."""
  h, w = size
  out = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
  if label is not None:
    label = np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))
  return out, label


def fit_size(shape: tuple[int, int], scale: tuple[int, int]) -> tuple[int, int]:
  """mmcv's ``rescale_size`` with ``keep_ratio``: the size of ``shape``'s
  aspect scaled by ``min(long(scale)/long(shape), short(scale)/short(shape))``
  (rounded half up)."""
  h, w = shape
  factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
  return int(h * factor + 0.5), int(w * factor + 0.5)


def random_resize(image, label, rng: np.random.Generator, *,
                  scale: tuple[int, int], ratio_range: tuple[float, float]):
  ratio = rng.uniform(*ratio_range)
  target = (int(scale[0] * ratio), int(scale[1] * ratio))
  return resize_pair(image, label, fit_size(image.shape[:2], target))


def random_crop(image, label, rng: np.random.Generator, *, crop: int,
                cat_max_ratio: float = 0.75, tries: int = 10):
  """A ``crop x crop`` window (smaller where the image is); see above."""
  h, w = label.shape

  def window():
    y = int(rng.integers(0, max(h - crop, 0) + 1))
    x = int(rng.integers(0, max(w - crop, 0) + 1))
    return y, x

  y, x = window()
  if cat_max_ratio < 1.0:
    for _ in range(tries):
      part = label[y:y + crop, x:x + crop]
      _, counts = np.unique(part[part != IGNORE], return_counts=True)
      if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
        break
      y, x = window()
  return image[y:y + crop, x:x + crop], label[y:y + crop, x:x + crop]


def random_flip(image, label, rng: np.random.Generator):
  if rng.random() < 0.5:
    return image[:, ::-1], label[:, ::-1]
  return image, label


def _clip(x) -> np.ndarray:
  return np.clip(x, 0, 255).astype(np.float64)


def photometric_distortion(image, rng: np.random.Generator) -> np.ndarray:
  """mmseg's ``PhotoMetricDistortion`` (defaults); returns uint8."""
  x = image.astype(np.float64)
  if rng.integers(2):
    x = _clip(x + rng.uniform(-32, 32))
  contrast_first = bool(rng.integers(2))
  if contrast_first and rng.integers(2):
    x = _clip(x * rng.uniform(0.5, 1.5))
  saturate, hue = rng.integers(2), rng.integers(2)
  if saturate or hue:
    hsv = colors.rgb_to_hsv(x / 255.0)
    if saturate:
      hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.5), 0, 1)
    if hue:  # OpenCV's hue runs over 0..180.
      hsv[..., 0] = (hsv[..., 0] + rng.integers(-18, 18) / 180.0) % 1.0
    x = _clip(colors.hsv_to_rgb(hsv) * 255.0)
  if not contrast_first and rng.integers(2):
    x = _clip(x * rng.uniform(0.5, 1.5))
  return x.astype(np.uint8)


def pad(image, label, size: int):
  """Bottom/right padding to ``size x size``: image 0, label ``IGNORE``."""
  h, w = label.shape
  out = np.zeros((size, size, 3), np.uint8)
  out[:h, :w] = image
  lab = np.full((size, size), IGNORE, np.uint8)
  lab[:h, :w] = label
  return out, lab


def train_transform(image, label, rng: np.random.Generator, *,
                    scale: tuple[int, int], ratio_range: tuple[float, float],
                    crop: int, cat_max_ratio: float):
  """The whole training pipeline: ``(uint8[crop, crop, 3], uint8[crop,
  crop])``."""
  image, label = random_resize(image, label, rng, scale=scale,
                               ratio_range=ratio_range)
  image, label = random_crop(image, label, rng, crop=crop,
                             cat_max_ratio=cat_max_ratio)
  image, label = random_flip(image, label, rng)
  image = photometric_distortion(np.ascontiguousarray(image), rng)
  return pad(image, np.ascontiguousarray(label), crop)
