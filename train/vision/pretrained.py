"""Pre-trained weights, in the formats people download, onto our ViT.

``load_pretrained(model, path)`` reads

- a Hugging Face folder or ``.safetensors`` file of ``ViTModel`` /
  ``ViTForImageClassification`` (``vit.*`` / ``embeddings.*`` names),
  ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` or a whole
  ``CLIPModel`` (``vision_model.*``, ``visual_projection``; the text tower is
  read apart, by ``load_text_tower``, for the zero-shot head); sharded
  folders (``model-0000x-of-0000y.safetensors``) too;
- an original ViT / big_vision ``.npz`` (``Transformer/encoderblock_0/...``,
  or big_vision's scanned ``Transformer/encoderblock/...`` with a leading
  layer axis),

renames and reshapes each tensor to our layout (``train.vision.vit``), and writes
it into the model. Leaves matching a ``dont_load`` regex keep their fresh
values (a new head); a position embedding of another resolution is resampled
bilinearly (its class-token row kept); any other mismatch raises a
``ValueError`` that names the leaf, the checkpoint tensor and both shapes.

``save_npz(model, path)`` writes the original ViT names, so that our models
round-trip through the format big_vision and ``timm`` read.
"""

import glob
import json
import logging
import os
import re
from typing import Any, Iterable

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from train.vision import clip_text
from train.core import files

# -- Reading files ------------------------------------------------------------


def checkpoint_files(path: str) -> list[str]:
  """The files a checkpoint is read from: ``path``, or a folder's safetensors.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: a folder without ``*.safetensors``, or another kind of file.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'Pre-trained checkpoint {path!r} (config.pretrained.path) does not'
        ' exist.')
  if not os.path.isdir(path):
    if not path.endswith(('.npz', '.safetensors')):
      raise ValueError(f'{path!r}: expected a .npz or .safetensors file.')
    return [path]
  found = sorted(glob.glob(os.path.join(path, '*.safetensors')))
  if not found:
    raise ValueError(
        f'{path!r} holds no *.safetensors file; save the Hugging Face model'
        ' with save_pretrained(..., safe_serialization=True) or pass a'
        ' .npz.')
  return found


def read_checkpoint(path: str) -> dict[str, np.ndarray]:
  """Every tensor of a ``.npz``, ``.safetensors`` or HF folder, by name."""
  tensors = {}
  for f in checkpoint_files(path):
    try:
      tensors.update(_read_file(f))
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(
          f'Cannot read pre-trained file {f!r} (config.pretrained.path); it'
          f' may be truncated or damaged: {type(e).__name__}: {e}') from e
  return tensors


def _read_file(f: str) -> dict[str, np.ndarray]:
  if f.endswith('.npz'):
    with np.load(f) as z:
      return {k: z[k] for k in z.files}
  tensors = {}
  with safe_open(f, framework='flax') as st:
    for k in st.keys():
      t = st.get_tensor(k)
      tensors[k] = np.asarray(t.astype(jnp.float32) if t.dtype in (
          jnp.bfloat16, jnp.float16) else t)
  return tensors


# -- Renaming to our layout ---------------------------------------------------


def _linear(prefix: str, ours: str, out: dict, src: dict) -> None:
  """A PyTorch Linear (out, in) -> our kernel (in, out) and bias."""
  if prefix + '.weight' in src:
    out[ours + '/kernel'] = (src[prefix + '.weight'].T, prefix + '.weight')
  if prefix + '.bias' in src:
    out[ours + '/bias'] = (src[prefix + '.bias'], prefix + '.bias')


def _norm(prefix: str, ours: str, out: dict, src: dict) -> None:
  out[ours + '/scale'] = (src[prefix + '.weight'], prefix + '.weight')
  out[ours + '/bias'] = (src[prefix + '.bias'], prefix + '.bias')


_PREFIXES = ('vit.', 'vision_model.', 'params/')
_OTHER_TOWER = ('text_model.', 'text_projection', 'logit_scale')


def _bare(name: str) -> str:
  for p in _PREFIXES:
    if name.startswith(p):
      return name[len(p):]
  return name


def _strip(src: dict) -> dict:
  """Drops the wrapper prefixes (``vit.``, ``vision_model.``, ``params/``)."""
  return {_bare(k): v for k, v in src.items()}


def from_hf_vit(src: dict) -> dict:
  """``transformers`` ViT names -> ours; values are (array, source name)."""
  src = _strip(src)
  out = {}
  e = 'embeddings.'
  out['cls'] = (src[e + 'cls_token'], e + 'cls_token')
  out['pos_embedding'] = (src[e + 'position_embeddings'],
                          e + 'position_embeddings')
  w = e + 'patch_embeddings.projection.weight'
  out['embedding/kernel'] = (src[w].transpose(2, 3, 1, 0), w)
  out['embedding/bias'] = (src[e + 'patch_embeddings.projection.bias'],
                           e + 'patch_embeddings.projection.bias')
  layers = {int(m.group(1)) for k in src
            if (m := re.match(r'encoder\.layer\.(\d+)\.', k))}
  for i in sorted(layers):
    p, b = f'encoder.layer.{i}.', f'blocks/{i}/'
    for name in ('query', 'key', 'value'):
      _linear(p + f'attention.attention.{name}', b + f'attn/{name}', out, src)
    _linear(p + 'attention.output.dense', b + 'attn/out', out, src)
    _linear(p + 'intermediate.dense', b + 'mlp/fc1', out, src)
    _linear(p + 'output.dense', b + 'mlp/fc2', out, src)
    _norm(p + 'layernorm_before', b + 'norm1', out, src)
    _norm(p + 'layernorm_after', b + 'norm2', out, src)
  _norm('layernorm', 'encoder_norm', out, src)
  _linear('classifier', 'head', out, src)
  return out


def _clip_blocks(src: dict, out: dict) -> None:
  """A CLIP tower's ``encoder.layers.i.*`` -> our ``blocks/i/*``."""
  layers = {int(m.group(1)) for k in src
            if (m := re.match(r'encoder\.layers\.(\d+)\.', k))}
  for i in sorted(layers):
    p, b = f'encoder.layers.{i}.', f'blocks/{i}/'
    for theirs, ours in (('q', 'query'), ('k', 'key'), ('v', 'value'),
                         ('out', 'out')):
      _linear(p + f'self_attn.{theirs}_proj', b + f'attn/{ours}', out, src)
    _linear(p + 'mlp.fc1', b + 'mlp/fc1', out, src)
    _linear(p + 'mlp.fc2', b + 'mlp/fc2', out, src)
    _norm(p + 'layer_norm1', b + 'norm1', out, src)
    _norm(p + 'layer_norm2', b + 'norm2', out, src)


