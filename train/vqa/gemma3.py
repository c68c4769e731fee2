"""Gemma 3 multimodal as Tunix has it: its ``Gemma3`` with its SigLIP.

Tunix's ``tunix.models.gemma3.model.Gemma3`` with a ``vision_config`` is the
whole model (SigLIP, average pooling to ``mm_tokens_per_image``, the soft
embedding norm and projection, the images merged at the image tokens); it
is used as it is. This module builds its config from a
``Gemma3ForConditionalGeneration`` ``config.json`` (the text decoder through
``train.language.families``, refusing by key what Tunix cannot compute) and
the map of its safetensors. Gemma 3's attention is causal, and full within
each image's tokens (Tunix's ``make_causal_bidirectional_attention_mask``);
positions count from 0.
"""

import dataclasses

import jax.numpy as jnp
from tunix.models.gemma3 import model as gemma3_lib
from tunix.models.gemma3 import params_safetensors as gemma3_params
from tunix.models.gemma3 import vision as vision_lib

from train.language import families
from train.vqa import paligemma

_Reader = families._Reader  # pylint: disable=protected-access
_TUNIX_LANGUAGE = r'(?:language_model\.)?model\.'
_TUNIX_VISION = r'vision_tower\.vision_model\.'
_TUNIX_PROJECTOR = r'multi_modal_projector\.'


def siglip_config(hf: dict, where: str) -> vision_lib.SigLIPConfig:
  """Tunix's ``SigLIPConfig``: ``vision_config`` pooled to
  ``mm_tokens_per_image``."""
  r = _Reader(hf['vision_config'], where + ' vision_config')
  r.require('model_type', ('siglip_vision_model',),
            default='siglip_vision_model')
  r.require('hidden_act', ('gelu_pytorch_tanh',), default='gelu_pytorch_tanh')
  # Tunix's LayerNorms and its soft-embedding RMSNorm fix eps at 1e-6.
  r.require('layer_norm_eps', (1e-6,), default=1e-6)
  r.require('num_channels', (3,), default=3)
  r.require('vision_use_head', (False,), default=False)
  size, patch = r('image_size'), r('patch_size')
  prepool = (size // patch) ** 2
  tokens = _Reader(hf, where)('mm_tokens_per_image')
  side, pooled = int(round(prepool ** 0.5)), int(round(tokens ** 0.5))
  if size % patch or side % pooled or pooled * pooled != tokens:
    raise ValueError(f'{where}: image_size={size}, patch_size={patch} and'
                     f' mm_tokens_per_image={tokens} do not pool evenly.')
  return vision_lib.SigLIPConfig(
      num_mm_tokens_per_image_prepool=prepool,
      num_mm_tokens_per_image=tokens, image_height=size, image_width=size,
      patch_size=(patch, patch), width=r('hidden_size'),
      depth=r('num_hidden_layers'), mlp_dim=r('intermediate_size'),
      num_heads=r('num_attention_heads'),
      soft_token_placeholder=_Reader(hf, where)('image_token_index'))


def model_config(hf: dict, where: str, dtype, remat: str):
  """Tunix's Gemma 3 ``ModelConfig`` with its vision config."""
  text = dict(hf['text_config'])
  text.setdefault('tie_word_embeddings', hf.get('tie_word_embeddings', True))
  sharding = families.with_batch_axes(
      gemma3_lib.ShardingConfig.get_default_sharding())
  cfg = families.GEMMA3.build(text, where + ' text_config', dtype, sharding)
  return dataclasses.replace(
      cfg, vision_config=siglip_config(hf, where),
      remat_config=gemma3_lib.RematConfig[remat])


def weights_map(cfg: gemma3_lib.ModelConfig) -> dict:
  """Tunix's Gemma 3 map, for the published and transformers-5 naming.

  Tunix's vision patterns want ``vision_tower.vision_model.`` (transformers
  5 saves ``vision_tower.``), and it maps SigLIP's position embedding
  ``[N, W]`` as it is onto its ``[1, N, W]`` leaf; both are fixed here.
  """
  out = {}
  tunix_map = gemma3_params._get_key_and_transform_mapping  # pylint: disable=protected-access
  for pattern, (target, transform) in tunix_map(cfg).items():
    for tunix, ours in ((_TUNIX_LANGUAGE, paligemma.LANGUAGE),
                        (_TUNIX_VISION, paligemma.VISION),
                        (_TUNIX_PROJECTOR, paligemma.PROJECTOR)):
      if pattern.startswith(tunix):
        pattern = ours + pattern[len(tunix):]
        break
    if target.endswith('pos_embedding'):
      v = cfg.vision_config
      transform = (None, (1, v.num_mm_tokens_per_image_prepool, v.width))
    out[pattern] = (target, transform)
  return out


def model(cfg: gemma3_lib.ModelConfig, rngs) -> gemma3_lib.Gemma3:
  return gemma3_lib.Gemma3(cfg, rngs=rngs)


def model_input(cfg: gemma3_lib.ModelConfig) -> dict:
  """A dummy input at the config's image size (Tunix's ``get_model_input``
  hard-codes 896 px images)."""
  v = cfg.vision_config
  return {'last_tokens': jnp.ones((2, 1), jnp.int32),
          'positions': jnp.ones((2, 1), jnp.int32), 'cache': None,
          'attention_mask': jnp.ones((2, 1, 1), jnp.bool_),
          'images': jnp.zeros((2, 1, v.image_height, v.image_width, 3),
                              jnp.float32)}
