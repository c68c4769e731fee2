"""PaliGemma on Tunix: its SigLIP, a linear projector and its Gemma decoder.

PaliGemma (1: Gemma-1 decoder; 2: Gemma-2 decoder) encodes an image with
SigLIP into ``(S / P)^2`` soft tokens (256 at 224 px, patch 14, no pooling),
projects them linearly to the decoder's width and puts them where the text
holds its ``<image>`` tokens; the decoder attends fully over the image and
the prompt (the prefix) and causally over the answer (the suffix):

.. math::

   \\mathrm{mask}[q, k] = \\mathrm{valid}[k] \\wedge \\big(k \\le q \\vee
   (\\mathrm{prefix}[q] \\wedge \\mathrm{prefix}[k])\\big).

Every block is Tunix's: ``tunix.models.gemma3.vision.SigLiP`` (the encoder),
``tunix.models.gemma.model.Gemma`` (embedder, decoder layers, final norm,
soft-capping). Tunix has no PaliGemma, and its ``Gemma.__call__`` takes
tokens only, so :class:`PaliGemma` is the thin adapter: its own forward pass
calls Tunix's embedder, merges the image embeddings, then calls Tunix's
layers and final norm in order with the prefix mask. Positions are 1-based,
as ``transformers``' PaliGemma counts them.

This module also builds Tunix's configs from a
``PaliGemmaForConditionalGeneration`` ``config.json`` (refusing, by key,
what Tunix cannot compute as ``transformers`` does) and the tensor map of
its safetensors.
"""

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
from tunix.models.gemma import model as gemma_lib
from tunix.models.gemma import params_safetensors as gemma_params
from tunix.models.gemma3 import model as gemma3_lib
from tunix.models.gemma3 import params_safetensors as gemma3_params
from tunix.models.gemma3 import vision as vision_lib

from train.language import families

_Reader = families._Reader  # pylint: disable=protected-access

# Where each part's tensors live, in the published (legacy) and the
# transformers >= 4.52 naming: both are accepted.
LANGUAGE = r'(?:model\.language_model\.|language_model\.model\.)'
VISION = r'(?:model\.)?vision_tower\.(?:vision_model\.)?'
PROJECTOR = r'(?:model\.)?multi_modal_projector\.'


# -- config.json --------------------------------------------------------------

def _attention_types(r: _Reader, kind: str, num_layers: int):
  if kind == 'gemma':
    return (gemma_lib.AttentionType.GLOBAL,) * num_layers
  names = {'sliding_attention': gemma_lib.AttentionType.LOCAL_SLIDING,
           'full_attention': gemma_lib.AttentionType.GLOBAL}
  layer_types = r('layer_types', None) or [
      'sliding_attention' if (i + 1) % 2 else 'full_attention'
      for i in range(num_layers)]
  unknown = sorted(set(layer_types) - set(names))
  if unknown or len(layer_types) != num_layers:
    raise ValueError(f'{r.where}: text_config.layer_types={layer_types!r}:'
                     f' need {num_layers} of {sorted(names)}.')
  return tuple(names[t] for t in layer_types)


def text_config(text: dict, where: str, sharding) -> gemma_lib.ModelConfig:
  """Tunix's Gemma (1 or 2) ``ModelConfig`` of ``text_config``."""
  r = _Reader(text, where + ' text_config')
  kind = r.require('model_type', ('gemma', 'gemma2'))
  r.require('attention_bias', (False,), default=False)
  act = text.get('hidden_activation') or text.get('hidden_act')
  if act not in ('gelu_pytorch_tanh', None):
    raise ValueError(f'{r.where}: hidden_activation={act!r}: Tunix\'s Gemma'
                     ' computes gelu_pytorch_tanh only.')
  r.require('rms_norm_eps', (1e-6,), default=1e-6)  # Tunix's is fixed.
  if r.rope(kinds=('default',)).theta != 10_000.0:  # Tunix's is fixed.
    raise ValueError(f'{r.where}: rope_theta must be 10000 (Tunix\'s Gemma'
                     ' fixes it).')
  num_layers, head_dim = r('num_hidden_layers'), r.head_dim()
  gemma2 = kind == 'gemma2'
  if gemma2:  # Tunix scales queries by head_dim ** -0.5 only.
    r.require('query_pre_attn_scalar', (head_dim,))
  else:
    for key in ('final_logit_softcapping', 'attn_logit_softcapping',
                'sliding_window'):
      r.require(key, (None,))
  return gemma_lib.ModelConfig(
      num_layers=num_layers, num_embed=r('vocab_size'),
      embed_dim=r('hidden_size'), hidden_dim=r('intermediate_size'),
      num_heads=r('num_attention_heads'), head_dim=head_dim,
      num_kv_heads=r('num_key_value_heads', r('num_attention_heads')),
      final_logit_softcap=r('final_logit_softcapping', None),
      attn_logits_soft_cap=r('attn_logit_softcapping', None),
      sliding_window_size=r('sliding_window', None),
      use_post_attn_norm=gemma2, use_post_ffw_norm=gemma2,
      attention_types=_attention_types(r, kind, num_layers),
      shd_config=sharding)


