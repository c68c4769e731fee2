r"""The embedded default: does SPD keep a foundation model's robustness?

    python -m train.demo --workdir runs/demo

Pre-trains a small ViT on every domain of ``digits_domains`` (once; kept in
``WORKDIR/foundation.npz``), fine-tunes it on the clean domain with AdamW,
L2-SP, SPD, LoRA and LoRA+SPD over several seeds, picks each method's
hyperparameter on in-distribution validation accuracy, and reports ID and
OOD test accuracy: a table in the terminal, ``WORKDIR/results.json`` and
``WORKDIR/results.png``. Every run is an ordinary ``train`` run in
``WORKDIR/runs/...`` (metrics, TensorBoard, checkpoints): running the command
again reuses what is finished. See ``configs/demo.py``.
"""

import json
import os
import re
import time

from absl import app
from absl import flags
from absl import logging
from flax import nnx
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np
import tqdm

from train import checkpoints
from train import digits_domains
from train import metrics as metrics_lib
from train import train
from train import weights

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


def foundation(config, workdir: str, data_dir: str) -> tuple[str, dict]:
  """Pre-trains (or reuses) the foundation model; returns its .npz path."""
  path = os.path.join(workdir, 'foundation.npz')
  f = config.foundation.copy_and_resolve_references()
  f.dataset.data_dir = data_dir
  f.dataset.ood = ml_collections.ConfigDict({
      d: {'name': f'digits_domains/{d}', 'split': 'test'}
      for d in ('clean',) + tuple(config.shifts)})
  run_dir = os.path.join(workdir, 'foundation')
  results = train.train_and_evaluate(f, run_dir, print_summary=False)
  if not os.path.exists(path):
    model = train.make_model(f, nnx.Rngs(0))
    directory = os.path.join(run_dir, 'checkpoints')
    saved = checkpoints.read_step(directory, f.num_train_steps)
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, saved['model'])
    nnx.update(model, state)
    weights.save_npz(model, path)
  return path, results


def finetune_all(config, workdir: str, data_dir: str, foundation_path: str):
  """Every (method, hyperparameter, seed) run; returns their eval metrics."""
  runs = []
  for method in config.method_order:
    spec = config.methods[method]
    for value in spec.grid:
      for seed in config.seeds:
        runs.append((method, spec, value, seed))
  results = {}
  bar = tqdm.tqdm(runs, desc='fine-tuning', unit='run')
  for method, spec, value, seed in bar:
    bar.set_postfix(run=f'{method} {spec.grid_key.split(".")[-1]}={value}'
                    f' seed {seed}')
    c = config.finetune.copy_and_resolve_references()
    for k, v in spec.overrides:
      _set(c, k, v)
    _set(c, spec.grid_key, value)
    c.seed = seed
    c.pretrained.path = foundation_path
    c.dataset.data_dir = data_dir
    c.dataset.ood = ml_collections.ConfigDict({
        d: {'name': f'digits_domains/{d}', 'split': 'test'}
        for d in config.shifts})
    run_dir = os.path.join(workdir, 'runs',
                           _run_name(method, spec.grid_key, value, seed))
    results[(method, value, seed)] = train.train_and_evaluate(
        c, run_dir, print_summary=False)
  return results


def summarize(config, results, foundation_results) -> dict:
  """Per method: the value picked on ID validation, and test accuracies."""
  shifts = list(config.shifts)
  summary = {}
  for method in config.method_order:
    spec = config.methods[method]
    val = {v: np.mean([results[(method, v, s)]['eval/val_accuracy']
                       for s in config.seeds]) for v in spec.grid}
    best = max(spec.grid, key=lambda v: val[v])  # First best on a tie.
    per_seed = [results[(method, best, s)] for s in config.seeds]
    ood = [np.mean([r[f'eval/{d}_accuracy'] for d in shifts])
           for r in per_seed]
    summary[method] = {
        'picked': {spec.grid_key: best},
        'val_accuracy_by_value': {str(v): float(a) for v, a in val.items()},
        'id_accuracy': [r['eval/id_accuracy'] for r in per_seed],
        'ood_accuracy': [float(o) for o in ood],
        'ood_accuracy_by_domain': {
            d: [r[f'eval/{d}_accuracy'] for r in per_seed] for d in shifts},
    }
  f = foundation_results
  summary['Foundation (no fine-tuning)'] = {
      'picked': {},
      'id_accuracy': [f['eval/clean_accuracy']],
      'ood_accuracy': [float(np.mean([f[f'eval/{d}_accuracy']
                                      for d in shifts]))],
      'ood_accuracy_by_domain': {d: [f[f'eval/{d}_accuracy']]
                                 for d in shifts},
  }
  return summary


def _mean_std(xs) -> str:
  xs = 100 * np.asarray(xs)
  return f'{xs.mean():5.1f} ± {xs.std():3.1f}' if len(xs) > 1 else (
      f'{xs.mean():5.1f}')


def table(summary) -> str:
  rows = []
  for method, s in summary.items():
    picked = ', '.join(f'{k.split(".")[-1]}={v}' for k, v in
                       s['picked'].items()) or '-'
    rows.append([method, picked, _mean_std(s['id_accuracy']),
                 _mean_std(s['ood_accuracy'])])
  return metrics_lib.format_table(
      rows, ['method', 'picked on ID val', 'ID acc %', 'OOD acc % (mean)'])


def plot(summary, path: str) -> None:
  """ID against mean OOD accuracy, one point (mean ± std) per method."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4.5))
  for method, s in summary.items():
    idm, oodm = 100 * np.asarray(s['id_accuracy']), 100 * np.asarray(
        s['ood_accuracy'])
    marker = '*' if method.startswith('Foundation') else 'o'
    ax.errorbar(idm.mean(), oodm.mean(), xerr=idm.std(), yerr=oodm.std(),
                fmt=marker, markersize=12 if marker == '*' else 7,
                capsize=3, label=method)
  ax.set_xlabel('ID accuracy, clean digits (%)')
  ax.set_ylabel('OOD accuracy, mean of shifted domains (%)')
  ax.set_title('Fine-tuning a digits "foundation" ViT')
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
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  data_dir = config.data_dir or os.path.join(workdir, 'tfds')
  digits_domains.build(data_dir, configs=('mixture', 'clean') + tuple(
      config.shifts))
  foundation_path, foundation_results = foundation(config, workdir, data_dir)
  results = finetune_all(config, workdir, data_dir, foundation_path)
  summary = summarize(config, results, foundation_results)
  with open(os.path.join(workdir, 'results.json.tmp'), 'w') as f:
    json.dump(summary, f, indent=2)
  os.replace(os.path.join(workdir, 'results.json.tmp'),
             os.path.join(workdir, 'results.json'))
  plot(summary, os.path.join(workdir, 'results.png'))
  if jax.process_index() == 0:
    print(f'\n{table(summary)}\n\nID: clean test digits; OOD: mean over'
          f' {", ".join(config.shifts)}. {len(config.seeds)} seed(s).'
          f'\nWrote {workdir}/results.json and results.png in'
          f' {time.time() - start:.0f} s.')
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # The progress bars say enough.
  run(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
