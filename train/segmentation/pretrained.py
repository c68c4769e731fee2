"""A Hugging Face folder's safetensors, read into our Swin + UperNet, checked.

``load(folder, model)`` fills ``model`` (an ``upernet.UperNet``) in place
from

- a whole ``UperNetForSemanticSegmentation`` folder (Swin backbone): every
  leaf of the model is set, BatchNorm running statistics included;
- a Swin backbone folder: ``SwinModel``, ``SwinForImageClassification``
  (its ``swin.`` prefix stripped) or ``SwinBackbone``: the backbone is set,
  the decode and auxiliary heads (and, but for ``SwinBackbone``, the
  per-stage feature norms ``backbone.hidden_states_norms``) stay at their
  initialisation and are named ``fresh`` in the report.

Before a single tensor is read, every tensor of every file must map to a leaf
or be skipped for a named reason (a ``relative_position_index`` buffer,
recomputed from the window; BatchNorm's ``num_batches_tracked``; the final
``layernorm`` of ``SwinModel``, which no feature map uses; an image
classifier), and every mapped tensor must have its leaf's shape (as the leaf
lays it out: PyTorch's ``[out, in]`` linear weights and ``[O, I, H, W]``
conv kernels are transposed to ``[in, out]`` and ``[H, W, I, O]``); a
mismatch is named with its file, tensor, leaf and both shapes. Then each
tensor is read, refused naming its file when it holds a NaN or an inf, cast
to the leaf's dtype and placed on the leaf's sharding.

Both spellings ``transformers`` uses are read: the on-disk names of published
checkpoints and of its ``save_pretrained`` (``attention.self.query``,
``attention.output.dense``, ``intermediate.dense``, ``output.dense``,
``attention.self.relative_position_bias_table``) and its version 5 module
names (``attention.q_proj`` ..., ``mlp.fc1``), which ours follow.

The relative position bias tables are not interpolated: the window size is
read from the folder's config, so a table always fits (a shape mismatch is
refused).
"""

import dataclasses
import glob
import json
import os
import re
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import safetensors

from train.segmentation import upernet

# The normalisation the models expect, of pixels in [0, 1] (ImageNet's).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Older (and on-disk) names -> transformers 5's module names, which ours use.
_RENAMES = (
    (re.compile(r'\.attention\.self\.(query|key|value)\.'),
     lambda m: f'.attention.{m.group(1)[0]}_proj.'),
    (re.compile(r'\.attention\.self\.relative_position_bias_table$'),
     lambda m: ('.attention.relative_position_bias'
                '.relative_position_bias_table')),
    (re.compile(r'\.attention\.output\.dense\.'),
     lambda m: '.attention.o_proj.'),
    (re.compile(r'\.intermediate\.dense\.'), lambda m: '.mlp.fc1.'),
    (re.compile(r'(blocks\.\d+)\.output\.dense\.'),
     lambda m: f'{m.group(1)}.mlp.fc2.'),
    # transformers' pyramid pooling block is (pool, conv block): ours is the
    # conv block alone.
    (re.compile(r'\.psp_modules\.(\d+)\.1\.'),
     lambda m: f'.psp_modules.{m.group(1)}.'),
)
# Tensors read by no one on purpose, with the reason the report gives.
_SKIP = (
    (re.compile(r'relative_position_index$'),
     'a buffer recomputed from window_size'),
    (re.compile(r'num_batches_tracked$'),
     "BatchNorm's update counter (our momentum is fixed)"),
    (re.compile(r'^backbone\.layernorm\.'),
     "SwinModel's final LayerNorm, which no feature map uses"),
    (re.compile(r'^classifier\.'), 'the image classifier (a new head replaces'
     ' it)'),
    (re.compile(r'mask_token$'), "SimMIM's mask token"),
)
_SUFFIX = {'weight': ('kernel', 'scale'), 'bias': ('bias',),
           'running_mean': ('mean',), 'running_var': ('var',)}
# Leaves a backbone-only folder may leave at their initialisation.
_HEADS = re.compile(r'^(decode_head|auxiliary_head|backbone\.'
                    r'hidden_states_norms)\.')


