"""TFDS input for fine-tuning: deterministic, resumable, split per process.

Reads any TFDS set prepared in the ``array_record`` format through
``tfds.data_source`` (random access, no TensorFlow) and builds the batches
with ``grain``:

- Training: an endless, seeded shuffle (a new order each epoch), the paper's
  augmentations (random resized crop, flip; then Mixup / CutMix and label
  smoothing on the batch), normalisation. Global batch ``i`` is a pure
  function of ``(seed, i)``, so a run restarted at step ``s`` sees exactly
  the batches an uninterrupted run would; each of ``P`` processes reads only
  its own ``1/P`` of every global batch.
- Evaluation: resize and centre crop, the last batch padded, with a ``mask``
  that marks the real examples.

A set must be prepared in ``config.dataset.data_dir`` (e.g. ``tfds build
imagenet2012 --file_format=array_record --data_dir=...``), or be one that
TFDS can prepare by itself, such as ``digits_domains`` (registered by
importing ``config.dataset.tfds_module``): with ``config.dataset.prepare`` it
is prepared on first use.
"""

import contextlib
import functools
import importlib
import io
import os
from typing import Any, Iterator

import grain
import jax
import ml_collections
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

# -- Sources ------------------------------------------------------------------


def data_dir(dataset: ml_collections.ConfigDict) -> str | None:
  """The TFDS ``data_dir`` of ``config.dataset`` (None: TFDS's default)."""
  return os.path.expanduser(dataset.data_dir) if dataset.data_dir else None


def import_builder_module(dataset: ml_collections.ConfigDict) -> None:
  """Imports ``dataset.tfds_module``, which registers a set's TFDS builder."""
  _import_module(dataset.get('tfds_module', ''))


def _import_module(module: str) -> None:
  if module:
    try:
      importlib.import_module(module)
    except ImportError as e:
      raise ValueError(
          f'config.dataset.tfds_module={module!r} cannot be imported: {e}'
      ) from e


def _ensure_prepared(name: str, data_dir, *, module: str = '',
                     prepare: bool = False) -> None:
  """Checks that a set is prepared; prepares it first when allowed.

  Args:
    name: the TFDS name, e.g. ``'imagenet2012'`` or ``'digits_domains/rotate'``.
    data_dir: the TFDS data_dir (None: TFDS's default).
    module: a module to import first, which registers the set's TFDS builder
      (``config.dataset.tfds_module``); '' for TFDS's own sets.
    prepare: run the builder's ``download_and_prepare`` (``array_record``
      files) when the set is missing (``config.dataset.prepare``): for sets
      that need no manual download, such as ``digits_domains``.
  """
  _import_module(module)
  try:
    builder = tfds.builder(name, data_dir=data_dir,
                           file_format='array_record')
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f'TFDS does not know the dataset {name!r} (config.dataset; a set'
        f' defined in your own module needs config.dataset.tfds_module): {e}'
    ) from e
  # TFDS's is_prepared() warns about a folder it does not find (a set not yet
  # prepared); ask it only about one that exists.
  if builder.data_path.exists() and builder.is_prepared():
    return
  if prepare:
    tfds.disable_progress_bar()  # Ours say enough.
    # TFDS prints its progress to stdout; keep stdout for the caller.
    try:
      with contextlib.redirect_stdout(io.StringIO()):
        builder.download_and_prepare()
    except Exception as e:  # pylint: disable=broad-except
      raise RuntimeError(
          f'Preparing dataset {name!r} in data_dir'
          f' {builder.data_dir_root!r} failed (config.dataset.prepare=True:'
          f' TFDS downloads what the set needs): {type(e).__name__}: {e}'
      ) from e
    return
  raise FileNotFoundError(
      f'Dataset {name!r} is not prepared in data_dir'
      f' {builder.data_dir_root!r} (config.dataset.data_dir). Prepare it'
      f' with: tfds build {name.split("/")[0]} --file_format=array_record'
      f' --data_dir={builder.data_dir_root}, or set'
      ' config.dataset.prepare=True to prepare it on first use.'
  )


def source(name: str, split: str, dataset: ml_collections.ConfigDict) -> Any:
  """A random-access TFDS data source (``len`` and ``[i]``).

  Reads ``dataset.data_dir``, ``tfds_module`` and ``prepare`` (see
  :func:`_ensure_prepared`). With ``dataset.cache_in_memory``, the decoded
  examples are kept in memory (for small sets: the demo's digits), shared by
  every later call in the process.
  """
  args = (name, split, data_dir(dataset), dataset.get('tfds_module', ''),
          bool(dataset.get('prepare', False)))
  if dataset.cache_in_memory:
    return _cached_source(*args)
  return _source(*args)


@functools.lru_cache(maxsize=64)
def _cached_source(*args) -> list:
  src = _source(*args)
  return list(src.__getitems__(range(len(src))))


