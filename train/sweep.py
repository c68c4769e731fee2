r"""Many independent training runs: one after another, or in worker processes.

A sweep (``train.demo``) is a list of ordinary ``train`` runs, each in its own
workdir. On one accelerator they take turns in this process. On CPUs, a run
of a small model leaves cores idle between its operations (Python, input,
checkpoint writes), so ``workers`` processes each take the next run as they
become free: on 2 cores, 2 workers finish the demo's 90 runs in about a fifth
less time than 1. A run's result does not depend on where it ran: each is a
pure function of its config.

Workers are spawned (never forked: a forked JAX runtime is unsafe) and share
the persistent compilation cache, so a program compiled by one is loaded by
the others. SIGINT (Ctrl-C) reaches every process of the group: each
worker's run saves and stops (``train.preemption``), the runs not started are
cancelled, and ``run_all`` raises ``Preempted``. A SIGTERM to this process
alone is passed on to the workers.

    >>> jobs = []  # [(key, config, workdir), ...]
    >>> list(run_all(jobs, workers=1))
    []
"""

import concurrent.futures
import multiprocessing
import os
import signal
import threading
from typing import Any, Callable, Iterator, Sequence

import jax
import ml_collections

from train import preemption
from train import train

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
            worker_init: Callable[[], None] | None = None,
            ) -> Iterator[tuple[Any, dict[str, float]]]:
  """Trains every job; yields ``(key, final eval metrics)`` as each ends.

  Args:
    jobs: ``(key, config, workdir)`` triples; ``key`` is only handed back.
    workers: processes that train at once; 1 trains here, in order.
    worker_init: a picklable function each worker calls first (e.g. to
      point JAX at the sweep's compilation cache).

  Raises:
    train.preemption.Preempted: on SIGINT / SIGTERM, once every started run
      has saved.
    Exception: the first failed run's error; the runs not started are
      cancelled, the started ones finish.
  """
  if workers <= 1 or len(jobs) <= 1:
    for key, config, workdir in jobs:
      yield key, _train(config, workdir)
    return
  pool = concurrent.futures.ProcessPoolExecutor(
      min(workers, len(jobs)), mp_context=multiprocessing.get_context('spawn'),
      initializer=_init_worker, initargs=(worker_init,))
  futures = {pool.submit(_train, config, workdir): key
             for key, config, workdir in jobs}
  in_main_thread = threading.current_thread() is threading.main_thread()
  if in_main_thread:  # Signals reach the main thread only.
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
  try:
    for future in concurrent.futures.as_completed(futures):
      yield futures[future], future.result()
  except _Terminated:  # This process alone got it: pass it on.
    for child in multiprocessing.active_children():
      os.kill(child.pid, signal.SIGTERM)
    pool.shutdown(wait=True, cancel_futures=True)
    raise preemption.Preempted(
        'Stopped by SIGTERM; every started run saved. Run the same command'
        ' to resume.') from None
  except (KeyboardInterrupt, preemption.Preempted):
    pool.shutdown(wait=True, cancel_futures=True)  # The workers are saving.
    raise preemption.Preempted(
        'Stopped by SIGINT; every started run saved. Run the same command to'
        ' resume.') from None
  except BaseException:
    pool.shutdown(wait=True, cancel_futures=True)
    raise
  finally:
    if in_main_thread:
      signal.signal(signal.SIGTERM, previous)
  pool.shutdown()


class _Terminated(Exception):
  pass


def _raise_terminated(signum, frame):
  del signum, frame
  raise _Terminated()


def _init_worker(worker_init) -> None:
  if worker_init is not None:
    worker_init()


def _train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  results = train.train_and_evaluate(config, workdir, print_summary=False)
  return {k: float(v) for k, v in results.items()}
