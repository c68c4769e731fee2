"""The paper's baselines in the recipe: linear probe, LP-FT and WiSE-FT.

Each test trains the tiny config for a few steps and checks the method against
what it must be by definition: a model built afresh (the run's start), a
separate linear-probe run (LP-FT's first stage), the float64 mean of two
weight sets (WiSE-FT at alpha 0.5), an uninterrupted run (a killed one).
"""

import json
import logging
import os
import signal
import subprocess
import sys

from flax import nnx
import jax
import numpy as np
import pytest

from configs import tiny
from train.core import checkpoints
from train.vision import evaluation
from train.vision import finetune
from train.vision import input_pipeline
from train.vision import mesh as mesh_lib
from train.vision import model_setup
from train.vision import train_modes
from train.vision import wise_ft
from tests import trainlib
from tests.faults.test_reliability import _wait_for_step


def _config(data_dir, **overrides):
  config = tiny.get_config()
  config.dataset.data_dir = data_dir
  config.optimizer.warmup_steps = 0
  config.update_from_flattened_dict(overrides)  # Dotted keys.
  return config


def _flat(tree) -> dict[str, np.ndarray]:
  """``{'blocks/0/attn/query/kernel': array}``, whatever the key types."""
  def name(path):
    return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k)))
                    for k in path)
  return {name(p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _pure_model(config):
  return nnx.to_pure_dict(nnx.state(
      model_setup.make_model(config, nnx.Rngs(config.seed))))


def _initial_model(config) -> dict[str, np.ndarray]:
  """The model a run starts from, built here (no pre-trained weights)."""
  return _flat(_pure_model(config))


def _start_file(workdir, config) -> dict[str, np.ndarray]:
  return _flat(wise_ft.load_start_model(workdir, _pure_model(config)))


def _step_model(workdir, step) -> dict[str, np.ndarray]:
  return _flat(checkpoints.read_step(os.path.join(workdir, 'checkpoints'),
                                     step)['model'])


def test_linear_probe_leaves_every_backbone_leaf_bitwise(digits_data_dir,
                                                        tmp_path):
  config = _config(digits_data_dir, train_mode='linear_probe',
                   **{'optimizer.name': 'adam'})
  finetune.train_and_evaluate(config, str(tmp_path), print_summary=False)
  before = _initial_model(config)
  after = _step_model(str(tmp_path), config.num_train_steps)
  assert before.keys() == after.keys()
  backbone = [k for k in before if not k.startswith('head/')]
  assert len(backbone) > 10
  for k in backbone:
    np.testing.assert_array_equal(after[k], before[k], err_msg=k)
    assert after[k].tobytes() == before[k].tobytes(), k  # -0.0 too.
  assert not np.array_equal(after['head/kernel'], before['head/kernel'])


def test_lp_ft_second_stage_starts_from_the_probed_head(digits_data_dir,
                                                        tmp_path):
  config = _config(digits_data_dir, train_mode='lp_ft',
                   num_train_steps=3, checkpoint_every_steps=100,
                   **{'lp_ft.probe_steps': 4, 'lp_ft.probe_learning_rate': 3e-2})
  lpft, probe = str(tmp_path / 'lpft'), str(tmp_path / 'probe')
  finetune.train_and_evaluate(config, lpft, print_summary=False)
  # The reference: a linear probe run of its own, as LP-FT's stage 1 is.
  finetune.train_and_evaluate(train_modes.probe_config(config), probe,
                              print_summary=False)
  initial = _initial_model(config)
  start = _start_file(lpft, config)
  boundary = _step_model(lpft, 4)
  assert start.keys() == boundary.keys() == initial.keys()
  for k in start:  # The saved start of stage 2 is the model after step 4.
    assert start[k].tobytes() == boundary[k].tobytes(), k
    if not k.startswith('head/'):  # The probe moved no backbone leaf.
      assert start[k].tobytes() == initial[k].tobytes(), k
  probed = _step_model(probe, 4)
  for k in ('head/kernel', 'head/bias'):
    assert not np.array_equal(start[k], initial[k])
    np.testing.assert_allclose(start[k], probed[k], rtol=1e-6, atol=1e-7,
                               err_msg=k)
  final = _step_model(lpft, 7)  # Stage 2 then trained the backbone.
  assert not np.array_equal(final['blocks/0/mlp/fc1/kernel'],
                            start['blocks/0/mlp/fc1/kernel'])


@pytest.mark.slow
def test_wise_ft_endpoints_and_midpoint(digits_data_dir, tmp_path):
  config = _config(digits_data_dir, **{'wise_ft.alphas': (0.0, 0.5, 1.0)})
  workdir = str(tmp_path)
  results = finetune.train_and_evaluate(config, workdir, print_summary=False)
  sets = [k for k in results if k.startswith('eval/')]
  assert len(sets) == 4  # val, id and two OOD sets.
  # alpha = 1: the fine-tuned model's own accuracies.
  for k in sets:
    assert results[f'wise_ft/1.0/{k}'] == results[k], k
  # alpha = 0: a model built afresh (the start), evaluated here.
  mesh = mesh_lib.make_mesh(config)
  with jax.set_mesh(mesh):
    fresh = model_setup.make_model(config, nnx.Rngs(config.seed))
    start_accuracy = evaluation.accuracies(fresh, config, mesh)
  for k in sets:
    assert results[f'wise_ft/0.0/{k}'] == start_accuracy[k], k
  # alpha = 0.5: the elementwise mean, from float64.
  start = _initial_model(config)
  tuned = _step_model(workdir, config.num_train_steps)
  mixed = _flat(wise_ft.interpolate(start, tuned, 0.5))
  for k in start:
    mean = ((start[k].astype(np.float64) + tuned[k]) / 2).astype(np.float32)
    assert mixed[k].dtype == np.float32
    np.testing.assert_array_equal(mixed[k], mean, err_msg=k)
  assert any(not np.array_equal(start[k], tuned[k]) for k in start)
  # The command on the finished workdir gives the same numbers.
  proc = subprocess.run(
      [sys.executable, '-m', 'train.vision.wise_ft_main', f'--workdir={workdir}',
       '--alphas=0,1'], env=trainlib.env_with_devices(1), cwd=trainlib.REPO,
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(os.path.join(workdir, wise_ft.RESULTS_FILE)) as f:
    by_alpha = json.load(f)
  assert set(by_alpha) == {'0.0', '1.0'}
  for k in sets:
    assert by_alpha['0.0'][k] == start_accuracy[k]
    assert by_alpha['1.0'][k] == results[k]


def test_interpolate_refuses_mismatched_models():
  with pytest.raises(ValueError, match=r"\['w'\] has shape"):
    wise_ft.interpolate({'w': np.zeros(2)}, {'w': np.zeros(3)}, 0.5)
  with pytest.raises(ValueError, match='non-float'):
    wise_ft.interpolate({'n': np.int32(1)}, {'n': np.int32(2)}, 0.5)


def test_wise_ft_without_a_start_model_says_so(tmp_path):
  with pytest.raises(FileNotFoundError, match='starting model'):
    wise_ft.load_start_model(str(tmp_path), {'w': np.zeros(1)})


# Slow enough steps (an evaluation each) to be killed in the middle of
# either stage: checkpoints at 3, 5 (the boundary), 6, 9 and 10.
LP_FT = ('--config.train_mode=lp_ft', '--config.lp_ft.probe_steps=5',
         '--config.num_train_steps=5', '--config.eval_every_steps=1',
         '--config.log_every_steps=1', '--config.checkpoint_every_steps=3')


def _kill_at(workdir, data_dir, step):
  """Starts (or resumes) the run and SIGKILLs it once ``step`` is logged."""
  proc = subprocess.Popen(
      trainlib.train_command(workdir, data_dir, *LP_FT),
      env=trainlib.env_with_devices(1), cwd=trainlib.REPO,
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  _wait_for_step(workdir, step, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return checkpoints.Checkpointer(
      os.path.join(workdir, 'checkpoints')).all_steps()[-1]


@pytest.mark.slow
def test_lp_ft_killed_in_either_stage_resumes_bitwise(digits_data_dir,
                                                      tmp_path):
  whole, killed = str(tmp_path / 'whole'), str(tmp_path / 'killed')
  trainlib.run_train(whole, digits_data_dir, *LP_FT)
  assert _kill_at(killed, digits_data_dir, 4) < 5  # In the probe.
  assert 5 <= _kill_at(killed, digits_data_dir, 8) < 9  # In fine-tuning.
  result = trainlib.run_train(killed, digits_data_dir, *LP_FT)
  assert 'Resumed from step' in result.stderr
  trainlib.assert_same_run(whole, killed)
  config = _config(digits_data_dir)
  start_a, start_b = _start_file(whole, config), _start_file(killed, config)
  for k in start_a:
    assert start_a[k].tobytes() == start_b[k].tobytes(), k


def test_staged_optimizer_switches_after_the_first_stage():
  import optax  # pylint: disable=g-import-not-at-top
  tx = train_modes.staged(optax.sgd(1.0), optax.sgd(10.0), first_steps=2)
  params = np.float32(0.0)
  state = tx.init(params)
  steps = []
  for _ in range(4):
    u, state = jax.jit(tx.update)(np.float32(1.0), state, params)
    steps.append(float(u))
  assert steps == [-1.0, -1.0, -10.0, -10.0]


def test_a_missing_set_is_prepared_only_when_the_config_allows(tmp_path,
                                                               caplog):
  dataset = tiny.get_config().dataset
  dataset.data_dir = str(tmp_path)
  dataset.prepare = False
  with pytest.raises(FileNotFoundError, match='config.dataset.prepare'):
    input_pipeline.source('digits_domains/invert', 'test', dataset)
  dataset.tfds_module = 'no_such_module_xyz'
  with pytest.raises(ValueError, match='tfds_module'):
    input_pipeline.source('digits_domains/invert', 'test', dataset)
  dataset.tfds_module = 'train.demo.digits_domains'
  dataset.prepare = True
  assert len(input_pipeline.source('digits_domains/invert', 'test',
                                   dataset)) == 400
  # A first run warns of nothing a user could act on: TFDS's is_prepared()
  # logs 'Variant folder ... has no dataset_info.json' when asked about a set
  # not yet built (14 such lines in the demo's first run, once).
  assert not [r.getMessage() for r in caplog.records
              if r.levelno >= logging.WARNING], caplog.text
