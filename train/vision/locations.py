r"""What the ViT recipe's config paths hold: the run identity's vision half.

A run's identity (``train.core.run_identity.identity``) is its config with
each location-only path replaced by what it holds. For this recipe:

- ``dataset.data_dir`` by every TFDS set the config reads (the training set
  and every OOD set), each as its name, version and split sizes;
- ``pretrained.path`` by the SHA-256 of each weights file read from it;
- ``zeroshot.class_names`` and, for a zero-shot head, the tokenizer, by their
  SHA-256.

So a workdir that is moved, copied or reached through another mount, and the
same data in another ``data_dir``, have the same identity, and a changed
checkpoint file does not.
"""

import functools
from typing import Any, Optional

import ml_collections
import tensorflow_datasets as tfds

from train.core import run_identity
from train.vision import clip_text
from train.vision import input_pipeline
from train.vision import pretrained


@functools.lru_cache(maxsize=256)
def _tfds_set(name: str, data_dir: Optional[str]) -> dict:
  info = tfds.builder(name, data_dir=data_dir).info
  return {'version': str(info.version),
          'splits': {s: int(info.splits[s].num_examples)
                     for s in sorted(info.splits)}}


def datasets_identity(dataset: ml_collections.ConfigDict) -> dict:
  """``{tfds name: {version, splits}}`` of every set ``dataset`` reads.

  The sets must be prepared (``input_pipeline.check_available``): an
  unprepared set has no split sizes yet.
  """
  input_pipeline.import_builder_module(dataset)
  data_dir = input_pipeline.data_dir(dataset)
  names = [dataset.name] + [ood.name for ood in dataset.get('ood', {}).values()]
  return {n: _tfds_set(n, data_dir) for n in dict.fromkeys(names)}


def locations(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What the ViT recipe's paths hold: data sets, weights, names, tokenizer."""
  out = {}
  if 'dataset' in config:
    out['dataset.data_dir'] = datasets_identity(config.dataset)
  if config.get('pretrained', {}).get('path'):
    out['pretrained.path'] = run_identity.digests(
        pretrained.checkpoint_files(config.pretrained.path))
  zeroshot = config.get('zeroshot')
  if zeroshot is not None:
    if zeroshot.class_names:
      out['zeroshot.class_names'] = run_identity.content(
          zeroshot.class_names, 'config.zeroshot.class_names')
    if config.model.head_init == 'zeroshot':
      out['zeroshot.tokenizer'] = run_identity.content(
          clip_text.tokenizer_path(config),
          'config.zeroshot.tokenizer, or tokenizer.json in'
          ' config.pretrained.path')
  return out


def identity(config: ml_collections.ConfigDict) -> dict:
  """The run identity of a ViT recipe's config (its :func:`locations`)."""
  return run_identity.identity(config, locations(config))
