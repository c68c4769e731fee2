"""A Hugging Face folder's safetensors, read into a Tunix model, checked.

Tunix maps each tensor name to a model leaf (its ``tensor_map``); its own
loader then skips the tensors it cannot map with a warning, leaves a leaf
that no tensor fills at its random initialisation, and assumes one dtype per
file. Here the same maps are used and everything is checked before a single
tensor is read:

- every tensor of every file is used, except buffers derived from the config
  (``rotary_emb``) and, for a multimodal Gemma 3, the vision tower: an unused
  one is named with its file;
- every leaf of the model is set by exactly one tensor: a leaf left over is
  named;
- a tensor whose shape does not fit is named with its file, its shape, the
  leaf and the leaf's shape;
- an ``lm_head`` in a folder whose config ties it to the embedding must equal
  the embedding;

then each tensor is read one at a time, refused naming its file when it holds
a NaN or an inf, cast to the model's dtype and placed straight onto its
shards (each device gets only its slice; every process reads the file).
"""

import dataclasses
import glob
import os
import re
from typing import Any, Callable, Optional

import jax
import numpy as np
import safetensors

# Tensors read by no one on purpose: buffers recomputed from config.json.
DERIVED = re.compile(r'(^|\.)rotary_emb\.')
# A multimodal Gemma 3 folder: we fine-tune its text decoder only.
VISION = re.compile(r'^(model\.)?(vision_tower|multi_modal_projector)\.')
EMBEDDING = 'embedder.input_embedding'  # Tunix's leaf, in every family.
_FUSED = re.compile(r'tmp\.layers\.([0-9]+)\.attn\.([qkv])$')


@dataclasses.dataclass
class Source:
  """Where a leaf's value comes from: tensors of one file, and how."""
  file: str
  names: tuple[str, ...]
  shape: tuple[int, ...]
  read: Callable[[], np.ndarray]

  def describe(self) -> str:
    return f'{", ".join(repr(n) for n in self.names)} of {self.file}'


def _files(folder: str) -> list[str]:
  files = sorted(glob.glob(os.path.join(folder, '*.safetensors')))
  if not files:
    raise FileNotFoundError(f'No *.safetensors file in {folder}.')
  return files


def _reader(path: str, name: str, permute, reshape) -> Callable[[], np.ndarray]:
  def read():
    with safetensors.safe_open(path, framework='numpy') as f:
      x = f.get_tensor(name)
    if not np.all(np.isfinite(x)):
      bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
      raise ValueError(f'Tensor {name!r} of {path} holds {bad} NaN or inf'
                       ' values; refusing to load it.')
    x = x.transpose(permute) if permute else x
    return x.reshape(reshape) if reshape else x
  return read


def _transformed_shape(shape, permute, reshape, name, path):
  moved = tuple(shape[i] for i in permute) if permute else tuple(shape)
  if reshape and np.prod(moved) != np.prod(reshape):
    raise ValueError(
        f'Tensor {name!r} of {path} has shape {tuple(shape)}'
        f' ({np.prod(shape)} values) but the model wants it as'
        f' {tuple(reshape)}: its config.json does not describe this tensor.')
  return tuple(reshape) if reshape else moved


def collect(folder: str, tensor_map: dict, *,
            ignore_vision: bool) -> tuple[dict, dict, list]:
  """``(sources by leaf key, raw sources by HF name, ignored names)``.

  Raises:
    ValueError: naming every tensor no leaf takes (with its file), or two
      tensors for one leaf.
  """
  from tunix.utils import torch_utils  # pylint: disable=g-import-not-at-top
  sources, raw, ignored, unused = {}, {}, [], []
  for path in _files(folder):
    with safetensors.safe_open(path, framework='numpy') as f:
      shapes = {n: f.get_slice(n).get_shape() for n in f.keys()}
    for name, shape in shapes.items():
      raw[name] = Source(path, (name,), tuple(shape),
                         _reader(path, name, None, None))
      if DERIVED.search(name) or (ignore_vision and VISION.search(name)):
        ignored.append(name)
        continue
      try:
        key, transform = torch_utils.torch_key_to_jax_key(tensor_map, name)
      except ValueError:
        unused.append(f'{name!r} of {path}')
        continue
      permute, reshape = transform or (None, None)
      if key in sources:
        raise ValueError(f'Two tensors fill the leaf {key!r}:'
                         f' {sources[key].describe()} and {name!r} of {path}.')
      sources[key] = Source(
          path, (name,), _transformed_shape(shape, permute, reshape, name, path),
          _reader(path, name, permute, reshape))
  if unused:
    raise ValueError(
        f'{len(unused)} tensor(s) of {folder} map to no leaf of the model'
        f' (Tunix would skip them silently): {"; ".join(unused[:10])}'
        f'{" ..." if len(unused) > 10 else ""}.')
  return sources, raw, ignored


