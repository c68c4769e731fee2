r"""The main command: robust fine-tuning methods compared by their frontiers.

    python -m train.demo --workdir runs/demo

Pre-trains a small ViT without labels on every domain of ``digits_domains``
(``train.contrastive``; kept in ``WORKDIR/foundation.npz``), then fine-tunes
it on the clean domain with every method of ``configs/demo.py``, each over a
sweep of its strength and several seeds. Per method it reports the point
picked on mean ID validation accuracy (a table), its whole ID/OOD curve (the
frontier plot) and whether another method's curve dominates it, and checks
the regime (a linear probe well below fine-tuning in distribution). Writes
``WORKDIR/results.json`` and ``WORKDIR/results.png``. Every run is an
ordinary ``train`` run in ``WORKDIR/runs/...`` (metrics, TensorBoard,
checkpoints, ``result.json``): running the command again reuses what is
finished, and compiled programs are cached in ``WORKDIR/jax_cache``.
"""

import functools
import hashlib
import json
import os
import re
import shutil
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np
import tqdm

from train import contrastive
from train import input_pipeline
from train import metrics as metrics_lib
from train import preemption
from train import sweep
from train import wise_ft

_DEFAULT_CONFIG = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs',
    'demo.py')
FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', 'runs/demo', 'Where everything is written.')
config_flags.DEFINE_config_file('config', _DEFAULT_CONFIG,
                                'configs/demo.py or a variant.',
                                lock_config=True)


def _set(config: ml_collections.ConfigDict, dotted: str, value) -> None:
  *parents, leaf = dotted.split('.')
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value


def _run_name(method: str, key: str, value, seed: int) -> str:
  name = f'{method}_{key.split(".")[-1]}={value}_seed{seed}'
  return re.sub(r'[^A-Za-z0-9_.=+-]', '_', name)


