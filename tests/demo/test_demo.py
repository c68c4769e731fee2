"""The README's main command, shrunk: the regime holds on its own numbers."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import demo as demo_config
from train.demo import analysis
from train.demo import comparison
from train.demo import contrastive
from train.vision import finetune
from train.demo import digits_domains
from tests import trainlib


@pytest.mark.slow
def test_the_main_command_finds_its_embedded_default_config(tmp_path):
  """``python -m train.demo`` with no --config, as the README runs it, from
  another folder: its default config loads, and a workdir that is a file is
  refused, naming it, before any work."""
  (tmp_path / 'a_file').write_text('')
  proc = subprocess.run(
      [sys.executable, '-m', 'train.demo', '--workdir',
       str(tmp_path / 'a_file')], cwd=tmp_path, capture_output=True,
      text=True, env={**trainlib.env_with_devices(1),
                      'PYTHONPATH': trainlib.REPO}, timeout=300)
  assert proc.returncode != 0
  assert f'--workdir {tmp_path / "a_file"} is a file, not a folder' in (
      proc.stderr), proc.stderr[-2000:]


def test_demo_config_is_data_and_names_the_real_shifts():
  proc = subprocess.run(
      [sys.executable, '-c', 'import sys, configs.demo as d; d.get_config();'
       ' print(sorted(m for m in sys.modules if m.split(".")[0] =='
       ' "train"))'], cwd=trainlib.REPO, capture_output=True, text=True,
      env=trainlib.env_with_devices(1), timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == '[]'  # Imports no training code.
  assert demo_config.SHIFTS == digits_domains.SHIFTS
  assert demo_config.FAR_SHIFTS == digits_domains.FAR_SHIFTS
  # Far: in no pre-training data.
  assert not set(digits_domains.FAR_SHIFTS) & set(digits_domains.DOMAINS)
  for arg in ('', 'full_grid'):
    config = demo_config.get_config(arg)
    assert set(config.shifts) == set(digits_domains.SHIFTS)
    assert set(config.far_shifts) == set(digits_domains.FAR_SHIFTS)


@pytest.fixture(scope='module')
def finished_demo(tmp_path_factory):
  """A finished smoke demo (runs in 2 workers) and its summary."""
  workdir = tmp_path_factory.mktemp('demo')
  config = demo_config.get_config('smoke')
  config.workers = 2  # The runs in worker processes (train.demo.sweep).
  summary = comparison.run_comparison(config, str(workdir))
  return workdir, summary


def _without_time(summary):
  return {k: v for k, v in json.loads(json.dumps(summary)).items()
          if k != 'wall_seconds'}


@pytest.fixture()
def counting(monkeypatch):
  """Counts the runs trained and the foundations pre-trained (in-process)."""
  trained = {'runs': [], 'foundations': 0}
  train_run, pretrain = finetune.train_and_evaluate, contrastive._train

  def count_run(config, workdir, **kwargs):
    trained['runs'].append(os.path.basename(workdir))
    return train_run(config, workdir, **kwargs)

  def count_foundation(config):
    trained['foundations'] += 1
    return pretrain(config)

  monkeypatch.setattr(finetune, 'train_and_evaluate', count_run)
  monkeypatch.setattr(contrastive, '_train', count_foundation)
  return trained


def _rerun(workdir):
  config = demo_config.get_config('smoke')
  config.workers = 1  # In this process, where the counters see them.
  return comparison.run_comparison(config, str(workdir))


@pytest.mark.slow
def test_demo_end_to_end_in_the_papers_regime(finished_demo, counting):
  workdir, summary = finished_demo
  config = demo_config.get_config('smoke')
  methods = summary['methods']
  assert list(methods) == list(config.method_order)
  for method, s in methods.items():
    for key in ('val_accuracy', 'id_accuracy', 'near_ood_accuracy',
                'far_ood_accuracy'):
      assert len(s[key]) == len(config.seeds)
      assert np.isfinite(s[key]).all() and (np.asarray(s[key]) > 0.1).all()
    assert len(s['curve']) == len(config.methods[method].grid)
  # The paper's protocol: SPD ran at the learning rate AdamW picked on
  # validation, and its runs' own configs say so.
  # So did FTP, over k.
  ft_rate = methods[config.vanilla]['picked']['optimizer.learning_rate']
  for method in ('SPD', 'FTP'):
    assert methods[method]['picked']['optimizer.learning_rate'] == ft_rate
    for q in methods[method]['curve']:
      assert q['setting']['optimizer.learning_rate'] == ft_rate
    runs = [d for d in os.listdir(workdir / 'runs')
            if d.startswith(f'{method}_')]
    assert len(runs) == len(config.seeds) * len(config.methods[method].grid)
    for run in runs:
      with open(workdir / 'runs' / run / 'config.json') as f:
        c = json.load(f)['optimizer']
      assert c['learning_rate'] == ft_rate
      assert c['name'] == method.lower()
  # SPD's and FTP's diagnostics, over training, recorded beside their
  # accuracies, and each method's own only.
  diag = methods['SPD']['diagnostics']
  assert set(diag) == {'fire_rate', 'mean_ratio', 'deviation_norm'}
  assert 0 < np.mean(diag['fire_rate']) < 1 and np.mean(diag['mean_ratio']) > 0
  diag = methods['FTP']['diagnostics']
  assert set(diag) == {'gamma_over_norm', 'at_radius_fraction',
                       'deviation_norm'}
  assert 0 < np.mean(diag['gamma_over_norm']) <= 1
  assert 0 <= np.mean(diag['at_radius_fraction']) <= 1
  assert np.mean(diag['deviation_norm']) > 0
  assert set(methods[config.vanilla]['diagnostics']) == {'deviation_norm'}
  assert 'FTP (weight_decay=1, learning_rate=' in analysis.verdict(config,
                                                                   summary)
  # The regime, measured: a linear probe well below fine-tuning on ID.
  lp, ft = methods[config.linear_probe], methods[config.vanilla]
  gap = np.mean(ft['id_accuracy']) - np.mean(lp['id_accuracy'])
  assert gap >= config.min_id_gap, f'LP only {100 * gap:.1f} points below FT'
  assert summary['regime']['id_gap_holds']
  # WiSE-FT at alpha 1 is the LP-FT run it interpolates, exactly.
  wise = {q['setting']['wise_ft.alpha']: q
          for q in methods['WiSE-FT']['curve']}
  assert wise[1.0]['id'] == methods['LP-FT']['id_accuracy']
  assert wise[1.0]['near'] == methods['LP-FT']['near_ood_accuracy']
  assert wise[1.0]['far'] == methods['LP-FT']['far_ood_accuracy']
  with open(workdir / 'results.json') as f:
    assert json.load(f) == json.loads(json.dumps(summary))
  assert os.path.getsize(workdir / 'results.png') > 10_000
  # A second run reuses every finished run; the one run removed is trained
  # again in this process, to the same numbers as in a worker.
  ft_runs = [comparison.run_name(config.vanilla, methods[config.vanilla][
      'picked'], seed) for seed in config.seeds]  # Those SPD's rate is from.
  shutil.rmtree(workdir / 'runs' / ft_runs[0])
  again = _rerun(workdir)
  assert counting == {'runs': ft_runs[:1], 'foundations': 0}
  assert _without_time(again) == _without_time(summary)


@pytest.mark.slow
def test_a_moved_demo_reuses_every_run_and_prints_the_same_table(
    finished_demo, counting, tmp_path, capsys):
  workdir, summary = finished_demo
  moved = tmp_path / 'elsewhere' / 'demo'
  shutil.copytree(workdir, moved)
  again = _rerun(moved)
  assert counting == {'runs': [], 'foundations': 0}  # Nothing trained again.
  assert _without_time(again) == _without_time(summary)
  assert analysis.table(summary) in capsys.readouterr().out
  # The reused runs' config.json now name the moved workdir's inputs.
  some_run = next(iter(os.listdir(moved / 'runs')))
  with open(moved / 'runs' / some_run / 'config.json') as f:
    assert json.load(f)['pretrained']['path'] == str(moved / 'foundation.npz')


def _truncate(path, size=20):
  with open(path, 'r+b') as f:
    f.truncate(size)


@pytest.mark.slow
def test_damaged_and_stale_files_are_named_kept_aside_and_recomputed(
    finished_demo, counting, tmp_path, caplog):
  workdir, summary = finished_demo
  copy = tmp_path / 'demo'
  shutil.copytree(workdir, copy)
  runs = sorted(os.listdir(copy / 'runs'))
  lp, spd, ft, lp_ft = (next(r for r in runs if r.startswith(m)) for m in (
      'LP_', 'SPD_', 'FT_', 'LP-FT_'))
  _truncate(copy / 'runs' / lp / 'result.json')  # Damaged: trained again.
  _truncate(copy / 'runs' / ft / 'config.json')  # Damaged: written again.
  _truncate(copy / 'runs' / lp_ft / 'wise_ft.json')  # Damaged: re-evaluated.
  _truncate(copy / 'results.json')
  _truncate(copy / 'foundation.npz', 1000)  # Damaged: pre-trained again.
  with open(copy / 'runs' / spd / 'result.json') as f:
    record = json.load(f)
  record['identity']['optimizer']['b1'] = 0.5  # Of another config: stale.
  with open(copy / 'runs' / spd / 'result.json', 'w') as f:
    json.dump(record, f)
  again = _rerun(copy)
  # The same table: every recomputed result is the one it replaces.
  assert _without_time(again) == _without_time(summary)
  # The foundation was pre-trained again, to the same bytes: no run was
  # trained again for it; only the damaged and the stale run were.
  assert counting == {'runs': [lp, spd], 'foundations': 1}
  log = caplog.text
  for damaged in (f'runs/{lp}/result.json', f'runs/{ft}/config.json',
                  f'runs/{lp_ft}/wise_ft.json', 'results.json',
                  'foundation.npz'):
    assert f'{copy}/{damaged} is damaged' in log, damaged
  assert f'runs/{spd}/result.json was made for another config' in log
  assert 'optimizer.b1' in log
  aside = sorted(n.rsplit('_', 1)[0] for n in os.listdir(copy)
                 if n.startswith('damaged_'))
  assert aside == [
      'damaged_foundation.npz', 'damaged_foundation.npz.json',
      'damaged_results.json']
  in_runs = os.listdir(copy / 'runs')
  assert any(n.startswith(f'damaged_{lp}_') for n in in_runs)
  assert any(n.startswith(f'stale_{spd}_') for n in in_runs)
  assert any(n.startswith('damaged_config.json_')
             for n in os.listdir(copy / 'runs' / ft))