def _files(folder: str) -> list[str]:
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'Pre-trained folder {folder!r} does not exist.')
  files = sorted(glob.glob(os.path.join(folder, '*.safetensors')))
  if not files:
    raise FileNotFoundError(
        f'No *.safetensors file in {folder!r}; save the model with'
        ' save_pretrained(..., safe_serialization=True).')
  return files


def _shapes(files: list[str]) -> dict[str, tuple[str, tuple[int, ...]]]:
  """``{tensor name: (file, shape)}`` of every tensor, without reading."""
  out = {}
  for path in files:
    try:
      with safetensors.safe_open(path, framework='numpy') as f:
        for name in f.keys():
          if name in out:
            raise ValueError(f'Tensor {name!r} is in both {out[name][0]} and'
                             f' {path}.')
          out[name] = (path, tuple(f.get_slice(name).get_shape()))
    except (OSError, safetensors.SafetensorError) as e:
      raise ValueError(f'Cannot read {path!r}; it may be truncated or'
                       f' damaged: {e}') from e
  return out


def _whole(names) -> bool:
  """Whether the folder holds a whole UperNet (else a Swin backbone)."""
  return any(n.startswith(('decode_head.', 'backbone.')) for n in names)


def _ours(name: str, whole: bool) -> tuple[str, str]:
  """``(our name up to the last part, HF's last part)`` or ``('', reason)``
  for a tensor skipped on purpose."""
  if whole:
    name = re.sub(r'^backbone\.swin\.', 'backbone.', name)
  else:
    name = re.sub(r'^swin\.', '', name)
    name = name if name.startswith('classifier.') else 'backbone.' + name
  for pattern, reason in _SKIP:
    if pattern.search(name):
      return '', reason
  for pattern, repl in _RENAMES:
    name = pattern.sub(repl, name)
  base, _, last = name.rpartition('.')
  return base, last


def _leaf_key(base: str, last: str, leaves: dict) -> str:
  for suffix in _SUFFIX.get(last, (last,)):
    if f'{base}.{suffix}' in leaves:
      return f'{base}.{suffix}'
  return f'{base}.{_SUFFIX.get(last, (last,))[0]}'


