"""Vision-language models for VQA: load, adapt, run, decode.

``load(folder, mesh=...)`` builds, from a Hugging Face folder, PaliGemma
(``train.vqa.paligemma``: Tunix's SigLIP + projector + Tunix's Gemma 1/2
decoder) or Gemma 3 multimodal (``train.vqa.gemma3``: Tunix's ``Gemma3``
with its SigLIP) with every leaf from the folder's safetensors, under the
checks of ``train.language.hf_weights`` (every tensor used, every leaf set,
shapes and non-finite values named by file and tensor). ``build_inputs``
lays questions out as PaliGemma's processor does (Gemma 3: as its own)::

    <image> x N  <bos>  prompt  \\n  |  answer  <eos>  <pad> ...
    '------------ prefix -----------'   '-- suffix --'

(full attention over the prefix, causal over the suffix, the loss on the
suffix), ``preprocess`` resizes and normalises images as its image
processor does, ``logits`` runs the model and ``generate`` decodes greedily
with a key/value cache. ``add_lora`` puts qwix LoRA adapters on the
decoder's projections (and optionally on SigLIP's attention).
"""

import dataclasses
import functools
import json
import logging
import os
import re
from typing import Any, Optional

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import qwix
import transformers
from tunix.models.gemma3 import utils as gemma3_utils

from train.language import families
from train.language import hf_weights
from train.language import models as lm
from train.vqa import gemma3
from train.vqa import paligemma

PROMPT_TEMPLATE = 'answer en {question}'  # PaliGemma's VQA transfers.
# SigLIP's attention projections, by the decoder's Hugging Face names.
_VISION_PROJECTIONS = {'q_proj': 'query_proj', 'k_proj': 'key_proj',
                       'v_proj': 'value_proj', 'o_proj': 'out_proj'}
