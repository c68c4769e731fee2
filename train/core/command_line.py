"""What every training command line does around its run.

``run(train_and_evaluate, config, workdir)`` is the body of ``python -m
train`` and ``python -m train.llm``: it quiets the libraries' INFO logs, joins
the other processes of a multi-host run (``train.core.distributed``), runs the
recipe's ``train_and_evaluate`` and turns its two expected endings into what
a user should see:

- a signal (``train.core.preemption.Preempted``): the step is saved, one warning,
  exit status 0;
- a full disk: one last line, ``No space left on device while writing
  <path>``, exit status 1, and nothing printed after it (Orbax's and
  TensorStore's background writes keep failing after the first one).

Anything else is raised as it is.
"""

import os
import sys
from typing import Callable

from absl import logging
import jax
import ml_collections

from train.core import checkpoints
from train.core import distributed
from train.core import library_noise
from train.core import preemption


def run(train_and_evaluate: Callable[..., dict],
        config: ml_collections.ConfigDict, workdir: str) -> None:
  """Runs ``train_and_evaluate(config, workdir)`` as a command line does."""
  library_noise.quiet_libraries()
  library_noise.drop_closed_loop_noise()  # Orbax's, after a full disk.
  distributed.join_cluster()  # Before anything touches a JAX backend.
  logging.info('JAX process %d/%d, %d local devices', jax.process_index(),
               jax.process_count(), jax.local_device_count())
  try:
    train_and_evaluate(config, workdir)
  except preemption.Preempted as e:  # Saved: a clean stop.
    logging.warning('%s', e)
  except Exception as e:  # pylint: disable=broad-except
    full = checkpoints.disk_full_error(e)
    if full is None:
      raise
    # One line, not Orbax's and asyncio's pages of tracebacks.
    _exit_with_last_line(
        f'No space left on device while writing'
        f' {full.filename or workdir}; every checkpoint already saved'
        ' is intact. Free space and run the same command to resume.')


def _exit_with_last_line(message: str) -> None:
  """Prints ``message`` as the very last line and exits with status 1.

  After a save fails on a full disk, Orbax's and TensorStore's background
  writes keep failing one by one, and some print their error (or raise it
  again at interpreter shutdown) after ours. Nothing is left to lose by
  skipping the rest of the shutdown: the run's lock and checkpointer were
  released on the way out of ``train_and_evaluate``, every metrics row is
  already closed on disk, and the half-written step is a temporary directory
  that no restore reads.
  """
  logging.flush()
  sys.stdout.flush()
  sys.stderr.write(message + '\n')
  sys.stderr.flush()
  os._exit(1)  # pylint: disable=protected-access
