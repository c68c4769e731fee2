"""train.demo.sweep: runs in worker processes fail and stop like runs in this one."""

import multiprocessing
import os
import signal
import subprocess
import sys
import time

import jax
import pytest

from configs import tiny
from train.core import checkpoints
from train.core import metrics
from train.demo import sweep
from tests import trainlib


def test_default_workers_one_per_core_on_cpu_and_what_is_asked_otherwise():
  assert jax.default_backend() == 'cpu'
  assert sweep.default_workers(0) == max(1, min(4, os.cpu_count()))
  assert sweep.default_workers(3) == 3


@pytest.mark.slow
def test_a_failed_run_in_a_worker_is_raised_here_naming_the_config_key(
    tmp_path):
  bad = tiny.get_config()
  bad.num_train_steps = 0  # Refused by train.core.config_checks before any work.
  jobs = [(i, bad, str(tmp_path / f'run{i}')) for i in range(3)]
  with pytest.raises(ValueError, match='num_train_steps'):
    list(sweep.run_all(jobs, workers=2))
  # The pool is shut down: no worker process outlives the sweep.
  assert not multiprocessing.active_children()


def test_the_scheduler_keeps_each_worker_to_its_group_until_the_end():
  # A demo-like sweep: methods of 6 and 12 runs, 2 workers finishing in turn.
  sizes = {'LP': 6, 'FT': 12, 'SPD': 12, 'LoRA': 12}
  jobs = [((m, i), None, '') for m, n in sizes.items() for i in range(n)]
  scheduler = sweep.Scheduler(jobs, lambda key: key[0], num_workers=2)
  handed = {0: [], 1: []}
  worker = 0
  while (job := scheduler.next_for(worker)) is not None:
    handed[worker].append(job[0])
    worker = 1 - worker
  assert scheduler.next_for(0) is None and scheduler.next_for(1) is None
  # Every job once, each group's in order.
  assert sorted(handed[0] + handed[1]) == sorted(k for k, _, _ in jobs)
  for w in (0, 1):
    for m in sizes:
      mine = [i for g, i in handed[w] if g == m]
      assert mine == sorted(mine)
  # A group is started by one worker; the other joins it only once no group
  # is left to start (the last one), so every method is traced once, except
  # the last one shared.
  groups = {w: [g for g, _ in handed[w]] for w in (0, 1)}
  shared = set(groups[0]) & set(groups[1])
  assert shared == {'LoRA'}, groups
  first = {w: groups[w][0] for w in (0, 1)}
  assert first == {0: 'LP', 1: 'FT'}


_SWEEP_SCRIPT = r'''
import sys
from configs import tiny
from train.core import preemption
from train.demo import sweep
jobs = []
for i in range(3):
  c = tiny.get_config()
  c.dataset.data_dir = sys.argv[1]
  c.seed = i
  # Slow steps (an evaluation each), to be interrupted in the middle.
  c.num_train_steps, c.eval_every_steps, c.log_every_steps = 10, 1, 1
  c.checkpoint_every_steps = 3
  jobs.append((i, c, f'{sys.argv[2]}/run{i}'))
try:
  for key, _ in sweep.run_all(jobs, workers=2):
    print('finished', key, flush=True)
except preemption.Preempted as e:
  print('PREEMPTED', e, flush=True)
'''


@pytest.mark.slow
def test_ctrl_c_saves_every_running_run_and_starts_no_other(
    digits_data_dir, tmp_path):
  proc = subprocess.Popen(
      [sys.executable, '-c', _SWEEP_SCRIPT, digits_data_dir, str(tmp_path)],
      env=trainlib.env_with_devices(1), cwd=trainlib.REPO,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      start_new_session=True)  # Its own process group, as in a terminal.
  try:
    for i in range(2):  # Both workers past their step-3 checkpoint.
      path = tmp_path / f'run{i}' / 'metrics.jsonl'
      deadline = time.time() + 300
      while not (path.exists() and '"step": 4, "train/' in path.read_text()):
        assert proc.poll() is None, proc.stderr.read()[-4000:]
        assert time.time() < deadline, f'run{i} never reached step 4'
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # What Ctrl-C in a terminal does.
    out, err = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  assert proc.returncode == 0, err[-4000:]
  assert 'PREEMPTED Stopped by SIGINT' in out, out + err[-4000:]
  assert 'Traceback' not in err, err[-4000:]
  for i in range(2):  # Each saved the step it stopped at, metrics included.
    run = tmp_path / f'run{i}'
    steps = checkpoints.Checkpointer(str(run / 'checkpoints')).all_steps()
    rows = metrics.read_jsonl(str(run / 'metrics.jsonl'))
    assert 4 <= steps[-1] < 10 and rows[-1]['step'] == steps[-1]
  assert not (tmp_path / 'run2').exists()  # Never started.
  # No worker outlives the sweep (multiprocessing's helpers exit within
  # moments of their parent).
  deadline = time.time() + 30
  while _group_alive(proc.pid):
    assert time.time() < deadline, subprocess.run(
        ['ps', '-o', 'pid,stat,args', '-g', str(proc.pid)],
        capture_output=True, text=True, check=False).stdout
    time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
  try:
    os.killpg(pgid, 0)
  except ProcessLookupError:
    return False
  return True
