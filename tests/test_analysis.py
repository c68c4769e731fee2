"""train.analysis on hand-made numbers: picking, dominance, the regime, words."""

import ml_collections
import pytest

from train import analysis


def _result(val, id_, *ood):
  r = {'eval/val_accuracy': val, 'eval/id_accuracy': id_}
  r.update({f'eval/s{i}_accuracy': x for i, x in enumerate(ood)})
  return r


SHIFTS = ('s0', 's1')


def _curve(per_value, key='optimizer.learning_rate', on=None):
  return {'grid_key': key, 'on': on or {},
          'points': analysis.points(per_value, SHIFTS)}


def test_points_are_per_seed_and_ood_is_the_mean_of_the_shifts():
  pts = analysis.points({0.1: [_result(0.5, 0.6, 0.2, 0.4),
                               _result(0.7, 0.8, 0.3, 0.5)]}, SHIFTS)
  assert pts == {0.1: {'val': [0.5, 0.7], 'id': [0.6, 0.8],
                       'ood': [pytest.approx(0.3), pytest.approx(0.4)]}}


def test_pick_takes_the_best_mean_validation_and_the_first_on_a_tie():
  curve = _curve({1: [_result(0.5, 0.9, 0, 0)], 2: [_result(0.6, 0.1, 0, 0)],
                  3: [_result(0.6, 0.2, 0, 0)]})
  assert analysis.pick(curve) == 2  # Not the best ID (1), not the later tie.
  seeds = _curve({1: [_result(0.9, 0, 0, 0), _result(0.1, 0, 0, 0)],
                  2: [_result(0.6, 0, 0, 0), _result(0.6, 0, 0, 0)]})
  assert analysis.pick(seeds) == 2  # Means over seeds: 0.5 against 0.6.


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


def _demo_config():
  return ml_collections.ConfigDict({
      'shifts': SHIFTS, 'seeds': (0, 1), 'linear_probe': 'LP',
      'vanilla': 'FT', 'min_id_gap': 0.05})


def test_summary_rows_and_the_regime_on_hand_made_numbers():
  config = _demo_config()
  curves = {
      # LP: ID 0.70, OOD 0.50 at its picked (only) value.
      'LP': _curve({0.01: [_result(0.7, 0.7, 0.5, 0.5)] * 2}),
      # FT: picked at 3e-3 (val 0.9): ID 0.80, 10 points above LP; its
      # smaller lr beats LP's OOD (0.55 > 0.50), the picked one does not.
      'FT': _curve({1e-4: [_result(0.6, 0.72, 0.6, 0.5)] * 2,
                    3e-3: [_result(0.9, 0.8, 0.4, 0.4)] * 2}),
      'W': _curve({0.5: [_result(0.8, 0.75, 0.6, 0.6)] * 2}, key='alpha',
                  on={'optimizer.learning_rate': 3e-3}),
  }
  summary = analysis.summarize(config, curves)
  ft = summary['methods']['FT']
  assert ft['picked'] == {'optimizer.learning_rate': 3e-3}
  assert ft['id_accuracy'] == [0.8, 0.8] and ft['val_accuracy'] == [0.9, 0.9]
  assert summary['methods']['W']['picked'] == {
      'alpha': 0.5, 'optimizer.learning_rate': 3e-3}
  assert summary['regime'] == {
      'id_gap_ft_minus_lp': pytest.approx(0.10),
      'id_gap_holds': True,
      'ft_settings_above_lp_ood': [1e-4]}
  # LP (0.70, 0.50) is beaten on both axes by FT at 1e-4 (0.72, 0.55) and
  # by W (0.75, 0.60); nothing covers FT's (0.80, 0.40).
  assert summary['methods']['LP']['dominated_by'] == ['FT', 'W']
  assert summary['methods']['FT']['dominated_by'] == []
  config.min_id_gap = 0.2
  assert not analysis.summarize(config, curves)['regime']['id_gap_holds']
  words = analysis.verdict(config, analysis.summarize(config, curves))
  assert 'DOES NOT HOLD' in words
  assert 'LP: its curve is dominated by FT, W.' in words
  assert 'Not dominated (on the frontier): FT, W.' in words
  text = analysis.table(summary)
  assert 'learning_rate=0.003' in text and '80.0 ± 0.0' in text


def test_the_figure_has_one_curve_and_one_star_per_method():
  config = _demo_config()
  curves = {'LP': _curve({0.01: [_result(0.7, 0.7, 0.5, 0.5)] * 2}),
            'FT': _curve({1e-4: [_result(0.6, 0.72, 0.6, 0.5)] * 2,
                          3e-3: [_result(0.9, 0.8, 0.4, 0.4)] * 2})}
  fig = analysis.figure(analysis.summarize(config, curves))
  lines = fig.axes[0].get_lines()
  assert len(lines) == 4  # Curve and picked star, per method.
  assert list(lines[2].get_xdata()) == pytest.approx([72.0, 80.0])
  assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [
      'LP', 'FT']
