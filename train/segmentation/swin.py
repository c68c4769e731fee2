r"""The Swin Transformer (Liu et al., ICCV 2021) as a Flax NNX backbone.

A hierarchical vision Transformer: the image is cut into ``patch_size``
patches (a strided convolution), then four stages of Transformer blocks whose
self-attention is restricted to non-overlapping ``window_size`` x
``window_size`` windows; every other block shifts the windows by half a
window (a cyclic roll of the feature map, with a mask so that tokens only
attend to tokens that were neighbours before the roll). Between stages a
patch merging layer concatenates each 2 x 2 neighbourhood (4C channels),
normalises it and projects it to 2C: the resolution halves, the width
doubles. Each window's attention adds a learned relative position bias,

.. math::

   \mathrm{Attention}(Q, K, V) = \mathrm{softmax}\Big(
     \frac{Q K^\top}{\sqrt{d}} + B + M\Big) V,
   \quad B_{ij} = T[\Delta y_{ij} + w - 1,\ \Delta x_{ij} + w - 1],

with :math:`T` a table of :math:`(2w - 1)^2` entries per head and :math:`M`
the shifted window's mask (0 within a region, -100 across regions, as the
reference implementation). Sizes that are not multiples of the patch, of the
window or of 2 (patch merging) are zero-padded at the bottom and right, and
the padding is cropped after each block, exactly as ``transformers``'
``SwinBackbone`` does; windows keep their size whatever the resolution (its
``always_partition=True``).

The backbone returns, for each stage, its output *before* patch merging,
normalised by that stage's LayerNorm (``hidden_states_norms.stage{i}``): the
four feature maps at strides 4, 8, 16, 32 (for ``patch_size=4``) that a
dense-prediction head consumes.

Module names follow ``transformers``' ``SwinBackbone`` (version 5 names:
``embeddings.patch_embeddings.projection``, ``embeddings.norm``,
``encoder.layers.{i}.blocks.{j}.{layernorm_before, attention.{q_proj, k_proj,
v_proj, o_proj, relative_position_bias.relative_position_bias_table},
layernorm_after, mlp.{fc1, fc2}}``, ``encoder.layers.{i}.downsample.{norm,
reduction}``, ``hidden_states_norms.stage{i}``) so that
``train.segmentation.pretrained`` maps saved tensors onto them 1:1 (it reads
the older on-disk names, ``attention.self.query`` ..., too).

Stochastic depth (drop path) zeroes whole examples of a residual branch with
a probability rising linearly over the blocks from 0 to ``drop_path_rate``,
and rescales the kept ones by :math:`1 / (1 - p)`; it is the identity when
deterministic. It is applied to both residual branches of a block, as in the
original Swin and mmsegmentation (``transformers``' ``SwinLayer`` applies it
to the attention branch only; the two agree when deterministic).
"""

import dataclasses
import functools
from typing import Optional

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

