"""Refuses a ViT recipe's config whose values make no sense, naming every key.

The rules of every recipe (``train.core.config_checks.RULES``: seed,
optimizer, steps, checkpoints) and this recipe's own: the model, the data
and its augmentation, the train mode, WiSE-FT; and the rules that relate
several fields (LP-FT needs a probe, a zero-shot head needs a CLIP tower, the
mesh covers the devices).

    >>> from configs import tiny
    >>> config = tiny.get_config()
    >>> config.model.drop_path_rate = 1.0
    >>> problems(config, num_devices=1)
    ['config.model.drop_path_rate=1.0: must be in [0, 1)']
"""

from typing import Any, Sequence

import ml_collections

from train.core import config_checks as cc
from train.vision import train_modes
from train.vision import vit


def _ordered_in_unit(v) -> bool:
  return (len(v) == 2 and cc.Range(0, 1, lo_open=True)(v) and v[0] <= v[1])


def _prompt_templates(v) -> bool:
  return (isinstance(v, (tuple, list)) and len(v) > 0
          and all(isinstance(t, str) and '{}' in t for t in v))


RULES: Sequence[tuple[str, Any]] = cc.RULES + (
    ('model.num_classes', cc.POSITIVE),
    ('model.pool', cc.OneOf(('', 'cls', 'mean'))),
    ('model.drop_path_rate', cc.Range(0, 1, hi_open=True)),
    ('model.lora_rank', cc.NON_NEGATIVE),
    ('model.lora_alpha', cc.NON_NEGATIVE),
    ('model.dtype', cc.OneOf(('', 'float32', 'bfloat16', 'float16'))),
    ('model.param_dtype', cc.OneOf(('float32', 'float64'))),
    ('model.head_init', cc.OneOf(('', 'zeroshot'))),
    ('zeroshot.templates',
     cc.Where(_prompt_templates, 'a non-empty tuple of strings, each with {}')),
    ('dataset.image_size', cc.POSITIVE),
    ('dataset.num_classes', cc.POSITIVE),
    ('dataset.std', cc.POSITIVE),
    ('dataset.crop_fraction', cc.Range(0, 1, lo_open=True)),
    ('dataset.augment.crop_scale',
     cc.Where(_ordered_in_unit, '(lo, hi) with 0 < lo <= hi <= 1')),
    ('dataset.augment.mixup_alpha', cc.NON_NEGATIVE),
    ('dataset.augment.cutmix_alpha', cc.NON_NEGATIVE),
    ('dataset.augment.mix_prob', cc.PROBABILITY),
    ('dataset.augment.switch_prob', cc.PROBABILITY),
    ('dataset.augment.label_smoothing', cc.Range(0, 1, hi_open=True)),
    ('train_mode', cc.OneOf(train_modes.MODES)),
    ('lp_ft.probe_steps', cc.NON_NEGATIVE),
    ('lp_ft.probe_learning_rate', cc.NON_NEGATIVE),
    ('wise_ft.alphas', cc.PROBABILITY),
)


def _lp_ft_has_a_probe(config, num_devices) -> list[str]:
  del num_devices
  if config.get('train_mode') == 'lp_ft' and config.lp_ft.probe_steps < 1:
    return [f'config.train_mode=lp_ft needs config.lp_ft.probe_steps >= 1,'
            f' got {config.lp_ft.probe_steps}']
  return []


def _zero_shot_head_fits(config, num_devices) -> list[str]:
  """A zero-shot head needs a CLIP tower with a projection, and its text."""
  del num_devices
  if config.get('model', {}).get('head_init') != 'zeroshot':
    return []
  shape = vit.MODEL_CONFIGS.get(config.model.name)
  out = []
  if shape is None or shape.variant != 'clip' or not shape.projection_dim:
    out.append(f'config.model.name={config.model.name!r} is not a CLIP'
               ' image tower with a projection')
  if not config.pretrained.path:
    out.append('config.pretrained.path is empty (the text tower comes'
               ' from it)')
  if config.model.num_classes != config.dataset.num_classes:
    out.append(f'config.model.num_classes={config.model.num_classes}'
               ' differs from config.dataset.num_classes='
               f'{config.dataset.num_classes}')
  return ["config.model.head_init='zeroshot': " + p for p in out]


def _mesh_covers_the_devices(config, num_devices) -> list[str]:
  if 'mesh' not in config:
    return []
  data, fsdp = config.mesh.data, config.mesh.fsdp
  if fsdp < 1 or (data > 0 and data * fsdp != num_devices) or (
      num_devices % fsdp):
    return [f'config.mesh: data={data} x fsdp={fsdp} does not cover the'
            f' {num_devices} devices (data=-1: all that fsdp leaves)']
  return []


CROSS_FIELD_RULES = (_lp_ft_has_a_probe, _zero_shot_head_fits,
                     _mesh_covers_the_devices)


def problems(config: ml_collections.ConfigDict, *,
             num_devices: int) -> list[str]:
  """One line per value that breaks a rule (empty when the config is fine)."""
  return cc.problems(config, num_devices=num_devices, rules=RULES,
                     cross_field=CROSS_FIELD_RULES)


def check(config: ml_collections.ConfigDict, *, num_devices: int) -> None:
  """Raises ``ValueError`` naming every bad key and its allowed range."""
  cc.refuse(problems(config, num_devices=num_devices))
