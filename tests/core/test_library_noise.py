"""The workarounds in train.core.library_noise: still needed, still working."""

import asyncio
import importlib.metadata
import logging
import sys

from absl import logging as absl_logging
import pytest

from train.core import library_noise


@pytest.mark.parametrize('name', sorted(library_noise.CHECKED_ON))
def test_installed_versions_are_the_ones_the_workarounds_were_checked_on(name):
  """A new version: check whether each workaround is still needed, then
  update CHECKED_ON."""
  checked = library_noise.CHECKED_ON[name]
  if name == 'python':
    installed = '.'.join(map(str, sys.version_info[:2]))
  else:
    installed = importlib.metadata.version(name)
  assert installed == checked, (
      f'{name} {installed}, checked on {checked}: see train.core.library_noise')


def test_orbax_still_logs_through_absl_so_no_logger_name_tells_it_apart():
  """If Orbax logs through a named logger, a logger level is the public way
  and the file-path filter is no longer needed."""
  from orbax.checkpoint import checkpoint_manager  # pylint: disable=g-import-not-at-top
  assert checkpoint_manager.logging is absl_logging
  assert '/orbax/' in checkpoint_manager.__file__


def _record(pathname, level):
  return logging.LogRecord('absl', level, pathname, 1, 'msg', None, None)


def test_the_filter_drops_library_info_and_keeps_warnings_and_ours():
  quiet = library_noise.QuietLibraries()
  from orbax.checkpoint import checkpoint_manager  # pylint: disable=g-import-not-at-top
  orbax_file = checkpoint_manager.__file__
  assert not quiet.filter(_record(orbax_file, logging.INFO))
  assert quiet.filter(_record(orbax_file, logging.WARNING))
  assert quiet.filter(_record(library_noise.__file__, logging.INFO))


def _closed_loop_error():
  loop = asyncio.new_event_loop()
  loop.close()
  try:
    loop.call_soon_threadsafe(lambda: None)
  except RuntimeError:
    return sys.exc_info()
  raise AssertionError('a closed loop accepted a callback')


def test_a_callback_on_a_closed_loop_is_recognised_and_dropped():
  """asyncio still raises that message from that frame: the hook matches."""
  kind, value, tb = _closed_loop_error()
  assert library_noise.is_closed_loop_noise(kind, value, tb), (
      f'{value!r}: asyncio changed; see train.core.library_noise')
  seen = []
  hook = library_noise.without_closed_loop_noise(
      lambda *e: seen.append(e))
  hook(kind, value, tb)
  assert not seen
  other = RuntimeError('something else')
  hook(RuntimeError, other, None)
  assert seen and seen[0][1] is other
