"""train.demo.analysis on hand-made numbers: picking, dominance, the shared rate."""

import json
import re

import ml_collections
import numpy as np
import pytest

from configs import demo as demo_config
from train.demo import analysis
from train.demo import comparison

NEAR, FAR = ('n0', 'n1'), ('f0',)


def _result(val, id_, near0, near1, far):
  return {'eval/val_accuracy': val, 'eval/id_accuracy': id_,
          'eval/n0_accuracy': near0, 'eval/n1_accuracy': near1,
          'eval/f0_accuracy': far}


def _curve(per_setting, keys=('optimizer.learning_rate',), on=None,
           diagnostics=None):
  return {'keys': keys, 'on': on or {},
          'points': analysis.points(per_setting, NEAR, FAR, diagnostics)}


def test_points_are_per_seed_with_near_and_far_means_and_diagnostics():
  pts = analysis.points(
      {0.1: [_result(0.5, 0.6, 0.2, 0.4, 0.9), _result(0.7, 0.8, 0.3, 0.5, 0.1)]},
      NEAR, FAR, {0.1: [{'fire_rate': 0.5, 'deviation_norm': 2.0},
                        {'fire_rate': 0.7, 'deviation_norm': 3.0}]})
  assert pts == {0.1: {
      'val': [0.5, 0.7], 'id': [0.6, 0.8],
      'near': [pytest.approx(0.3), pytest.approx(0.4)], 'far': [0.9, 0.1],
      'diagnostics': {'fire_rate': [0.5, 0.7], 'deviation_norm': [2.0, 3.0]}}}
  # A diagnostic that one run lacks is not reported for the point.
  partial = analysis.points({1: [_result(0, 0, 0, 0, 0)] * 2}, NEAR, FAR,
                            {1: [{'fire_rate': 0.5}, {}]})
  assert partial[1]['diagnostics'] is None


def test_pick_takes_the_best_mean_validation_and_the_first_on_a_tie():
  curve = _curve({1: [_result(0.5, 0.9, 0, 0, 0)],
                  2: [_result(0.6, 0.1, 0, 0, 0)],
                  3: [_result(0.6, 0.2, 0, 0, 0)]})
  assert analysis.pick(curve) == 2  # Not the best ID (1), not the later tie.
  seeds = _curve({1: [_result(0.9, 0, 0, 0, 0), _result(0.1, 0, 0, 0, 0)],
                  2: [_result(0.6, 0, 0, 0, 0), _result(0.6, 0, 0, 0, 0)]})
  assert analysis.pick(seeds) == 2  # Means over seeds: 0.5 against 0.6.


def test_dominance_by_hand_on_each_axis():
  def curve(*points):
    return {'keys': ('x',), 'on': {}, 'points': {
        i: {'id': [a], 'near': [b], 'far': [c], 'val': [0.0]}
        for i, (a, b, c) in enumerate(points)}}
  curves = {
      'A': curve((0.9, 0.5, 0.1), (0.8, 0.6, 0.1)),
      'B': curve((0.9, 0.55, 0.0), (0.85, 0.6, 0.0)),  # Beats A on near.
      'C': curve((0.95, 0.3, 0.0)),  # Best ID: nobody covers it.
      'D': curve((0.9, 0.55, 0.2)),  # Equal to a point of B on near.
  }
  assert analysis.dominated_by(curves, 'near') == {
      'A': ['B'], 'B': [], 'C': [], 'D': []}
  # On far, D's (0.9, 0.2) covers A's (0.9, 0.1) and (0.8, 0.1); B's (0.9,
  # 0.0) and (0.85, 0.0) are covered by A, C and D.
  assert analysis.dominated_by(curves, 'far') == {
      'A': ['D'], 'B': ['A', 'C', 'D'], 'C': [], 'D': []}


def _demo_config():
  methods = {'FT': {'lr_of': '', 'lr_grid': ()},
             'SPD': {'lr_of': 'FT', 'lr_grid': ()},
             'FTP': {'lr_of': 'FT', 'lr_grid': ()}}
  return ml_collections.ConfigDict({
      'shifts': NEAR, 'far_shifts': FAR, 'seeds': (0, 1),
      'linear_probe': 'LP', 'vanilla': 'FT', 'min_id_gap': 0.05,
      'methods': methods})


