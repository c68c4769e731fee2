r"""A Flax NNX Vision Transformer: ViT (Ti/S/B/L) and the CLIP image encoder.

One module covers both families, as they differ only in a few switches:

- ``variant='vit'``: the original ViT (and big_vision's): a biased patch
  embedding, exact GELU, LayerNorm at the end of the encoder.
- ``variant='clip'``: CLIP's image encoder: an unbiased patch embedding, a
  LayerNorm before the encoder (``pre_norm``), quick GELU
  :math:`x \sigma(1.702 x)`, and an unbiased projection of the pooled feature.

Pooling is by class token (``'cls'``) or by the mean of the tokens
(``'mean'``, no class token); drop-path (stochastic depth) regularises the
residual branches. With ``lora_rank > 0`` every attention and MLP projection
gets a LoRA adapter, :math:`W x + \frac{\alpha}{r} B A x` with :math:`B = 0`
at init, whose factors are ``nnx.LoRAParam`` so that an optimizer built with
``wrt=nnx.LoRAParam`` trains only them.

Params are float32 by default; ``param_dtype=jnp.float64`` (with
``jax_enable_x64``) builds the whole model in float64, attention's softmax
included, for checks against float64 references.

Kernels carry ``nnx.with_partitioning`` metadata over the ``'fsdp'`` mesh axis
(their input dimension); everything else is replicated. Parameter names follow
big_vision's, so that ``train.vision.pretrained`` maps published checkpoints onto them:
``embedding``, ``cls``, ``pos_embedding``, ``blocks/i/{norm1, attn/{query,
key, value, out}, norm2, mlp/{fc1, fc2}}``, ``encoder_norm``, ``projection``,
``head``.

Example:

>>> from flax import nnx
>>> import jax.numpy as jnp
>>> model = VisionTransformer(**get_model_kwargs('mu/4'), num_classes=10,
...                           image_size=32, rngs=nnx.Rngs(0))
>>> model(jnp.zeros((2, 32, 32, 3))).shape
(2, 10)
"""

import dataclasses
from typing import Any, Optional

from flax import nnx
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The shape of a ViT: what a name like ``'b/16'`` stands for."""
  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int
  variant: str = 'vit'
  projection_dim: int = 0  # CLIP: size of the projected feature; 0 = none.


MODEL_CONFIGS: dict[str, ModelConfig] = {
    # Tiny models for tests and the laptop demo (32x32 images).
    'mu/4': ModelConfig(width=32, depth=2, mlp_dim=64, num_heads=2,
                        patch_size=4),
    'xs/8': ModelConfig(width=64, depth=4, mlp_dim=128, num_heads=4,
                        patch_size=8),
    'clip-mu/4': ModelConfig(width=32, depth=2, mlp_dim=64, num_heads=2,
                             patch_size=4, variant='clip', projection_dim=16),
    # The ViT family (Dosovitskiy et al.; Steiner et al.).
    'ti/16': ModelConfig(width=192, depth=12, mlp_dim=768, num_heads=3,
                         patch_size=16),
    's/16': ModelConfig(width=384, depth=12, mlp_dim=1536, num_heads=6,
                        patch_size=16),
    's/32': ModelConfig(width=384, depth=12, mlp_dim=1536, num_heads=6,
                        patch_size=32),
    'b/16': ModelConfig(width=768, depth=12, mlp_dim=3072, num_heads=12,
                        patch_size=16),
    'b/32': ModelConfig(width=768, depth=12, mlp_dim=3072, num_heads=12,
                        patch_size=32),
    'l/16': ModelConfig(width=1024, depth=24, mlp_dim=4096, num_heads=16,
                        patch_size=16),
    # CLIP image encoders (Radford et al.), the paper's backbone.
    'clip-b/32': ModelConfig(width=768, depth=12, mlp_dim=3072, num_heads=12,
                             patch_size=32, variant='clip',
                             projection_dim=512),
    'clip-b/16': ModelConfig(width=768, depth=12, mlp_dim=3072, num_heads=12,
                             patch_size=16, variant='clip',
                             projection_dim=512),
    'clip-l/14': ModelConfig(width=1024, depth=24, mlp_dim=4096, num_heads=16,
                             patch_size=14, variant='clip',
                             projection_dim=768),
}


def get_model_kwargs(name: str) -> dict[str, Any]:
  """The constructor arguments of the model called ``name``."""
  if name not in MODEL_CONFIGS:
    raise ValueError(
        f'Unknown model {name!r} (config.model.name); known:'
        f' {sorted(MODEL_CONFIGS)}.'
    )
  return dataclasses.asdict(MODEL_CONFIGS[name])


def exact_gelu(x: jax.Array) -> jax.Array:
  """ViT's GELU. A named function, so that two models compare equal (one
  compiled step serves both)."""
  return jax.nn.gelu(x, approximate=False)


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's GELU approximation, :math:`x \\sigma(1.702 x)`."""
  return x * jax.nn.sigmoid(1.702 * x)


