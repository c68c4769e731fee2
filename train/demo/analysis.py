r"""Reading a comparison of fine-tuning methods: pure functions of numbers.

The demo (``train.demo.comparison``) trains every method of ``configs/demo.py``
over a grid of its strength and several seeds; this module turns the
accuracies into what it reports, and does nothing else (it never trains,
evaluates, reads or writes files):

- :func:`points`: per setting of a method, the per-seed validation, ID, near-
  and far-OOD accuracies and the run's diagnostics (its curve).
- :func:`pick`: the setting of best mean validation accuracy.
- :func:`shared_rate`: a curve over learning rate x strength cut down to one
  learning rate (the paper's protocol, from a whole grid).
- :func:`dominated_by`: which methods' curves dominate each method's curve,
  on ID against near or against far OOD.
- :func:`summarize`: the table's rows, the verdicts and the regime check, as
  written to ``results.json``; :func:`table`, :func:`diagnostics_table`,
  :func:`verdict` and :func:`compare_protocols` put them in words,
  :func:`figure` draws the frontier plots.

A curve is ``{'keys': (dotted keys of a setting), 'on': {fixed settings},
'points': {setting: point}}``, where a setting is the value of the one key,
or a tuple of the values of several (learning rate, strength).

Example (two methods, one seed; B is better on both axes at every point):

>>> def curve(id_, ood):
...   result = {'eval/val_accuracy': .5, 'eval/id_accuracy': id_,
...             'eval/x_accuracy': ood, 'eval/y_accuracy': ood}
...   return {'keys': ('lr',), 'on': {},
...           'points': points({1: [result]}, ('x',), ('y',))}
>>> dominated_by({'A': curve(.6, .3), 'B': curve(.7, .4)}, 'near')
{'A': ['B'], 'B': []}
"""

from typing import Any, Mapping, Optional, Sequence

import matplotlib
import numpy as np

from train.core import metrics as metrics_lib

matplotlib.use('Agg')  # Figures are saved, never shown.
from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

AXES = {'near': 'near OOD', 'far': 'far OOD'}
# A run's diagnostics, as ``train.demo.comparison`` reads them from its metrics,
# and their columns in :func:`diagnostics_table`: (name, header, scale,
# digits). Any may be missing from a run (e.g. FTP's without FTP).
DIAGNOSTIC_COLUMNS = (
    ('fire_rate', 'SPD fire rate %', 100, 1),
    ('mean_ratio', 'SPD mean r_t %', 100, 2),
    ('gamma_over_norm', 'FTP mean gamma/norm %', 100, 1),
    ('at_radius_fraction', 'FTP mean at radius %', 100, 1),
    ('deviation_norm', '||theta - theta_0||', 1, 2),
)
DIAGNOSTICS = tuple(c[0] for c in DIAGNOSTIC_COLUMNS)


def mean_over(result: Mapping[str, float], sets: Sequence[str]) -> float:
  """The mean accuracy of one run's result over the eval sets ``sets``."""
  return float(np.mean([result[f'eval/{d}_accuracy'] for d in sets]))


def points(per_setting: Mapping[Any, Sequence[Mapping[str, float]]],
           near: Sequence[str], far: Sequence[str],
           diagnostics: Optional[Mapping[Any, Sequence[Mapping]]] = None
           ) -> dict[Any, dict[str, Any]]:
  """``{setting: {'val', 'id', 'near', 'far': [...], 'diagnostics'}}``.

  Args:
    per_setting: per setting, the results of its runs (one per seed), each
      ``{'eval/<set>_accuracy': ...}``.
    near: the near-OOD sets, whose mean is ``near``; ``far`` likewise.
    diagnostics: per setting, each run's ``{name: value}`` for names of
      ``DIAGNOSTICS`` (any may be missing, e.g. without SPD); lists of
      those per seed go in the point's ``diagnostics`` (None when absent).
  """
  out = {}
  for setting, rs in per_setting.items():
    diag = None
    if diagnostics is not None:
      runs = diagnostics[setting]
      diag = {k: [d[k] for d in runs] for k in DIAGNOSTICS
              if all(d.get(k) is not None for d in runs)} or None
    out[setting] = {'val': [r['eval/val_accuracy'] for r in rs],
                    'id': [r['eval/id_accuracy'] for r in rs],
                    'near': [mean_over(r, near) for r in rs],
                    'far': [mean_over(r, far) for r in rs],
                    'diagnostics': diag}
  return out