_VISION_PATH = r'vision_encoder/siglip_encoder/transformer/blocks/\d+/attn/'


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A loaded vision-language model and what it is."""
  model: nnx.Module  # paligemma.PaliGemma, or Tunix's Gemma3.
  kind: str  # 'paligemma' | 'gemma3'
  config: Any  # Tunix's decoder ModelConfig.
  image_size: int  # Pixels of a side (224 for paligemma-3b-pt-224).
  num_image_tokens: int  # Per image: 256 for PaliGemma-224 and Gemma 3.
  image_token_id: int
  report: dict  # What was read, for the log.
  # Gemma 3 frames its image tokens: (start_of_image id, end_of_image id).
  image_frame: Optional[tuple[int, int]] = None


# -- Loading ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Plan:
  """How to build one kind from its config.json (``plan``)."""
  kind: str
  config: Any  # Tunix's decoder ModelConfig.
  vision: Any  # Tunix's SigLIPConfig.
  make: Any  # () -> the model (random, for its structure).
  tensor_map: dict
  fused_qkv: bool
  rename: Any  # A fused q/k/v leaf key -> the model's leaf key.
  embedding: str  # The token embedding's leaf key.
  image_token_id: int
  image_frame: Optional[tuple[int, int]]


def _read(folder: str) -> tuple[dict, str]:
  where = os.path.join(folder, 'config.json')
  if not os.path.isfile(where):
    raise FileNotFoundError(
        f'{where} does not exist: the model path must be a Hugging Face'
        ' folder (config.json, *.safetensors, tokenizer files).')
  with open(where) as f:
    hf = json.load(f)
  if hf.get('model_type') not in ('paligemma', 'gemma3'):
    raise ValueError(f'{where}: model_type {hf.get("model_type")!r} is not'
                     ' a vision-language model we support; known: gemma3,'
                     ' paligemma.')
  for key in ('text_config', 'vision_config'):
    if not isinstance(hf.get(key), dict):
      raise ValueError(f'{where}: key {key!r} is missing.')
  if not hf.get('tie_word_embeddings', True) or not hf['text_config'].get(
      'tie_word_embeddings', True):
    raise ValueError(f'{where}: tie_word_embeddings=False: Tunix\'s Gemma'
                     ' decodes with the embedding; refusing.')
  # Keys a published config.json leaves out (paligemma-3b-pt-224's: its
  # SigLIP's image_size, its Gemma's head_dim...) take transformers' defaults.
  return transformers.AutoConfig.from_pretrained(folder).to_dict(), where


def _paligemma_plan(hf: dict, where: str, dtype, remat: str) -> Plan:
  text = dict(hf['text_config'])
  text.setdefault('vocab_size', hf.get('vocab_size'))
  sharding = families.with_batch_axes(
      paligemma.gemma_lib.ShardingConfig.get_default_sharding())
  tcfg = paligemma.text_config(text, where, sharding)
  image_token_id = hf.get('image_token_index', hf.get('image_token_id'))
  if image_token_id is None:
    raise ValueError(f'{where}: key \'image_token_index\' is missing.')
  vcfg = paligemma.vision_config(hf['vision_config'], where,
                                 image_token_id=image_token_id)
  projection = hf.get('projection_dim', tcfg.embed_dim)
  if projection != tcfg.embed_dim:
    raise ValueError(f'{where}: projection_dim={projection} differs from'
                     f' text_config.hidden_size={tcfg.embed_dim}.')
  make = lambda: paligemma.PaliGemma(
      tcfg, vcfg, image_token_id=image_token_id, rngs=nnx.Rngs(0),
      dtype=dtype, remat=remat != 'NONE')
  return Plan('paligemma', tcfg, vcfg, make, paligemma.tensor_map(tcfg, vcfg),
               tcfg.num_heads == tcfg.num_kv_heads, paligemma.decoder_leaf,
               'decoder.' + hf_weights.EMBEDDING, int(image_token_id), None)


def _gemma3_plan(hf: dict, where: str, dtype, remat: str) -> Plan:
  if remat != 'NONE':
    raise ValueError(f'{where}: remat={remat!r} with Gemma 3: Tunix\'s'
                     ' nnx.remat mutates qwix LoRA modules across trace'
                     ' levels (TraceContextError); use remat off.')
  cfg = gemma3.model_config(hf, where, dtype, remat)
  frame = tuple(hf.get(k) for k in ('boi_token_index', 'eoi_token_index'))
  return Plan('gemma3', cfg, cfg.vision_config,
               lambda: gemma3.model(cfg, nnx.Rngs(0)), gemma3.weights_map(cfg),
               cfg.num_heads == cfg.num_kv_heads, lambda k: k,
               hf_weights.EMBEDDING,
               int(cfg.vision_config.soft_token_placeholder),
               None if None in frame else frame)


def _sources(folder: str, built: Plan) -> tuple[dict, list]:
  sources, raw, ignored = hf_weights.collect(folder, built.tensor_map,
                                             ignore_vision=False)
  sources = hf_weights.fuse_qkv(sources, fused_qkv=built.fused_qkv)
  sources = {built.rename(k): v for k, v in sources.items()}
  head = sources.pop('unused.lm_head.weight', None)
  if head is not None:  # Tied (config.json says so): it must equal.
    embedding = sources[built.embedding]
    hf_weights._equal(raw[head.names[0]], raw[embedding.names[0]])()  # pylint: disable=protected-access
  return sources, ignored


def plan(folder: str, *, dtype: str = 'float32',
         remat: bool | str = False) -> Plan:
  """What ``load`` builds from ``folder/config.json`` (no weights read):
  ``nnx.eval_shape(plan(folder).make)`` is the model's structure."""
  remat = {True: 'BLOCK', False: 'NONE'}.get(remat, remat)
  hf, where = _read(folder)
  return {'paligemma': _paligemma_plan, 'gemma3': _gemma3_plan}[
      hf['model_type']](hf, where, families.DTYPES[dtype], remat)


