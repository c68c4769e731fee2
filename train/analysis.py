r"""Reading a comparison of fine-tuning methods: pure functions of numbers.

The demo (``train.comparison``) trains every method of ``configs/demo.py``
over a grid of its strength and several seeds; this module turns the
accuracies into what it reports, and does nothing else (it never trains,
evaluates, reads or writes files):

- :func:`points`: per grid value, the per-seed validation, ID and mean-OOD
  accuracies of a method (its curve).
- :func:`pick`: the grid value of best mean validation accuracy.
- :func:`dominated_by`: which methods' curves dominate each method's curve.
- :func:`summarize`: the table's rows, the verdicts and the regime check, as
  written to ``results.json``; :func:`table` and :func:`verdict` put them in
  words, :func:`figure` draws the frontier plot.

Example (two methods, one seed; B is better on both axes at every point):

>>> a = {'grid_key': 'lr', 'on': {}, 'points': points(
...     {1: [{'eval/val_accuracy': .5, 'eval/id_accuracy': .6,
...           'eval/x_accuracy': .3}]}, shifts=('x',))}
>>> b = {'grid_key': 'lr', 'on': {}, 'points': points(
...     {1: [{'eval/val_accuracy': .5, 'eval/id_accuracy': .7,
...           'eval/x_accuracy': .4}]}, shifts=('x',))}
>>> dominated_by({'A': a, 'B': b})
{'A': ['B'], 'B': []}
"""

from typing import Any, Mapping, Sequence

import matplotlib
import numpy as np

from train import metrics as metrics_lib

matplotlib.use('Agg')  # Figures are saved, never shown.
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position


def mean_ood(result: Mapping[str, float], shifts: Sequence[str]) -> float:
  """The mean accuracy over the OOD sets ``shifts`` of one run's result."""
  return float(np.mean([result[f'eval/{d}_accuracy'] for d in shifts]))


def points(per_value: Mapping[Any, Sequence[Mapping[str, float]]],
           shifts: Sequence[str]) -> dict[Any, dict[str, list[float]]]:
  """``{value: {'val': [...], 'id': [...], 'ood': [...]}}``, one per seed.

  Args:
    per_value: per grid value, the results of its runs (one per seed), each
      ``{'eval/<set>_accuracy': ...}``.
    shifts: the OOD sets whose mean is ``ood``.
  """
  return {value: {'val': [r['eval/val_accuracy'] for r in rs],
                  'id': [r['eval/id_accuracy'] for r in rs],
                  'ood': [mean_ood(r, shifts) for r in rs]}
          for value, rs in per_value.items()}


def pick(curve: Mapping[str, Any]) -> Any:
  """The grid value of best mean validation accuracy (the first on a tie)."""
  values = curve['points']
  return max(values, key=lambda v: np.mean(values[v]['val']))


def _mean_point(p: Mapping[str, Sequence[float]]) -> tuple[float, float]:
  return float(np.mean(p['id'])), float(np.mean(p['ood']))


def dominated_by(curves: Mapping[str, Mapping[str, Any]]
                 ) -> dict[str, list[str]]:
  """Per method, the methods whose curve dominates its curve.

  Curve B dominates curve A when every point of A (mean over seeds) has a
  point of B at least as good in both ID and OOD accuracy, and B is not A's
  equal (some point of A is strictly beaten on one axis).
  """
  means = {m: [_mean_point(p) for p in c['points'].values()]
           for m, c in curves.items()}
  out = {}
  for a, pa in means.items():
    out[a] = []
    for b, pb in means.items():
      if a == b:
        continue
      covered = all(any(q[0] >= p[0] and q[1] >= p[1] for q in pb)
                    for p in pa)
      strict = any(any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in pb)
                   for p in pa)
      if covered and strict:
        out[a].append(b)
  return out


