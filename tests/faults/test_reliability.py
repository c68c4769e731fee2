"""Faults a long run meets: kills, damaged checkpoints, many hosts, bad input.

Each test runs ``python -m train`` on the tiny config as a user would, and
checks what the program did and that nothing was lost.
"""

import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest

from train.core import checkpoints
from train.core import metrics
from train.core import workdir_lock
from tests import trainlib

# Every test here runs `python -m train` in subprocesses (kills, signals,
# several processes): the slow part of the suite.
pytestmark = pytest.mark.slow

# Slow enough steps (an evaluation each) to be killed in the middle.
LONG = ('--config.num_train_steps=10', '--config.eval_every_steps=1',
        '--config.log_every_steps=1', '--config.checkpoint_every_steps=3')


def _wait_for_step(workdir, step, proc, timeout=300):
  """Blocks until ``metrics.jsonl`` has a training row at ``step``."""
  path = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, proc.stderr.read()[-4000:]
    if os.path.exists(path):
      with open(path) as f:
        if any(f'"step": {step}, "train/' in line for line in f):
          return
    time.sleep(0.02)
  raise TimeoutError(f'step {step} never logged')


@pytest.fixture(scope='module')
def long_run(digits_data_dir, tmp_path_factory):
  """An uninterrupted run of LONG, shared by the interrupted ones."""
  whole = str(tmp_path_factory.mktemp('long') / 'whole')
  trainlib.run_train(whole, digits_data_dir, *LONG)
  return whole


@pytest.fixture(scope='module')
def tiny_run(digits_data_dir, tmp_path_factory):
  """An uninterrupted run of the tiny config on one device."""
  whole = str(tmp_path_factory.mktemp('tiny') / 'whole')
  trainlib.run_train(whole, digits_data_dir)
  return whole