def from_hf_clip(src: dict) -> dict:
  """``transformers`` CLIP vision names -> ours (the text tower ignored)."""
  src = _strip(src)
  out = {}
  e = 'embeddings.'
  cls = src[e + 'class_embedding']
  out['cls'] = (cls.reshape(1, 1, -1), e + 'class_embedding')
  pos = src[e + 'position_embedding.weight']
  out['pos_embedding'] = (pos[None], e + 'position_embedding.weight')
  w = e + 'patch_embedding.weight'
  out['embedding/kernel'] = (src[w].transpose(2, 3, 1, 0), w)
  _norm('pre_layrnorm', 'pre_norm', out, src)  # (sic) transformers' name.
  _clip_blocks(src, out)
  _norm('post_layernorm', 'encoder_norm', out, src)
  _linear('visual_projection', 'projection', out, src)
  return out


# Original ViT / big_vision module names -> ours, within an encoder block.
_NPZ_BLOCK = (
    (r'LayerNorm_0/', 'norm1/'),
    (r'LayerNorm_[12]/', 'norm2/'),
    (r'MultiHeadDotProductAttention_\d/', 'attn/'),
    (r'MlpBlock_\d/Dense_0/', 'mlp/fc1/'),
    (r'MlpBlock_\d/Dense_1/', 'mlp/fc2/'),
)


