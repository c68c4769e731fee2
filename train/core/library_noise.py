"""Workarounds for other libraries' noise, with the versions they were checked on.

Two things a user should not see have no public switch, so they are matched
here, and only here:

- **Orbax's INFO chatter.** Orbax (and etils, grain) log through absl's
  root logger, so no logger name tells their records from ours; the file a
  record comes from does (``LogRecord.pathname``, a public attribute, read
  against the libraries' package folders). Orbax's background threads also
  log the traceback of an error that is raised again in the main thread:
  their one line is kept, not the pages.
- **Callbacks that outlive Orbax's event loop.** When an asynchronous save
  fails (a full disk), Orbax closes its asyncio loop while TensorStore
  writes are still finishing; each one's callback then fails in
  ``loop.call_soon_threadsafe`` with ``RuntimeError('Event loop is
  closed')``, raised by asyncio's private ``BaseEventLoop._check_closed``,
  and TensorStore prints its traceback (hundreds of lines). Only that
  exception, from that frame, is dropped.

``tests/core/test_library_noise.py`` fails when an installed version differs
from :data:`CHECKED_ON` (check again whether a workaround is still needed),
when the libraries stop logging through absl (a logger level would then do),
and when asyncio stops raising that message from that frame (the hook would
no longer match).
"""

import logging
import sys

from absl import logging as absl_logging

# The versions the two workarounds were checked on (importlib.metadata names).
CHECKED_ON = {
    'python': '3.11',
    'orbax-checkpoint': '0.12.8',
    'tensorstore': '0.1.86',
    'absl-py': '2.5.1',
}

# Libraries whose INFO records are dropped, by their package folder.
QUIET = ('orbax', 'etils', 'grain', 'tensorflow_datasets', 'jax')

CLOSED_LOOP_MESSAGE = 'Event loop is closed'
CLOSED_LOOP_FRAME = '_check_closed'  # asyncio.BaseEventLoop's.


class QuietLibraries(logging.Filter):
  """Drops the libraries' INFO chatter (Orbax logs every file it writes)."""

  def filter(self, record):
    if '/orbax/' in record.pathname and record.levelno >= logging.ERROR:
      # Orbax's background threads log the traceback of an error that is
      # raised again in the main thread: keep their one line, not the pages.
      record.exc_info = record.exc_text = None
    return record.levelno >= logging.WARNING or not any(
        f'/{lib}/' in record.pathname for lib in QUIET)


def quiet_libraries() -> None:
  """Keeps our INFO logs and the libraries' warnings; drops their INFO."""
  absl_logging.get_absl_handler().addFilter(QuietLibraries())


def is_closed_loop_noise(kind, value, tb) -> bool:
  """Whether an uncaught exception is a callback that outlived the loop."""
  return (kind is RuntimeError and str(value) == CLOSED_LOOP_MESSAGE
          and tb is not None
          and _innermost(tb).tb_frame.f_code.co_name == CLOSED_LOOP_FRAME)


def without_closed_loop_noise(excepthook):
  """``excepthook``, but silent on :func:`is_closed_loop_noise`."""

  def hook(kind, value, tb):
    if not is_closed_loop_noise(kind, value, tb):
      excepthook(kind, value, tb)

  return hook


def drop_closed_loop_noise() -> None:
  """Installs :func:`without_closed_loop_noise` as ``sys.excepthook``."""
  sys.excepthook = without_closed_loop_noise(sys.excepthook)


def _innermost(tb):
  while tb.tb_next is not None:
    tb = tb.tb_next
  return tb