def _start(workdir, data_dir, *overrides):
  return subprocess.Popen(
      trainlib.train_command(workdir, data_dir, *overrides),
      env=trainlib.env_with_devices(1), cwd=trainlib.REPO,
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_sigkill_then_same_command_resumes_exactly(digits_data_dir, long_run,
                                                  tmp_path):
  whole, killed = long_run, str(tmp_path / 'killed')
  proc = _start(killed, digits_data_dir, *LONG)
  _wait_for_step(killed, 5, proc)  # Past the step-3 checkpoint, before 6.
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert sorted(checkpoints.Checkpointer(
      os.path.join(killed, 'checkpoints')).all_steps())[-1] in (3, 6)
  result = trainlib.run_train(killed, digits_data_dir, *LONG)
  assert 'Resumed from step' in result.stderr
  # The killed run's lock is recognised as stale and taken over.
  assert 'Took over the lock of a run that is no longer alive' in result.stderr
  trainlib.assert_same_run(whole, killed)


def _truncate_largest_file(step_dir):
  files = [f for f in glob.glob(os.path.join(step_dir, '**', '*'),
                                recursive=True) if os.path.isfile(f)]
  victim = max(files, key=os.path.getsize)
  with open(victim, 'r+b') as f:
    f.truncate(os.path.getsize(victim) // 3)
  return victim


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_sigint_saves_the_step_and_resumes_exactly(
    digits_data_dir, long_run, tmp_path, sig):
  stopped = str(tmp_path / 'stopped')
  proc = _start(stopped, digits_data_dir, *LONG)
  _wait_for_step(stopped, 4, proc)  # After the step-3 checkpoint.
  proc.send_signal(sig)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-4000:]
  assert 'Traceback' not in err
  assert f'Stopped by {sig.name} after step' in err
  saved = checkpoints.Checkpointer(
      os.path.join(stopped, 'checkpoints')).all_steps()
  rows = metrics.read_jsonl(os.path.join(stopped, 'metrics.jsonl'))
  assert saved[-1] >= 4 and saved[-1] == rows[-1]['step']  # Nothing lost.
  if sig == signal.SIGINT:
    return  # The same path as SIGTERM from here on.
  result = trainlib.run_train(stopped, digits_data_dir, *LONG)
  assert f'Resumed from step {saved[-1]}' in result.stderr
  trainlib.assert_same_run(long_run, stopped)


def test_a_moved_workdir_resumes_exactly_with_its_data_elsewhere(
    digits_data_dir, tiny_run, tmp_path):
  """A stopped run, its workdir and its data copied elsewhere, resumes."""
  first = str(tmp_path / 'first')
  trainlib.run_train(first, digits_data_dir, '--config.max_steps_per_run=4')
  moved, data = str(tmp_path / 'disk2' / 'run'), str(tmp_path / 'disk2' / 'tfds')
  shutil.copytree(first, moved)
  shutil.copytree(digits_data_dir, data)
  shutil.rmtree(first)  # The old place is gone.
  result = trainlib.run_train(moved, data)
  assert 'Resumed from step 4' in result.stderr
  trainlib.assert_same_run(tiny_run, moved)


def test_the_same_command_twice_is_refused_naming_the_holder(
    digits_data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  with workdir_lock.WorkdirLock(workdir):  # As a live run holds it.
    result = trainlib.run_train(workdir, digits_data_dir, check=False)
  assert result.returncode != 0
  assert (f'is in use by another run: host {socket.gethostname()}, pid'
          f' {os.getpid()}, since ') in result.stderr, result.stderr[-3000:]
  assert not os.path.exists(os.path.join(workdir, 'checkpoints'))


def _assert_same_run_to_float_noise(workdir_1, workdir_2):
  """Final states equal but for the sums' order; returns both runs' rows."""
  model_1, opt_1, rows_1 = trainlib.final_state(workdir_1)
  model_2, opt_2, rows_2 = trainlib.final_state(workdir_2)
  key_bias = "['key']['bias']"  # Zero gradient: rounding noise (test_train).
  trainlib.assert_trees_equal(model_1, model_2, rtol=1e-5, atol=1e-6,
                              skip=key_bias)
  trainlib.assert_trees_equal(opt_1, opt_2, rtol=1e-4, atol=1e-6,
                              skip=key_bias)
  assert [r['step'] for r in rows_1] == [r['step'] for r in rows_2]
  return rows_1, rows_2


def test_mesh_changes_on_resume_8_devices_to_1_and_back(digits_data_dir,
                                                        tiny_run, tmp_path):
  workdir = str(tmp_path / 'moved')
  for num_devices, fsdp in ((8, 2), (1, 1), (8, 2)):  # Steps 1-2, 3-4, 5-6.
    trainlib.run_train(workdir, digits_data_dir, f'--config.mesh.fsdp={fsdp}',
                       '--config.max_steps_per_run=2',
                       num_devices=num_devices)
  _assert_same_run_to_float_noise(tiny_run, workdir)


def test_damaged_newest_checkpoint_falls_back_and_is_kept(digits_data_dir,
                                                          tiny_run, tmp_path):
  whole, damaged = tiny_run, str(tmp_path / 'damaged')
  trainlib.run_train(damaged, digits_data_dir)  # Checkpoints 3 and 6.
  ckpt_dir = os.path.join(damaged, 'checkpoints')
  _truncate_largest_file(os.path.join(ckpt_dir, '6'))
  result = trainlib.run_train(damaged, digits_data_dir)
  # The warning names both steps; the damaged one was moved, not deleted.
  assert 'Resuming from checkpoint step 3' in result.stderr
  assert 'step(s) [6] cannot be read' in result.stderr
  assert len(glob.glob(os.path.join(ckpt_dir, 'damaged_step_6_*'))) == 1
  # Steps 4-6 were trained again, exactly as before.
  trainlib.assert_same_run(whole, damaged, rows=False)


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_of_four_devices_match_one_of_eight(digits_data_dir,
                                                          tmp_path):
  single, multi = str(tmp_path / 'single'), str(tmp_path / 'multi')
  trainlib.run_train(single, digits_data_dir, '--config.mesh.fsdp=2',
                     num_devices=8)
  port = _free_port()
  procs = []
  for pid in range(2):
    env = trainlib.env_with_devices(
        4, JAX_COORDINATOR_ADDRESS=f'localhost:{port}', JAX_NUM_PROCESSES='2',
        JAX_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen(
        trainlib.train_command(multi, digits_data_dir, '--config.mesh.fsdp=2'),
        env=env, cwd=trainlib.REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True))
  try:
    for p in procs:
      _, err = p.communicate(timeout=600)
      assert p.returncode == 0, err[-6000:]
  finally:  # A hung process must not outlive the test.
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert 'JAX process 1/2, 4 local devices' in err
  rows_1, rows_2 = _assert_same_run_to_float_noise(single, multi)
  for a, b in zip(rows_1, rows_2):
    for k in a:
      if 'loss' in k or 'accuracy' in k:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, err_msg=k)


def test_sigterm_to_one_host_stops_every_host_after_the_same_saved_step(
    digits_data_dir, tmp_path):
  # JAX's preemption service: process 1 gets the SIGTERM, and both processes
  # save the same step (all of a step's shards) and exit 0.
  workdir = str(tmp_path / 'multi')
  port = _free_port()
  procs, logs = [], []
  for pid in range(2):
    env = trainlib.env_with_devices(
        4, JAX_COORDINATOR_ADDRESS=f'localhost:{port}', JAX_NUM_PROCESSES='2',
        JAX_PROCESS_ID=str(pid))
    logs.append(open(tmp_path / f'stderr_{pid}.txt', 'w+'))  # No pipe to fill.
    procs.append(subprocess.Popen(
        trainlib.train_command(workdir, digits_data_dir, *LONG,
                               '--config.mesh.fsdp=2'),
        env=env, cwd=trainlib.REPO, stdout=subprocess.DEVNULL,
        stderr=logs[-1], text=True))
  try:
    _wait_for_step(workdir, 4, procs[0])  # After the step-3 checkpoint.
    procs[1].send_signal(signal.SIGTERM)
    for p in procs:
      p.wait(timeout=600)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  errs = []
  for p, log in zip(procs, logs):
    log.seek(0)
    errs.append(log.read())
    log.close()
    assert p.returncode == 0, errs[-1][-4000:]
  stopped = [re.findall(r'Stopped by .+? after step (\d+)', e) for e in errs]
  assert all(len(s) == 1 for s in stopped), errs
  step = int(stopped[0][0])
  assert int(stopped[1][0]) == step and 4 <= step < 10
  saved = checkpoints.Checkpointer(os.path.join(workdir, 'checkpoints'))
  assert saved.all_steps()[-1] == step
  saved.close()
  rows = metrics.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  assert rows[-1]['step'] == step  # Metrics flushed up to the saved step.


BAD_INPUT = [
    # (overrides, what stderr must say)
    (('--config.optimizer.nmae=spd',), 'nmae'),
    (('--config.batch_size=lots',), 'batch_size'),
    (('--config.optimizer.name=sgd',), "config.optimizer.name='sgd'"),
    (('--config.model.name=b/15',), "Unknown model 'b/15'"),
    (('--config.dataset.name=no_such_dataset',), 'no_such_dataset'),
    (('--config.dataset.ood.rotate.split=nope',), "'nope'"),
    (('--config.pretrained.path=/nonexistent/vit.npz',), '/nonexistent/vit.npz'),
    (('--config.optimizer.learning_rate=1e30',
      '--config.optimizer.warmup_steps=0'), 'set config.optimizer.skip_nonfinite=True'),
    # Checked before any work, naming the key and the allowed range.
    (('--config.optimizer.learning_rate=-0.001',),
     'config.optimizer.learning_rate=-0.001: must be >= 0'),
    # apply_if_finite gives up after max_nonfinite bad steps: the NaN update
    # is applied, and the save refuses it whatever skip_nonfinite says.
    (('--config.optimizer.skip_nonfinite=True',
      '--config.optimizer.learning_rate=1e38',
      '--config.optimizer.warmup_steps=0', '--config.optimizer.max_nonfinite=0',
      '--config.optimizer.grad_clip_norm=0'), 'Not saving step 3'),
]


@pytest.mark.parametrize('overrides,message', BAD_INPUT)
def test_bad_input_is_refused_with_a_message_that_names_it(
    digits_data_dir, tmp_path, overrides, message):
  workdir = str(tmp_path / 'run')
  result = trainlib.run_train(workdir, digits_data_dir, *overrides,
                              check=False)
  assert result.returncode != 0
  assert message in result.stderr, result.stderr[-3000:]
  # Refused before any checkpoint; a NaN stops before saving one.
  assert not glob.glob(os.path.join(workdir, 'checkpoints', '[0-9]*'))


def test_missing_data_dir_is_named(tmp_path):
  result = trainlib.run_train(
      str(tmp_path / 'run'), str(tmp_path / 'no_tfds_here'),
      '--config.dataset.name=mnist', '--config.dataset.prepare=False',
      check=False)
  assert result.returncode != 0
  assert 'not prepared in data_dir' in result.stderr
  assert 'no_tfds_here' in result.stderr


def test_pretrained_leaf_that_does_not_fit_is_named(digits_data_dir,
                                                   tmp_path):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from train.vision import vit, pretrained  # pylint: disable=g-import-not-at-top
  other = vit.VisionTransformer(
      **dict(vit.get_model_kwargs('mu/4'), mlp_dim=48), num_classes=10,
      image_size=32, rngs=nnx.Rngs(0))
  path = str(tmp_path / 'other.npz')
  pretrained.save_npz(other, path)
  result = trainlib.run_train(str(tmp_path / 'run'), digits_data_dir,
                              f'--config.pretrained.path={path}', check=False)
  assert result.returncode != 0
  assert ("'Transformer/encoderblock_0/MlpBlock_3/Dense_0/bias' has shape"
          " (48,) but our leaf 'blocks/0/mlp/fc1/bias' has shape (64,)"
          in result.stderr), result.stderr[-3000:]


def test_workdir_of_another_config_is_refused(digits_data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  trainlib.run_train(workdir, digits_data_dir)
  before = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  result = trainlib.run_train(workdir, digits_data_dir,
                              '--config.optimizer.name=adamw', check=False)
  assert result.returncode != 0
  assert 'holds a run of a different config' in result.stderr
  assert "['optimizer']" in result.stderr or 'optimizer' in result.stderr
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == before


def test_nonfinite_steps_skipped_when_the_config_asks(digits_data_dir,
                                                      tmp_path):
  workdir = str(tmp_path / 'run')
  # An absurd learning rate makes the loss NaN after a few steps; with
  # skip_nonfinite, optax.apply_if_finite drops every non-finite update and
  # the run finishes instead of stopping. (At 1e38 the params reach 1e38 and
  # SPD's deviation norms overflow to inf: that state is refused at the save.)
  result = trainlib.run_train(
      workdir, digits_data_dir, '--config.optimizer.skip_nonfinite=True',
      '--config.optimizer.learning_rate=1e15',
      '--config.optimizer.warmup_steps=0',
      '--config.optimizer.max_nonfinite=100',
      '--config.optimizer.grad_clip_norm=0', check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  model, opt, rows = trainlib.final_state(workdir)
  assert any(not np.isfinite(r['train/loss']) for r in rows
             if 'train/loss' in r)
  assert int(opt['opt_state']['total_notfinite']) > 0
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(model))


def test_a_full_disk_ends_in_one_line_naming_the_path(digits_data_dir,
                                                      tmp_path):
  full = tmp_path / 'small_disk'
  full.mkdir()
  # A 1.2 MB file system fills up during the second save (root only): the
  # workdir's other files take ~0.12 MB and one checkpoint of the tiny config
  # ~0.8 MB (0.37 MB of arrays, written first by TensorStore), so step 3
  # fits whole and step 6 runs out while its arrays are written. (At 1.5 MB
  # it ran out in Orbax's metadata writes instead, or not, by a few KB.)
  if os.geteuid() != 0 or subprocess.run(
      ['mount', '-t', 'tmpfs', '-o', 'size=1200k', 'tmpfs', str(full)],
      capture_output=True, check=False).returncode:
    pytest.skip('needs root to mount a small tmpfs')
  try:
    result = trainlib.run_train(str(full / 'run'), digits_data_dir,
                                check=False)
  finally:
    subprocess.run(['umount', str(full)], check=False)
  assert result.returncode == 1, result.stderr[-5000:]
  last = result.stderr.strip().splitlines()[-1]
  # The path that failed (a checkpoint file, or the workdir when the error
  # names none: where the disk fills up depends on timing), and nothing
  # after it, however late Orbax's other writes fail.
  assert last.startswith('No space left on device while writing '
                         f'{full}/run'), result.stderr[-5000:]
  # No traceback through our code, and Orbax's threads log one line each.
  # (TensorStore callbacks that outlive Orbax's event loop may still print
  # a few 5-line "Event loop is closed" tracebacks, depending on timing.)
  assert 'train_and_evaluate' not in result.stderr
  assert 'RESOURCE_EXHAUSTED' in result.stderr
  # TensorStore prints those 5-line tracebacks itself, past sys.excepthook
  # when they come late: seen 0 to ~60 of them, from several threads at once,
  # so their lines can interleave mid-line. Every piece of them is dropped;
  # the rest stays short.
  noise = re.compile(
      r'Traceback \(most recent call last\):|File "[^"]*asyncio/base_events'
      r'\.py", line \d+, in (call_soon_threadsafe|_check_closed)|'
      r'self\._check_closed\(\)|raise RuntimeError\(.Event loop is closed.\)|'
      r'RuntimeError|Event loop is closed')
  rest = [line for line in noise.sub('', result.stderr).splitlines()
          if line.strip(' :')]
  assert len(rest) < 80, result.stderr
