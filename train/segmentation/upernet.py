r"""UperNet (Xiao et al., ECCV 2018) on a Swin backbone, in Flax NNX.

The decode head fuses the backbone's four feature maps :math:`C_1 .. C_4`
(strides 4 to 32):

1. a pyramid pooling module (PSPNet) on :math:`C_4`: for each scale
   :math:`s \in` ``pool_scales`` (1, 2, 3, 6), adaptive average pooling to
   :math:`s \times s` (PyTorch's bins: :math:`[\lfloor i H / s \rfloor,
   \lceil (i + 1) H / s \rceil)`), a 1 x 1 conv block, bilinear upsampling
   back; the four and :math:`C_4` are concatenated and a 3 x 3 conv block
   (``bottleneck``) gives :math:`L_4`;
2. an FPN: lateral 1 x 1 conv blocks :math:`L_i` of :math:`C_{1..3}`, a top
   down path :math:`L_{i-1} \mathrel{+}= \mathrm{up}(L_i)`, a 3 x 3 conv
   block on each (``fpn_convs``), everything upsampled to :math:`L_1`'s
   size, concatenated, fused by a 3 x 3 conv block (``fpn_bottleneck``) and
   classified by a 1 x 1 conv (``classifier``).

A conv block is conv (no bias) + BatchNorm + ReLU. The optional auxiliary
FCN head reads :math:`C_3` (``auxiliary_num_convs`` 3 x 3 conv blocks, an
optional concatenation with its input, a 1 x 1 classifier). Both heads'
logits are upsampled bilinearly to the input size. Every bilinear resize is
PyTorch's ``interpolate(mode='bilinear', align_corners=False)`` (no
antialiasing, unlike ``jax.image.resize`` when it shrinks), written as two
small interpolation matrices.

BatchNorm: with ``deterministic=True`` (evaluation) it uses the running
statistics; with ``deterministic=False`` (training) it normalises with the
batch's statistics and updates the running ones (``nnx.BatchNorm``,
momentum 0.9 = PyTorch's 0.1, epsilon 1e-5): those are ``nnx.BatchStat``
variables, state the training step must carry along with the params.

Names follow ``transformers``' ``UperNetForSemanticSegmentation``
(``backbone.*``, ``decode_head.{psp_modules.i, bottleneck, lateral_convs.i,
fpn_convs.i, fpn_bottleneck, classifier}``, ``auxiliary_head.{convs.i,
conv_cat, classifier}``, each conv block ``{conv, batch_norm}``); only the
pyramid pooling blocks drop ``transformers``' ``.1`` (its pooling layer
``.0`` has no weights).
"""

import dataclasses
import functools
from typing import Any, Optional

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from train.segmentation import swin

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class SegConfig:
  """Everything that builds a Swin + UperNet (``UperNetConfig`` fields)."""
  num_labels: int
  backbone: swin.SwinConfig = swin.SwinConfig()
  hidden_size: int = 512           # The decode head's channels.
  pool_scales: tuple[int, ...] = (1, 2, 3, 6)
  use_auxiliary_head: bool = True
  auxiliary_channels: int = 256
  auxiliary_num_convs: int = 1
  auxiliary_concat_input: bool = False
  auxiliary_loss_weight: float = 0.4
  auxiliary_in_index: int = 2      # The feature map the FCN head reads.
  loss_ignore_index: int = 255

  def __post_init__(self):
    stages = len(self.backbone.depths)
    if self.use_auxiliary_head and not 0 <= self.auxiliary_in_index < stages:
      raise ValueError(f'auxiliary_in_index={self.auxiliary_in_index}: the'
                       f' backbone has {stages} stages.')
    if self.num_labels < 1:
      raise ValueError(f'num_labels={self.num_labels}: at least 1.')

  @classmethod
  def from_hf(cls, hf: dict, *, where: str) -> 'SegConfig':
    """From an ``UperNetConfig`` config.json (with a ``SwinConfig``
    backbone); refuses what the model does not implement by key name."""
    return _from_hf(cls, hf, where)

  @classmethod
  def tiny(cls, num_labels: int, **overrides) -> 'SegConfig':
    """A small Swin + UperNet for smoke runs and tests (window 4)."""
    backbone = swin.SwinConfig(embed_dim=16, depths=(1, 1, 2, 1),
                               num_heads=(1, 2, 2, 4), window_size=4,
                               drop_path_rate=0.1)
    kwargs = dict(num_labels=num_labels, backbone=backbone, hidden_size=32,
                  auxiliary_channels=16)
    kwargs.update(overrides)
    return cls(**kwargs)

  def to_hf(self) -> dict:
    """The config.json ``transformers`` reads (UperNetConfig + SwinConfig)."""
    return _to_hf(self)