def _source(name: str, split: str, data_dir, module: str, prepare: bool):
  _ensure_prepared(name, data_dir, module=module, prepare=prepare)
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir,
                            download=False)
  except Exception as e:  # pylint: disable=broad-except
    if _num_examples(name, split, data_dir) == 0:
      raise ValueError(
          f'Split {split!r} of {name!r} in data_dir {data_dir!r} is empty (0'
          ' examples); check config.dataset.') from e
    raise ValueError(
        f'Cannot read split {split!r} of {name!r} from data_dir {data_dir!r}:'
        f' {type(e).__name__}: {e}. Random access needs the array_record'
        ' format: tfds build ... --file_format=array_record.'
    ) from e


def _num_examples(name: str, split: str, data_dir) -> int | None:
  """The size TFDS records for a split (slices too), or None if unknown."""
  try:
    return tfds.builder(name, data_dir=data_dir).info.splits[split].num_examples
  except Exception:  # pylint: disable=broad-except
    return None


def eval_sets(dataset: ml_collections.ConfigDict) -> dict[str, tuple[str, str]]:
  """Display name -> (TFDS name, split) of every evaluation set.

  ``val`` is the in-distribution validation split (for model selection),
  ``id`` the in-distribution test split, then every OOD set of the config.
  """
  sets = {}
  if dataset.val_split:
    sets['val'] = (dataset.name, dataset.val_split)
  sets['id'] = (dataset.name, dataset.eval_split)
  for display, ood in dataset.ood.items():
    sets[display] = (ood.name, ood.split)
  return sets


def check_available(dataset: ml_collections.ConfigDict) -> None:
  """Fails before any training if a set or split is missing."""
  for name, split in [(dataset.name, dataset.train_split)] + list(
      eval_sets(dataset).values()):
    source(name, split, dataset)


# -- Preprocessing ------------------------------------------------------------


def _resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  if image.shape[:2] == size:
    return image
  return np.asarray(Image.fromarray(image).resize(
      (size[1], size[0]), Image.BICUBIC))


def random_resized_crop(image: np.ndarray, size: int, scale, rng,
                        ratio=(3 / 4, 4 / 3)) -> np.ndarray:
  """Inception-style crop: a random area and aspect ratio, resized."""
  h, w = image.shape[:2]
  for _ in range(10):
    area = h * w * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
    ch = int(round(np.sqrt(area / aspect)))
    cw = int(round(np.sqrt(area * aspect)))
    if 0 < ch <= h and 0 < cw <= w:
      top = rng.integers(0, h - ch + 1)
      left = rng.integers(0, w - cw + 1)
      return _resize(image[top:top + ch, left:left + cw], (size, size))
  return center_crop(image, size, 1.0)


def center_crop(image: np.ndarray, size: int, crop_fraction: float):
  """Resizes the shorter side to ``size / crop_fraction``; crops the centre."""
  h, w = image.shape[:2]
  if (h, w) == (size, size):
    return image
  short = int(round(size / crop_fraction))
  image = _resize(image, (max(short, round(h * short / w)),
                          max(short, round(w * short / h))))
  h, w = image.shape[:2]
  top, left = (h - size) // 2, (w - size) // 2
  return image[top:top + size, left:left + size]


def _as_rgb(image: np.ndarray) -> np.ndarray:
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return image


