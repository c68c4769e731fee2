"""The VQA readers on generated files in the ten sets' layouts: rows read,
every bad input refused naming the file, the row and the field; batches
seeded and resumable."""

import json
import os
import shutil

import numpy as np
import pytest

from train.vqa import data
from train.vqa import smoke


@pytest.fixture(scope='module')
def vqa_dir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('vqa'))
  smoke.write_data(root, num_train=12, num_eval=3, image_size=16, seed=0)
  return root


@pytest.fixture
def copy_dir(vqa_dir, tmp_path):
  root = str(tmp_path / 'vqa')
  shutil.copytree(vqa_dir, root)
  return root


def test_every_set_reads_into_rows(vqa_dir):
  for name in (data.TRAIN,) + data.EVAL_SETS:
    rows = data.read_set(name, vqa_dir)
    assert len(rows) == (12 if name == data.TRAIN else 3), name
    for r in rows:
      assert isinstance(r.question_id, str) and r.question.endswith('?')
      assert len(r.answers) == 10 and all(isinstance(a, str)
                                          for a in r.answers)
      assert os.path.isfile(r.image)
    assert len({r.question_id for r in rows}) == len(rows)
  assert len(data.read_set(data.TRAIN, vqa_dir, max_examples=5)) == 5


def test_vqacp_images_follow_coco_split(vqa_dir):
  rows = data.read_set('vqa_cp', vqa_dir)
  folders = {os.path.basename(os.path.dirname(r.image)) for r in rows}
  assert folders == {'train2014', 'val2014'}
  for r in rows:
    split = os.path.basename(os.path.dirname(r.image))
    assert os.path.basename(r.image).startswith(f'COCO_{split}_')


def test_vqace_is_a_subset_of_vqav2_val(vqa_dir):
  val = {r.question_id: r for r in data.read_set('vqav2_val', vqa_dir)}
  for r in data.read_set('vqa_ce', vqa_dir):
    assert val[r.question_id] == r


def _edit(root, relative, change):
  path = os.path.join(root, relative)
  with open(path) as f:
    obj = json.load(f)
  change(obj)
  with open(path, 'w') as f:
    json.dump(obj, f)
  return path


def _pop(key):
  return lambda row: row.pop(key)


@pytest.mark.parametrize('name, file_index, rows_of, change, message', [
    ('vqav2_train', 0, lambda o: o['questions'], _pop('question'),
     r"row 1: field 'question' is missing"),
    ('vqav2_train', 0, lambda o: o['questions'],
     lambda r: r.update(image_id='12'),
     r"row 1: field 'image_id' is a string, not a number"),
    ('vqav2_train', 1, lambda o: o['annotations'],
     lambda r: r['answers'].pop(),
     r"row 1: field 'answers' has 9 answers, not 10"),
    ('vqav2_train', 1, lambda o: o['annotations'],
     lambda r: r['answers'][4].update(answer=3),
     r"row 1: answers\[4\]: field 'answer' is a number, not a string"),
    ('vqav2_train', 1, lambda o: o['annotations'],
     lambda r: r.update(question_id=-5),
     r"row 1: field 'question_id' \d+ has no annotation"),
    ('vqa_cp', 0, lambda o: o, lambda r: r.update(coco_split='test2015'),
     r"row 1: field 'coco_split' is 'test2015'"),
    ('iv_vqa', 0, lambda o: o, lambda r: r.update(answer='yes'),
     r"row 1: field 'answer' is a string, not an array"),
    ('textvqa', 0, lambda o: o['data'], lambda r: r.update(question=''),
     r"row 1: field 'question' is empty"),
    ('vizwiz', 0, lambda o: o, _pop('answers'),
     r"row 1: field 'answers' is missing"),
])
def test_malformed_row_is_named(copy_dir, name, file_index, rows_of, change,
                                message):
  relative = data.LAYOUTS[name].files[file_index]
  path = _edit(copy_dir, relative, lambda o: change(rows_of(o)[1]))
  with pytest.raises(ValueError, match=message) as e:
    data.read_set(name, copy_dir)
  assert path in str(e.value)


def test_vqace_unknown_id_is_named(copy_dir):
  path = _edit(copy_dir, data.LAYOUTS['vqa_ce'].files[0],
               lambda o: o.append(7))
  with pytest.raises(ValueError, match=r'row 3: question id 7 is not in'):
    data.read_set('vqa_ce', copy_dir)
  assert path.endswith('counterexamples.json')