# SwinConfig keys we read, and the values we support of those we do not.
_SWIN_KEYS = ('embed_dim', 'depths', 'num_heads', 'window_size', 'patch_size',
              'num_channels', 'mlp_ratio', 'qkv_bias', 'drop_path_rate',
              'layer_norm_eps')
_SWIN_FIXED = {'model_type': 'swin', 'use_absolute_embeddings': False,
               'hidden_act': 'gelu', 'hidden_dropout_prob': 0.0,
               'attention_probs_dropout_prob': 0.0}
_HEAD_KEYS = ('hidden_size', 'pool_scales', 'use_auxiliary_head',
              'auxiliary_channels', 'auxiliary_num_convs',
              'auxiliary_concat_input', 'auxiliary_loss_weight',
              'loss_ignore_index')


def _stages(n: int) -> list[str]:
  return [f'stage{i + 1}' for i in range(n)]


def swin_from_hf(hf: dict, *, where: str) -> swin.SwinConfig:
  """A ``SwinConfig`` dict -> ours; unsupported values refused by key."""
  for key, value in _SWIN_FIXED.items():
    if key in hf and hf[key] != value:
      raise ValueError(f'{where}: {key}={hf[key]!r} is not supported (the'
                       f' Swin here implements {key}={value!r}).')
  kwargs = {k: hf[k] for k in _SWIN_KEYS if k in hf}
  for k in ('depths', 'num_heads'):
    if k in kwargs:
      kwargs[k] = tuple(kwargs[k])
  for k in ('patch_size', 'window_size'):
    if isinstance(kwargs.get(k), (list, tuple)):
      if len(set(kwargs[k])) != 1:
        raise ValueError(f'{where}: {k}={kwargs[k]!r}: only square sizes.')
      kwargs[k] = kwargs[k][0]
  return swin.SwinConfig(**kwargs)


def _from_hf(cls, hf: dict, where: str) -> 'SegConfig':
  if hf.get('model_type') != 'upernet':
    raise ValueError(f'{where}: model_type={hf.get("model_type")!r}; expected'
                     " 'upernet' (or read a Swin backbone's config with"
                     ' pretrained.read_config).')
  for key in ('backbone', 'use_timm_backbone', 'use_pretrained_backbone'):
    if hf.get(key):
      raise ValueError(f'{where}: {key}={hf[key]!r} is not supported: the'
                       ' backbone is described by backbone_config (a Swin).')
  backbone_hf = hf.get('backbone_config') or {}
  if backbone_hf.get('model_type') != 'swin':
    raise ValueError(f'{where}: backbone_config.model_type='
                     f'{backbone_hf.get("model_type")!r}: only a Swin'
                     ' backbone is supported.')
  backbone = swin_from_hf(backbone_hf, where=f'{where} backbone_config')
  out = backbone_hf.get('out_features')
  if out is not None and list(out) != _stages(len(backbone.depths)):
    raise ValueError(f'{where}: backbone_config.out_features={out!r}: the'
                     ' UperNet head here reads every stage'
                     f' ({_stages(len(backbone.depths))}).')
  labels = hf.get('id2label') or {}
  kwargs = {k: hf[k] for k in _HEAD_KEYS if k in hf}
  kwargs['pool_scales'] = tuple(kwargs.get('pool_scales', (1, 2, 3, 6)))
  config = cls(num_labels=hf.get('num_labels', len(labels) or 2),
               backbone=backbone, **kwargs)
  cin = backbone.channels[config.auxiliary_in_index]
  aux_in = hf.get('auxiliary_in_channels')
  if config.use_auxiliary_head and aux_in not in (None, cin):
    raise ValueError(f'{where}: auxiliary_in_channels={aux_in} but stage'
                     f' {config.auxiliary_in_index + 1} has {cin} channels.')
  if (config.use_auxiliary_head and config.auxiliary_num_convs == 0
      and cin != config.auxiliary_channels):
    raise ValueError(f'{where}: auxiliary_num_convs=0 needs'
                     f' auxiliary_channels={cin} (the input width).')
  return config