def load(folder: str, *, mesh: jax.sharding.Mesh, dtype: str = 'float32',
         remat: bool | str = False) -> Loaded:
  """The folder's model, every leaf from its safetensors, on ``mesh``.

  Args:
    folder: a ``PaliGemmaForConditionalGeneration`` or
      ``Gemma3ForConditionalGeneration`` folder (``config.json``,
      ``*.safetensors``).
    mesh: with axes 'data', 'fsdp' and 'tp'.
    dtype: of the weights and the computation ('float32' for checks).
    remat: Tunix's decoder ``RematConfig`` name ('NONE', 'BLOCK',
      'DECODER'), or a bool (True: 'BLOCK').

  Raises:
    ValueError: a config.json key Tunix cannot compute as ``transformers``
      does, or weights that do not fit, by name (file, tensor, leaf).
  """
  built = plan(folder, dtype=dtype, remat=remat)
  with jax.set_mesh(mesh):
    abstract = nnx.eval_shape(built.make)
  graphdef, state = nnx.split(abstract)
  like = state.to_pure_dict()
  leaves = lm._flat(like)  # pylint: disable=protected-access
  shardings = lm._flat(nnx.get_named_sharding(state, mesh).to_pure_dict())  # pylint: disable=protected-access
  sources, ignored = _sources(folder, built)
  hf_weights.check_structure(sources, leaves)
  np_dtype = np.dtype(families.DTYPES[dtype])
  values = {k: hf_weights.place(sources[k], np_dtype, shardings[k])
            for k in leaves}
  model = nnx.merge(graphdef, lm._unflat(values, like))  # pylint: disable=protected-access
  if ignored:
    logging.info('Left unread on purpose (%d): %s', len(ignored),
                 ', '.join(ignored[:5]))
  return Loaded(model, built.kind, built.config, built.vision.image_height,
                built.vision.num_mm_tokens_per_image, built.image_token_id,
                {'kind': built.kind, 'tensors': len(sources),
                 'ignored': len(ignored), 'dtype': dtype},
                built.image_frame)


# -- LoRA ---------------------------------------------------------------------

def lora_paths(loaded: Loaded, targets: tuple[str, ...], *,
               vision: bool) -> list[str]:
  """qwix module-path regexes of the projections ``targets`` names."""
  prefix = 'decoder/' if loaded.kind == 'paligemma' else ''
  decoder = [prefix + r'layers/\d+/' + re.escape(p)
             for p in lm.lora_paths(_as_language(loaded), targets)]
  if not vision:
    return decoder
  names = sorted({_VISION_PROJECTIONS[t] for t in targets
                  if t in _VISION_PROJECTIONS})
  if not names:
    raise ValueError(f'config.model.lora.targets={targets!r}: vision LoRA'
                     f' adapts SigLIP\'s attention; name one of'
                     f' {sorted(_VISION_PROJECTIONS)}.')
  return decoder + [_VISION_PATH + n for n in names]


def _as_language(loaded: Loaded) -> lm.Loaded:
  """The decoder as ``train.language`` sees it: Gemma's projection names."""
  family = dataclasses.replace(families.GEMMA3, name=loaded.kind)
  return lm.Loaded(loaded.model, family, loaded.config, {})


def _model_input(loaded: Loaded) -> dict:
  if loaded.kind == 'gemma3':
    return gemma3.model_input(loaded.config)
  return loaded.model.get_model_input()


def _lora_graph(loaded: Loaded, spec: lm.LoraSpec, paths: list[str],
                seed: int):
  provider = qwix.LoraProvider(
      module_path='|'.join(f'(?:{p})' for p in paths),
      rank=spec.rank, alpha=spec.alpha, dropout=spec.dropout,
      lora_a_initializer=lm._LORA_A_INIT, lora_b_initializer=lm._LORA_B_INIT)  # pylint: disable=protected-access
  remat = getattr(loaded.model, 'remat', False)
  if remat:  # qwix creates the adapters in its trace: no checkpointed copy.
    loaded.model.remat = False
  try:
    abstract = nnx.eval_shape(lambda: qwix.apply_lora_to_model(
        loaded.model, provider, rngs=nnx.Rngs(seed),
        **_model_input(loaded)))
  finally:
    if remat:
      loaded.model.remat = True
  if remat:
    abstract.remat = True
  return nnx.split(abstract, nnx.LoRAParam, ...)


