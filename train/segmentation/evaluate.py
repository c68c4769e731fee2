"""Validation mIoU, clean and under ImageNet-C corruptions, and the table.

Each validation image is read at its own size, optionally corrupted
(``train.segmentation.corruptions``, at the image's size, as ImageNet-C
corrupts the images it is given), then evaluated as mmsegmentation's test
pipeline does:

- ``whole``: the image fitted in ``data.eval_scale`` (keeping its aspect),
  one forward pass, the logits resized bilinearly to the label's size;
- ``slide``: the fitted image in ``slide_crop`` windows every
  ``slide_stride`` pixels (the last window of a row or column flush with
  the edge), the windows' logits averaged where they overlap (mmseg's
  ``slide_inference``), then resized to the label's size.

The argmax is counted in a confusion matrix on the devices
(``train.segmentation.metrics``), summed over the images; the metrics come
from the sum. A corruption's score is the mean of its severities' mIoU.
"""

from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from train.segmentation import augment
from train.segmentation import corruptions
from train.segmentation import data
from train.segmentation import metrics
from train.segmentation import steps


class Evaluator:
  """The validation set's metrics for given params and statistics."""

  def __init__(self, graphdef, config: ml_collections.ConfigDict,
               data_dir: str, ids: list[str], mesh: jax.sharding.Mesh):
    self.config, self.data_dir = config, data_dir
    # Every process reads every image; each array is the same on all
    # devices (a global array, as jit needs on several hosts).
    replicated = jax.sharding.NamedSharding(mesh,
                                            jax.sharding.PartitionSpec())
    self._put = lambda x: jax.make_array_from_process_local_data(
        replicated, np.ascontiguousarray(x))
    limit = config.data.max_eval_images
    self.ids = ids[:limit] if limit else ids
    self.num_classes = config.data.num_classes
    self._logits = jax.jit(
        lambda p, s, r, x: steps.forward_logits(graphdef, p, s, r, x))
    self._count = jax.jit(_count, static_argnames=('num_classes',))

  def _logits_of(self, state, image: np.ndarray) -> jax.Array:
    """``[1, h, w, K]`` logits of the fitted image (whole or slide)."""
    if self.config.data.eval_mode == 'whole':
      return self._logits(*state, self._put(image[None]))
    return slide_logits(lambda x: self._logits(*state, self._put(x)), image,
                        self.config.data.slide_crop,
                        self.config.data.slide_stride, self.num_classes)

  def confusion(self, params, stats, rest, *, corruption: Optional[str] = None,
                severity: int = 0, limit: int = 0) -> np.ndarray:
    """The ``[K, K]`` counts over the (first ``limit``) images."""
    ids = self.ids[:limit] if limit else self.ids
    total = jnp.zeros((self.num_classes,) * 2, jnp.int32)
    scale = tuple(self.config.data.eval_scale)
    for index, image, label in data.eval_examples(self.data_dir, ids,
                                                  self.num_classes):
      if corruption:
        image = corruptions.corrupt(image, corruption, severity,
                                    seed=self.config.seed, index=index)
      fitted, _ = augment.resize_pair(image, None,
                                 augment.fit_size(image.shape[:2], scale))
      logits = self._logits_of((params, stats, rest), fitted)
      if not isinstance(logits, jax.Array):  # Slide: averaged on the host.
        logits = self._put(logits)
      total = total + self._count(logits, self._put(label[None]),
                                  num_classes=self.num_classes)
    return np.asarray(jax.device_get(total))

  def clean(self, params, stats, rest) -> dict[str, float]:
    s = metrics.scores(self.confusion(params, stats, rest))
    return {'eval/mIoU': s['mIoU'], 'eval/aAcc': s['aAcc']}

  def robustness(self, params, stats, rest) -> dict[str, float]:
    """Clean metrics, each corruption's per severity and their means."""
    out = self.clean(params, stats, rest)
    limit = self.config.corruptions.max_images
    for name in self.config.corruptions.names:
      per_severity = []
      for severity in self.config.corruptions.severities:
        s = metrics.scores(self.confusion(params, stats, rest,
                                          corruption=name, severity=severity,
                                          limit=limit))
        out[f'eval/{name}/{severity}/mIoU'] = s['mIoU']
        per_severity.append(s['mIoU'])
      out[f'eval/{name}/mIoU'] = float(np.mean(per_severity))
    names = self.config.corruptions.names
    if names:
      out['eval/corrupted/mIoU'] = float(np.mean(
          [out[f'eval/{n}/mIoU'] for n in names]))
    return out


def _count(logits, label, *, num_classes: int) -> jax.Array:
  """Logits resized to the label's size, argmax, confusion matrix."""
  logits = steps.resize_to(logits, label.shape[1:3])
  return metrics.confusion_matrix(jnp.argmax(logits, -1), label,
                                  num_classes=num_classes)


def windows(size: int, crop: int, stride: int) -> list[tuple[int, int]]:
  """mmseg's slide windows along one axis: ``[(start, end)]``, the last
  flush with the edge; one window (the whole axis) when ``size <= crop``.

  >>> windows(700, 480, 320)
  [(0, 480), (220, 700)]
  >>> windows(300, 480, 320)
  [(0, 300)]
  """
  count = max(size - crop + stride - 1, 0) // stride + 1
  out = []
  for i in range(count):
    end = min(i * stride + crop, size)
    out.append((max(end - crop, 0), end))
  return out


def slide_logits(forward, image: np.ndarray, crop: int, stride: int,
                 num_classes: int) -> np.ndarray:
  """The mean of the windows' logits at each pixel, ``[1, h, w, K]``.

  ``forward``: uint8 ``[1, hc, wc, 3]`` -> ``[1, hc, wc, K]`` logits.
  """
  h, w = image.shape[:2]
  total = np.zeros((1, h, w, num_classes), np.float32)
  count = np.zeros((1, h, w, 1), np.float32)
  for y0, y1 in windows(h, crop, stride):
    for x0, x1 in windows(w, crop, stride):
      total[:, y0:y1, x0:x1] += np.asarray(
          forward(image[None, y0:y1, x0:x1]))
      count[:, y0:y1, x0:x1] += 1
  return total / count


def table(results: dict[str, float],
          config: ml_collections.ConfigDict) -> tuple[list[list], list[str]]:
  """One row per condition: mIoU % (corruptions: mean over severities)."""
  pct = lambda v: 100.0 * v
  rows = [['start (clean)', pct(results.get('start/mIoU', float('nan')))],
          ['clean', pct(results['eval/mIoU'])]]
  for name in config.corruptions.names:
    rows.append([name, pct(results[f'eval/{name}/mIoU'])])
  if config.corruptions.names:
    rows.append(['corrupted mean', pct(results['eval/corrupted/mIoU'])])
  return rows, ['condition', 'mIoU %']
