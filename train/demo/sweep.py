r"""Many independent training runs: one after another, or in worker processes.

A sweep (``train.demo``) is a list of ordinary ``train`` runs, each in its own
workdir. On one accelerator they take turns in this process. On CPUs, a run
of a small model leaves cores idle between its operations (Python, input,
checkpoint writes), so ``workers`` processes train at once, each taking a
new run as it becomes free. Runs of one group (a method: same programs, other
hyperparameter values) go to the same worker while it has any left
(``Scheduler``), so that each worker traces and compiles only its groups'
programs. A run's result does not depend on where it ran: each is a pure
function of its config.

Workers are spawned (never forked: a forked JAX runtime is unsafe) and share
the persistent compilation cache, so a program compiled by one is loaded by
the others. SIGINT (Ctrl-C) reaches every process of the group: each
worker's run saves and stops (``train.core.preemption``), the runs not started are
cancelled, and ``run_all`` raises ``Preempted``. A SIGTERM to this process
alone is passed on to the workers.

    >>> jobs = []  # [(key, config, workdir), ...]
    >>> list(run_all(jobs, workers=1))
    []
"""

import collections
import concurrent.futures
import multiprocessing
import os
import signal
import threading
from typing import Any, Callable, Hashable, Iterator, Sequence

import jax
import ml_collections

from train.core import preemption
from train.vision import finetune

Job = tuple[Any, ml_collections.ConfigDict, str]  # (key, config, workdir)


def default_workers(requested: int) -> int:
  """``requested``, or when 0: one per CPU core (at most 4) on CPU, else 1.

  Runs share one accelerator by taking turns; several hosts run one run at a
  time together.
  """
  if requested > 0:
    return requested
  if jax.default_backend() != 'cpu' or jax.process_count() > 1:
    return 1
  return max(1, min(4, os.cpu_count() or 1))


def run_all(jobs: Sequence[Job], *, workers: int,
            group: Callable[[Any], Hashable] | None = None,
            worker_init: Callable[[], None] | None = None,
            ) -> Iterator[tuple[Any, dict[str, float]]]:
  """Trains every job; yields ``(key, final eval metrics)`` as each ends.

  Args:
    jobs: ``(key, config, workdir)`` triples; ``key`` is only handed back.
    workers: processes that train at once; 1 trains here, in order.
    group: ``key -> group``: the jobs of a group share compiled programs
      (one method of a sweep), so a worker keeps to one group while it has
      jobs left (see ``Scheduler``). Default: every job its own group.
    worker_init: a picklable function each worker calls first (e.g. to
      point JAX at the sweep's compilation cache).

  Raises:
    train.core.preemption.Preempted: on SIGINT / SIGTERM, once every started run
      has saved.
    Exception: the first failed run's error; no other run is started, the
      started ones finish.
  """
  if workers <= 1 or len(jobs) <= 1:
    for key, config, workdir in jobs:
      yield key, _train(config, workdir)
    return
  context = multiprocessing.get_context('spawn')
  pools = [  # One process each: the scheduler decides which runs where.
      concurrent.futures.ProcessPoolExecutor(
          1, mp_context=context, initializer=_init_worker,
          initargs=(worker_init,))
      for _ in range(min(workers, len(jobs)))]
  scheduler = Scheduler(jobs, group or (lambda key: key), len(pools))
  running = {}  # future -> (worker, key)

  def start_next(worker: int) -> None:
    job = scheduler.next_for(worker)
    if job is not None:
      key, config, workdir = job
      running[pools[worker].submit(_train, config, workdir)] = (worker, key)

  def shut_down() -> None:
    for pool in pools:
      pool.shutdown(wait=True, cancel_futures=True)

  in_main_thread = threading.current_thread() is threading.main_thread()
  if in_main_thread:  # Signals reach the main thread only.
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
  try:
    for worker in range(len(pools)):
      start_next(worker)
    while running:
      done, _ = concurrent.futures.wait(
          running, return_when=concurrent.futures.FIRST_COMPLETED)
      for future in done:
        worker, key = running.pop(future)
        result = future.result()
        start_next(worker)
        yield key, result
  except _Terminated:  # This process alone got it: pass it on.
    for child in multiprocessing.active_children():
      os.kill(child.pid, signal.SIGTERM)
    shut_down()
    raise preemption.Preempted(
        'Stopped by SIGTERM; every started run saved. Run the same command'
        ' to resume.') from None
  except (KeyboardInterrupt, preemption.Preempted):
    shut_down()  # Ctrl-C reached the workers too: their runs are saving.
    raise preemption.Preempted(
        'Stopped by SIGINT; every started run saved. Run the same command to'
        ' resume.') from None
  except BaseException:
    shut_down()
    raise
  finally:
    if in_main_thread:
      signal.signal(signal.SIGTERM, previous)
  shut_down()


class Scheduler:
  """Which job each worker trains next, keeping workers to their groups.

  A worker takes the next job of its current group. When that group has no
  job left, it starts the first group that no worker has started; when every
  group is started, it joins the group with the most jobs left. So each
  group's programs are traced and compiled by one worker, except at the end,
  where sharing the last groups keeps every worker busy.

      >>> s = Scheduler([('a', 1), ('a', 2), ('b', 3)], lambda k: k, 2)
      >>> s.next_for(0), s.next_for(1), s.next_for(1), s.next_for(0)
      (('a', 1), ('b', 3), ('a', 2), None)
  """

  def __init__(self, jobs: Sequence[tuple], group: Callable[[Any], Hashable],
               num_workers: int):
    self._left: dict[Hashable, collections.deque] = {}  # In first-seen order.
    for job in jobs:
      self._left.setdefault(group(job[0]), collections.deque()).append(job)
    self._current: list[Hashable | None] = [None] * num_workers

  def next_for(self, worker: int) -> tuple | None:
    """The next job for ``worker``, or None when every job is handed out."""
    g = self._current[worker]
    if g not in self._left:
      taken = set(self._current)
      fresh = [h for h in self._left if h not in taken]
      if fresh:
        g = fresh[0]
      elif self._left:
        g = max(self._left, key=lambda h: len(self._left[h]))
      else:
        return None
      self._current[worker] = g
    jobs = self._left[g]
    job = jobs.popleft()
    if not jobs:
      del self._left[g]
    return job


class _Terminated(Exception):
  pass


def _raise_terminated(signum, frame):
  del signum, frame
  raise _Terminated()


def _init_worker(worker_init) -> None:
  # Ctrl-C reaches every process of the group: a worker between runs leaves
  # it to the parent (which cancels what has not started); a running run
  # catches it itself (train.core.preemption) and saves.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  if worker_init is not None:
    worker_init()


def _train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  results = finetune.train_and_evaluate(config, workdir, print_summary=False)
  return {k: float(v) for k, v in results.items()}
