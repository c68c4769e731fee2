r"""The main command's work: robust fine-tuning methods compared by their frontiers.

``run_comparison(config, workdir)`` (what ``python -m train.demo`` runs)
pre-trains a small ViT without labels on every domain of ``digits_domains``
(``train.demo.contrastive``; kept in ``WORKDIR/foundation.npz``), then fine-tunes
it on the clean domain with every method of ``configs/demo.py``, each over a
sweep of its strength and several seeds, evaluates WiSE-FT on the runs it is
computed on, and hands the numbers to ``train.demo.analysis`` (the table, the
verdicts, the frontier plot). Writes ``WORKDIR/results.json`` and
``WORKDIR/results.png``.

Every run is an ordinary ``python -m train`` run in ``WORKDIR/runs/<name>``
(metrics, TensorBoard, checkpoints, ``result.json``). Running again reuses
what is finished and resumes what is not, by ``train.core.run_identity``: a run is
reused when its identity (its config with paths replaced by what they hold:
the foundation's SHA-256, the data's name, version and sizes) is the same, so
a workdir that was moved or copied, or data in another ``data_dir``, reuses
everything. A run that is damaged or of another identity is moved aside
(``stale_<name>_<time>``, ``damaged_<name>_<time>``), named in one line, and
trained again; nothing is deleted. Compiled programs are cached in
``WORKDIR/jax_cache``.
"""

import functools
import json
import os
import re
import time
from typing import Any, Mapping, Optional, Sequence

from absl import logging
import jax
from matplotlib import pyplot as plt
import ml_collections
import numpy as np
import tqdm

from train.demo import analysis
from train.demo import checks
from train.demo import contrastive
from train.core import files
from train.core import library_noise
from train.vision import input_pipeline
from train.core import metrics as metrics_lib
from train.core import run_identity
from train.demo import sweep
from train.vision import locations
from train.vision import wise_ft

RESULT_FILE = 'result.json'  # A finished run's record, in its directory.


LEARNING_RATE = 'optimizer.learning_rate'


def run_name(method: str, setting: Mapping[str, Any], seed: int) -> str:
  """A run's directory, e.g. ``SPD_learning_rate=0.003_weight_decay=1.0_seed0``."""
  parts = [f'{k.split(".")[-1]}={v}' for k, v in setting.items()]
  return re.sub(r'[^A-Za-z0-9_.=+-]', '_',
                '_'.join([method, *parts, f'seed{seed}']))


