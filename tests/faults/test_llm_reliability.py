"""``python -m train.llm`` killed, stopped, resumed and refused, as users run it.

Each run is the smoke config (a tiny random Llama, generated rows) in a
subprocess; a kill is a real SIGKILL. The runs of this module share JAX's
persistent compilation cache, so only the first compiles.
"""

import fcntl
import glob
import os
import signal
import socket
import subprocess
import time

import pytest

from tests import llm_helpers
from tests import trainlib
from tests.faults.test_reliability import _wait_for_step  # pylint: disable=g-importing-member
from train.core import checkpoints
from train.core import metrics
from train.core import workdir_lock

pytestmark = pytest.mark.slow

# Slow enough to be killed in the middle: a checkpoint every 3 steps, a val
# loss every 2, the final evaluation on two short sets.
LONG = ('--config.num_train_steps=8', '--config.checkpoint_every_steps=3',
        '--config.log_every_steps=1', '--config.eval_every_steps=2',
        "--config.eval.modes=('loglik',)",
        "--config.data.test_sets=('boolq','piqa')",
        '--config.data.max_eval_examples=2')


@pytest.fixture(scope='session')
def shared(tmp_path_factory, worker_id):
  """One folder for every pytest-xdist worker of this session."""
  base = tmp_path_factory.getbasetemp()
  root = (base if worker_id == 'master' else base.parent) / 'llm_runs'
  root.mkdir(exist_ok=True)
  return root


@pytest.fixture(scope='session')
def cache(shared):
  """JAX's persistent compilation cache, shared by the runs of all workers."""
  return shared / 'jax_cache'


@pytest.fixture(scope='session')
def whole(shared, cache):
  """An uninterrupted run of LONG, made once for all workers."""
  workdir = str(shared / 'whole')
  with open(shared / 'whole.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # The first worker runs it.
    if not os.path.exists(os.path.join(workdir, 'result.json')):
      llm_helpers.run_llm(workdir, *LONG, cache_dir=cache)
  return workdir


def _assert_same_run(workdir_a, workdir_b):
  trainlib.assert_same_run(workdir_a, workdir_b,
                           state_of=llm_helpers.final_state)


def test_sigkill_then_the_same_command_resumes_exactly(whole, cache,
                                                      tmp_path):
  killed = str(tmp_path / 'killed')
  # Synchronous saves: the step-3 checkpoint is on disk once step 5 is
  # logged (a tiny step takes less than an asynchronous save).
  sync = '--config.async_checkpointing=False'
  proc = llm_helpers.start_llm(killed, *LONG, sync, cache_dir=cache)
  _wait_for_step(killed, 5, proc)  # Past the step-3 checkpoint.
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  saved = checkpoints.Checkpointer(os.path.join(killed, 'checkpoints'))
  assert saved.all_steps()[-1] in (3, 6)
  saved.close()
  result = llm_helpers.run_llm(killed, *LONG, sync, cache_dir=cache)
  assert 'Resumed from step' in result.stderr
  assert 'Took over the lock of a run that is no longer alive' in result.stderr
  _assert_same_run(whole, killed)


def test_sigterm_saves_the_step_exits_0_and_resumes_exactly(whole, cache,
                                                            tmp_path):
  stopped = str(tmp_path / 'stopped')
  proc = llm_helpers.start_llm(stopped, *LONG, cache_dir=cache)
  _wait_for_step(stopped, 4, proc)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-4000:]
  assert 'Traceback' not in err
  assert 'Stopped by SIGTERM after step' in err
  saved = checkpoints.Checkpointer(os.path.join(stopped, 'checkpoints'))
  step = saved.all_steps()[-1]
  saved.close()
  rows = metrics.read_jsonl(os.path.join(stopped, 'metrics.jsonl'))
  assert step >= 4 and rows[-1]['step'] == step  # Nothing lost.
  result = llm_helpers.run_llm(stopped, *LONG, cache_dir=cache)
  assert f'Resumed from step {step}' in result.stderr
  _assert_same_run(whole, stopped)


BAD_INPUT = [
    (('--config.optimizer.nmae=spd',), ['nmae']),
    # Every bad value is named at once, before any work.
    (('--config.model.lora.rank=0', '--config.optimizer.name=sgd',
      '--config.smoke.enabled=False'),
     ['config.model.lora.rank=0: must be > 0',
      "config.optimizer.name='sgd': must be one of",
      "config.model.path='': must name a folder"]),
    (('--config.optimizer.learning_rate=1e30',
      '--config.optimizer.warmup_steps=0'),
     ['Loss is nan', 'set config.optimizer.skip_nonfinite=True']),
]


@pytest.mark.parametrize('overrides,messages', BAD_INPUT,
                         ids=['unknown_key', 'bad_values', 'nan_loss'])
def test_bad_input_is_refused_naming_it(cache, tmp_path, overrides,
                                        messages):
  workdir = str(tmp_path / 'run')
  result = llm_helpers.run_llm(workdir, *LONG, *overrides, cache_dir=cache,
                               check=False)
  assert result.returncode != 0
  for message in messages:
    assert message in result.stderr, result.stderr[-3000:]
  assert not glob.glob(os.path.join(workdir, 'checkpoints', '[0-9]*'))


def test_a_workdir_of_another_config_is_refused_untouched(whole, cache):
  before = sorted(os.listdir(os.path.join(whole, 'checkpoints')))
  result = llm_helpers.run_llm(whole, *LONG, '--config.model.lora.rank=8',
                               cache_dir=cache, check=False)
  assert result.returncode != 0
  assert ("holds a run of a different config (keys ['model.lora.rank']"
          in result.stderr)
  assert sorted(os.listdir(os.path.join(whole, 'checkpoints'))) == before


def test_the_same_command_twice_is_refused_naming_the_holder(cache, tmp_path):
  workdir = str(tmp_path / 'run')
  with workdir_lock.WorkdirLock(workdir):  # As a live run holds it.
    result = llm_helpers.run_llm(workdir, *LONG, cache_dir=cache, check=False)
  assert result.returncode != 0
  assert (f'is in use by another run: host {socket.gethostname()}, pid'
          f' {os.getpid()}') in result.stderr, result.stderr[-3000:]


def test_the_smoke_config_as_the_readme_runs_it(tmp_path):
  """``python -m train.llm --config configs/commonsense.py:smoke`` as a user
  runs it (no compilation cache, nothing but the command): its table, and no
  warning a user cannot act on."""
  start = time.perf_counter()
  result = subprocess.run(
      llm_helpers.llm_command(str(tmp_path / 'smoke')),
      env=trainlib.env_with_devices(1), cwd=trainlib.REPO,
      capture_output=True, text=True, timeout=300)
  seconds = time.perf_counter() - start
  assert result.returncode == 0, result.stderr[-5000:]
  print(f'\n{seconds:.1f} s\n{result.stdout}')  # The README's time: measured.
  warnings = [line for line in result.stderr.splitlines()
              if line.startswith(('W', 'E')) or 'You are using a model' in line]
  assert not warnings, warnings
  lines = result.stdout.splitlines()
  assert lines[0].split() == ['set', 'generate', '%', 'loglik', '%']
  assert [l.split()[0] for l in lines[2:]] == sorted(
      llm_helpers.DATASETS) + ['mean']