@pytest.mark.parametrize('name', data.EVAL_SETS)
def test_missing_image_is_named(copy_dir, name):
  row = data.read_set(name, copy_dir)[-1]
  os.remove(row.image)
  with pytest.raises(FileNotFoundError,
                     match=r': row \d+: field \'image(_id)?\': image '
                           f'{row.image} does not exist'):
    data.read_set(name, copy_dir)


def test_bad_files_are_named(copy_dir):
  with pytest.raises(ValueError, match=r"Unknown VQA set 'gqa'"):
    data.read_set('gqa', copy_dir)
  path = os.path.join(copy_dir, data.LAYOUTS['okvqa'].files[0])
  with open(path, 'w') as f:
    f.write('{"questions": [')
  with pytest.raises(ValueError, match=f'{path} is not valid JSON'):
    data.read_set('okvqa', copy_dir)
  path = _edit(copy_dir, data.LAYOUTS['advqa'].files[1],
               lambda o: o.pop('annotations'))
  with pytest.raises(ValueError, match=f"{path}: expected an object with the"
                                       " field 'annotations'"):
    data.read_set('advqa', copy_dir)
  os.remove(os.path.join(copy_dir, data.LAYOUTS['vizwiz'].files[0]))
  with pytest.raises(FileNotFoundError, match='val.json: no such file'):
    data.read_set('vizwiz', copy_dir)


def test_unreadable_image_is_named(copy_dir):
  row = data.read_set('okvqa', copy_dir)[0]
  with open(row.image, 'wb') as f:
    f.write(b'not an image')
  with pytest.raises(ValueError, match=f'Cannot read image {row.image}'):
    data.load_image(row.image)


def test_training_answer_is_the_most_frequent():
  row = data.Row('1', 'x.jpg', 'q?', ('b', 'a', 'a', 'b', 'c') + ('d',) * 5)
  assert data.training_answer(row) == 'd'
  tie = data.Row('1', 'x.jpg', 'q?', ('b', 'a') * 5)
  assert data.training_answer(tie) == 'b'


def test_held_out_split(vqa_dir):
  rows = data.read_set(data.TRAIN, vqa_dir)
  train, held = data.split_held_out(rows, 4, seed=3)
  assert len(train) == 8 and len(held) == 4
  assert {r.question_id for r in train} | {r.question_id for r in held} == {
      r.question_id for r in rows}
  assert data.split_held_out(rows, 4, seed=3) == (train, held)
  with pytest.raises(ValueError, match='holds out all 12'):
    data.split_held_out(rows, 12, seed=3)


def _ids(rows):
  return {'ids': np.array([int(r.question_id) for r in rows])}


def test_batches_are_seeded_resumable_and_split_over_processes(vqa_dir):
  rows = data.read_set(data.TRAIN, vqa_dir)
  whole = data.train_batches(rows, _ids, batch_size=4, seed=1)
  first = [next(whole)['ids'] for _ in range(7)]  # Spans three epochs.
  # Each epoch (3 batches of 4 of the 12 rows) is a permutation.
  assert sorted(np.concatenate(first[:3]).tolist()) == sorted(
      int(r.question_id) for r in rows)
  assert not np.array_equal(np.concatenate(first[:3]),
                            np.concatenate(first[3:6]))
  resumed = data.train_batches(rows, _ids, batch_size=4, seed=1,
                               start_step=5)
  np.testing.assert_array_equal(next(resumed)['ids'], first[5])
  halves = [data.train_batches(rows, _ids, batch_size=4, seed=1,
                               start_step=2, process_index=p,
                               process_count=2) for p in range(2)]
  np.testing.assert_array_equal(
      np.concatenate([next(h)['ids'] for h in halves]), first[2])
  other = data.train_batches(rows, _ids, batch_size=4, seed=2)
  assert not np.array_equal(next(other)['ids'], first[0])


def test_images_are_decoded_and_preprocessed(vqa_dir):
  rows = data.read_set('textvqa', vqa_dir)

  def preprocess(images, size):  # Nearest-neighbour stand-in, [1,H,W,3].
    assert images.dtype == np.uint8 and images.shape[0] == 1
    step = images.shape[1] // size
    return images[:, ::step, ::step].astype(np.float32) / 255.0

  out = data.load_images(rows, preprocess, 8)
  assert out.shape == (3, 8, 8, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out[0], data.load_image(rows[0].image)[::2, ::2]
                             / 255.0)
