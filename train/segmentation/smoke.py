"""A generated scene set for a run with nothing downloaded: digits on a canvas.

Each scene is a ``size x size`` canvas (48 by default) with a few of
scikit-learn's 8x8 handwritten digits (``sklearn.datasets.load_digits``),
each upscaled ``zoom`` times, at random places, in a light colour whose hue
depends on the digit (:func:`digit_colour`) over a darker textured
background (a smooth colour gradient plus noise). Its label map
has one class per digit, ``1 + digit`` (1..10), where the digit's stroke is
(its 0..16 intensity above ``STROKE``), and 0 (background) elsewhere; a
later digit covers an earlier one. That is 11 classes.

:func:`write` lays the scenes out as mmsegmentation's PASCAL-Context
converter does (``JPEGImages/*.jpg``, ``SegmentationClassContext/*.png``,
``ImageSets/SegmentationContext/{train,val}.txt``), so the real reader
(``train.segmentation.data``) reads them. PNG values are the class plus 1,
because the reader subtracts 1 (PASCAL-Context's reduce-zero-label): a
value of 0 would be ignored, and the smoke's background is a class.
"""

import os

import jax
from jax.experimental import multihost_utils
import numpy as np
from matplotlib import colors
from PIL import Image
from sklearn import datasets

from train.core import files
from train.segmentation import data

NUM_CLASSES = 11  # Background + ten digits.
STROKE = 3  # Of the digits' 0..16 intensities: above it, the digit's pixel.


def digit_colour(digit: int, rng: np.random.Generator) -> np.ndarray:
  """A light RGB colour whose hue says the digit (``digit / 10`` of the
  wheel, +- 0.02), saturation 0.6-1, value 0.8-1: a tiny model learns the
  classes in a few hundred steps from colour and shape together, where
  shape alone (16-pixel digits) takes far longer than a smoke run."""
  hsv = np.array([(digit / 10 + rng.uniform(-0.02, 0.02)) % 1.0,
                  rng.uniform(0.6, 1.0), rng.uniform(0.8, 1.0)])
  return colors.hsv_to_rgb(hsv) * 255


def scene(digits: np.ndarray, targets: np.ndarray, rng: np.random.Generator,
          *, size: int, per_scene: int,
          zoom: int) -> tuple[np.ndarray, np.ndarray]:
  """``(uint8[size, size, 3] image, uint8[size, size] classes 0..10)``."""
  yy, xx = np.mgrid[0:size, 0:size] / size
  start, end = rng.uniform(0, 110, 3), rng.uniform(0, 110, 3)  # Darker ...
  t = (0.5 * (yy + xx))[..., None]
  image = (1 - t) * start + t * end + rng.normal(0, 12, (size, size, 3))
  label = np.zeros((size, size), np.uint8)
  side = 8 * zoom
  for _ in range(per_scene):
    k = rng.integers(len(digits))
    glyph = np.kron(digits[k].reshape(8, 8), np.ones((zoom, zoom)))
    y, x = rng.integers(0, size - side + 1, 2)
    colour = digit_colour(targets[k], rng)  # ... than the digits.
    alpha = np.clip(glyph / STROKE, 0, 1)[..., None]
    patch = image[y:y + side, x:x + side]
    image[y:y + side, x:x + side] = (1 - alpha) * patch + alpha * colour
    stroke = glyph > STROKE
    label[y:y + side, x:x + side][stroke] = 1 + targets[k]
  return np.clip(image, 0, 255).astype(np.uint8), label


def write(directory: str, *, num_train: int, num_val: int, size: int = 48,
          per_scene: int = 3, zoom: int = 2, seed: int = 0) -> None:
  """The scenes in mmseg's PASCAL-Context layout; the same seed, the same
  files. Training scenes use the first half of the digits, validation
  scenes the second (different writers' digits)."""
  loaded = datasets.load_digits()
  half = len(loaded.images) // 2
  parts = {'train': (slice(0, half), num_train),
           'val': (slice(half, None), num_val)}
  for folder in (data.IMAGES, data.LABELS, data.SPLITS):
    os.makedirs(os.path.join(directory, folder), exist_ok=True)
  for split, (rows, count) in parts.items():
    rng = np.random.default_rng([seed, split == 'val'])
    ids = [f'{split}_{i:05d}' for i in range(count)]
    for image_id in ids:
      image, label = scene(loaded.images[rows], loaded.target[rows], rng,
                           size=size, per_scene=per_scene, zoom=zoom)
      Image.fromarray(image).save(
          os.path.join(directory, data.IMAGES, f'{image_id}.jpg'), quality=95)
      Image.fromarray(label + 1).save(  # The reader subtracts 1.
          os.path.join(directory, data.LABELS, f'{image_id}.png'))
    with files.atomic_write(os.path.join(directory, data.SPLITS,
                                         f'{split}.txt')) as f:
      f.write('\n'.join(ids) + '\n')


def prepare(directory: str, smoke, *, seed: int) -> str:
  """The scene folder under ``directory`` (written once, by process 0).

  Args:
    directory: e.g. ``WORKDIR/smoke``.
    smoke: ``config.smoke`` (num_train, num_val, size, per_scene, zoom).
    seed: the same seed writes the same scenes.
  """
  done = os.path.join(directory, 'COMPLETE')
  if jax.process_index() == 0 and not os.path.exists(done):
    write(directory, num_train=smoke.num_train, num_val=smoke.num_val,
          size=smoke.size, per_scene=smoke.per_scene, zoom=smoke.zoom,
          seed=seed)
    with open(done, 'w') as f:  # Last: its presence means complete.
      f.write('ok\n')
  multihost_utils.sync_global_devices('smoke scenes written')
  return directory