def _layout(key: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  """PyTorch's layout -> ours (the permutation ``_read`` applies)."""
  if key.endswith('.kernel') and len(shape) == 4:
    return tuple(shape[i] for i in (2, 3, 1, 0))
  if key.endswith('.kernel') and len(shape) == 2:
    return shape[::-1]
  return shape


def _read(path: str, name: str, key: str) -> np.ndarray:
  with safetensors.safe_open(path, framework='flax') as f:
    x = f.get_tensor(name)
  x = np.asarray(x.astype(jnp.float32) if x.dtype in (jnp.bfloat16,
                                                      jnp.float16) else x)
  if not np.all(np.isfinite(x)):
    bad = int(x.size - np.count_nonzero(np.isfinite(x)))
    raise ValueError(f'Tensor {name!r} of {path} holds {bad} NaN or inf'
                     ' values; refusing to load it.')
  if key.endswith('.kernel') and x.ndim == 4:
    return x.transpose(2, 3, 1, 0)
  return x.T if key.endswith('.kernel') and x.ndim == 2 else x


def _leaves(model) -> tuple[Any, dict]:
  state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
  return state, {'.'.join(map(str, p)): v
                 for p, v in nnx.to_flat_state(state)}


def _plan(folder: str, leaves: dict) -> tuple[dict, dict]:
  """``({leaf: (file, tensor)}, report)``, every check done, nothing read.

  Raises:
    FileNotFoundError: no folder, or no safetensors in it.
    ValueError: naming every tensor no leaf takes, every shape mismatch
      (file, tensor, leaf, both shapes), every leaf no tensor fills (but a
      new head's, for a backbone folder).
  """
  shapes = _shapes(_files(folder))
  whole = _whole(shapes)
  sources, skipped, problems = {}, [], []
  for name, (path, shape) in sorted(shapes.items()):
    base, last = _ours(name, whole)
    if not base:
      skipped.append(f'{name} ({last})')
      continue
    key = _leaf_key(base, last, leaves)
    if key not in leaves:
      problems.append(f'tensor {name!r} of {path} maps to {key!r}, which the'
                      ' model (built from its config) does not have')
    elif _layout(key, shape) != tuple(leaves[key].shape):
      problems.append(
          f'tensor {name!r} of {path} has shape {shape} ({_layout(key, shape)}'
          f' in our layout) but the leaf {key!r} has shape'
          f' {tuple(leaves[key].shape)}')
    elif key in sources:
      problems.append(f'tensors {sources[key][1]!r} and {name!r} both fill'
                      f' {key!r}')
    else:
      sources[key] = (path, name)
  missing = sorted(set(leaves) - set(sources))
  fresh = [k for k in missing if not whole and _HEADS.match(k)]
  unfilled = sorted(set(missing) - set(fresh))
  if unfilled:
    problems.append(
        f'{len(unfilled)} leaf/leaves of the model are in no tensor of'
        f' {folder}: {", ".join(unfilled[:10])}'
        f'{" ..." if len(unfilled) > 10 else ""}')
  if problems:
    raise ValueError(f'The weights of {folder} do not fit the model:\n  '
                     + '\n  '.join(problems))
  report = {'kind': 'upernet' if whole else 'swin backbone',
            'loaded': sorted(sources), 'fresh': fresh, 'skipped': skipped}
  return sources, report


def plan_load(folder: str, model: upernet.UperNet) -> dict:
  """``load``'s checks and report, nothing read: works on an abstract model
  (``nnx.eval_shape``)."""
  return _plan(folder, _leaves(model)[1])[1]


def load(folder: str, model: upernet.UperNet) -> dict:
  """Fills ``model`` in place from ``folder``'s safetensors (see the module).

  Returns:
    ``{'kind', 'loaded': [leaf], 'fresh': [leaf left at init], 'skipped':
    ['tensor (reason)']}``.
  """
  state, leaves = _leaves(model)
  sources, report = _plan(folder, leaves)
  for key, (path, name) in sources.items():
    var = leaves[key]
    old = var.get_value()
    host = _read(path, name, key).astype(old.dtype)
    # A leaf placed on a mesh keeps its place; one on the default device
    # stays uncommitted (as initialised), so jitted calls are not retraced.
    sharding = getattr(old, 'sharding', None)
    var.set_value(jax.device_put(host, sharding)
                  if isinstance(sharding, jax.sharding.NamedSharding)
                  else jnp.asarray(host))
  nnx.update(model, state)
  return report


def read_config(folder: str, *, num_labels: int,
                **overrides) -> upernet.SegConfig:
  """The model a folder's ``config.json`` describes, for ``num_labels``.

  An ``UperNetConfig`` gives the whole model (its label count must be
  ``num_labels``); a ``SwinConfig`` (a backbone folder) gives the backbone
  under the default UperNet head (mmsegmentation's: 512 channels, an
  auxiliary FCN head of 256). ``overrides`` replace fields (e.g.
  ``use_auxiliary_head``; ``backbone`` a whole ``SwinConfig``).
  """
  path = os.path.join(folder, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: the folder needs the'
                            ' config.json save_pretrained writes.')
  with open(path) as f:
    hf = json.load(f)
  kind = hf.get('model_type')
  if kind == 'upernet':
    config = upernet.SegConfig.from_hf(hf, where=path)
    if config.num_labels != num_labels:
      raise ValueError(f'{path} has {config.num_labels} labels (num_labels)'
                       f' but the model is asked for {num_labels}.')
  elif kind == 'swin':
    config = upernet.SegConfig(
        num_labels=num_labels,
        backbone=upernet.swin_from_hf(hf, where=path))
  else:
    raise ValueError(f'{path}: model_type={kind!r}; expected an UperNet'
                     " ('upernet') or a Swin backbone ('swin').")
  return dataclasses.replace(config, **overrides)
