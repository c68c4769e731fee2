"""The decoder families we fine-tune, as Tunix builds them from a config.json.

A Hugging Face folder says what it holds in ``config.json``; Tunix's
``ModelConfig`` class methods only know the published sizes. This module
builds Tunix's ``ModelConfig`` from the folder's own ``config.json`` (every
size, the norm epsilon, the RoPE base and scaling, tied embeddings, Gemma's
query scaling and sliding window), and refuses, naming the ``config.json``
key, what Tunix's decoder cannot compute as ``transformers`` does (biases,
other activations, soft-capping, RoPE scalings other than linear and Llama
3.1's, another layer pattern). What it cannot express but we can correct
thinly is corrected: the RoPE of Llama 3 and Qwen 3 (``train.language.rope``).

=======  ========================  ==========================================
family   ``model_type``            Tunix module
=======  ========================  ==========================================
llama    llama                     ``tunix.models.llama3`` (LLaMA 1-3.x)
qwen3    qwen3                     ``tunix.models.qwen3`` (dense Qwen 3)
gemma3   gemma3_text, gemma3 (a)   ``tunix.models.gemma3`` (text decoder)
=======  ========================  ==========================================

(a) A multimodal Gemma 3 folder: its ``text_config`` is used, and the vision
tower's tensors are left unread on purpose (we fine-tune the text decoder).

    >>> family_of({'model_type': 'gpt2'}, 'runs/gpt2')
    Traceback (most recent call last):
    ValueError: runs/gpt2/config.json: model_type 'gpt2' is not a family we support; known: gemma3, gemma3_text, llama, qwen3.
"""

import dataclasses
import json
import os
from typing import Any, Callable, Optional

import jax.numpy as jnp
from tunix.models.gemma3 import model as gemma3_model
from tunix.models.gemma3 import params_safetensors as gemma3_params
from tunix.models.llama3 import model as llama3_model
from tunix.models.llama3 import params as llama3_params
from tunix.models.qwen3 import model as qwen3_model
from tunix.models.qwen3 import params as qwen3_params

from train.language import rope as rope_lib

# The projections LoRA may adapt, by their Hugging Face names.
PROJECTIONS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj',
               'down_proj')


@dataclasses.dataclass(frozen=True)
class Family:
  """How one family maps onto Tunix.

  Attributes:
    name: our name for it.
    model_class: Tunix's NNX model class.
    attention_class: its attention module (the one ``rope.correct`` fixes).
    tensor_map: Tunix's ``{HF tensor regex: (leaf, (permute, reshape))}``
      builder, called with the ``ModelConfig``.
    build: ``(hf config dict, where, dtype, sharding) -> ModelConfig``.
    rope: ``hf config -> Rope`` when Tunix's RoPE must be corrected, else None.
    lora_modules: ``(ModelConfig) -> {HF projection: Tunix module path}``.
    default_sharding: Tunix's ``ShardingConfig.get_default_sharding``.
  """
  name: str
  model_class: type
  attention_class: type
  tensor_map: Callable[[Any], dict]
  build: Callable[..., Any]
  rope: Optional[Callable[[dict], rope_lib.Rope]]
  lora_modules: Callable[[Any], dict[str, str]]
  default_sharding: Callable[[], Any]


# -- config.json --------------------------------------------------------------

_REQUIRED = object()


class _Reader:
  """Reads keys of one config.json, naming the file and key on a problem."""

  def __init__(self, hf: dict, where: str):
    self.hf, self.where = hf, where

  def __call__(self, key: str, default: Any = _REQUIRED) -> Any:
    value = self.hf.get(key, default)
    if value is _REQUIRED or (value is None and default is _REQUIRED):
      raise ValueError(f'{self.where}: key {key!r} is missing; Tunix needs it'
                       ' to build the model.')
    return value

  def require(self, key: str, allowed: tuple, default: Any = None) -> Any:
    """The value of ``key``, refused unless it is one of ``allowed``."""
    value = self.hf.get(key, default)
    if value not in allowed:
      raise ValueError(
          f'{self.where}: {key}={value!r} cannot be computed by Tunix\'s'
          f' decoder (it supports {key} in {list(allowed)}); refusing rather'
          ' than loading a model that would not match transformers.')
    return value

  def head_dim(self) -> int:
    return self('head_dim', None) or self('hidden_size') // self(
        'num_attention_heads')

  def rope(self, layer_type: Optional[str] = None,
           kinds: tuple = rope_lib.KINDS) -> rope_lib.Rope:
    """The RoPE of ``config.json``, old (rope_theta/rope_scaling) or new
    (rope_parameters, per layer type for Gemma 3) style."""
    params = self.hf.get('rope_parameters')
    if params is not None and layer_type is not None:
      params = params.get(layer_type)
    if params is None:  # transformers < 5 writes these two keys.
      params = dict(self.hf.get('rope_scaling') or {})
      params.setdefault('rope_theta', self.hf.get('rope_theta', 10_000.0))
    kind = params.get('rope_type', params.get('type', 'default'))
    if kind not in kinds:
      raise ValueError(
          f'{self.where}: rope_type {kind!r} (rope_parameters/rope_scaling)'
          f' is not supported; we compute {list(kinds)}.')
    fields = {f.name for f in dataclasses.fields(rope_lib.Rope)}
    extra = {k: v for k, v in params.items() if k in fields and k != 'theta'}
    return rope_lib.Rope(theta=float(params['rope_theta']), kind=kind,
                         **extra)


