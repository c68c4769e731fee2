r"""Segmentation metrics from a confusion matrix accumulated on the devices.

The confusion matrix :math:`C` of ``K`` classes counts, over every labelled
pixel, :math:`C_{ij}` = pixels of true class ``i`` predicted as ``j``;
pixels labelled ``ignore_index`` (255) are left out. It is built inside
``jax.jit`` (:func:`confusion_matrix`), so a sharded batch is counted where
it lies and only the ``K x K`` int32 sum leaves the devices; the
evaluation adds one per batch.

From it, as mmsegmentation's ``IoUMetric`` computes them:

.. math::

   \mathrm{IoU}_c = \frac{C_{cc}}{\sum_j C_{cj} + \sum_i C_{ic} - C_{cc}},
   \qquad
   \mathrm{mIoU} = \operatorname{mean}_{c:\ \text{union}_c > 0}
   \mathrm{IoU}_c,
   \qquad
   \mathrm{aAcc} = \frac{\sum_c C_{cc}}{\sum_{ij} C_{ij}}.

A class with neither ground truth nor prediction has a 0/0 IoU: NaN, and it
is left out of the mean (mmseg's ``nanmean``).

>>> import numpy as np
>>> labels = np.array([[[0, 1], [1, 255]]])
>>> preds = np.array([[[0, 1], [0, 1]]])
>>> cm = np.asarray(confusion_matrix(preds, labels, num_classes=3))
>>> cm.tolist()
[[1, 0, 0], [1, 1, 0], [0, 0, 0]]
>>> r = scores(cm)
>>> round(r['mIoU'], 4), round(r['aAcc'], 4)
(0.5, 0.6667)
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_INDEX = 255


@functools.partial(jax.jit, static_argnames=('num_classes', 'ignore_index'))
def confusion_matrix(preds: jax.Array, labels: jax.Array, *,
                     num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> jax.Array:
  """``[K, K]`` int32 counts: row = true class, column = predicted class.

  Args:
    preds: predicted classes, any shape, integers in ``[0, K)``.
    labels: true classes, the same shape; ``ignore_index`` pixels (and, to
      be safe, any label outside ``[0, K)``) are not counted.
    num_classes: ``K``.
    ignore_index: the label of unlabelled pixels.
  """
  labels = labels.astype(jnp.int32).reshape(-1)
  preds = preds.astype(jnp.int32).reshape(-1)
  valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
  index = jnp.where(valid, labels * num_classes + preds, 0)
  counts = jnp.bincount(index, weights=valid.astype(jnp.int32),
                        length=num_classes * num_classes)
  return counts.astype(jnp.int32).reshape(num_classes, num_classes)


def per_class_iou(cm) -> np.ndarray:
  """``IoU_c`` for each class; NaN where the class has no pixel in the union
  (neither labelled nor predicted)."""
  cm = np.asarray(cm, dtype=np.float64)
  intersect = np.diag(cm)
  union = cm.sum(axis=1) + cm.sum(axis=0) - intersect
  with np.errstate(invalid='ignore', divide='ignore'):
    return np.where(union > 0, intersect / np.where(union > 0, union, 1),
                    np.nan)


def scores(cm) -> dict[str, float]:
  """``{'mIoU', 'aAcc', 'mAcc'}`` of a confusion matrix (fractions, not %).

  ``mAcc`` is the mean over classes with ground truth of their recall
  (mmseg's ``mAcc``). A matrix with no labelled pixel gives NaN.
  """
  cm = np.asarray(cm, dtype=np.float64)
  iou = per_class_iou(cm)
  total = cm.sum()
  gt = cm.sum(axis=1)
  with np.errstate(invalid='ignore', divide='ignore'):
    acc = np.where(gt > 0, np.diag(cm) / np.where(gt > 0, gt, 1), np.nan)
  nan = float('nan')
  return {
      'mIoU': float(np.nanmean(iou)) if np.any(~np.isnan(iou)) else nan,
      'aAcc': float(np.trace(cm) / total) if total > 0 else nan,
      'mAcc': float(np.nanmean(acc)) if np.any(~np.isnan(acc)) else nan,
  }