def _sharded(init, names):
  # Metadata only: ``train.vision.mesh.shard_module`` places the arrays once the
  # model is built (and loaded), so a model can be built without a mesh.
  return nnx.with_partitioning(init, names, eager_sharding=False)


class Dense(nnx.Linear):
  """``nnx.Linear`` with an optional LoRA adapter, scaled by alpha / rank."""

  def __init__(self, in_features: int, out_features: int, *, lora_rank: int,
               lora_alpha: float, dtype, param_dtype, rngs: nnx.Rngs,
               use_bias=True):
    super().__init__(
        in_features, out_features, use_bias=use_bias, dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_sharded(nnx.initializers.xavier_uniform(),
                             ('fsdp', None)),
        rngs=rngs,
    )
    if lora_rank > 0:
      self.lora = nnx.LoRA(in_features, lora_rank, out_features, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)
      self.lora_scale = (lora_alpha or lora_rank) / lora_rank
    else:
      self.lora = None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = super().__call__(x)
    if self.lora is not None:
      y = y + self.lora_scale * self.lora(x)
    return y


class Attention(nnx.Module):
  """Multi-head self-attention with separate query, key and value maps."""

  def __init__(self, width: int, num_heads: int, *, dense_kwargs):
    if width % num_heads:
      raise ValueError(f'width {width} is not divisible by num_heads'
                       f' {num_heads}.')
    self.num_heads = num_heads
    self.query = Dense(width, width, **dense_kwargs)
    self.key = Dense(width, width, **dense_kwargs)
    self.value = Dense(width, width, **dense_kwargs)
    self.out = Dense(width, width, **dense_kwargs)

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, tokens, width = x.shape
    heads = lambda y: y.reshape(batch, tokens, self.num_heads, -1)
    y = dot_product_attention(
        heads(self.query(x)), heads(self.key(x)), heads(self.value(x)))
    return self.out(y.reshape(batch, tokens, width))


def dot_product_attention(query, key, value):
  """``jax.nn.dot_product_attention``, in full precision for float64.

  JAX's computes the softmax in float32 whatever the inputs' dtype; a float64
  model (a check against a float64 reference) needs it in float64.
  """
  if query.dtype != jnp.float64:
    return jax.nn.dot_product_attention(query, key, value)
  logits = jnp.einsum('btnh,bsnh->bnts', query, key) / jnp.sqrt(
      query.shape[-1])
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum('bnts,bsnh->btnh', probs, value)


class Mlp(nnx.Module):
  def __init__(self, width: int, mlp_dim: int, activation, *, dense_kwargs):
    self.fc1 = Dense(width, mlp_dim, **dense_kwargs)
    self.fc2 = Dense(mlp_dim, width, **dense_kwargs)
    self.activation = activation

  def __call__(self, x):
    return self.fc2(self.activation(self.fc1(x)))


def drop_path(x: jax.Array, rate: float, key: Optional[jax.Array]) -> jax.Array:
  """Zeroes whole examples of a residual branch with probability ``rate``."""
  if rate == 0.0 or key is None:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


class Block(nnx.Module):
  """A pre-LayerNorm Transformer encoder block."""

  def __init__(self, width, mlp_dim, num_heads, *, activation, eps,
               drop_path_rate, dense_kwargs, rngs):
    norm_kwargs = dict(epsilon=eps, param_dtype=dense_kwargs['param_dtype'],
                       rngs=rngs)
    self.norm1 = nnx.LayerNorm(width, **norm_kwargs)
    self.attn = Attention(width, num_heads, dense_kwargs=dense_kwargs)
    self.norm2 = nnx.LayerNorm(width, **norm_kwargs)
    self.mlp = Mlp(width, mlp_dim, activation, dense_kwargs=dense_kwargs)
    self.drop_path_rate = drop_path_rate

  def __call__(self, x, key=None):
    keys = (None, None) if key is None else jax.random.split(key)
    x = x + drop_path(self.attn(self.norm1(x)), self.drop_path_rate, keys[0])
    x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path_rate, keys[1])
    return x


