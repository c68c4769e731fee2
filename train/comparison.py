r"""The main command's work: robust fine-tuning methods compared by their frontiers.

``run_comparison(config, workdir)`` (what ``python -m train.demo`` runs)
pre-trains a small ViT without labels on every domain of ``digits_domains``
(``train.contrastive``; kept in ``WORKDIR/foundation.npz``), then fine-tunes
it on the clean domain with every method of ``configs/demo.py``, each over a
sweep of its strength and several seeds, evaluates WiSE-FT on the runs it is
computed on, and hands the numbers to ``train.analysis`` (the table, the
verdicts, the frontier plot). Writes ``WORKDIR/results.json`` and
``WORKDIR/results.png``.

Every run is an ordinary ``python -m train`` run in ``WORKDIR/runs/<name>``
(metrics, TensorBoard, checkpoints, ``result.json``). Running again reuses
what is finished and resumes what is not, by ``train.run_identity``: a run is
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

from absl import logging
import jax
from matplotlib import pyplot as plt
import ml_collections
import tqdm

from train import analysis
from train import config_checks
from train import contrastive
from train import files
from train import input_pipeline
from train import metrics as metrics_lib
from train import run_identity
from train import sweep
from train import weight_ensembles

RESULT_FILE = 'result.json'  # A finished run's record, in its directory.


def run_name(method: str, key: str, value, seed: int) -> str:
  """The directory name of one run, e.g. ``SPD_weight_decay=0.1_seed0``."""
  name = f'{method}_{key.split(".")[-1]}={value}_seed{seed}'
  return re.sub(r'[^A-Za-z0-9_.=+-]', '_', name)


def _enable_compilation_cache(workdir: str) -> None:
  """Runs that differ in injected hyperparameters share compiled programs."""
  jax.config.update('jax_compilation_cache_dir',
                    os.path.join(workdir, 'jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def finetune_config(config: ml_collections.ConfigDict, spec, value, seed: int,
                    data_dir: str, foundation_path: str
                    ) -> ml_collections.ConfigDict:
  """The ``train`` config of one run of method ``spec`` at ``value``."""
  c = config.finetune.copy_and_resolve_references()
  c.update_from_flattened_dict(dict(spec.overrides))
  c.update_from_flattened_dict({spec.grid_key: value})
  c.seed = seed
  c.pretrained.path = foundation_path
  c.dataset.data_dir = data_dir
  return c


def _reused_result(run_dir: str, c: ml_collections.ConfigDict,
                   ident: dict) -> dict | None:
  """A finished run's results when it is this identity's, else None.

  A stale or damaged run is moved aside whole (``run_identity.reuse``); an
  unfinished one of this identity is left to resume, one of another moved
  aside.
  """
  owner = [run_dir]
  record = run_identity.reuse(os.path.join(run_dir, RESULT_FILE), ident,
                              owner=owner)
  if record is not None:
    run_identity.write_config(run_dir, c)  # Its current paths.
    return record['results']
  run_identity.reuse(os.path.join(run_dir, run_identity.IDENTITY_FILE), ident,
                     owner=owner)
  return None


def finetune_all(config, workdir: str, data_dir: str, foundation_path: str):
  """Every (method, value, seed) run; returns ``{(method, value, seed): r}``.

  Finished runs are reused; the others are trained by ``config.workers``
  processes at once (``train.sweep``), each keeping to one method while it
  has runs left (its programs are then traced and compiled once).
  """
  results, jobs, identities = {}, [], {}
  for method in config.method_order:
    spec = config.methods[method]
    if spec.of:  # Evaluated on another method's runs (WiSE-FT).
      continue
    for value in spec.grid:
      for seed in config.seeds:
        c = finetune_config(config, spec, value, seed, data_dir,
                            foundation_path)
        run_dir = os.path.join(workdir, 'runs',
                               run_name(method, spec.grid_key, value, seed))
        key = (method, value, seed)
        identities[key] = (run_dir, run_identity.identity(c))
        reused = _reused_result(run_dir, c, identities[key][1])
        if reused is None:
          jobs.append((key, c, run_dir))
        else:
          results[key] = reused
  bar = tqdm.tqdm(total=len(results) + len(jobs), initial=len(results),
                  desc='fine-tuning', unit='run')
  for key, r in sweep.run_all(
      jobs, workers=sweep.default_workers(config.workers),
      group=lambda key: key[0],  # By method.
      worker_init=functools.partial(_init_worker, workdir)):
    run_dir, ident = identities[key]
    run_identity.write_record(os.path.join(run_dir, RESULT_FILE), ident,
                              results=r)
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


def _wise_ft(config, workdir: str, method: str, value, alphas, data_dir: str,
             foundation_path: str) -> list[dict]:
  """WiSE-FT accuracies of ``method``'s runs at ``value``, one per seed."""
  spec = config.methods[method]
  out = []
  for seed in config.seeds:
    run_dir = os.path.join(workdir, 'runs',
                           run_name(method, spec.grid_key, value, seed))
    saved = run_identity.load_json(
        os.path.join(run_dir, weight_ensembles.RESULTS_FILE)) or {}
    if not all(str(float(a)) in saved for a in alphas):
      c = finetune_config(config, spec, value, seed, data_dir,
                          foundation_path)
      saved = {str(float(a)): r for a, r in
               weight_ensembles.evaluate_finished_run(run_dir, alphas,
                                                      c).items()}
    out.append(saved)
  return out


def method_curves(config, workdir: str, results: dict, data_dir: str,
                  foundation_path: str) -> dict:
  """Per method, its curve over its grid (``analysis.points``)."""
  curves = {}
  for method in config.method_order:
    spec = config.methods[method]
    if spec.of:  # WiSE-FT of the runs of ``spec.of`` picked on validation.
      base = analysis.pick(curves[spec.of])
      per_seed = _wise_ft(config, workdir, spec.of, base, spec.grid,
                          data_dir, foundation_path)
      per_value = {a: [r[str(float(a))] for r in per_seed] for a in spec.grid}
      on = {config.methods[spec.of].grid_key: base}
    else:
      per_value = {v: [results[(method, v, s)] for s in config.seeds]
                   for v in spec.grid}
      on = {}
    curves[method] = {'grid_key': spec.grid_key, 'on': on,
                      'points': analysis.points(per_value, config.shifts)}
  return curves


def run_comparison(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """The whole demo; returns the summary written to ``results.json``."""
  start = time.time()
  config_checks.check_demo(config, num_devices=jax.device_count())
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
  results = finetune_all(config, workdir, data_dir, foundation_path)
  summary = analysis.summarize(config, method_curves(
      config, workdir, results, data_dir, foundation_path))
  summary['wall_seconds'] = time.time() - start
  with files.atomic_write(results_path) as fp:
    json.dump(summary, fp, indent=1)
  fig = analysis.figure(summary)
  with files.atomic_write(os.path.join(workdir, 'results.png'), 'wb') as fp:
    fig.savefig(fp, format='png', dpi=120)
  plt.close(fig)
  if jax.process_index() == 0:
    print(f'\n{analysis.table(summary)}\n\nID: clean test digits; OOD: mean'
          f' over {", ".join(config.shifts)}. Mean ± std over seeds'
          f' {", ".join(map(str, config.seeds))}.\n\n'
          f'{analysis.verdict(config, summary)}\n\nWrote'
          f' {workdir}/results.json and results.png in'
          f' {time.time() - start:.0f} s.')
  return summary
