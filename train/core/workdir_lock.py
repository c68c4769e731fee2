"""One run per workdir: a lock that a second run meets at start-up.

``workdir/lock`` is held with ``fcntl.flock`` for the whole run and records
who holds it (host, pid, start time). The kernel (or the NFS server, once the
client's lease ends) releases a flock when its process dies however it dies,
so a lock left by a killed run is stale by construction: the next run takes
it and says whose it was. A multi-host run is one set of processes: process
0 takes the lock and every process learns whether it got it, so all of them
run or all of them stop.

    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> with WorkdirLock(d):  # A second run meets the lock:
    ...   try:
    ...     WorkdirLock(d).__enter__()
    ...   except WorkdirInUseError as e:
    ...     print('is in use by another run: host' in str(e))
    True
"""

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from typing import Optional

import jax
from jax.experimental import multihost_utils
import numpy as np


class WorkdirInUseError(RuntimeError):
  """Another live run holds the workdir."""


def _describe(holder: dict) -> str:
  return (f'host {holder.get("host")}, pid {holder.get("pid")}, since'
          f' {holder.get("since")}')


class WorkdirLock:
  """Context manager: holds ``workdir/lock`` or raises ``WorkdirInUseError``."""

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, 'lock')
    self._file = None

  def __enter__(self) -> 'WorkdirLock':
    refusal = self._acquire() if jax.process_index() == 0 else None
    if jax.process_count() > 1:  # Everyone runs, or no one does.
      refused = multihost_utils.broadcast_one_to_all(
          np.int32(refusal is not None))
      if refused and refusal is None:
        refusal = (f'Workdir {self.workdir} is in use by another run'
                   ' (process 0 found its lock held).')
    if refusal is not None:
      raise WorkdirInUseError(refusal)
    return self

  def _acquire(self) -> Optional[str]:
    """Takes the lock; returns why not when another run holds it."""
    os.makedirs(self.workdir, exist_ok=True)
    f = open(self.path, 'a+')  # pylint: disable=consider-using-with
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read(f)
      f.close()
      return (f'Workdir {self.workdir} is in use by another run:'
              f' {_describe(holder)} (lock file {self.path}). Wait for it to'
              ' finish or stop it, or use another --workdir.')
    except OSError as e:
      if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):
        raise
      logging.warning('The file system of %s cannot lock files (%s); two'
                      ' runs in it would not be stopped.', self.workdir, e)
      f.close()
      return None
    previous = _read(f)
    if previous:
      logging.warning('Took over the lock of a run that is no longer alive'
                      ' (%s).', _describe(previous))
    f.seek(0)
    f.truncate()
    json.dump({'host': socket.gethostname(), 'pid': os.getpid(),
               'since': datetime.datetime.now().astimezone().isoformat(
                   timespec='seconds')}, f)
    f.flush()
    os.fsync(f.fileno())
    self._file = f
    return None

  def __exit__(self, *exc) -> None:
    if self._file is not None:
      self._file.seek(0)
      self._file.truncate()  # Released cleanly: nothing stale to report.
      self._file.close()  # Closing releases the flock.
      self._file = None


def _read(f) -> dict:
  f.seek(0)
  try:
    return json.loads(f.read() or '{}')
  except json.JSONDecodeError:
    return {'host': '?', 'pid': '?', 'since': '?'}
