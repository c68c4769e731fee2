"""The PASCAL-Context reader, the training transforms, the digits scenes."""

import os

import numpy as np
import pytest
from PIL import Image

from train.segmentation import augment
from train.segmentation import data
from train.segmentation import smoke


@pytest.fixture(scope='module')
def scenes(tmp_path_factory):
  d = str(tmp_path_factory.mktemp('scenes'))
  smoke.write(d, num_train=6, num_val=3, size=48, seed=0)
  return d


def _write(root, image_id, image, label):
  for folder in (data.IMAGES, data.LABELS, data.SPLITS):
    os.makedirs(os.path.join(root, folder), exist_ok=True)
  Image.fromarray(image).save(os.path.join(root, data.IMAGES,
                                           f'{image_id}.jpg'))
  Image.fromarray(label).save(os.path.join(root, data.LABELS,
                                           f'{image_id}.png'))


def test_reduce_zero_label_convention(tmp_path):
  raw = np.array([[0, 1, 59], [255, 30, 2]], np.uint8)
  _write(str(tmp_path), 'a', np.zeros((2, 3, 3), np.uint8), raw)
  _, label = data.read_example(str(tmp_path), 'a', num_classes=59)
  # 0 (background) and 255 -> ignored; k -> k - 1.
  np.testing.assert_array_equal(label, [[255, 0, 58], [255, 29, 1]])


def test_label_outside_the_classes_is_refused_naming_file_and_value(tmp_path):
  _write(str(tmp_path), 'b', np.zeros((2, 2, 3), np.uint8),
         np.array([[1, 60], [77, 3]], np.uint8))
  with pytest.raises(ValueError, match=r'b\.png.*\[60, 77\]'):
    data.read_example(str(tmp_path), 'b', num_classes=59)


def test_missing_files_are_refused_by_name(tmp_path, scenes):
  with pytest.raises(FileNotFoundError, match='test.txt'):
    data.split_ids(scenes, 'test')
  with pytest.raises(FileNotFoundError, match=r'nope\.jpg'):
    data.check_split(scenes, ['train_00000', 'nope'])
  _write(str(tmp_path), 'c', np.zeros((4, 4, 3), np.uint8),
         np.ones((3, 4), np.uint8))
  with pytest.raises(ValueError, match=r'c\.png.*\(3, 4\).*\(4, 4\)'):
    data.read_example(str(tmp_path), 'c', num_classes=59)


def test_scenes_read_back_with_their_classes(scenes):
  ids = data.split_ids(scenes, 'train')
  assert ids == [f'train_{i:05d}' for i in range(6)]
  assert len(data.split_ids(scenes, 'val')) == 3
  image, label = data.read_example(scenes, ids[0], smoke.NUM_CLASSES)
  assert image.shape == (48, 48, 3) and label.shape == (48, 48)
  assert label.max() <= 10 and 0 in label and label.max() >= 1
  # The same seed writes the same scenes.
  np.testing.assert_array_equal(
      label, smoke.scene(*_half_digits(), np.random.default_rng([0, False]),
                         size=48, per_scene=3, zoom=2)[1])


def _half_digits():
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  d = datasets.load_digits()
  half = len(d.images) // 2
  return d.images[:half], d.target[:half]


def test_fit_size_is_mmcvs_keep_ratio():
  assert augment.fit_size((375, 500), (520, 520)) == (390, 520)
  assert augment.fit_size((500, 375), (260, 260)) == (260, 195)
  assert augment.fit_size((10, 10), (1040, 1040)) == (1040, 1040)


def test_crop_avoids_a_single_class_window():
  label = np.zeros((40, 40), np.uint8)
  label[:, 30:] = 1  # One class dominates most windows.
  image = np.zeros((40, 40, 3), np.uint8)
  rng = np.random.default_rng(0)
  for _ in range(20):
    _, part = augment.random_crop(image, label, rng, crop=16,
                                  cat_max_ratio=0.75)
    _, counts = np.unique(part, return_counts=True)
    assert part.shape == (16, 16)
    assert len(counts) > 1 and counts.max() / counts.sum() < 0.75


def test_pad_labels_padding_ignored():
  image, label = augment.pad(np.ones((2, 3, 3), np.uint8),
                             np.zeros((2, 3), np.uint8), 4)
  assert image.shape == (4, 4, 3) and image[3, 3].tolist() == [0, 0, 0]
  assert (label[2:] == 255).all() and (label[:, 3] == 255).all()
  assert (label[:2, :3] == 0).all()


def test_batches_are_seeded_and_resume(scenes):
  ids = data.split_ids(scenes, 'train')
  aug = data.Augmentation(scale=(52, 52), ratio_range=(0.5, 2.0), crop=32,
                          cat_max_ratio=0.75)
  kw = dict(num_classes=smoke.NUM_CLASSES, batch_size=4, seed=3, aug=aug)
  run = data.train_batches(scenes, ids, **kw)
  first = [next(run) for _ in range(4)]
  assert first[0]['image'].shape == (4, 32, 32, 3)
  assert first[0]['label'].shape == (4, 32, 32)
  assert first[0]['image'].dtype == np.uint8
  resumed = data.train_batches(scenes, ids, start_step=2, **kw)
  for want in first[2:]:
    got = next(resumed)
    np.testing.assert_array_equal(got['image'], want['image'])
    np.testing.assert_array_equal(got['label'], want['label'])
  # Two processes: each half of the same global batch.
  halves = [next(data.train_batches(scenes, ids, process_index=p,
                                    process_count=2, **kw)) for p in (0, 1)]
  np.testing.assert_array_equal(
      np.concatenate([h['label'] for h in halves]), first[0]['label'])
  other = next(data.train_batches(scenes, ids, **{**kw, 'seed': 4}))
  assert not np.array_equal(other['image'], first[0]['image'])