def _enable_compilation_cache(workdir: str) -> None:
  """Runs that differ in injected hyperparameters share compiled programs."""
  jax.config.update('jax_compilation_cache_dir',
                    os.path.join(workdir, 'jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def _finetune_config(config, spec, value, seed, data_dir, foundation_path):
  c = config.finetune.copy_and_resolve_references()
  for k, v in spec.overrides:
    _set(c, k, v)
  _set(c, spec.grid_key, value)
  c.seed = seed
  c.pretrained.path = foundation_path
  c.dataset.data_dir = data_dir
  return c


def _sha256(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


def _run_record(c: ml_collections.ConfigDict, foundation_sha256: str):
  return {'config': json.loads(c.to_json_best_effort(sort_keys=True)),
          'foundation_sha256': foundation_sha256}


def _reused(run_dir: str, record: dict) -> dict | None:
  """A finished run's results when its ``result.json`` matches, else None.

  It matches when it holds this config and was trained from this very
  foundation (its SHA-256); otherwise the run directory is stale and is
  removed, to be trained afresh. (A run directory without ``result.json`` is
  unfinished: it resumes.)
  """
  path = os.path.join(run_dir, 'result.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    saved = json.load(f)
  if {k: saved.get(k) for k in record} == record:
    return saved['results']
  shutil.rmtree(run_dir)  # Another config or foundation: start afresh.
  return None


def _write_result(run_dir: str, record: dict, results: dict) -> None:
  path = os.path.join(run_dir, 'result.json')
  with open(path + '.tmp', 'w') as f:
    json.dump({**record, 'results': results}, f, indent=1)
  os.replace(path + '.tmp', path)


def finetune_all(config, workdir: str, data_dir: str, foundation_path: str):
  """Every (method, value, seed) run; returns ``{(method, value, seed): r}``.

  Finished runs are reused; the others are trained by ``config.workers``
  processes at once (``train.sweep``), each keeping to one method while it
  has runs left (its programs are then traced and compiled once).
  """
  foundation_sha256 = _sha256(foundation_path)
  results, jobs, records = {}, [], {}
  for method in config.method_order:
    spec = config.methods[method]
    if spec.of:  # Evaluated inside another method's runs (WiSE-FT).
      continue
    for value in spec.grid:
      for seed in config.seeds:
        c = _finetune_config(config, spec, value, seed, data_dir,
                             foundation_path)
        run_dir = os.path.join(workdir, 'runs',
                               _run_name(method, spec.grid_key, value, seed))
        key = (method, value, seed)
        records[key] = (run_dir, _run_record(c, foundation_sha256))
        reused = _reused(run_dir, records[key][1])
        if reused is None:
          jobs.append((key, c, run_dir))
        else:
          results[key] = reused
  if jobs:  # Every set prepared here: workers must not race to prepare one.
    input_pipeline.check_available(jobs[0][1].dataset)
  bar = tqdm.tqdm(total=len(results) + len(jobs), initial=len(results),
                  desc='fine-tuning', unit='run')
  workers = sweep.default_workers(config.workers)
  for key, r in sweep.run_all(
      jobs, workers=workers, group=lambda key: key[0],  # By method.
      worker_init=functools.partial(_init_worker, workdir)):
    _write_result(*records[key], r)
    results[key] = r
    method, value, seed = key
    name = config.methods[method].grid_key.split('.')[-1]
    bar.set_postfix_str(f'{method} {name}={value} seed {seed}')
    bar.update(1)
  bar.close()
  return results


def _init_worker(workdir: str) -> None:
  """A sweep worker: the sweep's compilation cache, and quiet logs."""
  logging.set_verbosity(logging.WARNING)
  metrics_lib.quiet_libraries()
  _enable_compilation_cache(workdir)


def _ood(r: dict, shifts) -> float:
  return float(np.mean([r[f'eval/{d}_accuracy'] for d in shifts]))


def _wise_ft(config, workdir: str, method: str, value, alphas) -> list:
  """WiSE-FT accuracies of ``method``'s runs at ``value``, one per seed."""
  spec = config.methods[method]
  out = []
  for seed in config.seeds:
    run_dir = os.path.join(workdir, 'runs',
                           _run_name(method, spec.grid_key, value, seed))
    path = os.path.join(run_dir, wise_ft.RESULTS_FILE)
    saved = {}
    if os.path.exists(path):
      with open(path) as f:
        saved = json.load(f)
    if not all(str(float(a)) in saved for a in alphas):
      saved = {str(float(a)): r
               for a, r in wise_ft.run(run_dir, alphas).items()}
    out.append(saved)
  return out


def curves(config, results, workdir: str) -> dict:
  """Per method, per grid value: val, ID and mean-OOD accuracy per seed."""
  out = {}
  for method in config.method_order:
    spec = config.methods[method]
    rows = {}
    if spec.of:  # WiSE-FT of the runs of ``spec.of`` picked on validation.
      base = pick(out[spec.of])
      per_seed = _wise_ft(config, workdir, spec.of, base, spec.grid)
      for alpha in spec.grid:
        rs = [r[str(float(alpha))] for r in per_seed]
        rows[alpha] = {'val': [r['eval/val_accuracy'] for r in rs],
                       'id': [r['eval/id_accuracy'] for r in rs],
                       'ood': [_ood(r, config.shifts) for r in rs]}
      out[method] = {'grid_key': spec.grid_key, 'points': rows,
                     'on': {config.methods[spec.of].grid_key: base}}
      continue
    for value in spec.grid:
      per_seed = [results[(method, value, s)] for s in config.seeds]
      rows[value] = {'val': [r['eval/val_accuracy'] for r in per_seed],
                     'id': [r['eval/id_accuracy'] for r in per_seed],
                     'ood': [_ood(r, config.shifts) for r in per_seed]}
    out[method] = {'grid_key': spec.grid_key, 'points': rows, 'on': {}}
  return out


def pick(curve: dict):
  """The grid value of best mean validation accuracy (the first on a tie)."""
  points = curve['points']
  return max(points, key=lambda v: np.mean(points[v]['val']))


def _mean_point(p: dict) -> tuple[float, float]:
  return float(np.mean(p['id'])), float(np.mean(p['ood']))


def dominated_by(curves_: dict) -> dict[str, list[str]]:
  """Per method, the methods whose curve dominates its curve.

  Curve B dominates curve A when every point of A (mean over seeds) has a
  point of B at least as good in both ID and OOD accuracy, and B is not A's
  equal (some point of A is strictly beaten on one axis).
  """
  means = {m: [_mean_point(p) for p in c['points'].values()]
           for m, c in curves_.items()}
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


def summarize(config, curves_: dict) -> dict:
  """The table's rows, the frontier verdicts and the regime check."""
  dominance = dominated_by(curves_)
  summary = {'methods': {}, 'shifts': list(config.shifts),
             'seeds': list(config.seeds)}
  for method, c in curves_.items():
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


def table(summary) -> str:
  rows = []
  for method, s in summary['methods'].items():
    picked = ', '.join(_value(k, v) for k, v in s['picked'].items())
    rows.append([method, picked, _mean_std(s['val_accuracy']),
                 _mean_std(s['id_accuracy']), _mean_std(s['ood_accuracy']),
                 ', '.join(s['dominated_by']) or 'no'])
  return metrics_lib.format_table(
      rows, ['method', 'picked on ID val', 'val %', 'ID %', 'OOD % (mean)',
             'curve dominated by'])


def verdict(config, summary) -> str:
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


def plot(summary, path: str) -> None:
  """ID against mean OOD accuracy: one curve per method, picked point big."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
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
  tmp = path + '.tmp.png'
  fig.savefig(tmp, dpi=120)
  plt.close(fig)
  os.replace(tmp, path)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The whole demo; returns the summary written to results.json."""
  start = time.time()
  if not isinstance(config.workers, int) or config.workers < 0:
    raise ValueError(f'config.workers={config.workers!r}: expected an integer'
                     ' >= 0 (0: one per CPU core on CPU, 1 on an accelerator).')
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  _enable_compilation_cache(workdir)
  data_dir = config.data_dir or os.path.join(workdir, 'tfds')
  f = config.foundation.copy_and_resolve_references()
  f.dataset.data_dir = data_dir
  foundation_path = contrastive.pretrain(
      f, os.path.join(workdir, 'foundation.npz'))
  results = finetune_all(config, workdir, data_dir, foundation_path)
  summary = summarize(config, curves(config, results, workdir))
  summary['wall_seconds'] = time.time() - start
  with open(os.path.join(workdir, 'results.json.tmp'), 'w') as fp:
    json.dump(summary, fp, indent=1)
  os.replace(os.path.join(workdir, 'results.json.tmp'),
             os.path.join(workdir, 'results.json'))
  plot(summary, os.path.join(workdir, 'results.png'))
  if jax.process_index() == 0:
    print(f'\n{table(summary)}\n\nID: clean test digits; OOD: mean over'
          f' {", ".join(config.shifts)}. Mean ± std over seeds'
          f' {", ".join(map(str, config.seeds))}.\n\n'
          f'{verdict(config, summary)}\n\nWrote {workdir}/results.json and'
          f' results.png in {time.time() - start:.0f} s.')
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # The progress bars say enough.
  try:
    run(FLAGS.config, FLAGS.workdir)
  except preemption.Preempted as e:  # Every started run saved: a clean stop.
    print(f'\n{e}', file=sys.stderr)


if __name__ == '__main__':
  app.run(main)
