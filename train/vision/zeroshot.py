r"""CLIP's zero-shot head, and a zero-shot evaluation mode (no training).

For class names :math:`c_1 \dots c_K` and prompt templates
:math:`t_1 \dots t_T` (``'a photo of a {}.'`` ...), CLIP's text tower
:math:`g` gives the head's rows

.. math::

   w_k = \mathrm{normalize}\Big(\frac{1}{T} \sum_{j=1}^{T}
         \mathrm{normalize}\big(g(t_j(c_k))\big)\Big),

and zero-shot CLIP classifies an image by
:math:`s \cdot \mathrm{normalize}(f(x))\, W^\top`, with :math:`f` the image
tower's projected feature and :math:`s` the exponential of the checkpoint's
learned logit scale (100 for OpenAI's CLIP). With
``config.model.head_init = 'zeroshot'``, ``train.vision.model_setup.make_model`` builds
exactly that: the image tower normalises its feature
(``normalize_features``) and the head is ``kernel = s W^T``, ``bias = 0``, as
WiSE-FT's code does. Step 0 of such a run *is* zero-shot CLIP, and WiSE-FT
from it interpolates towards the zero-shot classifier.

Class names come from ``config.zeroshot.class_names`` (a file, one name per
line) or, when that is empty, from the TFDS dataset's label names if they are
words (DomainNet's; not ImageNet's synset ids). The head is computed once and
cached in the workdir (``zeroshot_head.npz``, with its record
``zeroshot_head.json``: what it was computed from, by content, see
``train.core.run_identity``), so a resumed run, a moved workdir or a later
zero-shot evaluation there does not recompute it. Zero-shot evaluation without
training is ``python -m train.vision.zeroshot_main`` (``train/vision/zeroshot_main.py``).
"""

import logging
import os
import re
from typing import Optional

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from train.vision import clip_text
from train.core import files
from train.core import run_identity
from train.vision import pretrained

CACHE_FILE = 'zeroshot_head.npz'
CACHE_RECORD = 'zeroshot_head.json'
TEXT_BATCH_SIZE = 256  # Prompts per text-tower call.


def _unreadable(names: list[str]) -> bool:
  """Label names that are not words: '0', '1' ... or synset ids."""
  return all(re.fullmatch(r'\d+|n\d{8}', n) for n in names)


def class_names(config: ml_collections.ConfigDict) -> list[str]:
  """The dataset's class names, in label order, from the file or TFDS."""
  num_classes = config.dataset.num_classes
  path = config.zeroshot.class_names
  if path:
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f'Class-name file {path!r} (config.zeroshot.class_names) does not'
          ' exist.')
    with open(path) as f:
      names = f.read().splitlines()
    while names and not names[-1].strip():
      names.pop()
    names = [n.strip() for n in names]
    if len(names) != num_classes:
      raise ValueError(
          f'Class-name file {path!r} (config.zeroshot.class_names) has'
          f' {len(names)} names but the dataset has {num_classes} classes'
          ' (config.dataset.num_classes); one name per line, in label'
          ' order.')
    if not all(names):
      raise ValueError(f'Class-name file {path!r} has an empty line'
                       f' (line {names.index("") + 1}).')
    return names
  name = config.dataset.name
  data_dir = (os.path.expanduser(config.dataset.data_dir)
              if config.dataset.data_dir else None)
  feature = tfds.builder(name, data_dir=data_dir).info.features['label']
  names = list(feature.names)
  if _unreadable(names):
    raise ValueError(
        f'The label names of {name!r} are not words ({names[:3]}...): set'
        ' config.zeroshot.class_names to a file with one class name per'
        ' line, in label order.')
  if len(names) != num_classes:
    raise ValueError(
        f'{name!r} has {len(names)} label names but config.dataset.'
        f'num_classes is {num_classes}.')
  return [n.replace('_', ' ') for n in names]


def head_weights(config: ml_collections.ConfigDict
                 ) -> tuple[np.ndarray, float]:
  """``(W, s)``: unit rows ``float32[K, d]`` and the logit scale."""
  names = class_names(config)
  tokenizer = clip_text.Tokenizer(clip_text.tokenizer_path(config))
  tower, logit_scale = pretrained.load_text_tower(
      config.pretrained.path, eot_token_id=tokenizer.eot_token_id)
  templates = list(config.zeroshot.templates)
  prompts = [t.format(c) for c in names for t in templates]
  logging.info('Zero-shot head: %d classes x %d templates', len(names),
               len(templates))
  feats = clip_text.encode_texts(tower, tokenizer, prompts,
                                 batch_size=TEXT_BATCH_SIZE)
  feats = feats.astype(np.float64).reshape(len(names), len(templates), -1)
  feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
  w = feats.mean(axis=1)
  w /= np.linalg.norm(w, axis=-1, keepdims=True)
  return w.astype(np.float32), logit_scale


def _cache_identity(config: ml_collections.ConfigDict) -> dict:
  """What the head depends on, by content: weights, tokenizer, names, prompts."""
  def content(path):  # A missing file is named by head_weights.
    return run_identity.file_sha256(path) if os.path.isfile(path) else None
  return {
      'checkpoint': [run_identity.file_sha256(f) for f in
                     pretrained.checkpoint_files(config.pretrained.path)],
      'tokenizer': content(clip_text.tokenizer_path(config)),
      'class_names': (content(os.path.expanduser(config.zeroshot.class_names))
                      if config.zeroshot.class_names else config.dataset.name),
      'templates': list(config.zeroshot.templates)}


def cached_head_weights(config: ml_collections.ConfigDict,
                        workdir: Optional[str]) -> tuple[np.ndarray, float]:
  """``head_weights``, read from / written to ``WORKDIR/zeroshot_head.npz``.

  Reused when computed from the same content (``run_identity.reuse``): a
  cache of other weights, prompts or names, or a damaged one, is moved aside
  and the head recomputed.
  """
  if not workdir:
    return head_weights(config)
  path = os.path.join(workdir, CACHE_FILE)
  record = os.path.join(workdir, CACHE_RECORD)
  ident = _cache_identity(config)
  if run_identity.reuse(record, ident, data_files=[path]) is not None:
    with np.load(path) as z:
      logging.info('Zero-shot head read from %s', path)
      return np.asarray(z['weights']), float(z['logit_scale'])
  w, logit_scale = head_weights(config)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with files.atomic_write(path, 'wb') as f:
      np.savez(f, weights=w, logit_scale=logit_scale)
    run_identity.write_record(record, ident, data_files=[path])
  return w, logit_scale


def init_head(model, config: ml_collections.ConfigDict,
              workdir: Optional[str] = None) -> None:
  """Sets ``model.head`` to CLIP's zero-shot classifier (``s W^T``, 0)."""
  if not model.normalize_features:
    raise ValueError('The zero-shot head needs a model built with'
                     ' normalize_features=True.')
  w, logit_scale = cached_head_weights(config, workdir)
  kernel = model.head.kernel
  if kernel.shape != w.T.shape:
    raise ValueError(
        f'The zero-shot head has shape {w.T.shape} (feature, classes) but'
        f' the model head has {tuple(kernel.shape)}; check'
        ' config.model.name and config.model.num_classes.')
  kernel[...] = (logit_scale * w.T).astype(kernel.dtype)
  model.head.bias[...] = np.zeros(model.head.bias.shape,
                                  model.head.bias.dtype)
