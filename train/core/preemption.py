"""SIGTERM and SIGINT end a run cleanly: finish the step, save, exit 0.

Preemptible TPU and GPU VMs and SLURM send SIGTERM some seconds before they
kill a job; a user types Ctrl-C (SIGINT). Either one sets a flag that the
training loop reads once per step (``reached(step)``); the loop then saves
that step, flushes its metrics and raises ``Preempted`` (which the command
line turns into exit status 0), and the same command resumes.

On a multi-host run every process must save the same step. JAX's preemption
service (started by ``jax.distributed.initialize``) catches SIGTERM on any
host, tells the others, and ``multihost_utils.reached_preemption_sync_point``
returns True on every process at the same step; SIGINT is passed to it as a
SIGTERM. A second signal while the step finishes stops at once.
"""

import logging
import os
import signal
import threading
from typing import Optional

import jax
from jax.experimental import multihost_utils


class Preempted(Exception):
  """The run saved its step and stopped on a signal; the same call resumes."""


class Preemption:
  """Context manager that turns SIGTERM / SIGINT into a clean stop."""

  def __init__(self):
    self.signal_name: Optional[str] = None
    self._multihost = jax.process_count() > 1
    self._previous = {}

  def __enter__(self) -> 'Preemption':
    if threading.current_thread() is not threading.main_thread():
      return self  # Signals reach the main thread only.
    signals = [signal.SIGINT] + ([] if self._multihost else [signal.SIGTERM])
    for s in signals:
      self._previous[s] = signal.signal(s, self._on_signal)
    return self

  def _on_signal(self, signum, frame) -> None:
    del frame
    if self.signal_name is not None:  # The second one: stop now.
      raise KeyboardInterrupt(f'second {signal.Signals(signum).name}')
    self.signal_name = signal.Signals(signum).name
    logging.warning('Got %s: finishing this step, saving a checkpoint, then'
                    ' exiting (send it again to stop at once).',
                    self.signal_name)
    if self._multihost:  # JAX's preemption service tells every host.
      os.kill(os.getpid(), signal.SIGTERM)

  def reached(self, step: int) -> bool:
    """Whether to save ``step`` and stop (the same answer on every host)."""
    if self._multihost:
      if multihost_utils.reached_preemption_sync_point(step):
        self.signal_name = self.signal_name or 'a preemption notice'
        return True
      return False
    return self.signal_name is not None

  def __exit__(self, *exc) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}
