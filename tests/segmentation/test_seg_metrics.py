"""The confusion matrix and mIoU against counts made by hand."""

import jax
import numpy as np
import pytest

from train.segmentation import metrics


def _by_hand(preds, labels, k):
  """A confusion matrix by loops over the pixels (the definition)."""
  cm = np.zeros((k, k), np.int64)
  for p, t in zip(np.ravel(preds), np.ravel(labels)):
    if t != 255:
      cm[t, p] += 1
  return cm


def test_small_map_counted_by_hand():
  labels = np.array([[0, 0, 1, 255],
                     [2, 2, 1, 1]])
  preds = np.array([[0, 1, 1, 2],
                    [2, 0, 1, 0]])
  cm = np.asarray(metrics.confusion_matrix(preds, labels, num_classes=4))
  # Rows: truth. 0 -> {0, 1}; 1 -> {1, 1, 0}; 2 -> {2, 0}; 255 not counted.
  expected = np.array([[1, 1, 0, 0],
                       [1, 2, 0, 0],
                       [1, 0, 1, 0],
                       [0, 0, 0, 0]])
  np.testing.assert_array_equal(cm, expected)
  iou = metrics.per_class_iou(cm)
  # IoU_0 = 1 / (2 + 3 - 1); IoU_1 = 2 / (3 + 3 - 2); IoU_2 = 1 / (2 + 1 - 1)
  np.testing.assert_allclose(iou[:3], [1 / 4, 2 / 4, 1 / 2])
  assert np.isnan(iou[3])  # Neither labelled nor predicted: left out.
  s = metrics.scores(cm)
  assert s['mIoU'] == pytest.approx((1 / 4 + 2 / 4 + 1 / 2) / 3)
  assert s['aAcc'] == pytest.approx(4 / 7)
  assert s['mAcc'] == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)


def test_predicted_but_absent_class_counts_as_zero_iou():
  labels = np.array([0, 0, 0, 0])
  preds = np.array([0, 0, 0, 1])
  s = metrics.scores(metrics.confusion_matrix(preds, labels, num_classes=3))
  # Class 1: union 1, intersection 0 -> IoU 0 (in the mean); class 2 NaN.
  assert s['mIoU'] == pytest.approx((3 / 4 + 0.0) / 2)


def test_random_batches_add_up_to_the_loop_count():
  rng = np.random.default_rng(0)
  k = 5
  labels = rng.integers(0, k, (3, 7, 9))
  labels[rng.random(labels.shape) < 0.2] = 255
  preds = rng.integers(0, k, (3, 7, 9))
  total = sum(np.asarray(metrics.confusion_matrix(p, t, num_classes=k))
              for p, t in zip(preds, labels))
  np.testing.assert_array_equal(total, _by_hand(preds, labels, k))
  np.testing.assert_array_equal(
      metrics.confusion_matrix(preds, labels, num_classes=k),
      _by_hand(preds, labels, k))


def test_counted_on_a_sharded_batch():
  """The count runs where a batch lies (one device here, or several)."""
  n = jax.device_count()
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec('data'))
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 4, (2 * n, 4, 4))
  preds = rng.integers(0, 4, (2 * n, 4, 4))
  cm = metrics.confusion_matrix(jax.device_put(preds, sharding),
                                jax.device_put(labels, sharding),
                                num_classes=4)
  np.testing.assert_array_equal(cm, _by_hand(preds, labels, 4))


def test_nothing_labelled_gives_nan():
  s = metrics.scores(np.zeros((3, 3), np.int32))
  assert all(np.isnan(v) for v in s.values())
