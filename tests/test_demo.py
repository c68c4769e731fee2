"""The README's main command, shrunk: the regime holds on its own numbers."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np

from configs import demo as demo_config
from train import analysis
from train import comparison
from train import digits_domains
from tests import trainlib


def test_demo_config_is_data_and_names_the_real_shifts():
  proc = subprocess.run(
      [sys.executable, '-c', 'import sys, configs.demo as d; d.get_config();'
       ' print(sorted(m for m in sys.modules if m.split(".")[0] =='
       ' "train"))'], cwd=trainlib.REPO, capture_output=True, text=True,
      env=trainlib.env_with_devices(1), timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == '[]'  # Imports no training code.
  assert demo_config.SHIFTS == digits_domains.SHIFTS


def test_dominance_by_hand():
  curve = lambda *points: {'grid_key': 'x', 'on': {}, 'points': {
      i: {'id': [a], 'ood': [b], 'val': [0.0]} for i, (a, b) in
      enumerate(points)}}
  verdict = analysis.dominated_by({
      'A': curve((0.9, 0.5), (0.8, 0.6)),
      'B': curve((0.9, 0.55), (0.85, 0.6)),  # Beats every point of A.
      'C': curve((0.95, 0.3)),  # Best ID: nobody covers it.
      'D': curve((0.9, 0.55)),  # Equal to a point of B: not beaten.
  })
  assert verdict == {'A': ['B'], 'B': [], 'C': [], 'D': []}


def test_demo_end_to_end_in_the_papers_regime(tmp_path):
  config = demo_config.get_config('smoke')
  config.workers = 2  # The runs in worker processes (train.sweep).
  summary = comparison.run_comparison(config, str(tmp_path))
  methods = summary['methods']
  assert list(methods) == list(config.method_order)
  for method, s in methods.items():
    for key in ('val_accuracy', 'id_accuracy', 'ood_accuracy'):
      assert len(s[key]) == len(config.seeds)
      assert np.isfinite(s[key]).all() and (np.asarray(s[key]) > 0.1).all()
    assert len(s['curve']) == len(config.methods[method].grid)
    best = max(s['curve'], key=lambda q: np.mean(q['val']))  # Picked on val.
    assert best['id'] == s['id_accuracy'] and best['ood'] == s['ood_accuracy']
  # The regime, measured: a linear probe well below fine-tuning on ID.
  lp, ft = methods[config.linear_probe], methods[config.vanilla]
  gap = np.mean(ft['id_accuracy']) - np.mean(lp['id_accuracy'])
  assert summary['regime']['id_gap_ft_minus_lp'] == gap
  assert gap >= config.min_id_gap, f'LP only {100 * gap:.1f} points below FT'
  above = [q['value'] for q in ft['curve']
           if np.mean(q['ood']) > np.mean(lp['ood_accuracy'])]
  assert summary['regime']['ft_settings_above_lp_ood'] == above
  # WiSE-FT at alpha 1 is the LP-FT run it interpolates, exactly.
  wise = {q['value']: q for q in methods['WiSE-FT']['curve']}
  assert wise[1.0]['id'] == methods['LP-FT']['id_accuracy']
  assert wise[1.0]['ood'] == methods['LP-FT']['ood_accuracy']
  with open(tmp_path / 'results.json') as f:
    assert json.load(f) == json.loads(json.dumps(summary))
  assert os.path.getsize(tmp_path / 'results.png') > 10_000
  # A second run reuses every finished run and gives the same numbers; the
  # one run removed is trained again in this process, to the same numbers as
  # in a worker.
  ft_runs = [d for d in os.listdir(tmp_path / 'runs') if d.startswith('FT_')]
  assert len(ft_runs) == 1
  shutil.rmtree(tmp_path / 'runs' / ft_runs[0])
  config.workers = 1
  again = comparison.run_comparison(config, str(tmp_path))
  assert os.path.exists(tmp_path / 'runs' / ft_runs[0] / 'result.json')
  assert again['wall_seconds'] < summary['wall_seconds']
  del again['wall_seconds'], summary['wall_seconds']
  assert json.loads(json.dumps(again)) == json.loads(json.dumps(summary))
