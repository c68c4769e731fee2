"""The VQA sets in the files their publishers distribute, as one row type.

Every set is read into :class:`Row` s (question id, image path, question,
the ten human answers), each checked: a malformed row is refused naming the
file, the row and the field, and so is a row whose image file is missing.
:data:`LAYOUTS` says where each set's files lie under ``data.dir`` (the
publishers' names, see ``configs/vqa.py``) and which of six formats they
are in:

- ``'vqa'``: the VQA API's pair of files, ``{"questions": [{question_id,
  image_id, question}]}`` and ``{"annotations": [{question_id, answers:
  [{answer, ...}] * 10}]}``, images named from ``image_id`` (VQAv2 train and
  val on COCO 2014, VQA-Rephrasings, OK-VQA, AdVQA on COCO val2017);
- ``'vqacp'``: VQA-CP v2's lists ``[{question_id, image_id, question,
  coco_split}]`` and ``[{question_id, answers}]``, the image in its
  ``coco_split`` folder;
- ``'vqace'``: VQA-CE's list of question ids (its counterexamples) over the
  VQAv2 val files;
- ``'lavis'``: one list ``[{question_id, question, answer: [10 strings],
  image}]`` with image paths relative to the set's image folder, as LAVIS
  and FRAMES-VQA store processed sets (IV-VQA, CV-VQA: the edited images);
- ``'textvqa'``: ``{"data": [{question_id, image_id, question, answers: [10
  strings]}]}``, images ``<image_id>.jpg``;
- ``'vizwiz'``: ``[{image, question, answers: [{answer, ...}] * 10}]``; the
  image's file name is the question id.

Training batches (:func:`train_batches`) are endless, seeded and resumable:
global batch ``i`` is a function of ``(seed, i)`` alone.
"""

import collections
import dataclasses
import json
import os
from typing import Any, Callable, Iterator, Sequence

import grain
import numpy as np
from PIL import Image

NUM_ANSWERS = 10