def summarize(config, curves: Mapping[str, Mapping[str, Any]]) -> dict:
  """The table's rows, the frontier verdicts and the regime check.

  Args:
    config: the demo's config (``shifts``, ``seeds``, ``linear_probe``,
      ``vanilla``, ``min_id_gap``).
    curves: per method, ``{'grid_key', 'points', 'on'}`` (``on``: the value
      of the method it is computed on, for WiSE-FT).
  """
  dominance = dominated_by(curves)
  summary = {'methods': {}, 'shifts': list(config.shifts),
             'seeds': list(config.seeds)}
  for method, c in curves.items():
    best = pick(c)
    p = c['points'][best]
    summary['methods'][method] = {
        'picked': {c['grid_key']: best, **c['on']},
        'val_accuracy': p['val'], 'id_accuracy': p['id'],
        'ood_accuracy': p['ood'],
        'dominated_by': dominance[method],
        'curve': [{'value': v, **q} for v, q in c['points'].items()],
    }
  lp = summary['methods'][config.linear_probe]
  ft = summary['methods'][config.vanilla]
  gap = float(np.mean(ft['id_accuracy']) - np.mean(lp['id_accuracy']))
  lp_ood = float(np.mean(lp['ood_accuracy']))
  ft_beats = [q['value'] for q in ft['curve'] if np.mean(q['ood']) > lp_ood]
  summary['regime'] = {
      'id_gap_ft_minus_lp': gap,
      'id_gap_holds': bool(gap >= config.min_id_gap),
      'ft_settings_above_lp_ood': ft_beats,
  }
  return summary


def _mean_std(xs) -> str:
  xs = 100 * np.asarray(xs)
  return f'{xs.mean():5.1f} ± {xs.std():3.1f}' if len(xs) > 1 else (
      f'{xs.mean():5.1f}')


def _value(key: str, v) -> str:
  return f'{key.split(".")[-1]}={v:g}' if isinstance(v, float) else (
      f'{key.split(".")[-1]}={v}')


def table(summary: Mapping[str, Any]) -> str:
  """One row per method: the picked value, val, ID and OOD, dominance."""
  rows = []
  for method, s in summary['methods'].items():
    picked = ', '.join(_value(k, v) for k, v in s['picked'].items())
    rows.append([method, picked, _mean_std(s['val_accuracy']),
                 _mean_std(s['id_accuracy']), _mean_std(s['ood_accuracy']),
                 ', '.join(s['dominated_by']) or 'no'])
  return metrics_lib.format_table(
      rows, ['method', 'picked on ID val', 'val %', 'ID %', 'OOD % (mean)',
             'curve dominated by'])


def verdict(config, summary: Mapping[str, Any]) -> str:
  """What the numbers say, in words."""
  r = summary['regime']
  lines = [
      f'Regime: vanilla fine-tuning ({config.vanilla}) is'
      f' {100 * r["id_gap_ft_minus_lp"]:.1f} points above the linear probe on'
      f' ID (required: {100 * config.min_id_gap:.0f}):'
      f' {"holds" if r["id_gap_holds"] else "DOES NOT HOLD"}.']
  if r['ft_settings_above_lp_ood']:
    lines.append(
        f'{config.vanilla} beats the linear probe on OOD at'
        f' {len(r["ft_settings_above_lp_ood"])} of its settings'
        f' ({", ".join(f"{v:g}" for v in r["ft_settings_above_lp_ood"])}).')
  else:
    lines.append(f'{config.vanilla} does not beat the linear probe on OOD at'
                 ' any of its settings: here fine-tuning only costs'
                 ' robustness.')
  free = [m for m, s in summary['methods'].items() if not s['dominated_by']]
  lines.append('Not dominated (on the frontier): ' + ', '.join(free) + '.')
  for m, s in summary['methods'].items():
    if s['dominated_by']:
      lines.append(f'{m}: its curve is dominated by '
                   + ', '.join(s['dominated_by']) + '.')
  return '\n'.join(lines)


def figure(summary: Mapping[str, Any]) -> plt.Figure:
  """ID against mean OOD accuracy: one curve per method, picked point big."""
  fig, ax = plt.subplots(figsize=(7.5, 5.5))
  colors = plt.get_cmap('tab10').colors
  for i, (method, s) in enumerate(summary['methods'].items()):
    xs = [100 * np.mean(q['id']) for q in s['curve']]
    ys = [100 * np.mean(q['ood']) for q in s['curve']]
    color = colors[i % len(colors)]
    ax.plot(xs, ys, '-o', color=color, markersize=4, linewidth=1.2,
            label=method)
    ax.plot(100 * np.mean(s['id_accuracy']), 100 * np.mean(s['ood_accuracy']),
            '*', color=color, markersize=16, markeredgecolor='black')
  ax.set_xlabel('ID accuracy, clean test digits (%)')
  ax.set_ylabel(f'OOD accuracy, mean of {len(summary["shifts"])} shifted'
                ' domains (%)')
  ax.set_title('Each method over its strength (mean of seeds);'
               ' ★ = picked on ID validation', fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  return fig
