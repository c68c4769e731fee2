"""``python -m train.vqa`` as users run it: the smoke end to end and in time,
a SIGKILLed run resumed bit for bit, zero-shot and WiSE-FT through the same
command. Subprocesses: all slow. (SIGTERM's save-and-stop is the skeleton's,
tested on the other recipes: tests/faults.)"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests import trainlib
from tests.faults.test_reliability import _wait_for_step  # pylint: disable=g-importing-member
from train.core import checkpoints

pytestmark = pytest.mark.slow

SETS = ('vqav2_val', 'iv_vqa', 'cv_vqa', 'vqa_rephrasings', 'vqa_cp',
        'vqa_ce', 'advqa', 'okvqa', 'textvqa', 'vizwiz')
# Long enough to be killed in the middle; a short final evaluation.
LONG = ('--config.num_train_steps=12', '--config.checkpoint_every_steps=3',
        '--config.log_every_steps=1', '--config.eval_every_steps=4',
        '--config.data.max_eval_examples=2', "--config.data.near_ood=('vqa_cp',)",
        "--config.data.far_ood=('okvqa',)")
# The runs compared with the zero-shot one also evaluate WiSE-FT's ends.
WISE = LONG + ('--config.wise_ft.alphas=(0.0,1.0)',)
TIMING_KEYS = ('train/rows_per_second',)


def _command(workdir, *overrides, config='configs/vqa.py:smoke'):
  return [sys.executable, '-m', 'train.vqa', f'--config={config}',
          f'--workdir={workdir}', *overrides]


def _env(cache_dir=None, num_devices=1):
  extra = {}
  if cache_dir is not None:  # Compiled programs shared between the runs.
    extra = dict(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  return trainlib.env_with_devices(num_devices, **extra)


def _run(workdir, *overrides, cache_dir=None, check=True, num_devices=1):
  result = subprocess.run(_command(workdir, *overrides),
                          env=_env(cache_dir, num_devices),
                          cwd=trainlib.REPO, capture_output=True, text=True,
                          timeout=400)
  if check:
    assert result.returncode == 0, result.stderr[-6000:]
  return result


def _start(workdir, *overrides, cache_dir):
  return subprocess.Popen(_command(workdir, *overrides), env=_env(cache_dir),
                          cwd=trainlib.REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)


def _state(workdir):
  model, opt, rows = trainlib.final_state(workdir)
  return model, opt, [{k: v for k, v in r.items() if k not in TIMING_KEYS}
                      for r in rows]


@pytest.fixture(scope='module')
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp('jax_cache')


@pytest.fixture(scope='module')
def whole(tmp_path_factory, cache):
  workdir = str(tmp_path_factory.mktemp('whole'))
  _run(workdir, *WISE, cache_dir=cache)
  return workdir


def test_the_smoke_as_the_docs_run_it(tmp_path):
  """No cache, the docs' command: the table, in under three minutes."""
  workdir = str(tmp_path / 'smoke')
  start = time.perf_counter()
  result = _run(workdir)
  took = time.perf_counter() - start
  assert took < 180, f'the smoke took {took:.0f} s'
  lines = result.stdout.splitlines()
  assert lines[0].split() == ['set', 'test', '%']
  names = [line.split()[0] for line in lines[2:]]
  assert names == ['held_out'] + list(SETS) + ['id', 'near_ood', 'far_ood']
  with open(os.path.join(workdir, 'result.json')) as f:
    metrics = json.load(f)['metrics']
  for line in lines[2:]:
    name, value = line.split()
    assert float(value) == pytest.approx(metrics[f'test/{name}'], abs=1e-4)
  near = [metrics[f'test/{s}'] for s in SETS[1:7]]
  assert metrics['test/near_ood'] == pytest.approx(sum(near) / 6)
  print(f'smoke: {took:.1f} s\n{result.stdout}')


def test_sigkill_then_the_same_command_resumes_exactly(whole, cache,
                                                      tmp_path):
  killed = str(tmp_path / 'killed')
  sync = '--config.async_checkpointing=False'
  proc = _start(killed, *WISE, sync, cache_dir=cache)
  _wait_for_step(killed, 5, proc)  # Past the step-3 checkpoint.
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  saved = checkpoints.Checkpointer(os.path.join(killed, 'checkpoints'))
  assert saved.all_steps()[-1] in (3, 6)
  saved.close()
  result = _run(killed, *WISE, sync, cache_dir=cache)
  assert 'Resumed from step' in result.stderr
  trainlib.assert_same_run(whole, killed, state_of=_state)
  with open(os.path.join(whole, 'result.json')) as a, open(
      os.path.join(killed, 'result.json')) as b:
    assert json.load(a) == json.load(b)


def test_zero_shot_is_wise_ft_at_alpha_0_through_the_same_command(
    whole, cache, tmp_path):
  zero = str(tmp_path / 'zero')
  result = _run(zero, *LONG, '--config.num_train_steps=0', cache_dir=cache)
  assert result.stdout.splitlines()[0].split() == ['set', 'test', '%']
  saved = os.path.join(zero, 'checkpoints')
  assert not os.path.isdir(saved) or not [
      s for s in os.listdir(saved) if s.isdigit()]  # Nothing trained.
  with open(os.path.join(zero, 'result.json')) as f:
    zero_metrics = json.load(f)['metrics']
  with open(os.path.join(whole, 'result.json')) as f:
    whole_metrics = json.load(f)['metrics']
  names = ('held_out', 'vqav2_val', 'vqa_cp', 'okvqa', 'id', 'near_ood',
           'far_ood')
  assert sorted(zero_metrics) == sorted(f'test/{n}' for n in names)
  for name in names:  # Alpha 0 is the pre-trained model.
    assert whole_metrics[f'test/alpha_0/{name}'] == zero_metrics[
        f'test/{name}']
    assert f'test/alpha_1/{name}' in whole_metrics


def test_two_devices_equal_one(whole, cache, tmp_path):
  """Rows and adapters split over 'fsdp' (2 fake CPU devices; a micro-batch
  of 2 rows splits over 2 shards): the same run to float32 noise."""
  wide = str(tmp_path / 'wide')
  _run(wide, *WISE, '--config.mesh.fsdp=2', cache_dir=cache, num_devices=2)
  model_a, opt_a, rows_a = _state(whole)
  model_b, opt_b, rows_b = _state(wide)
  trainlib.assert_trees_equal(model_a, model_b, rtol=1e-5, atol=1e-6)
  trainlib.assert_trees_equal(opt_a, opt_b, rtol=1e-4, atol=1e-7)
  trainlib.assert_rows_equal(rows_a, rows_b, rtol=1e-5, atol_for={
      k: 1e-6 for r in rows_a for k in r})