@dataclasses.dataclass(frozen=True)
class Row:
  """One question: ``image`` is a file path, ``answers`` the human ones."""
  question_id: str
  image: str
  question: str
  answers: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a set's files lie under ``data.dir`` and how they are written.

  ``files``: the JSON files the format reads (see the module docstring);
  ``images``: the image folder; ``image_name``: the file name of an image
  from its ``image_id`` (``'vqa'`` and ``'textvqa'``), or from
  ``coco_split`` too (``'vqacp'``).
  """
  format: str
  files: tuple[str, ...]
  images: str
  image_name: str = ''


_COCO14 = 'COCO_{split}_{image_id:012d}.jpg'
LAYOUTS = {
    'vqav2_train': Layout(
        'vqa', ('vqav2/v2_OpenEnded_mscoco_train2014_questions.json',
                'vqav2/v2_mscoco_train2014_annotations.json'),
        'coco/train2014', _COCO14.replace('{split}', 'train2014')),
    'vqav2_val': Layout(
        'vqa', ('vqav2/v2_OpenEnded_mscoco_val2014_questions.json',
                'vqav2/v2_mscoco_val2014_annotations.json'),
        'coco/val2014', _COCO14.replace('{split}', 'val2014')),
    'iv_vqa': Layout('lavis', ('iv_vqa/iv_vqa_test.json',), 'iv_vqa/images'),
    'cv_vqa': Layout('lavis', ('cv_vqa/cv_vqa_test.json',), 'cv_vqa/images'),
    'vqa_rephrasings': Layout(
        'vqa', ('vqa_rephrasings/v2_OpenEnded_mscoco_valrep2014_humans_og'
                '_questions.json',
                'vqa_rephrasings/v2_mscoco_valrep2014_humans_og_annotations'
                '.json'),
        'coco/val2014', _COCO14.replace('{split}', 'val2014')),
    'vqa_cp': Layout(
        'vqacp', ('vqa_cp/vqacp_v2_test_questions.json',
                  'vqa_cp/vqacp_v2_test_annotations.json'),
        'coco', '{split}/' + _COCO14),
    'vqa_ce': Layout(
        'vqace', ('vqa_ce/counterexamples.json',
                  'vqav2/v2_OpenEnded_mscoco_val2014_questions.json',
                  'vqav2/v2_mscoco_val2014_annotations.json'),
        'coco/val2014', _COCO14.replace('{split}', 'val2014')),
    'advqa': Layout(
        'vqa', ('advqa/v1_OpenEnded_mscoco_val2017_advqa_questions.json',
                'advqa/v1_mscoco_val2017_advqa_annotations.json'),
        'coco/val2017', '{image_id:012d}.jpg'),
    'okvqa': Layout(
        'vqa', ('okvqa/OpenEnded_mscoco_val2014_questions.json',
                'okvqa/mscoco_val2014_annotations.json'),
        'coco/val2014', _COCO14.replace('{split}', 'val2014')),
    'textvqa': Layout('textvqa', ('textvqa/TextVQA_0.5.1_val.json',),
                      'textvqa/train_images', '{image_id}.jpg'),
    'vizwiz': Layout('vizwiz', ('vizwiz/Annotations/val.json',),
                     'vizwiz/val'),
}
NEAR_OOD = ('iv_vqa', 'cv_vqa', 'vqa_rephrasings', 'vqa_cp', 'vqa_ce',
            'advqa')
FAR_OOD = ('okvqa', 'textvqa', 'vizwiz')
ID = 'vqav2_val'
TRAIN = 'vqav2_train'
EVAL_SETS = (ID,) + NEAR_OOD + FAR_OOD


# -- Checked JSON -------------------------------------------------------------

_JSON_KINDS = {dict: 'an object', list: 'an array', str: 'a string',
               int: 'a number', float: 'a number', bool: 'a boolean',
               type(None): 'null'}


def _kind(value: Any) -> str:
  return _JSON_KINDS.get(type(value), type(value).__name__)


def _load(path: str) -> Any:
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file.')
  with open(path, encoding='utf-8') as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path} is not valid JSON: {e}') from e


def _list(value: Any, path: str, key: str | None = None) -> list:
  """``value`` (or ``value[key]``) as a list, else an error naming it."""
  where = path
  if key is not None:
    if not isinstance(value, dict) or key not in value:
      raise ValueError(f'{path}: expected an object with the field {key!r},'
                       f' found {_kind(value)}.')
    value, where = value[key], f'{path}: field {key!r}'
  if not isinstance(value, list):
    raise ValueError(f'{where} is {_kind(value)}, not a list of rows.')
  return value


def _field(row: Any, name: str, types: tuple, where: str) -> Any:
  """``row[name]``, checked to be of one of ``types`` (and non-empty)."""
  if not isinstance(row, dict):
    raise ValueError(f'{where} is {_kind(row)}, not an object.')
  if name not in row:
    raise ValueError(f'{where}: field {name!r} is missing.')
  value = row[name]
  if not isinstance(value, types) or isinstance(value, bool):
    raise ValueError(f'{where}: field {name!r} is {_kind(value)}, not'
                     f' {" or ".join(_JSON_KINDS[t] for t in types)}.')
  if isinstance(value, str) and not value.strip():
    raise ValueError(f'{where}: field {name!r} is empty.')
  return value


def _answers(row: dict, where: str, *, nested: bool) -> tuple[str, ...]:
  """The ten answers (``[{answer: str}]`` when ``nested``, else strings)."""
  field = 'answers' if 'answers' in row or nested else 'answer'
  answers = _field(row, field, (list,), where)
  if len(answers) != NUM_ANSWERS:
    raise ValueError(f'{where}: field {field!r} has {len(answers)} answers,'
                     f' not {NUM_ANSWERS}.')
  out = []
  for j, answer in enumerate(answers):
    if nested:
      answer = _field(answer, 'answer', (str,), f'{where}: {field}[{j}]')
    elif not isinstance(answer, str):
      raise ValueError(f'{where}: {field}[{j}] is {_kind(answer)}, not a'
                       ' string.')
    out.append(answer)
  return tuple(out)


def _image(folder: str, name: str, where: str, field: str) -> str:
  path = os.path.join(folder, name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{where}: field {field!r}: image {path} does not'
                            ' exist.')
  return path


def _row(question_id: Any, image: str, question: str,
         answers: tuple[str, ...]) -> Row:
  return Row(str(question_id), image, question, answers)


# -- The formats --------------------------------------------------------------


def _answers_by_id(annotations: list, path: str) -> dict:
  """``{question_id: answers}`` of an annotations list; ids must be unique."""
  out = {}
  for i, a in enumerate(annotations):
    where = f'{path}: row {i}'
    qid = _field(a, 'question_id', (int, str), where)
    if qid in out:
      raise ValueError(f'{where}: field \'question_id\' {qid!r} appears'
                       ' twice.')
    out[qid] = _answers(a, where, nested=True)
  return out


def _joined(questions: list, qpath: str, answers: dict, apath: str,
            images: str, name_of: Callable[[dict, str], str]) -> list[Row]:
  """Questions joined with their answers; ``name_of(question, where)`` is
  the image's file name."""
  rows = []
  for i, q in enumerate(questions):
    where = f'{qpath}: row {i}'
    qid = _field(q, 'question_id', (int, str), where)
    question = _field(q, 'question', (str,), where)
    if qid not in answers:
      raise ValueError(f'{where}: field \'question_id\' {qid!r} has no'
                       f' annotation in {apath}.')
    image = _image(images, name_of(q, where), where, 'image_id')
    rows.append(_row(qid, image, question, answers[qid]))
  return rows