def _curves():
  return {
      # LP: ID 0.70, near 0.50, far 0.40 at its one value.
      'LP': _curve({0.01: [_result(0.7, 0.7, 0.5, 0.5, 0.4)] * 2}),
      # FT picked at 3e-3 (val 0.9): ID 0.80, 10 points above LP; its
      # smaller rate is above LP on near OOD (0.55), the picked one is not.
      'FT': _curve({1e-4: [_result(0.6, 0.72, 0.6, 0.5, 0.3)] * 2,
                    3e-3: [_result(0.9, 0.8, 0.4, 0.4, 0.3)] * 2}),
      # SPD at FT's rate: lambda 1 picked (val 0.92).
      'SPD': _curve({0.1: [_result(0.9, 0.8, 0.4, 0.4, 0.3)] * 2,
                     1.0: [_result(0.92, 0.82, 0.5, 0.5, 0.35)] * 2},
                    keys=('optimizer.weight_decay',),
                    on={'optimizer.learning_rate': 3e-3},
                    diagnostics={0.1: [{'fire_rate': 0.4}] * 2,
                                 1.0: [{'fire_rate': 0.5,
                                        'mean_ratio': 0.08}] * 2}),
  }


def _with_ftp(curves):
  """``curves`` and FTP at FT's rate, one k (0.5), with its diagnostics."""
  return {**curves, 'FTP': _curve(
      {0.5: [_result(0.91, 0.81, 0.45, 0.45, 0.32)] * 2},
      keys=('optimizer.weight_decay',), on={'optimizer.learning_rate': 3e-3},
      diagnostics={0.5: [{'gamma_over_norm': 0.123, 'at_radius_fraction': 0.9,
                          'deviation_norm': 1.5}] * 2})}


def test_summary_rows_the_regime_and_the_words_on_hand_made_numbers():
  config = _demo_config()
  summary = analysis.summarize(config, _with_ftp(_curves()))
  ft, spd = summary['methods']['FT'], summary['methods']['SPD']
  assert ft['picked'] == {'optimizer.learning_rate': 3e-3}
  assert ft['id_accuracy'] == [0.8, 0.8] and ft['val_accuracy'] == [0.9, 0.9]
  assert spd['picked'] == {'optimizer.weight_decay': 1.0,
                           'optimizer.learning_rate': 3e-3}
  assert spd['near_ood_accuracy'] == [0.5, 0.5]
  assert spd['far_ood_accuracy'] == [0.35, 0.35]
  assert spd['diagnostics'] == {'fire_rate': [0.5, 0.5],
                                'mean_ratio': [0.08, 0.08]}
  assert summary['regime'] == {
      'id_gap_ft_minus_lp': pytest.approx(0.10), 'id_gap_holds': True,
      'ft_settings_above_lp_near_ood': [{'optimizer.learning_rate': 1e-4}]}
  # Near: LP (0.70, 0.50) is covered by FT's 1e-4 (0.72, 0.55) and by SPD's
  # lambda 1 (0.82, 0.50); FT's 1e-4 point by nothing of SPD's (0.50 and
  # 0.40 < 0.55). Far: SPD's (0.82, 0.35) covers both of FT's (0.30), not
  # LP's (0.70, 0.40).
  assert summary['methods']['FTP']['diagnostics'] == {
      'gamma_over_norm': [0.123] * 2, 'at_radius_fraction': [0.9] * 2,
      'deviation_norm': [1.5] * 2}
  # FTP's (0.81, 0.45 near, 0.32 far) is covered by SPD's lambda 1 (0.82,
  # 0.50, 0.35); on far it covers both of FT's points (0.30), on near not
  # FT's 1e-4 one (0.72, 0.55).
  assert {m: s['dominated_by'] for m, s in summary['methods'].items()} == {
      'LP': {'near': ['FT', 'SPD'], 'far': []},
      'FT': {'near': [], 'far': ['SPD', 'FTP']},
      'SPD': {'near': [], 'far': []},
      'FTP': {'near': ['SPD'], 'far': ['SPD']}}
  config.min_id_gap = 0.2
  words = analysis.verdict(config, analysis.summarize(config,
                                                      _with_ftp(_curves())))
  assert 'DOES NOT HOLD' in words
  assert ('SPD (weight_decay=1, learning_rate=0.003) against FT: ID 82.0 vs'
          ' 80.0, near 50.0 vs 40.0, far 35.0 vs 30.0.') in words
  assert 'Not dominated on ID and far OOD: LP, SPD.' in words
  text = analysis.table(summary)
  assert 'learning_rate=0.003' in text and '80.0 ± 0.0' in text
  assert ('FTP (weight_decay=0.5, learning_rate=0.003) against FT: ID 81.0'
          ' vs 80.0, near 45.0 vs 40.0, far 32.0 vs 30.0.') in words
  diag = analysis.diagnostics_table(summary)
  assert '50.0 ± 0.0' in diag and '8.00 ± 0.00' in diag
  ftp_row = next(line for line in diag.splitlines() if line.startswith('FTP '))
  assert re.split(r'\s{2,}', ftp_row)[2:] == [
      '-', '-', '12.3 ± 0.0', '90.0 ± 0.0', '1.50 ± 0.00']


