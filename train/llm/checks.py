"""Refuses an LLM config whose values make no sense, naming every key.

Every recipe's rules (``train.core.config_checks.RULES``: optimizer, steps,
checkpoints, ...), then the LLM recipe's own, one line each, plus how the
batch splits over the mesh.
"""

import ml_collections

from train.core import config_checks as cc
from train.llm import commonsense
from train.llm import evaluate
from train.language import families


def _subset_of(allowed: tuple, what: str) -> cc.Where:
  return cc.Where(lambda v: isinstance(v, (tuple, list)) and len(v) > 0
                  and set(v) <= set(allowed),
                  f'a non-empty tuple of {what} {allowed}')


RULES = cc.RULES + (
    ('model.dtype', cc.OneOf(tuple(families.DTYPES))),
    ('model.remat', cc.OneOf(('NONE', 'BLOCK', 'DECODER'))),
    ('model.lora.rank', cc.POSITIVE),
    ('model.lora.alpha', cc.POSITIVE),
    ('model.lora.dropout', cc.Range(0, 1, hi_open=True)),
    ('model.lora.targets', _subset_of(families.PROJECTIONS, 'projections')),
    ('data.cutoff_len', cc.Range(lo=2)),
    ('data.val_size', cc.NON_NEGATIVE),
    ('data.max_eval_examples', cc.NON_NEGATIVE),
    ('data.test_sets', _subset_of(commonsense.DATASETS, 'sets')),
    ('eval.modes', _subset_of(evaluate.MODES, 'modes')),
    ('eval.max_new_tokens', cc.POSITIVE),
    ('optimizer.decay', cc.OneOf(('cosine', 'linear'))),
    ('micro_batch_size', cc.POSITIVE),
    ('mesh.fsdp', cc.POSITIVE),
    ('mesh.tp', cc.POSITIVE),
    ('smoke.num_train', cc.POSITIVE),
    ('smoke.num_test', cc.POSITIVE),
)


def batch_shards(config: ml_collections.ConfigDict, num_devices: int) -> int:
  """How many ways a batch is split: every device not on the 'tp' axis."""
  return max(num_devices // max(config.mesh.tp, 1), 1)


def problems(config: ml_collections.ConfigDict, *,
             num_devices: int) -> list[str]:
  """One line per bad value (empty when the config is fine)."""
  shards = batch_shards(config, num_devices)
  # The ViT recipe's cross-field rules (LP-FT, zero-shot head, its 2-axis
  # mesh) are not this recipe's.
  out = cc.problems(config, num_devices=shards, rules=RULES, cross_field=())
  micro, batch = config.micro_batch_size, config.batch_size
  if micro > 0 and batch > 0:
    if batch % micro:
      out.append(f'config.micro_batch_size={micro}: must divide'
                 f' config.batch_size={batch}')
    elif micro % shards:
      out.append(f'config.micro_batch_size={micro}: must be a multiple of'
                 f' the {shards} batch shards (devices / mesh.tp)')
  if not config.smoke.enabled:
    for key in ('model.path', 'data.dir'):
      section, field = key.split('.')
      if not config[section][field]:
        out.append(f'config.{key}={config[section][field]!r}: must name a'
                   ' folder (or set config.smoke.enabled=True)')
  return out


def check(config: ml_collections.ConfigDict, *, num_devices: int) -> None:
  """Raises ``ValueError`` naming every bad key and what it allows."""
  cc.refuse(problems(config, num_devices=num_devices))