def _coco_name(layout: Layout) -> Callable[[dict, str], str]:
  def name_of(q: dict, where: str) -> str:
    image_id = _field(q, 'image_id', (int,), where)
    split = ''
    if '{split}' in layout.image_name:
      split = _field(q, 'coco_split', (str,), where)
      if split not in ('train2014', 'val2014'):
        raise ValueError(f'{where}: field \'coco_split\' is {split!r}, not'
                         ' \'train2014\' or \'val2014\'.')
    return layout.image_name.format(image_id=image_id, split=split)
  return name_of


def _read_vqa(layout: Layout, paths: Sequence[str], images: str) -> list[Row]:
  qpath, apath = paths
  questions = _list(_load(qpath), qpath, 'questions')
  answers = _answers_by_id(_list(_load(apath), apath, 'annotations'), apath)
  return _joined(questions, qpath, answers, apath, images, _coco_name(layout))


def _read_vqacp(layout: Layout, paths: Sequence[str],
                images: str) -> list[Row]:
  qpath, apath = paths
  answers = _answers_by_id(_list(_load(apath), apath), apath)
  return _joined(_list(_load(qpath), qpath), qpath, answers, apath, images,
                 _coco_name(layout))


def _read_vqace(layout: Layout, paths: Sequence[str],
                images: str) -> list[Row]:
  ids_path = paths[0]
  ids = _list(_load(ids_path), ids_path)
  rows = {r.question_id: r for r in _read_vqa(layout, paths[1:], images)}
  out = []
  for i, qid in enumerate(ids):
    if not isinstance(qid, (int, str)) or isinstance(qid, bool):
      raise ValueError(f'{ids_path}: row {i} is {_kind(qid)}, not a question'
                       ' id.')
    if str(qid) not in rows:
      raise ValueError(f'{ids_path}: row {i}: question id {qid!r} is not in'
                       f' {paths[1]}.')
    out.append(rows[str(qid)])
  return out


def _read_lavis(unused_layout: Layout, paths: Sequence[str],
                images: str) -> list[Row]:
  (path,) = paths
  rows = []
  for i, r in enumerate(_list(_load(path), path)):
    where = f'{path}: row {i}'
    qid = _field(r, 'question_id', (int, str), where)
    question = _field(r, 'question', (str,), where)
    answers = _answers(r, where, nested=False)
    image = _image(images, _field(r, 'image', (str,), where), where, 'image')
    rows.append(_row(qid, image, question, answers))
  return rows


def _read_textvqa(layout: Layout, paths: Sequence[str],
                  images: str) -> list[Row]:
  (path,) = paths
  rows = []
  for i, r in enumerate(_list(_load(path), path, 'data')):
    where = f'{path}: row {i}'
    qid = _field(r, 'question_id', (int, str), where)
    question = _field(r, 'question', (str,), where)
    answers = _answers(r, where, nested=False)
    name = layout.image_name.format(
        image_id=_field(r, 'image_id', (str,), where))
    rows.append(_row(qid, _image(images, name, where, 'image_id'),
                     question, answers))
  return rows


def _read_vizwiz(unused_layout: Layout, paths: Sequence[str],
                 images: str) -> list[Row]:
  (path,) = paths
  rows = []
  for i, r in enumerate(_list(_load(path), path)):
    where = f'{path}: row {i}'
    name = _field(r, 'image', (str,), where)
    question = _field(r, 'question', (str,), where)
    answers = _answers(r, where, nested=True)
    rows.append(_row(name, _image(images, name, where, 'image'),
                     question, answers))
  return rows


