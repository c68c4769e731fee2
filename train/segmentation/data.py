"""PASCAL-Context 59 as mmsegmentation's converter lays it out, in batches.

The folder (``VOCdevkit/VOC2010`` after mmseg's
``tools/dataset_converters/pascal_context.py``)::

  JPEGImages/<id>.jpg
  SegmentationClassContext/<id>.png      # one uint8 label per pixel
  ImageSets/SegmentationContext/train.txt, val.txt   # one <id> per line

The label convention is mmseg's ``PascalContextDataset59`` (``LoadAnnotations
(reduce_zero_label=True)``): the converter writes 0 for background and
1..59 for the 59 classes; reading subtracts 1, so the classes are 0..58 and
background becomes 255, the ignored label, as are pixels already 255. A
PNG value above ``num_classes`` (other than 255) is refused, naming the file
and the values; so is a missing file or an image whose size differs from
its label's.

:func:`train_batches` serves endless, seeded, resumable batches through
grain (as the LLM recipe's data): global batch ``i`` is a pure function of
``(seed, i)``, each example augmented (``train.segmentation.augment``) by a
generator grain derives from the seed and the example's position, so the
same command resumes with the same batches. :func:`eval_examples` reads the
validation set one image at a time, at its own size, for whole-image or
sliding-window evaluation.
"""

import dataclasses
import os
from typing import Iterator

import grain
import numpy as np
from PIL import Image

from train.segmentation import augment

IGNORE = 255
IMAGES = 'JPEGImages'
LABELS = 'SegmentationClassContext'
SPLITS = os.path.join('ImageSets', 'SegmentationContext')


def split_ids(root: str, split: str) -> list[str]:
  """The ids listed in ``ImageSets/SegmentationContext/<split>.txt``."""
  path = os.path.join(root, SPLITS, f'{split}.txt')
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'{path}: the {split!r} split list is missing (expected mmseg\'s'
        ' PASCAL-Context layout under config.data.dir).')
  with open(path) as f:
    ids = [line.strip() for line in f if line.strip()]
  if not ids:
    raise ValueError(f'{path} lists no images.')
  return ids


def read_label(path: str, num_classes: int) -> np.ndarray:
  """A PNG's labels after reduce-zero-label: ``0..num_classes-1``, 255."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: label file missing.')
  raw = np.asarray(Image.open(path))
  if raw.ndim != 2:
    raise ValueError(f'{path}: a label map must have one channel, got shape'
                     f' {raw.shape}.')
  bad = np.unique(raw[(raw > num_classes) & (raw != IGNORE)])
  if bad.size:
    raise ValueError(
        f'{path}: label values {bad.tolist()[:10]} are outside the classes'
        f' (0 background, 1..{num_classes}, 255 ignored).')
  raw = raw.astype(np.int32)
  return np.where((raw == 0) | (raw == IGNORE), IGNORE, raw - 1).astype(
      np.uint8)


def read_image(path: str) -> np.ndarray:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: image file missing.')
  return np.asarray(Image.open(path).convert('RGB'))


def read_example(root: str, image_id: str,
                 num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """``(uint8[H, W, 3] RGB, uint8[H, W] labels)`` of one id."""
  image = read_image(os.path.join(root, IMAGES, f'{image_id}.jpg'))
  label_path = os.path.join(root, LABELS, f'{image_id}.png')
  label = read_label(label_path, num_classes)
  if image.shape[:2] != label.shape:
    raise ValueError(f'{label_path}: labels {label.shape} do not match the'
                     f' image {image.shape[:2]}.')
  return image, label


def check_split(root: str, ids: list[str]) -> None:
  """Every id's image and label exists (before any training)."""
  for image_id in ids:
    for folder, ext in ((IMAGES, 'jpg'), (LABELS, 'png')):
      path = os.path.join(root, folder, f'{image_id}.{ext}')
      if not os.path.isfile(path):
        raise FileNotFoundError(f'{path}: listed in {SPLITS} but missing.')


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """The training transform's sizes (mmseg's PASCAL-Context: 520, 0.5-2,
  480, 0.75)."""
  scale: tuple[int, int] = (520, 520)
  ratio_range: tuple[float, float] = (0.5, 2.0)
  crop: int = 480
  cat_max_ratio: float = 0.75


class _ReadAndAugment(grain.transforms.RandomMap):
  """Reads one id and applies the training transform (a class: grain names
  a transformation by its ``repr``)."""

  def __init__(self, root: str, num_classes: int, aug: Augmentation):
    self.root, self.num_classes, self.aug = root, num_classes, aug

  def __repr__(self) -> str:
    return f'ReadAndAugment({self.aug})'

  def random_map(self, image_id: str, rng: np.random.Generator) -> dict:
    image, label = read_example(self.root, image_id, self.num_classes)
    image, label = augment.train_transform(
        image, label, rng, scale=tuple(self.aug.scale),
        ratio_range=tuple(self.aug.ratio_range), crop=self.aug.crop,
        cat_max_ratio=self.aug.cat_max_ratio)
    return {'image': image, 'label': label}


def train_batches(root: str, ids: list[str], *, num_classes: int,
                  batch_size: int, seed: int, aug: Augmentation,
                  start_step: int = 0, process_index: int = 0,
                  process_count: int = 1,
                  threads: int = 0) -> Iterator[dict]:
  """This process's part of global batches ``start_step``, ``+1``, ...

  Endless, epoch after epoch in a fresh order drawn from ``seed``; process
  ``p`` of ``P`` gets rows ``[p*b/P, (p+1)*b/P)`` of every global batch.

  Yields:
    ``{'image': uint8[b, crop, crop, 3], 'label': uint8[b, crop, crop]}``,
    ``b = batch_size // process_count``; padding is labelled 255.
  """
  if batch_size % process_count:
    raise ValueError(f'batch_size {batch_size} is not divisible by'
                     f' process_count {process_count}.')
  if not ids:
    raise ValueError('No images to train on.')
  ds = (grain.MapDataset.source(list(ids))
        .seed(seed)
        .shuffle()  # A fresh permutation every epoch.
        .repeat(None)
        .random_map(_ReadAndAugment(root, num_classes, aug))
        .batch(batch_size // process_count))
  ds = ds[start_step * process_count + process_index::process_count]
  return iter(ds.to_iter_dataset(grain.ReadOptions(
      num_threads=threads, prefetch_buffer_size=2 * threads)))


def eval_examples(root: str, ids: list[str], num_classes: int, *,
                  process_index: int = 0,
                  process_count: int = 1) -> Iterator[tuple[int, np.ndarray,
                                                            np.ndarray]]:
  """``(index, image, label)`` of this process's share of ``ids`` (every
  ``process_count``-th from ``process_index``), at their own sizes."""
  for i in range(process_index, len(ids), process_count):
    image, label = read_example(root, ids[i], num_classes)
    yield i, image, label