def add_lora(loaded: Loaded, spec: lm.LoraSpec, *, mesh, seed: int,
             vision: bool = False) -> lm.Adapted:
  """qwix LoRA on the decoder's ``spec.targets`` (and SigLIP's attention).

  A is drawn as PEFT does, B is zero, both float32. With ``vision=True``
  the SigLIP attention projections among the targets are adapted too, and
  Tunix's ``apply_stop_gradient`` (on by default, which would give those
  adapters no gradient) is switched off on ``loaded.model``.
  """
  paths = lora_paths(loaded, spec.targets, vision=vision)
  loaded.model.vision_encoder.apply_stop_gradient = not vision
  with jax.set_mesh(mesh):
    graphdef, lora_abstract, rest = _lora_graph(loaded, spec, paths, seed)
    eval_graphdef, _, _ = _lora_graph(
        loaded, dataclasses.replace(spec, dropout=0.0), paths, seed)
  adapted = ['/'.join(map(str, p[:-1])) for p, _ in
             nnx.to_flat_state(lora_abstract)]
  for path in paths:
    if not any(re.fullmatch(path, a) for a in adapted):
      raise ValueError(f'LoRA found no module matching {path!r} in'
                       f' {loaded.kind} (qwix matched nothing).')
  base = nnx.state(loaded.model)
  if ({p for p, _ in nnx.to_flat_state(rest)}
      != {p for p, _ in nnx.to_flat_state(base)}):
    raise ValueError('qwix changed the base model\'s variables; expected'
                     ' only nnx.LoRAParam leaves to be added.')
  return lm.Adapted(graphdef, eval_graphdef,
                    lm._init_lora(lora_abstract, mesh, seed), base)  # pylint: disable=protected-access


# -- Inputs -------------------------------------------------------------------

_RESAMPLE = {'paligemma': Image.Resampling.BICUBIC,  # SigLIP's processor.
             'gemma3': Image.Resampling.BILINEAR}  # Gemma 3's.


def preprocess(images_uint8: np.ndarray, image_size: int,
               kind: str = 'paligemma') -> np.ndarray:
  """The kind's image processor: ``[B, H, W, 3]`` uint8 -> ``[B, S, S, 3]``.

  Each image is resized to ``S x S`` with PIL (PaliGemma: bicubic; Gemma 3,
  without pan-and-scan: bilinear), rescaled by 1/255 and normalised with
  mean 0.5 and std 0.5: :math:`x = (p / 255 - 0.5) / 0.5`, in [-1, 1].
  """
  images = np.asarray(images_uint8)
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(f'Images must be uint8 [B, H, W, 3]; got {images.dtype}'
                     f' {images.shape}.')
  out = np.empty((len(images), image_size, image_size, 3), np.float32)
  for i, image in enumerate(images):
    resized = Image.fromarray(image).resize((image_size, image_size),
                                            _RESAMPLE[kind])
    out[i] = np.asarray(resized, np.float32)
  return ((out * np.float32(1 / 255) - np.float32(0.5))
          / np.float32(0.5)).astype(np.float32)


def _special(tokenizer, name: str) -> int:
  value = getattr(tokenizer, f'{name}_token_id', None)
  if value is None:
    raise ValueError(f'The tokenizer {type(tokenizer).__name__} has no'
                     f' {name} token; the prompt format needs one.')
  return int(value)


def build_inputs(tokenizer, questions: list[str],
                 answers: Optional[list[str]] = None, *, loaded: Loaded,
                 max_len: int,
                 prompt_template: str = PROMPT_TEMPLATE
                 ) -> dict[str, np.ndarray]:
  """Rows as the kind's processor lays them out, right-padded.

  PaliGemma (its processor): ``num_image_tokens`` image tokens, BOS, the
  tokens of ``prompt + '\\n'`` (the prefix; ``prompt`` is
  ``prompt_template.format(question=questions[i])``), then, with answers,
  the tokens of ``answers[i]`` and EOS (the suffix). Gemma 3 (its
  processor's image sequence, then the same prompt and answer): BOS,
  ``'\\n\\n'``, start-of-image, the image tokens, end-of-image,
  ``'\\n\\n'``, ``prompt + '\\n'`` | answer, EOS.

  Returns:
    'tokens' int32 [B, max_len]; 'input_mask' (not padding), 'prefix_mask'
    (image and prompt) and 'loss_mask' (answer and EOS), bool [B, max_len].

  Raises:
    ValueError: a row longer than ``max_len`` (naming the row), or a
      tokenizer without BOS/EOS.
  """
  bos, eos = _special(tokenizer, 'bos'), _special(tokenizer, 'eos')
  pad = getattr(tokenizer, 'pad_token_id', None)
  pad = eos if pad is None else int(pad)
  if answers is not None and len(answers) != len(questions):
    raise ValueError(f'{len(questions)} questions but {len(answers)}'
                     ' answers.')
  encode = lambda s: list(tokenizer.encode(s, add_special_tokens=False))
  shape = (len(questions), max_len)
  out = {'tokens': np.full(shape, pad, np.int32),
         'input_mask': np.zeros(shape, bool),
         'prefix_mask': np.zeros(shape, bool),
         'loss_mask': np.zeros(shape, bool)}
  for i, question in enumerate(questions):
    prompt = encode(prompt_template.format(question=question) + '\n')
    image = [loaded.image_token_id] * loaded.num_image_tokens
    if loaded.image_frame is None:
      prefix = image + [bos] + prompt
    else:
      start, end = loaded.image_frame
      prefix = ([bos] + encode('\n\n') + [start] + image + [end]
                + encode('\n\n') + prompt)
    suffix = [] if answers is None else encode(answers[i]) + [eos]
    n = len(prefix) + len(suffix)
    if n > max_len:
      raise ValueError(f'Row {i} (question {question!r}) takes {n} tokens'
                       f' ({loaded.num_image_tokens} for the image);'
                       f' max_len is {max_len}.')
    out['tokens'][i, :n] = prefix + suffix
    out['input_mask'][i, :n] = True
    out['prefix_mask'][i, :len(prefix)] = True
    out['loss_mask'][i, len(prefix):n] = True
  return out


