"""Refuses a demo config whose values make no sense, naming every key.

The demo's own fields (its sweep), then each of its two stages' (the
foundation and the fine-tuning runs) by the ViT recipe's rules.
"""

from typing import Any, Sequence

import ml_collections

from train.core import config_checks as cc
from train.vision import checks as vision_checks

# The demo's config (configs/demo.py): its sweep, not a run.
DEMO_RULES: Sequence[tuple[str, Any]] = (
    ('workers', cc.Where(lambda v: isinstance(v, int) and not isinstance(
        v, bool) and v >= 0, 'an integer >= 0 (0: one per CPU core on CPU,'
        ' 1 on an accelerator)')),
    ('min_id_gap', cc.PROBABILITY),
)


def check(config: ml_collections.ConfigDict, *, num_devices: int) -> None:
  """Raises ``ValueError`` naming every bad key: the demo's own, its stages'."""
  found = cc.field_problems(config, DEMO_RULES)
  for stage in ('foundation', 'finetune'):
    found += [p.replace('config.', f'config.{stage}.', 1) for p in
              vision_checks.problems(config[stage],
                                     num_devices=num_devices)]
  cc.refuse(found)
