"""The README's main command, shrunk to seconds: every method reports."""

import json
import os

import numpy as np

from configs import demo as demo_config
from train import demo


def test_demo_end_to_end_every_method_above_chance(tmp_path):
  config = demo_config.get_config('smoke')
  summary = demo.run(config, str(tmp_path))
  chance = 1 / config.finetune.dataset.num_classes
  assert set(summary) == set(config.method_order) | {
      'Foundation (no fine-tuning)'}
  for method, s in summary.items():
    for key in ('id_accuracy', 'ood_accuracy'):
      accuracies = np.asarray(s[key])
      assert len(accuracies) == (1 if method.startswith('Foundation')
                                 else len(config.seeds))
      assert np.isfinite(accuracies).all() and (accuracies > chance).all(), (
          method, key, accuracies)
  with open(tmp_path / 'results.json') as f:
    assert json.load(f) == json.loads(json.dumps(summary))
  assert os.path.getsize(tmp_path / 'results.png') > 10_000
  assert os.path.exists(tmp_path / 'foundation.npz')
  # A second run reuses every finished run and gives the same numbers.
  again = demo.run(config, str(tmp_path))
  assert json.loads(json.dumps(again)) == json.loads(json.dumps(summary))