def read_config(folder: str) -> tuple[dict, str]:
  """``(config dict, where)``: the folder's ``config.json`` (a multimodal
  Gemma 3's ``text_config``, with the outer ``model_type`` kept)."""
  where = os.path.join(folder, 'config.json')
  if not os.path.isfile(where):
    raise FileNotFoundError(
        f'{where} does not exist: config.pretrained.path must be a Hugging'
        ' Face model folder (config.json, *.safetensors, tokenizer files).')
  with open(where) as f:
    hf = json.load(f)
  if hf.get('model_type') == 'gemma3' and 'text_config' in hf:
    text = dict(hf['text_config'])
    text.setdefault('tie_word_embeddings', True)
    return dict(text, model_type='gemma3'), where
  return hf, where


def family_of(hf: dict, folder: str) -> Family:
  model_type = hf.get('model_type')
  for family, types in _FAMILIES.values():
    if model_type in types:
      return family
  known = sorted(t for _, types in _FAMILIES.values() for t in types)
  raise ValueError(
      f'{os.path.join(folder, "config.json")}: model_type {model_type!r} is'
      f' not a family we support; known: {", ".join(known)}.')


def with_batch_axes(sharding, batch_axes=('data', 'fsdp')):
  """Tunix's sharding rules with activations' batch over ``batch_axes``.

  Tunix shards activations' batch axis over 'fsdp' only; our batches are
  split over the data axis too.
  """
  updates = {}
  for field in dataclasses.fields(sharding):
    spec = getattr(sharding, field.name)
    if field.name.startswith('act_') and spec and spec[0] == 'fsdp':
      updates[field.name] = (batch_axes, *spec[1:])
  return dataclasses.replace(sharding, **updates)


# -- Llama --------------------------------------------------------------------

def _refuse_biases_and_act(r: _Reader, act_key: str, act: str) -> None:
  r.require('attention_bias', (False,), default=False)
  r.require('mlp_bias', (False,), default=False)
  r.require(act_key, (act,), default=act)


def _build_llama(hf, where, dtype, sharding):
  del dtype  # Tunix's Llama computes in its params' dtype.
  r = _Reader(hf, where)
  _refuse_biases_and_act(r, 'hidden_act', 'silu')
  r.require('pretraining_tp', (1, None), default=1)
  return llama3_model.ModelConfig(
      num_layers=r('num_hidden_layers'), vocab_size=r('vocab_size'),
      embed_dim=r('hidden_size'), hidden_dim=r('intermediate_size'),
      num_heads=r('num_attention_heads'), head_dim=r.head_dim(),
      num_kv_heads=r('num_key_value_heads', r('num_attention_heads')),
      rope_theta=r.rope().theta,  # Unused by Tunix: see train.language.rope.
      norm_eps=r('rms_norm_eps'), shd_config=sharding,
      weight_tying=bool(r('tie_word_embeddings', False)))


def _separate_projections(cfg) -> dict[str, str]:
  del cfg
  return {p: f'{"attn" if p[0] in "qkvo" else "mlp"}/{p}' for p in PROJECTIONS}


# -- Qwen 3 -------------------------------------------------------------------

def _build_qwen3(hf, where, dtype, sharding):
  r = _Reader(hf, where)
  _refuse_biases_and_act(r, 'hidden_act', 'silu')
  r.require('use_sliding_window', (False,), default=False)
  return qwen3_model.ModelConfig(
      num_layers=r('num_hidden_layers'), vocab_size=r('vocab_size'),
      embed_dim=r('hidden_size'), hidden_dim=r('intermediate_size'),
      num_heads=r('num_attention_heads'), head_dim=r.head_dim(),
      num_kv_heads=r('num_key_value_heads', r('num_attention_heads')),
      rope_theta=r.rope(kinds=('default',)).theta,  # Unused: train.language.rope.
      norm_eps=r('rms_norm_eps'),
      use_tied_embedding=bool(r('tie_word_embeddings', False)),
      shd_config=sharding, dtype=dtype, param_dtype=dtype)


# -- Gemma 3 ------------------------------------------------------------------

