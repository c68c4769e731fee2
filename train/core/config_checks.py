"""Refuses configs whose values have the right type but make no sense.

The flag parser already refuses unknown keys and wrong types; this module
catches the rest before any work starts (a negative learning rate that trains
uphill, ``keep_checkpoints=0`` that deletes every checkpoint, a batch that
cannot be split over the devices, ...). With each recipe's ``checks`` module
it is where config rules live: the modules that read a config trust it. Every rule on one field is one line of ``RULES``:
``(key, allowed)``; a key a config does not have is skipped, so a new field
is one new line::

  ('optimizer.learning_rate', Range(lo=0)),

The rules here are the fields every recipe has; each recipe's ``checks``
module adds its own fields and its rules that relate several fields.

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

from train.core import optimizers


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


POSITIVE = Range(lo=0, lo_open=True)
NON_NEGATIVE = Range(lo=0)
PROBABILITY = Range(0, 1)

# (key, allowed): the fields every recipe's config has (the seed, the
# optimizer, the schedule of steps and checkpoints). A recipe adds its own
# (``train.vision.checks``, ``train.llm.checks``).
RULES: Sequence[tuple[str, Any]] = (
    ('seed', NON_NEGATIVE),
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

def _get(config: ml_collections.ConfigDict, key: str):
  node = config
  for part in key.split('.'):
    if part not in node:
      raise KeyError(key)
    node = node[part]
  return node


def _ftp_k_in_unit(config, num_devices) -> list[str]:
  """With ``optimizer.name=ftp``, ``optimizer.weight_decay`` is FTP's k."""
  del num_devices
  opt = config.get('optimizer', {})
  k = opt.get('weight_decay')
  if opt.get('name') == 'ftp' and not Range(0, 1)(k):
    return [f'config.optimizer.weight_decay={k!r}: with optimizer.name=ftp it'
            " is FTP's k and must be in [0, 1]"]
  return []


# Rules relating several fields that every recipe has (its optimizer's).
CROSS_FIELD_RULES = (_ftp_k_in_unit,)


def field_problems(config, rules) -> list[str]:
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
             cross_field: Sequence[Callable] = ()
             ) -> list[str]:
  """One line per value that breaks a rule (empty when the config is fine).

  Args:
    config: a run's config.
    num_devices: the devices a batch is split over.
    rules: the one-field rules; a recipe passes its own list (``RULES +
      ...``, as ``train.vision.checks`` and ``train.llm.checks`` do).
    cross_field: the recipe's rules relating several fields (besides
      ``CROSS_FIELD_RULES``, the optimizer's, which every recipe has).
  """
  out = field_problems(config, rules)
  for key in SPLIT_OVER_DEVICES:
    try:
      value = _get(config, key)
    except KeyError:
      continue
    if isinstance(value, int) and value > 0 and value % num_devices:
      out.append(f'config.{key}={value}: must be a multiple of the'
                 f' {num_devices} devices')
  for rule in (*CROSS_FIELD_RULES, *cross_field):
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