def vision_config(vision: dict, where: str, *,
                  image_token_id: int) -> vision_lib.SigLIPConfig:
  """Tunix's ``SigLIPConfig`` of PaliGemma's ``vision_config`` (no pooling)."""
  r = _Reader(vision, where + ' vision_config')
  r.require('model_type', ('siglip_vision_model',),
            default='siglip_vision_model')
  r.require('hidden_act', ('gelu_pytorch_tanh',), default='gelu_pytorch_tanh')
  r.require('layer_norm_eps', (1e-6,), default=1e-6)  # Tunix's is fixed.
  r.require('num_channels', (3,), default=3)
  r.require('vision_use_head', (False,), default=False)
  size, patch = r('image_size'), r('patch_size')
  if size % patch:
    raise ValueError(f'{r.where}: image_size={size} is not a multiple of'
                     f' patch_size={patch}.')
  tokens = (size // patch) ** 2
  return vision_lib.SigLIPConfig(
      num_mm_tokens_per_image_prepool=tokens, num_mm_tokens_per_image=tokens,
      image_height=size, image_width=size, patch_size=(patch, patch),
      width=r('hidden_size'), depth=r('num_hidden_layers'),
      mlp_dim=r('intermediate_size'), num_heads=r('num_attention_heads'),
      soft_token_placeholder=image_token_id)


# -- Tensors ------------------------------------------------------------------

def _language_map(cfg: gemma_lib.ModelConfig) -> dict:
  """Tunix's Gemma map, under PaliGemma's prefix, leaves under ``decoder.``.

  Tunix's map sends ``post_attention_layernorm`` to ``post_attn_norm``,
  which is right for Gemma 2; in Gemma 1 that norm is the one before the
  MLP (Tunix's ``pre_ffw_norm``).
  """
  out = {}
  tunix_map = gemma_params._get_key_and_transform_mapping  # pylint: disable=protected-access
  for pattern, (target, transform) in tunix_map(cfg).items():
    if not pattern.startswith(r'model\.'):
      continue  # lm_head (tied: checked apart) and Tunix's catch-all bias.
    if 'post_attention_layernorm' in pattern and not cfg.use_post_attn_norm:
      target = target.replace('post_attn_norm', 'pre_ffw_norm')
    if not target.startswith(('tmp.', 'unused.')):
      target = 'decoder.' + target
    out[LANGUAGE + pattern[len(r'model\.'):]] = (target, transform)
  out[r'lm_head\.weight'] = ('unused.lm_head.weight', None)
  return out


def _vision_map(cfg: vision_lib.SigLIPConfig) -> dict:
  """Tunix's Gemma 3 SigLIP map, for PaliGemma's prefixes.

  Tunix maps SigLIP's position embedding ``[N, W]`` as it is onto its
  ``[1, N, W]`` leaf; here it is reshaped.
  """
  like = gemma3_lib.ModelConfig(
      num_layers=1, num_embed=1, embed_dim=1, hidden_dim=1, num_heads=1,
      head_dim=2, num_kv_heads=1, vision_config=cfg)
  out = {}
  prefix = r'vision_tower\.vision_model\.'
  tunix_map = gemma3_params._get_key_and_transform_mapping  # pylint: disable=protected-access
  for pattern, (target, transform) in tunix_map(like).items():
    if not pattern.startswith(prefix):
      continue
    if target.endswith('pos_embedding'):
      transform = (None, (1, cfg.image_height // cfg.patch_size[0]
                          * (cfg.image_width // cfg.patch_size[1]), cfg.width))
    out[VISION + pattern[len(prefix):]] = (target, transform)
  return out


def tensor_map(text: gemma_lib.ModelConfig,
               vision: vision_lib.SigLIPConfig) -> dict:
  """``{HF tensor regex: (leaf, (permute, reshape))}`` of a PaliGemma folder."""
  return {**_language_map(text), **_vision_map(vision),
          PROJECTOR + r'linear\.weight': ('projector.kernel', ((1, 0), None)),
          PROJECTOR + r'linear\.bias': ('projector.bias', None)}


def decoder_leaf(key: str) -> str:
  """A fused q/k/v leaf (``layers.N.attn...``) under ``decoder.``."""
  return 'decoder.' + key if key.startswith('layers.') else key


# -- The model ----------------------------------------------------------------

def merge_images(embeddings: jax.Array, features: jax.Array,
                 is_image: jax.Array) -> jax.Array:
  """The k-th image token of each row takes the k-th image embedding.

  Tunix's ``merge_embeddings`` restores position 0 after merging (a Gemma 3
  prompt starts with BOS); PaliGemma's first token is an image token.

  Args:
    embeddings: [B, T, D] token embeddings.
    features: [B, N, D] image embeddings.
    is_image: bool [B, T], N True per row.
  """
  index = jnp.clip(jnp.cumsum(is_image, axis=-1) - 1, 0,
                   features.shape[1] - 1)
  picked = jnp.take_along_axis(features, index[..., None], axis=1)
  return jnp.where(is_image[..., None], picked.astype(embeddings.dtype),
                   embeddings)


class PaliGemma(nnx.Module):
  """Tunix's SigLIP + a linear projector + Tunix's Gemma decoder.

  Attributes:
    vision_encoder: ``tunix.models.gemma3.vision.SigLiP`` (its
      ``apply_stop_gradient`` True unless the encoder is adapted).
    projector: ``nnx.Linear`` from SigLIP's width to the decoder's.
    decoder: ``tunix.models.gemma.model.Gemma``.
  """

  def __init__(self, text: gemma_lib.ModelConfig,
               vision: vision_lib.SigLIPConfig, *, image_token_id: int,
               rngs: nnx.Rngs, dtype=jnp.float32, remat: bool = False):
    shd = vision_lib.SigLIPShardingConfig.get_default_sharding()
    self.vision_encoder = vision_lib.SigLiP(vision, rngs=rngs, dtype_mm=dtype,
                                            shd_config=shd)
    self.projector = nnx.Linear(
        vision.width, text.embed_dim, use_bias=True, rngs=rngs,
        param_dtype=dtype,
        kernel_init=nnx.with_partitioning(nnx.initializers.zeros_init(),
                                          ('fsdp', 'tp')),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(),
                                        ('tp',)))
    self.decoder = gemma_lib.Gemma(text, rngs=rngs)
    self.image_token_id = image_token_id
    self.remat = remat

  def embed(self, tokens: jax.Array, images: jax.Array | None) -> jax.Array:
    """[B, T, D]: Tunix's token embeddings, image embeddings merged in."""
    is_image = tokens == self.image_token_id
    # The image token may lie outside the vocabulary (transformers: id 0).
    x = self.decoder.embedder.encode(jnp.where(is_image, 0, tokens))
    if images is None:
      return x
    features = self.vision_encoder(images[:, None])[:, 0]  # [B, N, W]
    return merge_images(x, self.projector(features), is_image)

  def __call__(
      self,
      tokens: jax.Array,  # [B, T]
      positions: jax.Array,  # [B, T], 1-based
      cache: Any,  # Tunix's cache, or None
      attention_mask: jax.Array,  # bool [B, T, S]
      images: jax.Array | None = None,  # [B, H, W, 3], or None
  ) -> tuple[jax.Array, Any]:
    """``(logits [B, T, V], cache)``: Tunix's Gemma.__call__, on embeddings."""
    decoder = self.decoder
    new_cache = None if cache is None else {}
    x = self.embed(tokens, images)
    for i, layer in enumerate(decoder.layers):
      name = f'layer_{i}'
      layer_cache, x = self._layer(layer, x, positions,
                                   cache[name] if cache else None,
                                   attention_mask)
      if cache is not None:
        new_cache[name] = layer_cache
    # No final soft-capping: transformers' PaliGemma 2 leaves its Gemma 2's
    # final_logit_softcapping unapplied (greedy tokens are the same).
    return decoder.embedder.decode(decoder.final_norm(x)), new_cache

  def _layer(self, layer, x, positions, cache, attention_mask):
    """One Tunix decoder layer; rematerialised in the backward pass when
    ``remat`` (Tunix's own ``nnx.remat`` fails on qwix's LoRA modules: it
    mutates their Params across trace levels). The layer is merged afresh
    inside ``jax.checkpoint``; only its RNG state (LoRA dropout's) comes
    back out."""
    if not self.remat:
      return layer(x, positions, cache, attention_mask)
    graphdef, state = nnx.split(layer)

    def run(state, x):
      module = nnx.merge(graphdef, state)
      out = module(x, positions, cache, attention_mask)
      return out, nnx.state(module, nnx.RngState)

    out, rng_state = jax.checkpoint(run)(state, x)
    nnx.update(layer, rng_state)
    return out

  def get_model_input(self) -> dict:
    """A dummy input (for qwix's abstract trace of the LoRA graph)."""
    cfg = self.vision_encoder.config
    return {'tokens': jnp.ones((2, 1), jnp.int32),
            'positions': jnp.ones((2, 1), jnp.int32), 'cache': None,
            'attention_mask': jnp.ones((2, 1, 1), jnp.bool_),
            'images': jnp.zeros((2, cfg.image_height, cfg.image_width, 3),
                                jnp.float32)}

