"""Refuses configs whose values have the right type but make no sense.

The flag parser already refuses unknown keys and wrong types; this module
catches the rest before any work starts (a negative learning rate that trains
uphill, ``keep_checkpoints=0`` that deletes every checkpoint, a batch that
cannot be split over the devices, a zero-shot head on a model that is not
CLIP, ...). It is the one place where config rules live: the modules that read
a config trust it. Every rule on one field is one line of ``RULES``:
``(key, allowed)``; a key a config does not have is skipped, so a new field
is one new line::

  ('optimizer.learning_rate', Range(lo=0)),

Rules that relate several fields are functions of the config in
``CROSS_FIELD_RULES``; the demo's own config has ``DEMO_RULES``.

    >>> from configs import tiny
    >>> config = tiny.get_config()
    >>> config.optimizer.learning_rate = -1e-3
    >>> problems(config, num_devices=1)
    ['config.optimizer.learning_rate=-0.001: must be >= 0']
"""

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import ml_collections

from train.vision import vit
from train.core import optimizers
from train.vision import train_modes


@dataclasses.dataclass(frozen=True)
class Range:
  """A number (or each number of a tuple) in ``[lo, hi]``; open ends with ``*_open``."""
  lo: Optional[float] = None
  hi: Optional[float] = None
  lo_open: bool = False
  hi_open: bool = False

  def __call__(self, value: Any) -> bool:
    values = value if isinstance(value, (tuple, list)) else (value,)
    return all(self._ok(v) for v in values)

  def _ok(self, v) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
      return False
    if not math.isfinite(v):
      return False
    if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
      return False
    if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
      return False
    return True

  def __str__(self) -> str:
    if self.hi is None:
      return f'{">" if self.lo_open else ">="} {self.lo}'
    if self.lo is None:
      return f'{"<" if self.hi_open else "<="} {self.hi}'
    return (f'in {"(" if self.lo_open else "["}{self.lo}, {self.hi}'
            f'{")" if self.hi_open else "]"}')


@dataclasses.dataclass(frozen=True)
class OneOf:
  """A value among ``choices``."""
  choices: tuple

  def __call__(self, value: Any) -> bool:
    return value in self.choices

  def __str__(self) -> str:
    return f'one of {self.choices}'


@dataclasses.dataclass(frozen=True)
class Where:
  """Any predicate, with the words that say what it allows."""
  predicate: Callable[[Any], bool]
  description: str

  def __call__(self, value: Any) -> bool:
    return bool(self.predicate(value))

  def __str__(self) -> str:
    return self.description


def _ordered_in_unit(v) -> bool:
  return (len(v) == 2 and Range(0, 1, lo_open=True)(v) and v[0] <= v[1])


def _prompt_templates(v) -> bool:
  return (isinstance(v, (tuple, list)) and len(v) > 0
          and all(isinstance(t, str) and '{}' in t for t in v))


POSITIVE = Range(lo=0, lo_open=True)
NON_NEGATIVE = Range(lo=0)
PROBABILITY = Range(0, 1)

