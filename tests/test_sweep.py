"""train.sweep: runs in worker processes fail and stop like runs in this one."""

import os

import jax
import pytest

from configs import tiny
from train import sweep


def test_default_workers_one_per_core_on_cpu_and_what_is_asked_otherwise():
  assert jax.default_backend() == 'cpu'
  assert sweep.default_workers(0) == max(1, min(4, os.cpu_count()))
  assert sweep.default_workers(3) == 3


def test_a_failed_run_in_a_worker_is_raised_here_naming_the_config_key(
    tmp_path):
  bad = tiny.get_config()
  bad.num_train_steps = 0  # Refused by train.config_checks before any work.
  jobs = [(i, bad, str(tmp_path / f'run{i}')) for i in range(3)]
  with pytest.raises(ValueError, match='num_train_steps'):
    list(sweep.run_all(jobs, workers=2))
  # The pool is shut down: no worker process outlives the sweep.
  import multiprocessing  # pylint: disable=g-import-not-at-top
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