def pick(curve: Mapping[str, Any]) -> Any:
  """The setting of best mean validation accuracy (the first on a tie)."""
  values = curve['points']
  return max(values, key=lambda v: np.mean(values[v]['val']))


def setting_of(curve: Mapping[str, Any], setting: Any) -> dict[str, Any]:
  """``{dotted key: value}`` of one setting, with the curve's fixed ones."""
  values = setting if isinstance(setting, tuple) else (setting,)
  return {**dict(zip(curve['keys'], values)), **curve['on']}


def shared_rate(curve: Mapping[str, Any], rate: float) -> dict[str, Any]:
  """A learning-rate x strength curve at one learning rate (its first key).

  The paper's protocol read from a whole grid: the strengths at ``rate``.
  """
  return {'keys': tuple(curve['keys'][1:]),
          'on': {**curve['on'], curve['keys'][0]: rate},
          'points': {s[1:] if len(s) > 2 else s[1]: p
                     for s, p in curve['points'].items() if s[0] == rate}}


def _means(p: Mapping[str, Sequence[float]], axis: str) -> tuple[float, float]:
  return float(np.mean(p['id'])), float(np.mean(p[axis]))


def dominated_by(curves: Mapping[str, Mapping[str, Any]],
                 axis: str) -> dict[str, list[str]]:
  """Per method, the methods whose curve dominates its curve on ``axis``.

  Curve B dominates curve A when every point of A (mean over seeds) has a
  point of B at least as good in both ID and ``axis`` ('near' or 'far' OOD)
  accuracy, and B is not A's equal (some point of A is strictly beaten on
  one of them).
  """
  means = {m: [_means(p, axis) for p in c['points'].values()]
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


def _row(curve: Mapping[str, Any], dominance: Mapping[str, list]) -> dict:
  best = pick(curve)
  p = curve['points'][best]
  return {
      'picked': setting_of(curve, best),
      'val_accuracy': p['val'], 'id_accuracy': p['id'],
      'near_ood_accuracy': p['near'], 'far_ood_accuracy': p['far'],
      'diagnostics': p['diagnostics'],
      'dominated_by': dominance,
      'curve': [{'setting': setting_of(curve, s), **q}
                for s, q in curve['points'].items()],
  }


def summarize(config, curves: Mapping[str, Mapping[str, Any]]) -> dict:
  """The table's rows, the frontier verdicts and the regime check.

  Args:
    config: the demo's config (``shifts``, ``far_shifts``, ``seeds``,
      ``linear_probe``, ``vanilla``, ``min_id_gap``).
    curves: per method, its curve (see the module docstring).
  """
  dominance = {axis: dominated_by(curves, axis) for axis in AXES}
  summary = {'methods': {}, 'near_shifts': list(config.shifts),
             'far_shifts': list(config.far_shifts),
             'seeds': list(config.seeds)}
  for method, c in curves.items():
    summary['methods'][method] = _row(
        c, {axis: dominance[axis][method] for axis in AXES})
  lp = summary['methods'][config.linear_probe]
  ft = summary['methods'][config.vanilla]
  gap = float(np.mean(ft['id_accuracy']) - np.mean(lp['id_accuracy']))
  lp_near = float(np.mean(lp['near_ood_accuracy']))
  summary['regime'] = {
      'id_gap_ft_minus_lp': gap,
      'id_gap_holds': bool(gap >= config.min_id_gap),
      'ft_settings_above_lp_near_ood': [
          q['setting'] for q in ft['curve'] if np.mean(q['near']) > lp_near],
  }
  return summary


def _mean_std(xs, scale: float = 100, digits: int = 1) -> str:
  xs = scale * np.asarray(xs, np.float64)
  if len(xs) < 2:
    return f'{xs.mean():.{digits}f}'
  return f'{xs.mean():.{digits}f} ± {xs.std():.{digits}f}'


def _setting(picked: Mapping[str, Any]) -> str:
  def one(key, v):
    return f'{key.split(".")[-1]}={v:g}' if isinstance(v, float) else (
        f'{key.split(".")[-1]}={v}')
  return ', '.join(one(k, v) for k, v in picked.items())


def table(summary: Mapping[str, Any]) -> str:
  """One row per method: its pick, val, ID, near and far OOD, dominance."""
  rows = []
  for method, s in summary['methods'].items():
    rows.append([method, _setting(s['picked']), _mean_std(s['val_accuracy']),
                 _mean_std(s['id_accuracy']),
                 _mean_std(s['near_ood_accuracy']),
                 _mean_std(s['far_ood_accuracy'])]
                + [', '.join(s['dominated_by'][a]) or 'no' for a in AXES])
  return metrics_lib.format_table(
      rows, ['method', 'picked on ID val', 'val %', 'ID %', 'near OOD %',
             'far OOD %', 'dominated (near) by', 'dominated (far) by'])


def diagnostics_table(summary: Mapping[str, Any]) -> str:
  """How hard each method's picked runs pulled towards the start."""
  rows = []
  for method, s in summary['methods'].items():
    d = s['diagnostics'] or {}
    rows.append([method, _setting(s['picked'])] + [
        _mean_std(d[name], scale, digits) if name in d else '-'
        for name, _, scale, digits in DIAGNOSTIC_COLUMNS])
  return metrics_lib.format_table(
      rows, ['method', 'picked'] + [c[1] for c in DIAGNOSTIC_COLUMNS])


def _versus(summary, a: str, b: str) -> str:
  sa, sb = summary['methods'][a], summary['methods'][b]
  parts = [f'{name} {100 * np.mean(sa[k]):.1f} vs {100 * np.mean(sb[k]):.1f}'
           for name, k in (('ID', 'id_accuracy'),
                           ('near', 'near_ood_accuracy'),
                           ('far', 'far_ood_accuracy'))]
  return f'{a} ({_setting(sa["picked"])}) against {b}: ' + ', '.join(parts)


def verdict(config, summary: Mapping[str, Any]) -> str:
  """What the numbers say, in words."""
  r = summary['regime']
  lines = [
      f'Regime: vanilla fine-tuning ({config.vanilla}) is'
      f' {100 * r["id_gap_ft_minus_lp"]:.1f} points above the linear probe on'
      f' ID (required: {100 * config.min_id_gap:.0f}):'
      f' {"holds" if r["id_gap_holds"] else "DOES NOT HOLD"}.']
  for method in summary['methods']:
    spec = config.methods.get(method)
    if spec is not None and spec.lr_of and not spec.lr_grid:
      lines.append(_versus(summary, method, spec.lr_of) + '.')
  for axis, name in AXES.items():
    free = [m for m, s in summary['methods'].items()
            if not s['dominated_by'][axis]]
    lines.append(f'Not dominated on ID and {name}: ' + ', '.join(free) + '.')
  return '\n'.join(lines)


def compare_protocols(shared: Mapping[str, Any],
                      whole: Mapping[str, Any]) -> str:
  """Where the shared-learning-rate protocol and the whole grid disagree."""
  lines = []
  for method, s in whole['methods'].items():
    t = shared['methods'][method]
    changes = [f'picks {_setting(t["picked"])} -> {_setting(s["picked"])}'
               ] if t['picked'] != s['picked'] else []
    for axis, name in AXES.items():
      if t['dominated_by'][axis] != s['dominated_by'][axis]:
        changes.append(f'dominated on {name} by'
                       f' {", ".join(t["dominated_by"][axis]) or "none"} ->'
                       f' {", ".join(s["dominated_by"][axis]) or "none"}')
    lines.append(f'{method}: ' + ('; '.join(changes) if changes else
                                  'the same pick and verdicts'))
  return '\n'.join(lines)


def figure(summary: Mapping[str, Any]) -> plt.Figure:
  """ID against near and far OOD: a curve per method, its pick starred."""
  fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
  colors = plt.get_cmap('tab10').colors
  for ax, (axis, name) in zip(axes, AXES.items()):
    for i, (method, s) in enumerate(summary['methods'].items()):
      xs = [100 * np.mean(q['id']) for q in s['curve']]
      ys = [100 * np.mean(q[axis]) for q in s['curve']]
      color = colors[i % len(colors)]
      ax.plot(xs, ys, 'o', color=color, markersize=4, label=method,
              linestyle='-' if len(s['curve']) <= 8 else 'none')
      ax.plot(100 * np.mean(s['id_accuracy']),
              100 * np.mean(s[f'{axis}_ood_accuracy']), '*', color=color,
              markersize=16, markeredgecolor='black')
    shifts = summary[f'{axis}_shifts']
    ax.set_xlabel('ID accuracy, clean test digits (%)')
    ax.set_ylabel(f'{name} accuracy, mean of {len(shifts)} shifts (%)')
    ax.set_title(f'{name}: {", ".join(shifts)}', fontsize=9)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle('Each method over its setting (mean of seeds);'
               ' ★ = picked on ID validation', fontsize=10)
  fig.tight_layout()
  return fig
