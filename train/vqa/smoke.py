"""Generated VQA data in the ten sets' real file layouts, and a tiny model.

Each image is a plain canvas with one to four shapes (squares or discs) of
one colour; each question asks the colour, the number or the kind of the
shapes, and its ten human answers are the true one given by most annotators
and a wrong one by the rest, so every accuracy level of the metric occurs.
:func:`write_data` writes VQAv2 train and val, the six near-OOD and the three
far-OOD sets in the files and folders :data:`train.vqa.data.LAYOUTS` reads,
each in its publisher's format; :func:`prepare` adds the tiny random
PaliGemma folder (``train.vqa.tiny``) the smoke run trains.

    >>> import tempfile
    >>> from train.vqa import data
    >>> d = tempfile.mkdtemp()
    >>> write_data(d, num_train=4, num_eval=2, image_size=16, seed=0)
    >>> [len(data.read_set(n, d)) for n in (data.TRAIN,) + data.EVAL_SETS]
    [4, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2]
"""

import json
import os

import jax
from jax.experimental import multihost_utils
import numpy as np
from PIL import Image

from train.vqa import data
from train.vqa import tiny

COLOURS = {'red': (220, 30, 30), 'green': (30, 180, 30),
           'blue': (30, 30, 220), 'yellow': (230, 210, 20)}
SHAPES = ('square', 'circle')
NUMBER_WORDS = ('one', 'two', 'three', 'four')
QUESTIONS = {'colour': 'what color are the shapes?',
             'count': 'how many shapes are there?',
             'shape': 'what shape are they?'}
# Words the smoke's tokenizer must know (questions, answers, prompt).
VOCABULARY = sorted(
    set(' '.join(QUESTIONS.values()).replace('?', ' ?').split())
    | set(COLOURS) | set(SHAPES) | {'1', '2', '3', '4', 'answer', 'en'})