def from_npz(src: dict) -> dict:
  """Original ViT / big_vision ``.npz`` names -> ours."""
  src = _strip(src)
  # big_vision's scanned encoder: one leaf per kind with a leading layer axis.
  unrolled = {}
  for k, v in src.items():
    m = re.match(r'Transformer/encoderblock/(.*)', k)
    if m:
      for i in range(v.shape[0]):
        unrolled[f'Transformer/encoderblock_{i}/{m.group(1)}'] = (v[i], k)
    else:
      unrolled[k] = (v, k)
  out = {}
  for k, (v, source) in unrolled.items():
    m = re.match(r'Transformer/encoderblock_(\d+)/(.*)', k)
    if m:
      rest = m.group(2)
      for pattern, ours in _NPZ_BLOCK:
        rest = re.sub('^' + pattern, ours, rest)
      if rest.startswith('attn/'):
        name, kind = rest.split('/')[1:]
        if kind == 'kernel':  # (w, heads, head_dim) or (heads, head_dim, w)
          v = (v.reshape(-1, v.shape[-1]) if name == 'out'
               else v.reshape(v.shape[0], -1))
        else:
          v = v.reshape(-1)
      out[f'blocks/{m.group(1)}/{rest}'] = (v, source)
    elif k in ('Transformer/posembed_input/pos_embedding', 'pos_embedding'):
      out['pos_embedding'] = (v, source)
    elif k.startswith('Transformer/encoder_norm/'):
      out['encoder_norm/' + k.split('/')[-1]] = (v, source)
    elif k.startswith(('embedding/', 'head/')) or k == 'cls':
      out[k] = (v, source)
  return out


def to_ours(src: dict) -> dict:
  """Detects the checkpoint's format and renames it to our layout."""
  keys = list(src)
  if any('class_embedding' in k for k in keys):
    return from_hf_clip(src)
  if any('embeddings.cls_token' in k or 'patch_embeddings' in k for k in keys):
    return from_hf_vit(src)
  if any(k.startswith(('Transformer/', 'params/Transformer/')) for k in keys):
    return from_npz(src)
  raise ValueError(
      'Unrecognised checkpoint: expected Hugging Face ViT/CLIP or original'
      f' ViT .npz names; the first names are {sorted(keys)[:5]}.')


# -- Writing into the model ---------------------------------------------------


def resample_posemb(posemb: np.ndarray, num_tokens: int,
                    has_cls: bool) -> np.ndarray:
  """Bilinearly resizes a (1, [1+] g*g, w) grid of position embeddings."""
  old = posemb.shape[1]
  old_grid = int(round(np.sqrt(old)))
  extra = 0 if old_grid * old_grid == old else 1  # A class-token row.
  old_grid = int(round(np.sqrt(old - extra)))
  if old_grid * old_grid != old - extra:
    raise ValueError(f'pos_embedding with {old} tokens is not a square grid'
                     ' (plus a class token).')
  cls_row, grid = posemb[:, :extra], posemb[:, extra:]
  new_grid = int(round(np.sqrt(num_tokens - int(has_cls))))
  grid = grid.reshape(1, old_grid, old_grid, -1)
  grid = np.asarray(jax.image.resize(
      grid, (1, new_grid, new_grid, grid.shape[-1]), 'bilinear'))
  grid = grid.reshape(1, new_grid * new_grid, -1)
  if has_cls:
    if not extra:
      cls_row = np.zeros_like(grid[:, :1])
    return np.concatenate([cls_row, grid], axis=1)
  return grid


def _flat_params(model) -> dict[str, Any]:
  """Our Param leaves (not LoRA factors) by ``'a/b/c'`` path."""
  state = nnx.state(model, nnx.Param)
  return {
      '/'.join(str(k) for k in path): v
      for path, v in nnx.to_flat_state(state)
      if not isinstance(v, nnx.LoRAParam)
  }