def _enable_compilation_cache(workdir: str) -> None:
  """Runs that differ in injected hyperparameters share compiled programs."""
  jax.config.update('jax_compilation_cache_dir',
                    os.path.join(workdir, 'jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def finetune_config(config: ml_collections.ConfigDict, spec,
                    setting: Mapping[str, Any], seed: int, data_dir: str,
                    foundation_path: str) -> ml_collections.ConfigDict:
  """The ``train`` config of one run of method ``spec`` at ``setting``."""
  c = config.finetune.copy_and_resolve_references()
  c.update_from_flattened_dict(dict(spec.overrides))
  c.update_from_flattened_dict(dict(setting))
  c.seed = seed
  c.pretrained.path = foundation_path
  c.dataset.data_dir = data_dir
  return c


def settings(spec, picked_rate: Optional[float]) -> dict[Any, dict]:
  """A method's settings, keyed as its curve's points are.

  ``grid_key`` over ``grid``; for a method run at another's learning rate
  (``lr_of``) with that ``picked_rate`` too; over ``lr_grid x grid`` when it
  has a whole grid (keys ``(lr, value)``).
  """
  if spec.lr_grid:
    return {(lr, v): {LEARNING_RATE: lr, spec.grid_key: v}
            for lr in spec.lr_grid for v in spec.grid}
  fixed = {LEARNING_RATE: picked_rate} if spec.lr_of else {}
  return {v: {**fixed, spec.grid_key: v} for v in spec.grid}


def _reused_record(run_dir: str, c: ml_collections.ConfigDict,
                   ident: dict) -> dict | None:
  """A finished run's record when it is this identity's, else None.

  A stale or damaged run is moved aside whole (``run_identity.reuse``); an
  unfinished one of this identity is left to resume, one of another moved
  aside.
  """
  owner = [run_dir]
  record = run_identity.reuse(os.path.join(run_dir, RESULT_FILE), ident,
                              owner=owner)
  if record is not None:
    run_identity.write_config(run_dir, c)  # Its current paths.
    return {'results': record['results'],
            'diagnostics': record['diagnostics']}
  run_identity.reuse(os.path.join(run_dir, run_identity.IDENTITY_FILE), ident,
                     owner=owner)
  return None


# A run's diagnostics (``analysis.DIAGNOSTICS``): per name, the metric
# ``train.vision.finetune`` logs and how its logged values become one number:
# 'last' (a whole-run or end-of-run value) or 'mean' (over the logged steps:
# the last step's lr is ~0). A run has those its optimizer logs.
DIAGNOSTIC_METRICS = {
    'fire_rate': ('train/spd_fire_rate', 'last'),
    'mean_ratio': ('train/spd_mean_ratio', 'mean'),
    'gamma_over_norm': ('train/ftp_gamma_over_norm', 'mean'),
    'at_radius_fraction': ('train/ftp_at_radius_fraction', 'mean'),
    'deviation_norm': ('train/spd_deviation_norm', 'last'),
}


def _diagnostics(run_dir: str) -> dict[str, float]:
  """What a finished run's metrics say of its drift (``train.vision.finetune``).

  SPD's fire rate (of the whole run) and mean projection ratio, FTP's mean
  share of its move kept and mean fraction of rows at its radius (means over
  the logged steps), and the deviation from the pre-trained weights at the
  end (``DIAGNOSTIC_METRICS``); each when the run logs it.
  """
  rows = [r for r in metrics_lib.read_jsonl(os.path.join(run_dir,
                                                         'metrics.jsonl'))
          if 'train/loss' in r]
  out = {}
  for name, (key, how) in DIAGNOSTIC_METRICS.items():
    if how == 'last':
      if key in rows[-1]:
        out[name] = rows[-1][key]
    else:
      values = [r[key] for r in rows if key in r]
      if values:
        out[name] = float(np.mean(values))
  return out


def finetune_all(config, workdir: str, methods: Sequence[str],
                 picked_rates: Mapping[str, float], data_dir: str,
                 foundation_path: str) -> dict:
  """Every run of ``methods``: ``{(method, setting key, seed): record}``.

  A record is ``{'results': eval metrics, 'diagnostics': ...}``. Finished
  runs are reused; the others are trained by ``config.workers`` processes at
  once (``train.demo.sweep``), each keeping to one method while it has runs left
  (its programs are then traced and compiled once).
  """
  records, jobs, planned = {}, [], {}
  for method in methods:
    spec = config.methods[method]
    for key, setting in settings(
        spec, picked_rates.get(spec.lr_of)).items():
      for seed in config.seeds:
        c = finetune_config(config, spec, setting, seed, data_dir,
                            foundation_path)
        run_dir = os.path.join(workdir, 'runs',
                               run_name(method, setting, seed))
        planned[(method, key, seed)] = (run_dir, locations.identity(c))
        reused = _reused_record(run_dir, c, planned[(method, key, seed)][1])
        if reused is None:
          jobs.append(((method, key, seed), c, run_dir))
        else:
          records[(method, key, seed)] = reused
  bar = tqdm.tqdm(total=len(records) + len(jobs), initial=len(records),
                  desc='fine-tuning', unit='run')
  for job_key, results in sweep.run_all(
      jobs, workers=sweep.default_workers(config.workers),
      group=lambda key: key[0],  # By method.
      worker_init=functools.partial(_init_worker, workdir)):
    run_dir, ident = planned[job_key]
    records[job_key] = {'results': results,
                        'diagnostics': _diagnostics(run_dir)}
    run_identity.write_record(os.path.join(run_dir, RESULT_FILE), ident,
                              **records[job_key])
    bar.set_postfix_str(os.path.basename(run_dir))
    bar.update(1)
  bar.close()
  return records


def _init_worker(workdir: str) -> None:
  """A sweep worker: the sweep's compilation cache, and quiet logs."""
  logging.set_verbosity(logging.WARNING)
  library_noise.quiet_libraries()
  _enable_compilation_cache(workdir)


def _wise_ft(config, workdir: str, spec, picked: Mapping[str, Any],
             data_dir: str, foundation_path: str) -> list[dict]:
  """WiSE-FT accuracies of the runs ``spec`` is computed on, one per seed.

  ``picked``: the setting of the runs of ``spec.of`` picked on validation.
  """
  base = config.methods[spec.of]
  out = []
  for seed in config.seeds:
    run_dir = os.path.join(workdir, 'runs', run_name(spec.of, picked, seed))
    saved = run_identity.load_json(
        os.path.join(run_dir, wise_ft.RESULTS_FILE)) or {}
    if not all(str(float(a)) in saved for a in spec.grid):
      c = finetune_config(config, base, picked, seed, data_dir,
                          foundation_path)
      saved = {str(float(a)): r for a, r in
               wise_ft.evaluate_finished_run(run_dir, spec.grid,
                                                      c).items()}
    out.append(saved)
  return out


def _curve(config, method: str, records: dict, picked_rates) -> dict:
  """A trained method's curve over its settings (``analysis.points``)."""
  spec = config.methods[method]
  keys = settings(spec, picked_rates.get(spec.lr_of))
  per_seed = lambda key: [records[(method, key, s)] for s in config.seeds]
  return {
      'keys': ((LEARNING_RATE, spec.grid_key) if spec.lr_grid
               else (spec.grid_key,)),
      'on': ({LEARNING_RATE: picked_rates[spec.lr_of]}
             if spec.lr_of and not spec.lr_grid else {}),
      'points': analysis.points(
          {k: [r['results'] for r in per_seed(k)] for k in keys},
          config.shifts, config.far_shifts,
          {k: [r['diagnostics'] for r in per_seed(k)] for k in keys})}


def method_curves(config, workdir: str, data_dir: str,
                  foundation_path: str) -> dict:
  """Every method's curve, trained in the protocol's order.

  First the methods that depend on no other; then, at the learning rates
  those picked on validation, the methods run at another's rate
  (``lr_of``); WiSE-FT on the runs of the method it interpolates.
  """
  curves, picked_rates = {}, {}
  trained = [m for m in config.method_order if not config.methods[m].of]
  later = [m for m in trained if config.methods[m].lr_of
           and not config.methods[m].lr_grid]
  for phase in ([m for m in trained if m not in later], later):
    records = finetune_all(config, workdir, phase, picked_rates, data_dir,
                           foundation_path)
    for method in phase:
      curves[method] = _curve(config, method, records, picked_rates)
      picked = analysis.setting_of(curves[method],
                                   analysis.pick(curves[method]))
      if LEARNING_RATE in picked:
        picked_rates[method] = picked[LEARNING_RATE]
  for method in config.method_order:
    spec = config.methods[method]
    if spec.of:  # WiSE-FT of the runs of ``spec.of`` picked on validation.
      base = curves[spec.of]
      picked = analysis.setting_of(base, analysis.pick(base))
      per_seed = _wise_ft(config, workdir, spec, picked, data_dir,
                          foundation_path)
      curves[method] = {'keys': (spec.grid_key,), 'on': picked,
                        'points': analysis.points(
                            {a: [r[str(float(a))] for r in per_seed]
                             for a in spec.grid},
                            config.shifts, config.far_shifts)}
  return {m: curves[m] for m in config.method_order}


def run_comparison(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The whole demo; returns the summary written to ``results.json``."""
  start = time.time()
  checks.check(config, num_devices=jax.device_count())
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  _enable_compilation_cache(workdir)
  results_path = os.path.join(workdir, 'results.json')
  run_identity.load_json(results_path)  # A damaged one is kept aside.
  data_dir = config.data_dir or os.path.join(workdir, 'tfds')
  f = config.foundation.copy_and_resolve_references()
  f.dataset.data_dir = data_dir
  foundation_path = contrastive.pretrain(
      f, os.path.join(workdir, 'foundation.npz'))
  c = config.finetune.copy_and_resolve_references()
  c.dataset.data_dir = data_dir
  input_pipeline.check_available(c.dataset)  # Before workers: no races.
  curves = method_curves(config, workdir, data_dir, foundation_path)
  summary = analysis.summarize(config, curves)
  text = [analysis.table(summary), analysis.diagnostics_table(summary)]
  if any(config.methods[m].lr_grid for m in config.method_order):
    shared = analysis.summarize(config, _shared_rate_curves(config, curves))
    summary['shared_rate_protocol'] = shared
    text += ['The same grid read by the paper\'s protocol (each regulariser'
             ' at its reference\'s picked learning rate):',
             analysis.table(shared), analysis.compare_protocols(shared,
                                                                summary)]
  summary['wall_seconds'] = time.time() - start
  _write_outputs(workdir, summary)
  if jax.process_index() == 0:
    print('\n' + '\n\n'.join(text) + f'\n\nID: clean test digits; near OOD:'
          f' mean over {", ".join(config.shifts)}; far OOD: mean over'
          f' {", ".join(config.far_shifts)}. Mean ± std over seeds'
          f' {", ".join(map(str, config.seeds))}.\n\n'
          f'{analysis.verdict(config, summary)}\n\nWrote'
          f' {workdir}/results.json and results.png in'
          f' {time.time() - start:.0f} s.')
  return summary


def _shared_rate_curves(config, curves: dict) -> dict:
  """The whole-grid curves cut to each reference's picked learning rate."""
  out = dict(curves)
  for method in config.method_order:
    spec = config.methods[method]
    if spec.lr_grid:
      reference = curves[spec.lr_of]
      rate = analysis.setting_of(reference, analysis.pick(reference))[
          LEARNING_RATE]
      out[method] = analysis.shared_rate(curves[method], rate)
  return out


def _write_outputs(workdir: str, summary: dict) -> None:
  """``results.json`` and ``results.png``, atomically."""
  with files.atomic_write(os.path.join(workdir, 'results.json')) as fp:
    json.dump(summary, fp, indent=1)
  fig = analysis.figure(summary)
  with files.atomic_write(os.path.join(workdir, 'results.png'), 'wb') as fp:
    fig.savefig(fp, format='png', dpi=120)
  plt.close(fig)
