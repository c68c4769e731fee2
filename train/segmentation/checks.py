"""Refuses a segmentation config whose values make no sense, naming each key.

Every recipe's rules (``train.core.config_checks.RULES``: optimizer, steps,
checkpoints, ...), then this recipe's, one line each.
"""

import re

import ml_collections

from train.core import config_checks as cc
from train.segmentation import corruptions


def _pair(lo: float, what: str) -> cc.Where:
  return cc.Where(lambda v: isinstance(v, (tuple, list)) and len(v) == 2
                  and all(isinstance(x, (int, float)) and x > lo for x in v),
                  f'a pair of {what} > {lo}')


def _subset_of(allowed: tuple, what: str) -> cc.Where:
  return cc.Where(lambda v: isinstance(v, (tuple, list)) and v
                  and set(v) <= set(allowed),
                  f'a non-empty tuple of {what} {allowed}')


def _compiles(pattern) -> bool:
  try:
    re.compile(pattern)
  except (re.error, TypeError):
    return False
  return isinstance(pattern, str)


_PATTERNS = cc.Where(
    lambda v: isinstance(v, (tuple, list)) and all(_compiles(p) for p in v),
    'a tuple of regular expressions (re.compile) over leaf paths')


RULES = cc.RULES + (
    ('train_mode', cc.OneOf(('finetune', 'linear_probe'))),
    ('optimizer.name', cc.OneOf(('adamw', 'l2sp', 'spd', 'projection'))),
    ('optimizer.decay', cc.OneOf(('cosine', 'linear'))),
    ('optimizer.head_weight_decay', cc.NON_NEGATIVE),
    ('optimizer.no_decay', _PATTERNS),
    ('model.decode_channels', cc.POSITIVE),
    ('model.auxiliary_channels', cc.POSITIVE),
    ('model.auxiliary_loss_weight', cc.NON_NEGATIVE),
    ('model.drop_path_rate', cc.Range(0, 1, hi_open=True)),
    ('data.num_classes', cc.Range(2, 254)),
    ('data.scale', _pair(0, 'sizes')),
    ('data.ratio_range', _pair(0, 'ratios')),
    ('data.crop', cc.POSITIVE),
    ('data.cat_max_ratio', cc.Range(0, 1, lo_open=True)),
    ('data.eval_scale', _pair(0, 'sizes')),
    ('data.eval_mode', cc.OneOf(('whole', 'slide'))),
    ('data.slide_crop', cc.POSITIVE),
    ('data.slide_stride', cc.POSITIVE),
    ('data.max_eval_images', cc.NON_NEGATIVE),
    ('data.threads', cc.NON_NEGATIVE),
    ('corruptions.names', _subset_of(corruptions.NAMES, 'corruptions')),
    ('corruptions.severities', _subset_of(corruptions.SEVERITIES,
                                          'severities')),
    ('corruptions.max_images', cc.NON_NEGATIVE),
    ('smoke.num_train', cc.POSITIVE),
    ('smoke.num_val', cc.POSITIVE),
    ('smoke.size', cc.Range(lo=16)),
    ('smoke.per_scene', cc.POSITIVE),
    ('smoke.zoom', cc.POSITIVE),
)


def problems(config: ml_collections.ConfigDict, *,
             num_devices: int) -> list[str]:
  """One line per bad value (empty when the config is fine)."""
  # The ViT recipe's cross-field rules (LP-FT, zero-shot head) are not ours.
  out = cc.problems(config, num_devices=num_devices, rules=RULES,
                    cross_field=())
  if config.smoke.enabled:
    if 8 * config.smoke.zoom > config.smoke.size:
      out.append(f'config.smoke.zoom={config.smoke.zoom}: a digit'
                 f' ({8 * config.smoke.zoom} px) must fit the canvas'
                 f' (config.smoke.size={config.smoke.size})')
  else:
    for key in ('data.dir',) + (() if config.model.tiny else ('model.path',)):
      section, field = key.split('.')
      if not config[section][field]:
        out.append(f'config.{key}={config[section][field]!r}: must name a'
                   ' folder (or use configs/segmentation.py:smoke)')
  if config.data.slide_stride > config.data.slide_crop:
    out.append(f'config.data.slide_stride={config.data.slide_stride}: must'
               f' not exceed config.data.slide_crop={config.data.slide_crop}'
               ' (pixels would be left out)')
  return out


def check(config: ml_collections.ConfigDict, *, num_devices: int) -> None:
  """Raises ``ValueError`` naming every bad key and what it allows."""
  cc.refuse(problems(config, num_devices=num_devices))