def fuse_qkv(sources: dict, *, fused_qkv: bool) -> dict:
  """Gemma 3: Tunix's per-layer ``q_einsum``/``kv_einsum`` (or ``qkv_einsum``)
  from the q, k, v projections, each [D, N, H] -> [N, D, H]."""
  out, parts = {}, {}
  for key, src in sources.items():
    m = _FUSED.fullmatch(key)
    if m:
      parts.setdefault(m.group(1), {})[m.group(2)] = src
    else:
      out[key] = src
  for layer, got in parts.items():
    missing = [p for p in 'qkv' if p not in got]
    if missing:
      raise ValueError(f'Layer {layer} has no {"/".join(missing)} projection'
                       f' tensor (it has {got[next(iter(got))].describe()}).')
    groups = {'qkv_einsum': 'qkv'} if fused_qkv else {'q_einsum': 'q',
                                                      'kv_einsum': 'kv'}
    for leaf, letters in groups.items():
      out[f'layers.{layer}.attn.{leaf}.w'] = _stacked(
          [got[p] for p in letters], stack=len(letters) > 1)
  return out


def _stacked(srcs: list[Source], *, stack: bool) -> Source:
  def read():
    xs = [np.swapaxes(s.read(), 0, 1) for s in srcs]
    return np.stack(xs) if stack else xs[0]
  d, n, h = srcs[0].shape
  shape = ((len(srcs), n, d, h) if stack else (n, d, h))
  if stack and len({s.shape for s in srcs}) > 1:
    raise ValueError('Projections to fuse differ in shape: ' + '; '.join(
        f'{s.describe()} {s.shape}' for s in srcs))
  return Source(srcs[0].file, sum((s.names for s in srcs), ()), shape, read)


def tied_head(sources: dict, raw: dict,
              head_keys: tuple[str, ...]) -> Optional[Callable[[], None]]:
  """Removes a tied model's ``lm_head`` source; returns its equality check
  against the embedding (None when the folder has no ``lm_head``)."""
  for key in head_keys:
    if key in sources:
      head = sources.pop(key)
      embedding = sources[EMBEDDING].names[0]
      return _equal(raw[head.names[0]], raw[embedding])
  return None


def _equal(head: Source, embedding: Source) -> Callable[[], None]:
  def check():
    if head.shape != embedding.shape or not np.array_equal(
        head.read(), embedding.read()):
      raise ValueError(
          f'config.json ties the output layer to the embedding'
          f' (tie_word_embeddings), but {head.describe()} differs from'
          f' {embedding.describe()}; Tunix would ignore it.')
  return check


def check_structure(sources: dict, leaves: dict[str, Any]) -> None:
  """Every leaf filled, by a tensor of its shape; no tensor without a leaf."""
  problems = []
  for key, src in sources.items():
    if key not in leaves:
      problems.append(f'{src.describe()} maps to {key!r}, which the model'
                      ' (built from config.json) does not have')
    elif tuple(leaves[key].shape) != src.shape:
      problems.append(f'{src.describe()} has shape {src.shape} (as the model'
                      f' lays it out) but the leaf {key!r} has shape'
                      f' {tuple(leaves[key].shape)}')
  missing = sorted(set(leaves) - set(sources))
  if missing:
    problems.append(f'{len(missing)} leaf/leaves of the model are in no'
                    f' tensor of the folder: {", ".join(missing[:10])}'
                    f'{" ..." if len(missing) > 10 else ""}')
  if problems:
    raise ValueError('The weights do not fit the model:\n  '
                     + '\n  '.join(problems))


def place(src: Source, dtype, sharding) -> jax.Array:
  """Reads ``src`` (refusing non-finite values), casts, and shards it."""
  host = src.read().astype(dtype)
  return jax.make_array_from_callback(host.shape, sharding,
                                      lambda index: host[index])
