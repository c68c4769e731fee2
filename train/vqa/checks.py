"""Refuses a VQA config whose values make no sense, naming every key.

Every recipe's rules (``train.core.config_checks.RULES``), except that
``num_train_steps`` may be 0 (zero-shot: the pre-trained model evaluated),
then the VQA recipe's own, one line each, plus how the batch splits over the
mesh.
"""

import ml_collections

from train.core import config_checks as cc
from train.language import families
from train.vqa import data


def _subset_of(allowed: tuple, what: str, *, empty: bool) -> cc.Where:
  return cc.Where(lambda v: isinstance(v, (tuple, list))
                  and (empty or len(v) > 0) and set(v) <= set(allowed)
                  and len(set(v)) == len(v),
                  f'a tuple of distinct {what} {allowed}'
                  + ('' if empty else ', not empty'))


_PROMPT = cc.Where(lambda v: isinstance(v, str) and '{question}' in v,
                   "a string holding '{question}'")
_ALPHAS = cc.Where(lambda v: isinstance(v, (tuple, list))
                   and cc.Range(0, 1)(tuple(v)),
                   'a tuple of numbers in [0, 1]')

RULES = tuple(r for r in cc.RULES if r[0] != 'num_train_steps') + (
    ('num_train_steps', cc.NON_NEGATIVE),
    ('model.dtype', cc.OneOf(tuple(families.DTYPES))),
    ('model.remat', cc.OneOf((False, True))),
    ('model.lora.rank', cc.POSITIVE),
    ('model.lora.alpha', cc.POSITIVE),
    ('model.lora.dropout', cc.Range(0, 1, hi_open=True)),
    ('model.lora.targets', _subset_of(families.PROJECTIONS, 'projections',
                                      empty=False)),
    ('model.lora.vision', cc.OneOf((False, True))),
    ('data.prompt', _PROMPT),
    ('data.max_len', cc.Range(lo=2)),
    ('data.val_size', cc.NON_NEGATIVE),
    ('data.max_val_examples', cc.NON_NEGATIVE),
    ('data.near_ood', _subset_of(data.NEAR_OOD, 'near-OOD sets', empty=True)),
    ('data.far_ood', _subset_of(data.FAR_OOD, 'far-OOD sets', empty=True)),
    ('data.max_eval_examples', cc.NON_NEGATIVE),
    ('eval.max_new_tokens', cc.POSITIVE),
    ('wise_ft.alphas', _ALPHAS),
    ('optimizer.decay', cc.OneOf(('cosine', 'linear'))),
    ('optimizer.warmup_init_fraction', cc.Range(0, 1)),
    ('optimizer.end_fraction', cc.Range(0, 1)),
    ('micro_batch_size', cc.POSITIVE),
    ('mesh.fsdp', cc.POSITIVE),
    ('mesh.tp', cc.POSITIVE),
    ('smoke.num_train', cc.POSITIVE),
    ('smoke.num_eval', cc.POSITIVE),
    ('smoke.image_size', cc.Range(lo=8)),
)


def batch_shards(config: ml_collections.ConfigDict, num_devices: int) -> int:
  """How many ways a batch is split: every device not on the 'tp' axis."""
  return max(num_devices // max(config.mesh.tp, 1), 1)


def _batch_problems(config: ml_collections.ConfigDict,
                    shards: int) -> list[str]:
  micro, batch = config.micro_batch_size, config.batch_size
  if not (isinstance(micro, int) and isinstance(batch, int) and micro > 0
          and batch > 0):
    return []
  if batch % micro:
    return [f'config.micro_batch_size={micro}: must divide'
            f' config.batch_size={batch}']
  if micro % shards:
    return [f'config.micro_batch_size={micro}: must be a multiple of the'
            f' {shards} batch shards (devices / mesh.tp)']
  return []


def problems(config: ml_collections.ConfigDict, *,
             num_devices: int) -> list[str]:
  """One line per bad value (empty when the config is fine)."""
  shards = batch_shards(config, num_devices)
  out = cc.problems(config, num_devices=shards, rules=RULES, cross_field=())
  out += _batch_problems(config, shards)
  if config.smoke.enabled:
    if config.data.val_size >= config.smoke.num_train:
      out.append(f'config.data.val_size={config.data.val_size}: must be below'
                 f' config.smoke.num_train={config.smoke.num_train}')
  else:
    for key in ('model.path', 'data.dir'):
      section, field = key.split('.')
      if not config[section][field]:
        out.append(f'config.{key}={config[section][field]!r}: must name a'
                   ' folder (or set config.smoke.enabled=True)')
  return out


def check(config: ml_collections.ConfigDict, *, num_devices: int) -> None:
  """Raises ``ValueError`` naming every bad key and what it allows."""
  cc.refuse(problems(config, num_devices=num_devices))