# (key, allowed). mesh.* is checked against the devices by make_mesh, and may
# change when a run resumes.
RULES: Sequence[tuple[str, Any]] = (
    ('seed', NON_NEGATIVE),
    ('model.num_classes', POSITIVE),
    ('model.pool', OneOf(('', 'cls', 'mean'))),
    ('model.drop_path_rate', Range(0, 1, hi_open=True)),
    ('model.lora_rank', NON_NEGATIVE),
    ('model.lora_alpha', NON_NEGATIVE),
    ('model.dtype', OneOf(('', 'float32', 'bfloat16', 'float16'))),
    ('model.param_dtype', OneOf(('float32', 'float64'))),
    ('model.head_init', OneOf(('', 'zeroshot'))),
    ('zeroshot.templates',
     Where(_prompt_templates, 'a non-empty tuple of strings, each with {}')),
    ('dataset.image_size', POSITIVE),
    ('dataset.num_classes', POSITIVE),
    ('dataset.std', POSITIVE),
    ('dataset.crop_fraction', Range(0, 1, lo_open=True)),
    ('dataset.augment.crop_scale',
     Where(_ordered_in_unit, '(lo, hi) with 0 < lo <= hi <= 1')),
    ('dataset.augment.mixup_alpha', NON_NEGATIVE),
    ('dataset.augment.cutmix_alpha', NON_NEGATIVE),
    ('dataset.augment.mix_prob', PROBABILITY),
    ('dataset.augment.switch_prob', PROBABILITY),
    ('dataset.augment.label_smoothing', Range(0, 1, hi_open=True)),
    ('optimizer.name', OneOf(optimizers.METHODS)),
    ('optimizer.learning_rate', NON_NEGATIVE),
    ('optimizer.warmup_steps', NON_NEGATIVE),
    ('optimizer.weight_decay', NON_NEGATIVE),
    ('optimizer.b1', Range(0, 1, hi_open=True)),
    ('optimizer.b2', Range(0, 1, hi_open=True)),
    ('optimizer.eps', NON_NEGATIVE),
    ('optimizer.grad_clip_norm', NON_NEGATIVE),
    ('optimizer.anchor_dtype', OneOf(('', 'float32', 'bfloat16', 'float16'))),
    ('optimizer.max_nonfinite', NON_NEGATIVE),
    ('train_mode', OneOf(train_modes.MODES)),
    ('lp_ft.probe_steps', NON_NEGATIVE),
    ('lp_ft.probe_learning_rate', NON_NEGATIVE),
    ('wise_ft.alphas', PROBABILITY),
    ('batch_size', POSITIVE),
    ('eval_batch_size', POSITIVE),
    ('num_train_steps', POSITIVE),
    ('log_every_steps', POSITIVE),
    ('eval_every_steps', POSITIVE),
    ('checkpoint_every_steps', POSITIVE),
    ('keep_checkpoints', Range(lo=1)),
    ('max_steps_per_run', NON_NEGATIVE),
)

# Global batch sizes that are split over every device of every process.
SPLIT_OVER_DEVICES = ('batch_size', 'eval_batch_size')

# The demo's config (configs/demo.py): its sweep, not a run.
DEMO_RULES: Sequence[tuple[str, Any]] = (
    ('workers', Where(lambda v: isinstance(v, int) and not isinstance(
        v, bool) and v >= 0, 'an integer >= 0 (0: one per CPU core on CPU,'
        ' 1 on an accelerator)')),
    ('min_id_gap', PROBABILITY),
)


def _get(config: ml_collections.ConfigDict, key: str):
  node = config
  for part in key.split('.'):
    if part not in node:
      raise KeyError(key)
    node = node[part]
  return node


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


def _field_problems(config, rules) -> list[str]:
  out = []
  for key, allowed in rules:
    try:
      value = _get(config, key)
    except KeyError:
      continue
    if not allowed(value):
      out.append(f'config.{key}={value!r}: must be {allowed}')
  return out


def problems(config: ml_collections.ConfigDict, *, num_devices: int,
             rules: Sequence[tuple[str, Any]] = RULES,
             cross_field: Sequence[Callable] = CROSS_FIELD_RULES
             ) -> list[str]:
  """One line per value that breaks a rule (empty when the config is fine).

  Args:
    config: a run's config.
    num_devices: the devices a batch is split over.
    rules: the one-field rules; another recipe passes its own list (e.g.
      ``RULES + ...``, as ``train.llm.checks`` does).
    cross_field: the rules relating several fields, likewise.
  """
  out = _field_problems(config, rules)
  for key in SPLIT_OVER_DEVICES:
    try:
      value = _get(config, key)
    except KeyError:
      continue
    if isinstance(value, int) and value > 0 and value % num_devices:
      out.append(f'config.{key}={value}: must be a multiple of the'
                 f' {num_devices} devices')
  for rule in cross_field:
    out += rule(config, num_devices)
  return out


def refuse(found: list[str]) -> None:
  """Raises ``ValueError`` listing ``found`` (one line per problem), if any."""
  if found:
    raise ValueError('Invalid config (nothing was run):\n  '
                     + '\n  '.join(found))


def check(config: ml_collections.ConfigDict, *, num_devices: int,
          **rules) -> None:
  """Raises ``ValueError`` naming every bad key and its allowed range.

  ``rules``: ``rules=`` and ``cross_field=``, as :func:`problems` takes.
  """
  refuse(problems(config, num_devices=num_devices, **rules))


def check_demo(config: ml_collections.ConfigDict, *, num_devices: int) -> None:
  """``check`` for the demo's config: its own fields, its two stages'."""
  found = _field_problems(config, DEMO_RULES)
  for stage in ('foundation', 'finetune'):
    found += [p.replace('config.', f'config.{stage}.', 1) for p in
              problems(config[stage], num_devices=num_devices)]
  refuse(found)
