"""``python -m train.segmentation`` as users run it: the smoke run learns, a
SIGKILLed run resumes bit for bit, a bad config is refused by name.

Every test starts processes (slow). The runs of the resume test share JAX's
persistent compilation cache, so only the first compiles.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

from tests import trainlib
from tests.faults.test_reliability import _wait_for_step  # pylint: disable=g-importing-member
from train.core import checkpoints
from train.core import metrics

pytestmark = pytest.mark.slow

FAST_COMPILE = '--xla_backend_optimization_level=0'
# Short enough for a test, long enough to be killed in the middle.
SHORT = ('--config.num_train_steps=10', '--config.checkpoint_every_steps=3',
         '--config.log_every_steps=1', '--config.eval_every_steps=4',
         '--config.smoke.num_train=16', '--config.smoke.num_val=4',
         "--config.corruptions.names=('brightness',)",
         '--config.corruptions.severities=(1,)')


def _command(workdir, *overrides):
  return [sys.executable, '-m', 'train.segmentation',
          '--config=configs/segmentation.py:smoke', f'--workdir={workdir}',
          *overrides]


def _env(cache=None):
  extra = {}
  if cache is not None:
    extra = dict(JAX_COMPILATION_CACHE_DIR=str(cache),
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  env = trainlib.env_with_devices(1, **extra)
  if cache is not None:
    env['XLA_FLAGS'] += ' ' + FAST_COMPILE
  return env


def _run(workdir, *overrides, cache=None, check=True):
  result = subprocess.run(_command(workdir, *overrides), env=_env(cache),
                          cwd=trainlib.REPO, capture_output=True, text=True,
                          timeout=600)
  if check:
    assert result.returncode == 0, result.stderr[-6000:]
  return result


def test_smoke_learns_and_prints_the_table(tmp_path):
  """The README's command: clean mIoU at least twice the untrained one."""
  workdir = str(tmp_path / 'smoke')
  result = _run(workdir)
  with open(os.path.join(workdir, 'result.json')) as f:
    final = json.load(f)['metrics']
  rows = metrics.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  start = [r['eval/mIoU'] for r in rows if r['step'] == 0]
  assert len(start) == 1
  assert final['eval/mIoU'] >= 2 * start[0], (final['eval/mIoU'], start)
  for name in ('fog', 'defocus_blur', 'gaussian_noise', 'brightness'):
    assert 0 <= final[f'eval/{name}/mIoU'] <= 1
    assert f'eval/{name}/5/mIoU' in final
    assert name in result.stdout
  assert 'start (clean)' in result.stdout and 'corrupted mean' in result.stdout


def test_sigkill_then_the_same_command_resumes_exactly(tmp_path):
  cache = tmp_path / 'jax_cache'
  whole = str(tmp_path / 'whole')
  _run(whole, *SHORT, cache=cache)
  killed = str(tmp_path / 'killed')
  sync = '--config.async_checkpointing=False'
  proc = subprocess.Popen(_command(killed, *SHORT, sync), env=_env(cache),
                          cwd=trainlib.REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  _wait_for_step(killed, 5, proc)  # Past the step-3 checkpoint.
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  saved = checkpoints.Checkpointer(os.path.join(killed, 'checkpoints'))
  assert saved.all_steps()[-1] in (3, 6)
  saved.close()
  result = _run(killed, *SHORT, sync, cache=cache)
  assert 'Resumed from step' in result.stderr
  trainlib.assert_same_run(whole, killed)
  with open(os.path.join(whole, 'result.json')) as a, open(
      os.path.join(killed, 'result.json')) as b:
    assert json.load(a) == json.load(b)


def test_bad_config_and_missing_data_are_refused_by_name(tmp_path):
  result = _run(str(tmp_path / 'a'), '--config.data.num_classes=1',
                "--config.corruptions.names=('snow',)", check=False)
  assert result.returncode != 0
  assert 'config.data.num_classes=1' in result.stderr
  assert 'config.corruptions.names' in result.stderr
  empty = tmp_path / 'voc'
  empty.mkdir()
  result = subprocess.run(
      [sys.executable, '-m', 'train.segmentation',
       '--config=configs/segmentation.py:adamw',
       f'--workdir={tmp_path / "b"}', '--config.model.tiny=True',
       f'--config.data.dir={empty}'], env=_env(), cwd=trainlib.REPO,
      capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert os.path.join('ImageSets', 'SegmentationContext', 'train.txt') in (
      result.stderr)