def swin_to_hf(b: swin.SwinConfig) -> dict:
  """Ours -> a ``SwinConfig`` dict, all four stages out."""
  hf = {k: getattr(b, k) for k in _SWIN_KEYS}
  hf.update(depths=list(b.depths), num_heads=list(b.num_heads),
            out_features=_stages(len(b.depths)), **_SWIN_FIXED)
  return hf


def _to_hf(config: 'SegConfig') -> dict:
  hf = {k: getattr(config, k) for k in _HEAD_KEYS}
  hf.update(model_type='upernet', pool_scales=list(config.pool_scales),
            backbone_config=swin_to_hf(config.backbone),
            num_labels=config.num_labels,
            id2label={str(i): f'LABEL_{i}' for i in range(config.num_labels)},
            label2id={f'LABEL_{i}': i for i in range(config.num_labels)},
            architectures=['UperNetForSemanticSegmentation'])
  return hf


@functools.lru_cache(maxsize=None)
def resize_matrix(size_in: int, size_out: int) -> np.ndarray:
  r"""``[out, in]`` weights of PyTorch's bilinear ``align_corners=False``.

  Output pixel :math:`o` samples :math:`x = \max(0, (o + 1/2) s - 1/2)`,
  :math:`s = n_{in} / n_{out}`, between :math:`\lfloor x \rfloor` and the
  next pixel (clamped at the border).
  """
  scale = size_in / size_out
  src = np.maximum((np.arange(size_out) + 0.5) * scale - 0.5, 0.0)
  lo = np.floor(src).astype(int)
  hi = np.minimum(lo + 1, size_in - 1)
  frac = src - lo
  m = np.zeros((size_out, size_in), np.float64)
  np.add.at(m, (np.arange(size_out), lo), 1.0 - frac)
  np.add.at(m, (np.arange(size_out), hi), frac)
  return m.astype(np.float32)