def load_pretrained(model, path: str, *, dont_load: Iterable[str] = (),
                    resample_posemb_: bool = True) -> dict[str, Any]:
  """Loads a pre-trained checkpoint into ``model`` in place.

  Args:
    model: a ``train.vision.vit.VisionTransformer``.
    path: HF folder, ``.safetensors`` or ``.npz``.
    dont_load: regexes (``re.search``) of our leaf paths to leave as they are,
      e.g. ``('head',)`` for a new classifier.
    resample_posemb_: resample position embeddings of another resolution.

  Returns:
    A report: ``{'loaded': n, 'kept': [...], 'unused': [...]}`` where ``kept``
    are our leaves left fresh and ``unused`` the checkpoint's tensors not used.

  Raises:
    ValueError: naming the leaf, the checkpoint tensor and both shapes when a
      leaf is missing from the checkpoint or its shape does not fit.
  """
  src = read_checkpoint(path)
  theirs = to_ours(src)
  params = _flat_params(model)
  patterns = [re.compile(p) for p in dont_load]
  kept, used, new = [], set(), {}
  for name, var in params.items():
    if any(p.search(name) for p in patterns):
      kept.append(name)
      continue
    if name not in theirs:
      raise ValueError(
          f'{path}: our leaf {name!r} (shape {tuple(var.shape)}) has no'
          ' tensor in the checkpoint; add it to config.pretrained.dont_load'
          ' to keep it fresh, or check config.model.name.')
    value, source = theirs[name]
    used.add(name)
    if name == 'pos_embedding' and value.shape != var.shape and (
        resample_posemb_):
      logging.info('Resampling %s from %s to %s', source, value.shape,
                   var.shape)
      value = resample_posemb(value, var.shape[1], model.cls is not None)
    if tuple(value.shape) != tuple(var.shape):
      raise ValueError(
          f'{path}: checkpoint tensor {source!r} has shape'
          f' {tuple(value.shape)} but our leaf {name!r} has shape'
          f' {tuple(var.shape)}; check config.model.name, or list the leaf'
          ' in config.pretrained.dont_load.')
    if not np.all(np.isfinite(value)):
      raise ValueError(
          f'{path}: checkpoint tensor {source!r} (our leaf {name!r}) holds'
          ' NaN or inf values; refusing to load it.')
    new[name] = value
  state = nnx.state(model, nnx.Param)
  flat = dict(nnx.to_flat_state(state))
  for path, var in flat.items():
    name = '/'.join(str(k) for k in path)
    if name in new:
      var.set_value(jnp.asarray(new[name], dtype=var.dtype))
  nnx.update(model, state)
  sources = {s for _, s in theirs.values()}
  unused = sorted(source for name, (_, source) in theirs.items()
                  if name not in used and name not in kept)
  unused += sorted(k for k in src if _bare(k) not in sources
                   and not k.startswith(_OTHER_TOWER))
  return {'loaded': len(new), 'kept': kept, 'unused': unused}


def save_npz(model, path: str) -> None:
  """Writes ``model``'s params with the original ViT ``.npz`` names."""
  flat = {k: np.asarray(v[...]) for k, v in _flat_params(model).items()}
  heads = None
  out = {}
  for k, v in flat.items():
    m = re.match(r'blocks/(\d+)/(.*)', k)
    if m:
      i, rest = m.groups()
      base = f'Transformer/encoderblock_{i}/'
      if rest.startswith('attn/'):
        _, name, kind = rest.split('/')
        heads = heads or model.blocks[0].attn.num_heads
        if kind == 'kernel':
          v = (v.reshape(heads, -1, v.shape[-1]) if name == 'out'
               else v.reshape(v.shape[0], heads, -1))
        elif name != 'out':
          v = v.reshape(heads, -1)
        out[base + f'MultiHeadDotProductAttention_1/{name}/{kind}'] = v
        continue
      rest = (rest.replace('norm1/', 'LayerNorm_0/')
              .replace('norm2/', 'LayerNorm_2/')
              .replace('mlp/fc1/', 'MlpBlock_3/Dense_0/')
              .replace('mlp/fc2/', 'MlpBlock_3/Dense_1/'))
      out[base + rest] = v
    elif k == 'pos_embedding':
      out['Transformer/posembed_input/pos_embedding'] = v
    elif k.startswith('encoder_norm/'):
      out['Transformer/' + k] = v
    elif k.startswith(('projection/', 'pre_norm/')):
      raise ValueError('save_npz writes the ViT format; a CLIP model has a'
                       f' {k!r} it cannot hold.')
    else:
      out[k] = v
  with files.atomic_write(path, 'wb') as f:
    np.savez(f, **out)


# -- CLIP's text tower (for the zero-shot head) -------------------------------


