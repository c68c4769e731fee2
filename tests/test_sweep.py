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