@functools.lru_cache(maxsize=None)
def pool_matrix(size_in: int, size_out: int) -> np.ndarray:
  """``[out, in]`` weights of PyTorch's ``adaptive_avg_pool``: bin ``i``
  averages ``[floor(i n / s), ceil((i + 1) n / s))``."""
  m = np.zeros((size_out, size_in), np.float32)
  for i in range(size_out):
    start = (i * size_in) // size_out
    end = -(-((i + 1) * size_in) // size_out)
    m[i, start:end] = 1.0 / (end - start)
  return m


def _separable(x: jax.Array, rows: np.ndarray, cols: np.ndarray) -> jax.Array:
  y = jnp.einsum('oh,bhwc->bowc', rows.astype(x.dtype), x, precision=_HIGHEST)
  return jnp.einsum('pw,bowc->bopc', cols.astype(x.dtype), y,
                    precision=_HIGHEST)


def bilinear_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear resize of ``[B, H, W, C]`` to ``size`` (PyTorch's)."""
  _, h, w, _ = x.shape
  if (h, w) == tuple(size):
    return x
  return _separable(x, resize_matrix(h, size[0]), resize_matrix(w, size[1]))


def adaptive_avg_pool(x: jax.Array, scale: int) -> jax.Array:
  _, h, w, _ = x.shape
  return _separable(x, pool_matrix(h, scale), pool_matrix(w, scale))


class ConvModule(nnx.Module):
  """conv (no bias) + BatchNorm + ReLU."""

  def __init__(self, cin: int, cout: int, kernel: int, *, padding: int = 0,
               dilation: int = 1, dtype, param_dtype, rngs):
    self.conv = nnx.Conv(cin, cout, (kernel, kernel),
                         padding=((padding, padding), (padding, padding)),
                         kernel_dilation=dilation, use_bias=False, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
    self.batch_norm = nnx.BatchNorm(cout, momentum=0.9, epsilon=1e-5,
                                    dtype=dtype, param_dtype=param_dtype,
                                    rngs=rngs)

  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    x = self.batch_norm(self.conv(x), use_running_average=not train)
    return jax.nn.relu(x)


def _classifier(cin, num_labels, *, dtype, param_dtype, rngs):
  return nnx.Conv(cin, num_labels, (1, 1), dtype=dtype,
                  param_dtype=param_dtype,
                  kernel_init=nnx.initializers.normal(0.01), rngs=rngs)


class UperNetHead(nnx.Module):
  """Pyramid pooling on the last map, FPN fusion of all four, classifier."""

  def __init__(self, config: SegConfig, in_channels, **kw):
    c = config.hidden_size
    self.pool_scales = tuple(config.pool_scales)
    self.psp_modules = nnx.List([ConvModule(in_channels[-1], c, 1, **kw)
                                 for _ in self.pool_scales])
    self.bottleneck = ConvModule(
        in_channels[-1] + len(self.pool_scales) * c, c, 3, padding=1, **kw)
    self.lateral_convs = nnx.List([ConvModule(cin, c, 1, **kw)
                                   for cin in in_channels[:-1]])
    self.fpn_convs = nnx.List([ConvModule(c, c, 3, padding=1, **kw)
                               for _ in in_channels[:-1]])
    self.fpn_bottleneck = ConvModule(len(in_channels) * c, c, 3, padding=1,
                                     **kw)
    self.classifier = _classifier(c, config.num_labels, **kw)

  def _psp(self, x: jax.Array, train: bool) -> jax.Array:
    size = x.shape[1:3]
    outs = [x] + [bilinear_resize(block(adaptive_avg_pool(x, s), train), size)
                  for s, block in zip(self.pool_scales, self.psp_modules)]
    return self.bottleneck(jnp.concatenate(outs, axis=-1), train)

  def __call__(self, features: list[jax.Array], train: bool) -> jax.Array:
    laterals = [conv(f, train) for conv, f in zip(self.lateral_convs,
                                                   features)]
    laterals.append(self._psp(features[-1], train))
    for i in range(len(laterals) - 1, 0, -1):
      laterals[i - 1] = laterals[i - 1] + bilinear_resize(
          laterals[i], laterals[i - 1].shape[1:3])
    outs = [conv(l, train) for conv, l in zip(self.fpn_convs, laterals)]
    outs.append(laterals[-1])
    size = outs[0].shape[1:3]
    fused = jnp.concatenate([bilinear_resize(o, size) for o in outs], axis=-1)
    return self.classifier(self.fpn_bottleneck(fused, train))


class FCNHead(nnx.Module):
  """The auxiliary head: 3 x 3 conv blocks on one feature map, classifier."""

  def __init__(self, config: SegConfig, in_channels, **kw):
    cin, c = in_channels[config.auxiliary_in_index], config.auxiliary_channels
    self.in_index = config.auxiliary_in_index
    self.convs = nnx.List([
        ConvModule(cin if i == 0 else c, c, 3, padding=1, **kw)
        for i in range(config.auxiliary_num_convs)])
    # As transformers': the classifier reads ``auxiliary_channels`` (so
    # without convs the input must have that width; from_hf checks it).
    self.conv_cat = (ConvModule(cin + c, c, 3, padding=1, **kw)
                     if config.auxiliary_concat_input else None)
    self.classifier = _classifier(c, config.num_labels, **kw)

  def __call__(self, features: list[jax.Array], train: bool) -> jax.Array:
    x = features[self.in_index]
    y = x
    for conv in self.convs:
      y = conv(y, train)
    if self.conv_cat is not None:
      y = self.conv_cat(jnp.concatenate([x, y], axis=-1), train)
    return self.classifier(y)


class UperNet(nnx.Module):
  """Swin backbone + UperNet decode head (+ auxiliary FCN head).

  Args:
    config: the model's shape.
    rngs: initialisation randomness; its ``dropout`` stream (``default``
      when absent) drives drop path in training when no key is passed.
    dtype: computation dtype; param_dtype: the params'.

  ``UperNet(SegConfig.tiny(3), rngs=nnx.Rngs(0))(pixels)`` with ``pixels``
  ``[B, H, W, 3]`` gives ``{'logits', 'auxiliary_logits'}``, each
  ``[B, H, W, 3]``. Eager construction compiles one small XLA program per
  parameter shape; under ``nnx.jit`` / ``nnx.eval_shape`` it is one trace.
  """

  def __init__(self, config: SegConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.config = config
    self.backbone = swin.Swin(config.backbone, **kw)
    channels = config.backbone.channels
    self.decode_head = UperNetHead(config, channels, **kw)
    self.auxiliary_head = (FCNHead(config, channels, **kw)
                           if config.use_auxiliary_head else None)
    self.dropout_rngs = rngs['dropout'].fork()

  def __call__(self, pixels: jax.Array, *, deterministic: bool = True,
               dropout_key: Optional[jax.Array] = None) -> dict[str, Any]:
    """``pixels [B, H, W, 3]`` (normalised) -> ``{'logits': [B, H, W, K]}``
    (and ``'auxiliary_logits'`` with the auxiliary head).

    ``deterministic=False`` trains: drop path on (its key ``dropout_key``, or
    the model's ``dropout`` stream), BatchNorm on batch statistics.
    """
    train = not deterministic
    if train and dropout_key is None:
      dropout_key = self.dropout_rngs()
    features = self.backbone(pixels, deterministic=deterministic,
                             dropout_key=dropout_key)
    size = pixels.shape[1:3]
    out = {'logits': bilinear_resize(self.decode_head(features, train), size)}
    if self.auxiliary_head is not None:
      out['auxiliary_logits'] = bilinear_resize(
          self.auxiliary_head(features, train), size)
    return out


def create(config: SegConfig, *, seed: int = 0, dtype=jnp.float32,
           param_dtype=jnp.float32) -> UperNet:
  """``UperNet(config, rngs=nnx.Rngs(seed))``, initialised as one program.

  Eager construction compiles one XLA program per parameter shape (half a
  minute for the tiny model on a busy CPU). Here the construction is traced
  once and, on CPU, compiled without LLVM's optimisation passes (the program
  runs once): the same keys, so the same values up to float rounding, in a
  few seconds.
  """
  def make():
    return UperNet(config, rngs=nnx.Rngs(seed), dtype=dtype,
                   param_dtype=param_dtype)
  graphdef = nnx.graphdef(nnx.eval_shape(make))
  options = ({'xla_backend_optimization_level': 0}
             if jax.default_backend() == 'cpu' else None)
  state = jax.jit(lambda: nnx.state(make()), compiler_options=options)()
  return nnx.merge(graphdef, state)
