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
``config.model.head_init = 'zeroshot'``, ``train.train.make_model`` builds
exactly that: the image tower normalises its feature
(``normalize_features``) and the head is ``kernel = s W^T``, ``bias = 0``, as
WiSE-FT's code does. Step 0 of such a run *is* zero-shot CLIP, and WiSE-FT
from it interpolates towards the zero-shot classifier.

Class names come from ``config.zeroshot.class_names`` (a file, one name per
line) or, when that is empty, from the TFDS dataset's label names if they are
words (DomainNet's; not ImageNet's synset ids). The head is computed once and
cached in the workdir (``zeroshot_head.npz``), so a resumed run or a later
zero-shot evaluation there does not recompute it.

Zero-shot evaluation, on the ID split and every OOD set of a config::

    python -m train.zeroshot --config configs/domainnet_clip.py \
        --workdir runs/dn_zeroshot

prints the accuracies and writes them to ``WORKDIR/zeroshot.json``.
"""

import glob
import hashlib
import json
import logging
import os
import re
from typing import Optional

from absl import app
from absl import flags
from flax import nnx
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from train import clip_text
from train import metrics
from train import models
from train import weights

CACHE_FILE = 'zeroshot_head.npz'
RESULTS_FILE = 'zeroshot.json'
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
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
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


def tokenizer_path(config: ml_collections.ConfigDict) -> str:
  return os.path.expanduser(config.zeroshot.tokenizer or os.path.join(
      config.pretrained.path, 'tokenizer.json'))


def check_config(config: ml_collections.ConfigDict) -> None:
  """Refuses, by key, a config that cannot have a zero-shot head."""
  shape = models.get_model_kwargs(config.model.name)
  problems = []
  if shape['variant'] != 'clip' or not shape['projection_dim']:
    problems.append(f'config.model.name={config.model.name!r} is not a CLIP'
                    ' image tower with a projection')
  if not config.pretrained.path:
    problems.append('config.pretrained.path is empty (the text tower comes'
                    ' from it)')
  if config.model.num_classes != config.dataset.num_classes:
    problems.append(f'config.model.num_classes={config.model.num_classes}'
                    ' differs from config.dataset.num_classes='
                    f'{config.dataset.num_classes}')
  if not config.zeroshot.templates or not all(
      '{}' in t for t in config.zeroshot.templates):
    problems.append('config.zeroshot.templates must be prompts that each'
                    " hold '{}' for the class name")
  if problems:
    raise ValueError("config.model.head_init='zeroshot': "
                     + '; '.join(problems) + '.')


def head_weights(config: ml_collections.ConfigDict
                 ) -> tuple[np.ndarray, float]:
  """``(W, s)``: unit rows ``float32[K, d]`` and the logit scale."""
  names = class_names(config)
  tokenizer = clip_text.Tokenizer(tokenizer_path(config))
  tower, logit_scale = weights.load_text_tower(
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


def _fingerprint(config: ml_collections.ConfigDict) -> str:
  """What the head depends on: checkpoint, tokenizer, names, prompts."""
  def digest(f):  # Small text files by content.
    if not os.path.isfile(f):
      return None  # head_weights names the missing file.
    with open(f, 'rb') as fh:
      return hashlib.sha256(fh.read()).hexdigest()
  path = config.pretrained.path
  checkpoint = [path] if os.path.isfile(path) else sorted(
      glob.glob(os.path.join(path, '*.safetensors')))
  key = dict(
      checkpoint={os.path.abspath(f): [os.stat(f).st_size,
                                       os.stat(f).st_mtime_ns]
                  for f in checkpoint},
      tokenizer=digest(tokenizer_path(config)),
      class_names=(digest(os.path.expanduser(config.zeroshot.class_names))
                   if config.zeroshot.class_names else config.dataset.name),
      templates=list(config.zeroshot.templates))
  return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _read_cache(path: str, fingerprint: str):
  if not os.path.exists(path):
    return None
  try:
    with np.load(path) as z:
      if str(z['fingerprint']) == fingerprint:
        return np.asarray(z['weights']), float(z['logit_scale'])
    logging.warning('%s was computed for another (or a changed) checkpoint,'
                    ' tokenizer, class names or templates: recomputing it.',
                    path)
  except Exception as e:  # pylint: disable=broad-except
    logging.warning('%s is unreadable (%s): recomputing it.', path, e)
  return None


def cached_head_weights(config: ml_collections.ConfigDict,
                        workdir: Optional[str]) -> tuple[np.ndarray, float]:
  """``head_weights``, read from / written to ``WORKDIR/zeroshot_head.npz``."""
  if not workdir:
    return head_weights(config)
  path = os.path.join(workdir, CACHE_FILE)
  fingerprint = _fingerprint(config)
  cached = _read_cache(path, fingerprint)
  if cached is not None:
    logging.info('Zero-shot head read from %s', path)
    return cached
  w, logit_scale = head_weights(config)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = path + '.tmp.npz'
    np.savez(tmp, weights=w, logit_scale=logit_scale,
             fingerprint=fingerprint)
    os.replace(tmp, path)
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


# -- Zero-shot evaluation mode --------------------------------------------------


def evaluate(config: ml_collections.ConfigDict, workdir: str,
             *, print_summary: bool = True) -> dict[str, float]:
  """Zero-shot accuracy on every evaluation set; no training.

  Builds the model exactly as step 0 of a ``head_init='zeroshot'`` run
  (``train.train.make_model``), evaluates it as the run does, and writes the
  result to ``WORKDIR/zeroshot.json``.
  """
  from train import train  # pylint: disable=g-import-not-at-top
  workdir = os.path.abspath(workdir)
  if config.model.head_init != 'zeroshot':
    logging.info("Zero-shot evaluation: config.model.head_init=%r ->"
                 " 'zeroshot'.", config.model.head_init)
    config.model.head_init = 'zeroshot'
  mesh = train.make_mesh(config)
  with jax.set_mesh(mesh):
    model = train.make_model(config, nnx.Rngs(config.seed), workdir=workdir)
    train.shard_module(model, mesh)
    results = train.evaluate(model, config, mesh)
  if jax.process_index() == 0:
    path = os.path.join(workdir, RESULTS_FILE)
    with open(path + '.tmp', 'w') as f:
      json.dump(results, f, indent=2, sort_keys=True)
    os.replace(path + '.tmp', path)
    if print_summary:
      rows = [[k.removeprefix('eval/').removesuffix('_accuracy'), v]
              for k, v in results.items()]
      print(metrics.format_table(rows, ['eval set', 'zero-shot accuracy']))
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  metrics.quiet_libraries()
  evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == '__main__':
  # Defined here, not on import: ``python -m train`` imports this module.
  flags.DEFINE_string('workdir', None, 'Where the head and results go.')
  config_flags.DEFINE_config_file('config', None, 'A configs/*.py file.',
                                  lock_config=True)
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