def _normalize(image: np.ndarray, mean, std) -> np.ndarray:
  x = image.astype(np.float32) / 255.0
  return (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def train_example(example, rng, *, dataset: ml_collections.ConfigDict):
  """Crop, flip and normalise one training example."""
  aug = dataset.augment
  image = _as_rgb(np.asarray(example['image']))
  if aug.random_resized_crop:
    image = random_resized_crop(image, dataset.image_size, aug.crop_scale,
                                rng)
  else:
    image = center_crop(image, dataset.image_size, dataset.crop_fraction)
  if aug.flip and rng.random() < 0.5:
    image = image[:, ::-1]
  return {'image': _normalize(image, dataset.mean, dataset.std),
          'label': np.int32(example['label'])}


def mix_batch(batch: dict, rng: np.random.Generator, *,
              dataset: ml_collections.ConfigDict) -> dict:
  """Soft labels with smoothing, then Mixup or CutMix (timm's recipe)."""
  aug = dataset.augment
  n = dataset.num_classes
  smooth = aug.label_smoothing
  labels = np.full((len(batch['label']), n), smooth / n, np.float32)
  labels[np.arange(len(labels)), batch['label']] += 1.0 - smooth
  images = batch['image']
  use_mixup, use_cutmix = aug.mixup_alpha > 0, aug.cutmix_alpha > 0
  if (use_mixup or use_cutmix) and rng.random() < aug.mix_prob:
    cutmix = use_cutmix and (not use_mixup or rng.random() < aug.switch_prob)
    lam = rng.beta(*(2 * [aug.cutmix_alpha if cutmix else aug.mixup_alpha]))
    flipped = images[::-1]
    if cutmix:
      h, w = images.shape[1:3]
      ch, cw = int(h * np.sqrt(1 - lam)), int(w * np.sqrt(1 - lam))
      cy, cx = rng.integers(0, h), rng.integers(0, w)
      y0, y1 = np.clip([cy - ch // 2, cy + ch // 2], 0, h)
      x0, x1 = np.clip([cx - cw // 2, cx + cw // 2], 0, w)
      images = images.copy()
      images[:, y0:y1, x0:x1] = flipped[:, y0:y1, x0:x1]
      lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
      images = lam * images + (1 - lam) * flipped
    labels = lam * labels + (1 - lam) * labels[::-1]
  return {'image': images.astype(np.float32), 'label': labels}


def eval_example(example, *, dataset: ml_collections.ConfigDict):
  image = center_crop(_as_rgb(np.asarray(example['image'])),
                      dataset.image_size, dataset.crop_fraction)
  return {'image': _normalize(image, dataset.mean, dataset.std),
          'label': np.int32(example['label']), 'mask': np.bool_(True)}


# -- Batches ------------------------------------------------------------------


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size % process_count:
    raise ValueError(
        f'batch size {global_batch_size} is not divisible by the'
        f' {process_count} processes.')
  return global_batch_size // process_count


def train_batches(
    dataset: ml_collections.ConfigDict, *, global_batch_size: int, seed: int,
    start_step: int = 0, process_index: int | None = None,
    process_count: int | None = None, num_threads: int = 2,
) -> Iterator[dict]:
  """This process's part of global batches ``start_step``, ``start_step+1``...

  Args:
    dataset: ``config.dataset``.
    global_batch_size: over all processes.
    seed: data order and augmentation seed.
    start_step: the number of batches already consumed (a resumed run).
    process_index, process_count: default to JAX's.
    num_threads: reader threads (order does not depend on it).

  Yields:
    ``{'image': f32[b, s, s, 3], 'label': f32[b, num_classes]}`` (soft labels).
  """
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  local = _local_batch_size(global_batch_size, pc)
  src = source(dataset.name, dataset.train_split, dataset)
  ds = (
      grain.MapDataset.source(src)
      .seed(seed)
      .shuffle()  # A fresh permutation every epoch.
      .repeat(None)
      .random_map(functools.partial(train_example, dataset=dataset))
      .batch(local)
  )
  # Local batch k of process p is elements [k*local, (k+1)*local), so global
  # batch i is local batches i*P .. i*P + P - 1: process p takes i*P + p.
  ds = ds[start_step * pc + pi::pc]
  ds = ds.map_with_index(functools.partial(
      _mix_with_index, dataset=dataset, seed=seed, start_step=start_step,
      process_index=pi))
  return iter(ds.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=4)))


def _mix_with_index(index, batch, *, dataset, seed, start_step,
                    process_index):
  rng = np.random.default_rng([seed, start_step + index, process_index, 7])
  return mix_batch(batch, rng, dataset=dataset)


def eval_batches(
    dataset: ml_collections.ConfigDict, name: str, split: str, *,
    global_batch_size: int, process_index: int | None = None,
    process_count: int | None = None,
) -> Iterator[dict]:
  """One pass over a split; the last global batch is padded (``mask``).

  With ``dataset.cache_in_memory`` the preprocessed batches are also kept
  (read-only), so a process that evaluates the same split again (every run
  of a sweep) reads them from memory: evaluation is a pure function of the
  split and ``dataset``'s fields.
  """
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if not dataset.cache_in_memory:
    return _eval_batches(dataset, name, split, global_batch_size, pi, pc)
  key = (dataset.to_json_best_effort(sort_keys=True), name, split,
         global_batch_size, pi, pc)
  if key not in _EVAL_BATCHES:
    if len(_EVAL_BATCHES) >= 64:  # Oldest out (a long-lived process).
      del _EVAL_BATCHES[next(iter(_EVAL_BATCHES))]
    batches = tuple(_eval_batches(dataset, name, split, global_batch_size,
                                  pi, pc))
    for batch in batches:
      for array in batch.values():
        array.setflags(write=False)
    _EVAL_BATCHES[key] = batches
  return iter(_EVAL_BATCHES[key])


# (dataset JSON, name, split, batch size, process) -> the batches of a split.
_EVAL_BATCHES: dict[tuple, tuple[dict, ...]] = {}


def _eval_batches(dataset, name, split, global_batch_size, pi, pc):
  local = _local_batch_size(global_batch_size, pc)
  src = source(name, split, dataset)
  n = len(src)
  padded = -(-n // global_batch_size) * global_batch_size
  ds = (
      grain.MapDataset.range(padded)
      .map(_EvalOrPad(src, dataset))
      .batch(local)
  )
  ds = ds[pi::pc]
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2,
                                                   prefetch_buffer_size=4)))


class _EvalOrPad:
  """Example ``i`` for evaluation; past the end, a masked copy of the last.

  A class, not a ``functools.partial``: grain names each transformation by
  its ``repr``, which would print every cached example.
  """

  def __init__(self, src, dataset: ml_collections.ConfigDict):
    self.src, self.dataset = src, dataset

  def __repr__(self) -> str:
    return 'EvalOrPad'

  def __call__(self, i):
    n = len(self.src)
    example = eval_example(self.src[min(i, n - 1)], dataset=self.dataset)
    if i >= n:
      example['mask'] = np.bool_(False)
    return example
