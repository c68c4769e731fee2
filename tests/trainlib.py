"""Helpers for tests that run ``python -m train`` as users do."""

import os
import subprocess
import sys

import jax
import numpy as np

from train.core import checkpoints
from train.core import metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING_KEYS = ('train/images_per_second',)


def train_command(workdir, data_dir, *overrides, config='configs/tiny.py'):
  return [sys.executable, '-m', 'train', f'--config={config}',
          f'--workdir={workdir}', f'--config.dataset.data_dir={data_dir}',
          *overrides]


def env_with_devices(num_devices=1, **extra):
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={num_devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  env.update(extra)
  return env


def run_train(workdir, data_dir, *overrides, num_devices=1, check=True,
              timeout=600, config='configs/tiny.py'):
  result = subprocess.run(
      train_command(workdir, data_dir, *overrides, config=config),
      env=env_with_devices(num_devices), cwd=REPO, capture_output=True,
      text=True, timeout=timeout)
  if check:
    assert result.returncode == 0, (
        f'train failed (exit {result.returncode}):\n{result.stderr[-6000:]}')
  return result


def final_state(workdir):
  """(model, optimizer, metrics rows without timings) of a finished run."""
  directory = os.path.join(workdir, 'checkpoints')
  step = max(int(s) for s in os.listdir(directory) if s.isdigit())
  saved = checkpoints.read_step(directory, step)
  rows = [{k: v for k, v in r.items() if k not in TIMING_KEYS}
          for r in metrics.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))]
  return saved['model'], saved['optimizer'], rows


def assert_same_run(workdir_a, workdir_b, *, rows=True,
                    state_of=final_state):
  """Two finished runs bit for bit: model (or adapters), optimizer state
  (anchors included) and, unless ``rows=False``, the logged metrics.
  ``state_of``: the recipe's :func:`final_state`."""
  model_a, opt_a, rows_a = state_of(workdir_a)
  model_b, opt_b, rows_b = state_of(workdir_b)
  assert_trees_equal(model_a, model_b)
  assert_trees_equal(opt_a, opt_b)
  if rows:
    assert_rows_equal(rows_a, rows_b)


def assert_trees_equal(a, b, *, rtol=0.0, atol=0.0, skip=None):
  """Every leaf equal within tolerance; the message lists all that are not.

  ``skip``: a substring of the paths of leaves not compared.
  """
  assert jax.tree.structure(a) == jax.tree.structure(b)
  bad = []
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a),
                          jax.tree.leaves(b)):
    if skip and skip in jax.tree_util.keystr(path):
      continue
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if not np.allclose(x, y, rtol=rtol, atol=atol):
      bad.append(f'{jax.tree_util.keystr(path)}: max |diff|'
                 f' {np.max(np.abs(x - y)):.3g}, max |x| {np.max(np.abs(x)):.3g}')
  assert not bad, '\n'.join(bad)


def assert_rows_equal(a, b, *, rtol=0.0, atol_for=None):
  """Same logged steps and values; ``atol_for``: {key: atol} exceptions."""
  atol_for = atol_for or {}
  assert [r['step'] for r in a] == [r['step'] for r in b]
  for ra, rb in zip(a, b):
    assert ra.keys() == rb.keys(), (ra.keys(), rb.keys())
    for k in ra:
      np.testing.assert_allclose(ra[k], rb[k], rtol=rtol,
                                 atol=atol_for.get(k, 0.0),
                                 err_msg=f'{k} at step {ra["step"]}')