# -- Running it ---------------------------------------------------------------

def _is_gemma3(model) -> bool:
  return isinstance(model, gemma3.gemma3_lib.Gemma3)


def _decoder(model):
  """The module holding the embedder, layers and config."""
  return model if _is_gemma3(model) else model.decoder


def attention_mask(input_mask: jax.Array, prefix_mask: jax.Array,
                   length: Optional[int] = None) -> jax.Array:
  """PaliGemma's mask, bool [B, T, length]: causal, full within the
  prefix, no padding key (keys past T: none, until generation fills them)."""
  t = input_mask.shape[-1]
  length = t if length is None else length
  q, k = jnp.arange(t)[:, None], jnp.arange(length)[None, :]
  pad = lambda m: jnp.pad(m, ((0, 0), (0, length - t)))
  within = prefix_mask[:, :, None] & pad(prefix_mask)[:, None, :]
  return pad(input_mask)[:, None, :] & ((k <= q)[None] | within)


def _mask(model, tokens, input_mask, prefix_mask, length=None):
  """The kind's mask: Gemma 3's is causal, and full within each image's
  tokens (Tunix's own mask function)."""
  if not _is_gemma3(model):
    return attention_mask(input_mask, prefix_mask, length)
  mask = gemma3_utils.make_causal_bidirectional_attention_mask(
      input_mask, bidirectional_mask=tokens == _image_token(model))
  t = tokens.shape[-1]
  return jnp.pad(mask, ((0, 0), (0, 0), (0, (length or t) - t)))


def _image_token(model) -> int:
  if _is_gemma3(model):
    return model.config.vision_config.soft_token_placeholder
  return model.image_token_id


def _first_position(model) -> int:
  """PaliGemma counts positions from 1 (as transformers' does), Gemma 3
  from 0."""
  return 0 if _is_gemma3(model) else 1


def positions_of(input_mask: jax.Array, first: int = 1) -> jax.Array:
  """Positions that skip padding, the first real token's ``first``."""
  return jnp.maximum(
      jnp.cumsum(input_mask.astype(jnp.int32), axis=-1) - 1 + first, 0)


def _check_window(model, length: int) -> None:
  """Tunix's sliding masks count keys in cache slots (Gemma 2: against
  1-based positions; Gemma 3: from the last valid slot), which differs from
  transformers' once a row (with its padding) reaches the window. Rows stay
  inside it."""
  window = _decoder(model).config.sliding_window_size
  if window is not None and length >= window:
    raise ValueError(f'Rows of {length} tokens (with the generated ones)'
                     f' reach the decoder\'s sliding window of {window};'
                     f' keep them under {window}.')