READERS = {'vqa': _read_vqa, 'vqacp': _read_vqacp, 'vqace': _read_vqace,
           'lavis': _read_lavis, 'textvqa': _read_textvqa,
           'vizwiz': _read_vizwiz}


def read_set(name: str, data_dir: str, max_examples: int = 0) -> list[Row]:
  """The checked rows of set ``name`` (a key of :data:`LAYOUTS`) under
  ``data_dir``; the first ``max_examples`` when > 0.

  Raises:
    ValueError: naming the set when it is unknown, or the file, row and field
      of a malformed row.
    FileNotFoundError: naming a missing file, or the row and field of a
      missing image.
  """
  if name not in LAYOUTS:
    raise ValueError(f'Unknown VQA set {name!r}; known: {sorted(LAYOUTS)}.')
  layout = LAYOUTS[name]
  paths = [os.path.join(data_dir, f) for f in layout.files]
  rows = READERS[layout.format](layout, paths,
                                os.path.join(data_dir, layout.images))
  if not rows:
    raise ValueError(f'VQA set {name!r} ({paths[0]}) has no rows.')
  return rows[:max_examples] if max_examples > 0 else rows


def files_of(name: str) -> tuple[str, ...]:
  """The JSON files set ``name`` is read from, relative to ``data.dir``."""
  return LAYOUTS[name].files


# -- Training -----------------------------------------------------------------


def training_answer(row: Row) -> str:
  """The answer trained on: the most frequent of the ten (the first given,
  among equally frequent ones), as VQAv2's ``multiple_choice_answer``."""
  return collections.Counter(row.answers).most_common(1)[0][0]


def split_held_out(rows: list[Row], size: int,
                   seed: int) -> tuple[list[Row], list[Row]]:
  """``(train, held_out)``: ``size`` rows drawn by ``seed`` held out for
  picking (the rest kept in their order)."""
  if size >= len(rows):
    raise ValueError(f'data.val_size={size} holds out all {len(rows)}'
                     ' training rows.')
  held = set(np.random.default_rng(seed).permutation(len(rows))[:size]
             .tolist())
  return ([r for i, r in enumerate(rows) if i not in held],
          [r for i, r in enumerate(rows) if i in held])


def load_image(path: str) -> np.ndarray:
  """An image file as uint8 ``[H, W, 3]`` RGB; unreadable: named."""
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert('RGB'), np.uint8)
  except (OSError, ValueError) as e:
    raise ValueError(f'Cannot read image {path}: {e}') from e


def load_images(rows: Sequence[Row], preprocess: Callable,
                image_size: int) -> np.ndarray:
  """float32 ``[B, S, S, 3]``: each row's image through ``preprocess``
  (the model API's, uint8 ``[1, H, W, 3]`` in; images differ in size)."""
  return np.concatenate([
      np.asarray(preprocess(load_image(r.image)[None], image_size),
                 np.float32) for r in rows])


def train_batches(
    rows: Sequence[Row], encode: Callable[[list[Row]], dict], *,
    batch_size: int, seed: int, start_step: int = 0, process_index: int = 0,
    process_count: int = 1) -> Iterator[dict]:
  """This process's part of global batches ``start_step``, ``start_step+1``...

  Endless, epoch after epoch in a fresh order drawn from ``seed`` (grain's
  ``MapDataset`` shuffle): global batch ``i`` is a function of ``(seed, i)``
  alone, so a run resumed at step ``s`` sees the batches an uninterrupted run
  would. Process ``p`` of ``P`` gets rows ``[p*b/P, (p+1)*b/P)`` of every
  global batch, passed to ``encode`` (rows -> arrays: tokens, masks,
  images), which this yields.
  """
  if batch_size % process_count:
    raise ValueError(f'batch_size {batch_size} is not divisible by'
                     f' process_count {process_count}.')
  if not rows:
    raise ValueError('No rows to train on.')
  ds = (grain.MapDataset.source(np.arange(len(rows)))
        .seed(seed)
        .shuffle()  # A fresh permutation every epoch.
        .repeat(None)
        .batch(batch_size // process_count))
  ds = ds[start_step * process_count + process_index::process_count]
  for indices in ds.to_iter_dataset(grain.ReadOptions(
      num_threads=0, prefetch_buffer_size=0)):
    yield encode([rows[int(i)] for i in indices])