def test_a_runs_diagnostics_are_read_from_its_logged_metrics(tmp_path):
  # SPD's fire rate and the deviation from their last logged row, the ratio
  # and FTP's two from the mean over the logged rows; eval rows ignored.
  rows = [{'train/loss': 1.0, 'train/spd_mean_ratio': 0.1,
           'train/ftp_gamma_over_norm': 0.2,
           'train/ftp_at_radius_fraction': 1.0},
          {'train/loss': 0.5, 'train/spd_mean_ratio': 0.3,
           'train/spd_fire_rate': 0.4, 'train/spd_deviation_norm': 2.0,
           'train/ftp_gamma_over_norm': 0.4,
           'train/ftp_at_radius_fraction': 0.5},
          {'eval/val_accuracy': 0.9}]
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    f.write('\n'.join(json.dumps(r) for r in rows) + '\n')
  assert comparison._diagnostics(str(tmp_path)) == {
      'fire_rate': 0.4, 'mean_ratio': pytest.approx(0.2),
      'gamma_over_norm': pytest.approx(0.3), 'at_radius_fraction': 0.75,
      'deviation_norm': 2.0}
  assert set(comparison.DIAGNOSTIC_METRICS) == set(analysis.DIAGNOSTICS)


def test_the_shared_rate_is_read_from_a_whole_grid():
  grid = _curve({(1e-3, 0.1): [_result(0.5, 0.5, 0, 0, 0)],
                 (1e-3, 1.0): [_result(0.6, 0.6, 0, 0, 0)],
                 (3e-3, 0.1): [_result(0.9, 0.7, 0, 0, 0)],
                 (3e-3, 1.0): [_result(0.8, 0.8, 0, 0, 0)]},
                keys=('optimizer.learning_rate', 'optimizer.weight_decay'))
  assert analysis.pick(grid) == (3e-3, 0.1)
  assert analysis.setting_of(grid, (3e-3, 0.1)) == {
      'optimizer.learning_rate': 3e-3, 'optimizer.weight_decay': 0.1}
  at_1e3 = analysis.shared_rate(grid, 1e-3)
  assert at_1e3['keys'] == ('optimizer.weight_decay',)
  assert sorted(at_1e3['points']) == [0.1, 1.0]
  assert analysis.pick(at_1e3) == 1.0
  assert analysis.setting_of(at_1e3, 1.0) == {
      'optimizer.weight_decay': 1.0, 'optimizer.learning_rate': 1e-3}


def test_the_protocols_are_compared_pick_by_pick():
  config = _demo_config()
  shared = analysis.summarize(config, _curves())
  curves = _curves()
  curves['SPD'] = _curve({(1e-4, 1.0): [_result(0.95, 0.6, 0.7, 0.7, 0.5)] * 2},
                         keys=('optimizer.learning_rate',
                               'optimizer.weight_decay'))
  whole = analysis.summarize(config, curves)
  # The whole grid's one SPD point (0.60; near 0.70, far 0.50) no longer
  # covers LP on near (ID 0.60 < 0.70), nor FT on far.
  assert analysis.compare_protocols(shared, whole).splitlines() == [
      'LP: dominated on near OOD by FT, SPD -> FT',
      'FT: dominated on far OOD by SPD -> none',
      'SPD: picks weight_decay=1, learning_rate=0.003 -> learning_rate=0.0001,'
      ' weight_decay=1']


def test_the_figure_has_a_curve_and_a_star_per_method_on_each_axis():
  fig = analysis.figure(analysis.summarize(_demo_config(), _curves()))
  near, far = fig.axes
  assert len(near.get_lines()) == len(far.get_lines()) == 6
  assert list(near.get_lines()[2].get_xdata()) == pytest.approx([72.0, 80.0])
  assert list(far.get_lines()[2].get_ydata()) == pytest.approx([30.0, 30.0])
  assert [t.get_text() for t in near.get_legend().get_texts()] == [
      'LP', 'FT', 'SPD']


def test_the_shared_rate_step_puts_the_picked_rate_on_every_setting():
  config = demo_config.get_config()
  spd = config.methods.SPD
  assert spd.lr_of == config.vanilla
  assert comparison.settings(spd, 3e-3) == {
      v: {'optimizer.learning_rate': 3e-3, 'optimizer.weight_decay': v}
      for v in spd.grid}
  ft = config.methods[config.vanilla]
  assert comparison.settings(ft, None) == {
      v: {'optimizer.learning_rate': v} for v in ft.grid}
  whole = demo_config.get_config('full_grid').methods.SPD
  grid = comparison.settings(whole, None)
  assert len(grid) == len(ft.grid) * len(whole.grid)
  assert grid[(1e-4, 10.0)] == {'optimizer.learning_rate': 1e-4,
                                'optimizer.weight_decay': 10.0}
  assert np.isclose(sorted({k[0] for k in grid}), sorted(ft.grid)).all()