def _image(rng: np.random.Generator, size: int, colour: str, shape: str,
           count: int) -> np.ndarray:
  """A grey canvas with ``count`` shapes in a 2x2 grid of cells."""
  canvas = np.full((size, size, 3), 128, np.uint8)
  cell = size // 2
  r = max(cell // 3, 1)
  yy, xx = np.mgrid[:size, :size]
  for k in rng.permutation(4)[:count]:
    cy, cx = (k // 2) * cell + cell // 2, (k % 2) * cell + cell // 2
    if shape == 'square':
      inside = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
    else:
      inside = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    canvas[inside] = COLOURS[colour]
  return canvas


def _example(rng: np.random.Generator, size: int) -> tuple:
  """``(image, question, ten answers)``; between 0 and 9 annotators wrong."""
  colour = str(rng.choice(list(COLOURS)))
  shape = str(rng.choice(SHAPES))
  count = int(rng.integers(1, 5))
  kind = str(rng.choice(list(QUESTIONS)))
  true = {'colour': colour, 'shape': shape, 'count': str(count)}[kind]
  others = {'colour': list(COLOURS), 'shape': list(SHAPES),
            'count': ['1', '2', '3', '4']}[kind]
  wrong = str(rng.choice([o for o in others if o != true]))
  num_right = int(rng.integers(1, 11))
  answers = [true] * num_right + [wrong] * (10 - num_right)
  return (_image(rng, size, colour, shape, count), QUESTIONS[kind],
          [answers[i] for i in rng.permutation(10)])


def _save(image: np.ndarray, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(image).save(path)


def _dump(obj, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(obj, f)


def _most_common(answers: list[str]) -> str:
  return max(answers, key=answers.count)


def _nested(answers: list[str]) -> list[dict]:
  return [{'answer': a, 'answer_confidence': 'yes', 'answer_id': j + 1}
          for j, a in enumerate(answers)]


def _write_vqa(root, layout, examples, first_id) -> list[int]:
  """The VQA API's questions and annotations files, COCO-named images."""
  questions, annotations, ids = [], [], []
  for k, (image, question, answers) in enumerate(examples):
    image_id = qid = first_id + k
    split = 'val2014' if k % 2 else 'train2014'  # VQA-CP's: both.
    _save(image, os.path.join(root, layout.images, layout.image_name.format(
        image_id=image_id, split=split)))
    entry = {'question_id': qid, 'image_id': image_id, 'question': question}
    annotation = {'question_id': qid, 'image_id': image_id,
                  'answers': _nested(answers),
                  'multiple_choice_answer': _most_common(answers)}
    if layout.format == 'vqacp':
      entry['coco_split'] = annotation['coco_split'] = split
    questions.append(entry)
    annotations.append(annotation)
    ids.append(qid)
  qpath, apath = (os.path.join(root, f) for f in layout.files[-2:])
  if layout.format == 'vqacp':  # Plain lists.
    _dump(questions, qpath)
    _dump(annotations, apath)
  else:
    _dump({'questions': questions}, qpath)
    _dump({'annotations': annotations}, apath)
  return ids


def _write_lists(root, layout, examples, first_id) -> None:
  """LAVIS-style, TextVQA and VizWiz files: one JSON each."""
  rows = []
  for k, (image, question, answers) in enumerate(examples):
    if layout.format == 'lavis':
      name = f'edited_{first_id + k}.jpg'
      rows.append({'question_id': first_id + k, 'question': question,
                   'answer': answers, 'image': name})
    elif layout.format == 'textvqa':
      image_id = f'{first_id + k:016x}'
      name = layout.image_name.format(image_id=image_id)
      rows.append({'question_id': first_id + k, 'image_id': image_id,
                   'question': question, 'answers': answers})
    else:  # VizWiz.
      name = f'VizWiz_val_{first_id + k:08d}.jpg'
      rows.append({'image': name, 'question': question,
                   'answers': _nested(answers), 'answerable': 1})
    _save(image, os.path.join(root, layout.images, name))
  _dump({'data': rows} if layout.format == 'textvqa' else rows,
        os.path.join(root, layout.files[0]))


def write_data(root: str, *, num_train: int, num_eval: int, image_size: int,
               seed: int) -> None:
  """The training set and the ten evaluation sets under ``root``."""
  rng = np.random.default_rng(seed)
  val_ids = []
  for k, name in enumerate((data.TRAIN,) + data.EVAL_SETS):
    layout = data.LAYOUTS[name]
    n = num_train if name == data.TRAIN else num_eval
    first_id = (k + 1) * 100_000
    if layout.format == 'vqace':  # Its counterexamples: VQAv2 val's ids.
      _dump(list(reversed(val_ids))[:n], os.path.join(root, layout.files[0]))
      continue
    examples = [_example(rng, image_size) for _ in range(n)]
    if layout.format in ('vqa', 'vqacp'):
      ids = _write_vqa(root, layout, examples, first_id)
      val_ids = ids if name == data.ID else val_ids
    else:
      _write_lists(root, layout, examples, first_id)


def prepare(directory: str, smoke, *, seed: int) -> tuple[str, str]:
  """``(model folder, data folder)`` under ``directory``, written once.

  The model is ``train.vqa.tiny``'s random PaliGemma (28-pixel images, 4
  image tokens, 2 decoder layers) with a word tokenizer of
  :data:`VOCABULARY`.

  Args:
    directory: e.g. ``WORKDIR/smoke``.
    smoke: ``config.smoke`` (num_train, num_eval, image_size).
    seed: the same seed writes the same files.
  """
  model_dir = os.path.join(directory, 'model')
  data_dir = os.path.join(directory, 'data')
  if jax.process_index() == 0 and not os.path.exists(
      os.path.join(model_dir, 'config.json')):
    write_data(data_dir, num_train=smoke.num_train, num_eval=smoke.num_eval,
               image_size=smoke.image_size, seed=seed)
    tokenizer = tiny.word_tokenizer([' '.join(VOCABULARY)])
    tiny.write_tiny_paligemma(model_dir, tokenizer, seed=seed)
  multihost_utils.sync_global_devices('smoke inputs written')
  return model_dir, data_dir