_QUERY_NORM = gemma3_model.QueryPreAttentionNormalisation


def _gemma3_layer_pattern(num_layers: int) -> list[str]:
  kinds = {gemma3_model.AttentionType.LOCAL_SLIDING: 'sliding_attention',
           gemma3_model.AttentionType.GLOBAL: 'full_attention'}
  pattern = gemma3_model.GEMMA3_ATTENTION_PATTERN
  return [kinds[pattern[i % len(pattern)]] for i in range(num_layers)]


def _build_gemma3(hf, where, dtype, sharding):
  r = _Reader(hf, where)
  _refuse_biases_and_act(r, 'hidden_activation', 'gelu_pytorch_tanh')
  for key in ('final_logit_softcapping', 'attn_logit_softcapping'):
    r.require(key, (None,))
  r.require('rms_norm_eps', (1e-6,), default=1e-6)  # Tunix's is fixed.
  r.require('use_bidirectional_attention', (False,), default=False)
  r.require('tie_word_embeddings', (True,), default=True)
  num_layers, head_dim = r('num_hidden_layers'), r.head_dim()
  r.require('layer_types', (None, _gemma3_layer_pattern(num_layers)))
  per_head = r('hidden_size') // r('num_attention_heads')
  scalar = r.require('query_pre_attn_scalar', (head_dim, per_head))
  if 'rope_local_base_freq' in hf:  # transformers < 5.
    local = rope_lib.Rope(theta=float(hf['rope_local_base_freq']))
  else:
    local = r.rope('sliding_attention', kinds=('default',))
  full = r.rope('full_attention', kinds=('default', 'linear'))
  return gemma3_model.ModelConfig(
      num_layers=num_layers, num_embed=r('vocab_size'),
      embed_dim=r('hidden_size'), hidden_dim=r('intermediate_size'),
      num_heads=r('num_attention_heads'), head_dim=head_dim,
      num_kv_heads=r('num_key_value_heads', r('num_attention_heads')),
      sliding_window_size=r('sliding_window'),
      local_base_frequency=local.theta, global_base_frequency=full.theta,
      global_scale_factor=full.factor,
      query_pre_attn_norm=(_QUERY_NORM.BY_ONE_OVER_SQRT_HEAD_DIM
                           if scalar == head_dim else
                           _QUERY_NORM.BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS),
      shd_config=sharding, param_dtype=dtype)


def _gemma3_projections(cfg) -> dict[str, str]:
  # Tunix fuses k and v (and q too when there are as many kv heads as query
  # heads) into one einsum: their adapters are one LoRA over the fused output.
  fused_qkv = cfg.num_heads == cfg.num_kv_heads
  q = 'attn/qkv_einsum' if fused_qkv else 'attn/q_einsum'
  kv = 'attn/qkv_einsum' if fused_qkv else 'attn/kv_einsum'
  return {'q_proj': q, 'k_proj': kv, 'v_proj': kv,
          'o_proj': 'attn/attn_vec_einsum', 'gate_proj': 'mlp/gate_proj',
          'up_proj': 'mlp/up_proj', 'down_proj': 'mlp/down_proj'}


LLAMA = Family(
    name='llama', model_class=llama3_model.Llama3,
    attention_class=llama3_model.Attention,
    tensor_map=llama3_params._get_key_and_transform_mapping,  # pylint: disable=protected-access
    build=_build_llama, rope=lambda hf: _Reader(hf, '').rope(),
    lora_modules=_separate_projections,
    default_sharding=llama3_model.ShardingConfig.get_default_sharding)
QWEN3 = Family(
    name='qwen3', model_class=qwen3_model.Qwen3,
    attention_class=qwen3_model.Attention,
    tensor_map=qwen3_params._get_key_and_transform_mapping,  # pylint: disable=protected-access
    build=_build_qwen3, rope=lambda hf: _Reader(hf, '').rope(
        kinds=('default',)),
    lora_modules=_separate_projections,
    default_sharding=qwen3_model.ShardingConfig.get_default_sharding)
GEMMA3 = Family(
    name='gemma3', model_class=gemma3_model.Gemma3,
    attention_class=gemma3_model.Attention,
    tensor_map=gemma3_params._get_key_and_transform_mapping,  # pylint: disable=protected-access
    build=_build_gemma3, rope=None,  # Tunix's Gemma 3 passes its bases.
    lora_modules=_gemma3_projections,
    default_sharding=gemma3_model.ShardingConfig.get_default_sharding)

_FAMILIES = {
    'llama': (LLAMA, ('llama',)),
    'qwen3': (QWEN3, ('qwen3',)),
    'gemma3': (GEMMA3, ('gemma3_text', 'gemma3')),
}

rope_lib.install(llama3_model)
rope_lib.install(qwen3_model)

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16,
          'float16': jnp.float16}