def _check_images(model, images) -> None:
  """Images of the encoder's size, one a row (a wrong size would fail
  deep in Tunix's convolution, or silently resample SigLIP's positions)."""
  if images is None:
    return
  cfg = (model.config.vision_config if _is_gemma3(model)
         else model.vision_encoder.config)
  want = (cfg.image_height, cfg.image_width, 3)
  if len(images.shape) != 4 or tuple(images.shape[1:]) != want:
    raise ValueError(f'images have shape {tuple(images.shape)}; the model'
                     f' takes [B, {want[0]}, {want[1]}, 3] (preprocess them'
                     ' to its image_size).')


def logits(model, tokens, images, input_mask, prefix_mask) -> jax.Array:
  """float32 [B, T, V]: the model's logits over a batch of rows.

  Args:
    model: a ``paligemma.PaliGemma`` or Tunix ``Gemma3`` (with or without
      adapters).
    tokens: int32 [B, T] (``build_inputs``).
    images: float32 [B, S, S, 3] (``preprocess``), or None (text only).
    input_mask, prefix_mask: bool [B, T].
  """
  _check_window(model, tokens.shape[-1])
  _check_images(model, images)
  out, _ = model(tokens, positions_of(input_mask, _first_position(model)),
                 None, _mask(model, tokens, input_mask, prefix_mask),
                 images=images)
  return out.astype(jnp.promote_types(out.dtype, jnp.float32))


def _decode(model, tokens, images, input_mask, prefix_mask, *,
            max_new_tokens: int, eos_id: int, pad_id: int) -> jax.Array:
  """Greedy decoding (traced): prefill the prefixes, then a token a step.

  Rows are right-padded: every row's next token goes to the same cache
  slot, and the padding slots before it stay masked.
  """
  graphdef, state = nnx.split(model)
  merged = lambda: nnx.merge(graphdef, state)
  decoder = _decoder(model)
  batch, prompt_len = tokens.shape
  length = prompt_len + max_new_tokens
  _check_window(model, length)
  _check_images(model, images)
  slots = jnp.arange(length)
  cache = lm.init_cache(lm.cache_spec(decoder.config), batch, length,
                        decoder.embedder.input_embedding[...].dtype)
  first_position = _first_position(model)
  out, cache = merged()(
      tokens, positions_of(input_mask, first_position), cache,
      _mask(model, tokens, input_mask, prefix_mask, length), images=images)
  count = jnp.sum(input_mask, axis=-1).astype(jnp.int32)
  first = jnp.argmax(jnp.take_along_axis(
      out, (count - 1)[:, None, None], axis=1)[:, 0], axis=-1)
  key_valid = jnp.pad(input_mask, ((0, 0), (0, max_new_tokens)))

  def step(carry):
    t, token, done, cache, key_valid, generated = carry
    generated = generated.at[:, t].set(jnp.where(done, pad_id, token))
    done = done | (token == eos_id)
    key_valid = key_valid.at[:, prompt_len + t].set(True)
    mask = (key_valid & (slots <= prompt_len + t)[None])[:, None, :]
    out, cache = merged()(token[:, None],
                          (count + first_position + t)[:, None], cache, mask)
    token = jnp.argmax(out[:, -1], axis=-1).astype(jnp.int32)
    return t + 1, token, done, cache, key_valid, generated

  def running(carry):
    return (carry[0] < max_new_tokens) & ~jnp.all(carry[2])

  generated = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
  carry = (jnp.int32(0), first.astype(jnp.int32),
           jnp.zeros((batch,), jnp.bool_), cache, key_valid, generated)
  return jax.lax.while_loop(running, step, carry)[-1]


@functools.partial(nnx.jit, static_argnames=('max_new_tokens', 'eos_id',
                                             'pad_id'))
def generate(model, tokens, images, input_mask, prefix_mask, *,
             max_new_tokens: int, eos_id: int, pad_id: int) -> jax.Array:
  """int32 [B, max_new_tokens]: greedy continuations, jitted, KV-cached.

  Args:
    model: a ``paligemma.PaliGemma`` or Tunix ``Gemma3``.
    tokens, input_mask, prefix_mask: the prefixes (``build_inputs`` without
      answers), right-padded.
    images: float32 [B, S, S, 3].
    max_new_tokens, eos_id, pad_id: decoding stops when every row has
      produced ``eos_id`` (kept); ``pad_id`` after it.
  """
  return _decode(model, tokens, images, input_mask, prefix_mask,
                 max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)