# The Swin sizes of Liu et al.: embed_dim, depths, num_heads.
SIZES = {
    'tiny': (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    'small': (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    'base': (128, (2, 2, 18, 2), (4, 8, 16, 32)),
    'large': (192, (2, 2, 18, 2), (6, 12, 24, 48)),
}
_DEFAULT_EPS = 1e-5  # torch.nn.LayerNorm's, for the norms without a config eps.


@dataclasses.dataclass(frozen=True)
class SwinConfig:
  """The shape of a Swin backbone (``transformers``' ``SwinConfig`` fields)."""
  embed_dim: int = 96
  depths: tuple[int, ...] = (2, 2, 6, 2)
  num_heads: tuple[int, ...] = (3, 6, 12, 24)
  window_size: int = 7
  patch_size: int = 4
  num_channels: int = 3
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_path_rate: float = 0.1
  layer_norm_eps: float = 1e-5

  @classmethod
  def of_size(cls, size: str, **overrides) -> 'SwinConfig':
    """Swin-T/S/B/L (``'tiny'``, ``'small'``, ``'base'``, ``'large'``)."""
    if size not in SIZES:
      raise ValueError(f'Unknown Swin size {size!r}; known: {sorted(SIZES)}.')
    embed_dim, depths, heads = SIZES[size]
    return cls(embed_dim=embed_dim, depths=depths, num_heads=heads,
               **overrides)

  @property
  def channels(self) -> tuple[int, ...]:
    """Width of each stage's feature map: ``embed_dim * 2**i``."""
    return tuple(self.embed_dim * 2**i for i in range(len(self.depths)))

  def __post_init__(self):
    if len(self.depths) != len(self.num_heads):
      raise ValueError(f'depths {self.depths} and num_heads {self.num_heads}'
                       ' name a different number of stages.')
    for width, heads in zip(self.channels, self.num_heads):
      if width % heads:
        raise ValueError(f'A stage of width {width} cannot split into'
                         f' {heads} heads (num_heads {self.num_heads}).')


def _dense(din, dout, *, use_bias=True, dtype, param_dtype, rngs):
  return nnx.Linear(
      din, dout, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nnx.initializers.truncated_normal(0.02), rngs=rngs)


def _norm(width, eps, *, param_dtype, rngs):
  return nnx.LayerNorm(width, epsilon=eps, param_dtype=param_dtype, rngs=rngs)


def drop_path(x: jax.Array, rate: float, key: Optional[jax.Array]) -> jax.Array:
  """Zeroes whole examples with probability ``rate``, rescales the rest."""
  if rate == 0.0 or key is None:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate,
                              (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


@functools.lru_cache(maxsize=None)
def relative_position_index(window: int) -> np.ndarray:
  """``[w*w, w*w]`` index into the bias table of each query/key pair."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window),
                                indexing='ij')).reshape(2, -1)
  rel = coords[:, :, None] - coords[:, None, :] + window - 1  # 2, N, N
  return rel[0] * (2 * window - 1) + rel[1]


@functools.lru_cache(maxsize=None)
def shift_mask(height: int, width: int, window: int,
               shift: int) -> np.ndarray:
  """``[num_windows, w*w, w*w]``: 0 within a region, -100 across regions.

  The rolled map is cut into 3 x 3 regions (rows and columns split at
  ``-window`` and ``-shift``); two tokens of one window that come from
  different regions were not neighbours before the roll.
  """
  region = np.zeros((height, width), np.float32)
  cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
  label = 0
  for rows in cuts:
    for cols in cuts:
      region[rows, cols] = label
      label += 1
  windows = _partition(region[None, :, :, None], window)[..., 0]  # nW, N
  diff = windows[:, None, :] - windows[:, :, None]
  return np.where(diff != 0, -100.0, 0.0).astype(np.float32)


def _partition(x, window: int):
  """``[B, H, W, C]`` -> ``[B * H/w * W/w, w*w, C]`` (row-major windows)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // window, window, w // window, window, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(-1, window * window, c)


def _unpartition(x, window: int, batch: int, height: int, width: int):
  """The inverse of ``_partition``."""
  c = x.shape[-1]
  x = x.reshape(batch, height // window, width // window, window, window, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height, width, c)


class RelativePositionBias(nnx.Module):
  """The learned table :math:`T`, ``[(2w-1)^2, heads]``."""

  def __init__(self, num_heads: int, window: int, *, param_dtype, rngs):
    self.window = window
    init = nnx.initializers.truncated_normal(0.02)
    self.relative_position_bias_table = nnx.Param(init(
        rngs.params(), ((2 * window - 1) ** 2, num_heads), param_dtype))

  def __call__(self) -> jax.Array:
    n = self.window * self.window
    index = relative_position_index(self.window).reshape(-1)
    bias = self.relative_position_bias_table[...][index].reshape(n, n, -1)
    return bias.transpose(2, 0, 1)  # heads, N, N


class WindowAttention(nnx.Module):
  """Multi-head self-attention within windows, with the relative bias."""

  def __init__(self, width: int, num_heads: int, window: int, *, qkv_bias,
               dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_heads = num_heads
    self.q_proj = _dense(width, width, use_bias=qkv_bias, **kw)
    self.k_proj = _dense(width, width, use_bias=qkv_bias, **kw)
    self.v_proj = _dense(width, width, use_bias=qkv_bias, **kw)
    self.o_proj = _dense(width, width, **kw)
    self.relative_position_bias = RelativePositionBias(
        num_heads, window, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, mask: Optional[np.ndarray],
               batch: int) -> jax.Array:
    """``x``: ``[batch * num_windows, N, C]``; ``mask``: ``[nW, N, N]``."""
    bw, n, c = x.shape
    heads = lambda y: y.reshape(bw, n, self.num_heads, -1)
    q, k, v = (heads(self.q_proj(x)), heads(self.k_proj(x)),
               heads(self.v_proj(x)))
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
    scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
    scores = scores + self.relative_position_bias()[None].astype(scores.dtype)
    if mask is not None:
      scores = scores.reshape(batch, -1, self.num_heads, n, n)
      scores = (scores + mask[None, :, None].astype(scores.dtype)).reshape(
          bw, self.num_heads, n, n)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(bw, n, c)
    return self.o_proj(out)


class Mlp(nnx.Module):
  def __init__(self, width: int, hidden: int, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc1 = _dense(width, hidden, **kw)
    self.fc2 = _dense(hidden, width, **kw)

  def __call__(self, x):
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class SwinBlock(nnx.Module):
  """A (shifted-)window Transformer block on a ``[B, H, W, C]`` map."""

  def __init__(self, config: SwinConfig, width: int, num_heads: int, *,
               shift: int, drop_path_rate: float, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    eps = config.layer_norm_eps
    self.window, self.shift = config.window_size, shift
    self.drop_path_rate = drop_path_rate
    self.layernorm_before = _norm(width, eps, param_dtype=param_dtype,
                                  rngs=rngs)
    self.attention = WindowAttention(width, num_heads, config.window_size,
                                     qkv_bias=config.qkv_bias, **kw)
    self.layernorm_after = _norm(width, eps, param_dtype=param_dtype,
                                 rngs=rngs)
    self.mlp = Mlp(width, int(config.mlp_ratio * width), **kw)

  def __call__(self, x: jax.Array, key: Optional[jax.Array]) -> jax.Array:
    b, h, w, c = x.shape
    ws, shift = self.window, self.shift
    keys = (None, None) if key is None else jax.random.split(key)
    y = self.layernorm_before(x)
    hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
    y = jnp.pad(y, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
    if shift:
      y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
    mask = shift_mask(hp, wp, ws, shift) if shift else None
    y = self.attention(_partition(y, ws), mask, b)
    y = _unpartition(y, ws, b, hp, wp)
    if shift:
      y = jnp.roll(y, (shift, shift), axis=(1, 2))
    x = x + drop_path(y[:, :h, :w], self.drop_path_rate, keys[0])
    y = self.mlp(self.layernorm_after(x))
    return x + drop_path(y, self.drop_path_rate, keys[1])


class PatchMerging(nnx.Module):
  """2 x 2 neighbourhoods -> one token: ``[B, H, W, C]`` ->
  ``[B, H/2, W/2, 2C]``."""

  def __init__(self, width: int, *, dtype, param_dtype, rngs):
    self.norm = _norm(4 * width, _DEFAULT_EPS, param_dtype=param_dtype,
                      rngs=rngs)
    self.reduction = _dense(4 * width, 2 * width, use_bias=False, dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    _, h, w, _ = x.shape
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2],
                         x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
    return self.reduction(self.norm(x))


class SwinStage(nnx.Module):
  """``depth`` blocks (shift 0, w/2, 0, ...) then, but for the last stage,
  patch merging."""

  def __init__(self, config: SwinConfig, stage: int, rates, *, dtype,
               param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    width = config.channels[stage]
    self.blocks = nnx.List([
        SwinBlock(config, width, config.num_heads[stage],
                  shift=0 if j % 2 == 0 else config.window_size // 2,
                  drop_path_rate=rates[j], **kw)
        for j in range(config.depths[stage])])
    last = stage == len(config.depths) - 1
    self.downsample = None if last else PatchMerging(width, **kw)


class PatchEmbeddings(nnx.Module):
  def __init__(self, config: SwinConfig, *, dtype, param_dtype, rngs):
    p = config.patch_size
    self.patch_size = p
    self.projection = nnx.Conv(
        config.num_channels, config.embed_dim, (p, p), strides=p,
        padding='VALID', dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, pixels: jax.Array) -> jax.Array:
    _, h, w, _ = pixels.shape
    p = self.patch_size
    pixels = jnp.pad(pixels, ((0, 0), (0, -h % p), (0, -w % p), (0, 0)))
    return self.projection(pixels)


class Embeddings(nnx.Module):
  def __init__(self, config: SwinConfig, *, dtype, param_dtype, rngs):
    self.patch_embeddings = PatchEmbeddings(
        config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm = _norm(config.embed_dim, _DEFAULT_EPS,
                      param_dtype=param_dtype, rngs=rngs)

  def __call__(self, pixels):
    return self.norm(self.patch_embeddings(pixels))


class Encoder(nnx.Module):
  def __init__(self, config: SwinConfig, *, dtype, param_dtype, rngs):
    total = sum(config.depths)
    rates = [config.drop_path_rate * i / max(total - 1, 1)
             for i in range(total)]
    starts = np.cumsum((0,) + tuple(config.depths))
    self.layers = nnx.List([
        SwinStage(config, i, rates[starts[i]:starts[i + 1]], dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs)
        for i in range(len(config.depths))])


class StageNorms(nnx.Module):
  """``stage1`` ... ``stageN``: the LayerNorm of each feature map."""

  def __init__(self, channels, *, param_dtype, rngs):
    for i, width in enumerate(channels):
      setattr(self, f'stage{i + 1}',
              _norm(width, _DEFAULT_EPS, param_dtype=param_dtype, rngs=rngs))

  def __getitem__(self, i: int) -> nnx.LayerNorm:
    return getattr(self, f'stage{i + 1}')


class Swin(nnx.Module):
  """The Swin backbone: NHWC pixels -> the normalised feature map of each
  stage.

  Args:
    config: its shape.
    dtype: computation dtype (``None``: the params'); softmax in float32 at
      least.
    param_dtype: dtype of the params.
    rngs: initialisation randomness.
  """

  def __init__(self, config: SwinConfig, *, rngs: nnx.Rngs,
               dtype=jnp.float32, param_dtype=jnp.float32):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.config = config
    self.embeddings = Embeddings(config, **kw)
    self.encoder = Encoder(config, **kw)
    self.hidden_states_norms = StageNorms(
        config.channels, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, pixels: jax.Array, *, deterministic: bool = True,
               dropout_key: Optional[jax.Array] = None) -> list[jax.Array]:
    """``pixels [B, H, W, C]`` -> ``[B, ceil(H/4/2**i), ..., C_i]`` per stage.

    ``dropout_key`` drives drop path when not ``deterministic``.
    """
    if not deterministic and dropout_key is None and any(
        b.drop_path_rate for s in self.encoder.layers for b in s.blocks):
      raise ValueError('Swin: deterministic=False needs a dropout_key for'
                       ' drop path.')
    x = self.embeddings(pixels)
    features, block = [], 0
    for i, stage in enumerate(self.encoder.layers):
      for blk in stage.blocks:
        key = (None if deterministic or dropout_key is None
               else jax.random.fold_in(dropout_key, block))
        x = blk(x, key)
        block += 1
      features.append(self.hidden_states_norms[i](x))
      if stage.downsample is not None:
        x = stage.downsample(x)
    return features