def from_hf_clip_text(src: dict) -> dict:
  """``transformers`` CLIP text names -> ``train.vision.clip_text``'s."""
  src = {k.removeprefix('text_model.'): v for k, v in src.items()
         if k.startswith(('text_model.', 'text_projection'))}
  out = {}
  e = 'embeddings.'
  out['token_embedding/embedding'] = (src[e + 'token_embedding.weight'],
                                      e + 'token_embedding.weight')
  out['pos_embedding'] = (src[e + 'position_embedding.weight'],
                          e + 'position_embedding.weight')
  _clip_blocks(src, out)
  _norm('final_layer_norm', 'final_norm', out, src)
  _linear('text_projection', 'projection', out, src)
  return out


def _text_config(path: str, width: int) -> dict:
  """Heads, activation and epsilon from the folder's ``config.json``.

  Shapes do not give the number of heads; without a ``config.json`` OpenAI's
  convention (64-wide heads, quick GELU, epsilon 1e-5) is assumed.
  """
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  file = os.path.join(folder, 'config.json')
  text = {}
  if os.path.isfile(file):
    with open(file) as f:
      text = json.load(f).get('text_config') or {}
  return dict(num_heads=text.get('num_attention_heads', width // 64),
              activation=text.get('hidden_act', 'quick_gelu'),
              layer_norm_eps=text.get('layer_norm_eps', 1e-5))


def load_text_tower(path: str, *, eot_token_id: int,
                    dtype=None) -> tuple[Any, float]:
  """CLIP's text tower and logit scale from a whole ``CLIPModel`` checkpoint.

  Args:
    path: the Hugging Face folder or ``.safetensors`` that
      ``config.pretrained.path`` names.
    eot_token_id: the tokenizer's end-of-text token (where features pool).
    dtype: computation dtype.

  Returns:
    ``(tower, logit_scale)``: a ``train.vision.clip_text.TextTransformer`` with the
    checkpoint's weights, and ``exp`` of its learned logit scale (100 for
    OpenAI's CLIP).

  Raises:
    ValueError: naming the file when it holds no text tower, text projection
      or logit scale (an image-only checkpoint), or a tensor is missing.
  """
  src = read_checkpoint(path)
  needed = ('text_model.embeddings.token_embedding.weight',
            'text_projection.weight', 'logit_scale')
  missing = [k for k in needed if k not in src]
  if missing:
    raise ValueError(
        f'{path} (config.pretrained.path) has no text tower: {missing} are'
        " missing. config.model.head_init='zeroshot' needs a whole CLIPModel"
        ' checkpoint (e.g. openai/clip-vit-base-patch16), not an image-only'
        ' CLIPVisionModel one.')
  theirs = from_hf_clip_text(src)
  vocab_size, width = theirs['token_embedding/embedding'][0].shape
  mlp_dim = theirs['blocks/0/mlp/fc1/kernel'][0].shape[1]
  # Built abstractly (no random init), then every leaf set from the file.
  tower = nnx.eval_shape(lambda: clip_text.TextTransformer(
      vocab_size=vocab_size,
      context_length=theirs['pos_embedding'][0].shape[0],
      width=width,
      depth=sum(1 for k in theirs if k.endswith('/norm1/scale')),
      mlp_dim=mlp_dim,
      projection_dim=theirs['projection/kernel'][0].shape[1],
      eot_token_id=eot_token_id, dtype=dtype, rngs=nnx.Rngs(0),
      **_text_config(path, width)))
  state = nnx.state(tower)
  for leaf_path, var in nnx.to_flat_state(state):
    name = '/'.join(str(k) for k in leaf_path)
    if name not in theirs:
      raise ValueError(f'{path}: the text tower leaf {name!r} has no tensor'
                       ' in the checkpoint.')
    value, source = theirs[name]
    if tuple(value.shape) != tuple(var.shape):
      raise ValueError(f'{path}: checkpoint tensor {source!r} has shape'
                       f' {tuple(value.shape)} but the text tower leaf'
                       f' {name!r} has shape {tuple(var.shape)}.')
    var.set_value(jnp.asarray(value, dtype=var.dtype))
  nnx.update(tower, state)
  return tower, float(np.exp(np.asarray(src['logit_scale'], np.float64)))