class VisionTransformer(nnx.Module):
  """ViT or CLIP image encoder with a classification head.

  Args:
    width, depth, mlp_dim, num_heads, patch_size: the shape (see
      ``MODEL_CONFIGS``).
    num_classes: outputs of the head (zero-initialised); 0 = no head, the
      model returns its pooled (projected) feature.
    image_size: side of the square input images.
    variant: ``'vit'`` or ``'clip'``.
    projection_dim: CLIP's projection of the pooled feature; 0 = none.
    pool: ``'cls'`` or ``'mean'``.
    drop_path_rate: stochastic-depth rate, the same in every block.
    lora_rank, lora_alpha: LoRA adapters on every attention and MLP
      projection when the rank is > 0.
    layer_norm_eps: defaults to 1e-6 (ViT) or 1e-5 (CLIP).
    normalize_features: L2-normalise the feature before the head (CLIP's
      zero-shot classifier: cosine similarity, scale in the head's kernel).
    dtype: computation dtype (e.g. ``jnp.bfloat16``); ``None`` = the params'.
    param_dtype: dtype of every param: float32 (default) or, with
      ``jax_enable_x64``, float64.
    rngs: initialisation randomness.
  """

  def __init__(self, *, width: int, depth: int, mlp_dim: int, num_heads: int,
               patch_size: int, num_classes: int, image_size: int,
               variant: str = 'vit', projection_dim: int = 0,
               pool: str = 'cls', drop_path_rate: float = 0.0,
               lora_rank: int = 0, lora_alpha: float = 0.0,
               layer_norm_eps: Optional[float] = None, dtype=None,
               param_dtype=jnp.float32, normalize_features: bool = False,
               rngs: nnx.Rngs):
    if variant not in ('vit', 'clip'):
      raise ValueError(f"variant={variant!r}: expected 'vit' or 'clip'.")
    if pool not in ('cls', 'mean'):
      raise ValueError(f"pool={pool!r}: expected 'cls' or 'mean'.")
    if image_size % patch_size:
      raise ValueError(f'image_size {image_size} is not a multiple of'
                       f' patch_size {patch_size}.')
    param_dtype = jnp.dtype(param_dtype)
    if param_dtype == jnp.float64 and not jax.config.jax_enable_x64:
      raise ValueError(
          'param_dtype=float64 (config.model.param_dtype) needs 64-bit JAX:'
          " jax.config.update('jax_enable_x64', True) or JAX_ENABLE_X64=1."
      )
    clip = variant == 'clip'
    eps = layer_norm_eps or (1e-5 if clip else 1e-6)
    self.variant, self.pool, self.patch_size = variant, pool, patch_size
    self.dtype, self.normalize_features = dtype, normalize_features
    self.embedding = nnx.Conv(
        3, width, (patch_size, patch_size), strides=patch_size,
        padding='VALID', use_bias=not clip, dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=_sharded(nnx.initializers.lecun_normal(),
                             (None, None, None, 'fsdp')),
        rngs=rngs)
    num_tokens = (image_size // patch_size) ** 2
    if pool == 'cls':
      self.cls = nnx.Param(jnp.zeros((1, 1, width), param_dtype))
      num_tokens += 1
    else:
      self.cls = None
    self.pos_embedding = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (1, num_tokens, width),
                                 param_dtype))
    norm_kwargs = dict(epsilon=eps, param_dtype=param_dtype, rngs=rngs)
    self.pre_norm = nnx.LayerNorm(width, **norm_kwargs) if clip else None
    dense_kwargs = dict(lora_rank=lora_rank, lora_alpha=lora_alpha,
                        dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    activation = quick_gelu if clip else exact_gelu
    self.blocks = nnx.List([
        Block(width, mlp_dim, num_heads, activation=activation, eps=eps,
              drop_path_rate=drop_path_rate, dense_kwargs=dense_kwargs,
              rngs=rngs)
        for _ in range(depth)
    ])
    self.encoder_norm = nnx.LayerNorm(width, **norm_kwargs)
    feature_dim = width
    if projection_dim:
      self.projection = nnx.Linear(
          width, projection_dim, use_bias=False, dtype=dtype,
          param_dtype=param_dtype, kernel_init=_sharded(nnx.initializers.lecun_normal(),
                               ('fsdp', None)), rngs=rngs)
      feature_dim = projection_dim
    else:
      self.projection = None
    self.head = (nnx.Linear(feature_dim, num_classes, dtype=dtype,
                            param_dtype=param_dtype,
                            kernel_init=nnx.initializers.zeros, rngs=rngs)
                 if num_classes else None)

  def features(self, images: jax.Array, *, train: bool = False,
               dropout_key: Optional[jax.Array] = None) -> jax.Array:
    """The pooled (and projected) image feature, before the head."""
    x = self.embedding(images)
    batch = x.shape[0]
    x = x.reshape(batch, -1, x.shape[-1])
    if self.cls is not None:
      cls = jnp.broadcast_to(self.cls[...], (batch, 1, x.shape[-1]))
      x = jnp.concatenate([cls.astype(x.dtype), x], axis=1)
    x = x + self.pos_embedding[...].astype(x.dtype)
    if self.pre_norm is not None:
      x = self.pre_norm(x)
    for i, block in enumerate(self.blocks):
      key = (jax.random.fold_in(dropout_key, i)
             if train and dropout_key is not None else None)
      x = block(x, key)
    x = self.encoder_norm(x)
    x = x[:, 0] if self.pool == 'cls' else x.mean(axis=1)
    if self.projection is not None:
      x = self.projection(x)
    return x

  def __call__(self, images: jax.Array, *, train: bool = False,
               dropout_key: Optional[jax.Array] = None) -> jax.Array:
    """Logits (or the feature when there is no head) of NHWC images."""
    x = self.features(images, train=train, dropout_key=dropout_key)
    if self.normalize_features:  # In float32, whatever the dtype.
      f = x.astype(jnp.float32)
      x = (f / jnp.linalg.norm(f, axis=-1, keepdims=True)).astype(x.dtype)
    return self.head(x) if self.head is not None else x
