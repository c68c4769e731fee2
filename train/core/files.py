"""Writing files so that a reader never sees half of one, and moving them aside.

Every file the recipe writes for later (a run's ``config.json``, a
``result.json``, a cache, a figure) goes through :func:`atomic_write`: the
content goes to a temporary file in the same directory, which is then renamed
over the target (``os.replace`` is atomic on POSIX file systems), so a kill or
a full disk leaves either the old file or the new one, never a mixture. A file
or directory that cannot be used (damaged, or made for another config) is
never deleted: :func:`set_aside` renames it to ``<label>_<name>_<time>``
beside where it was, for the user to inspect or delete.

    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()
    >>> with atomic_write(os.path.join(d, 'a.json')) as f:
    ...   _ = f.write('{}')
    >>> sorted(os.listdir(d))
    ['a.json']
    >>> os.path.basename(set_aside(os.path.join(d, 'a.json'), 'damaged',
    ...                            now=1700000000))
    'damaged_a.json_1700000000'
"""

import contextlib
import os
import time
from typing import IO, Iterator, Optional


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'w') -> Iterator[IO]:
  """Opens a temporary file that replaces ``path`` when the block succeeds.

  On an exception the temporary file is removed and ``path`` is untouched.
  The temporary name keeps ``path``'s suffix (``x.tmp.npz``), for writers
  such as ``np.savez`` that add one otherwise.

  Args:
    path: the file to write.
    mode: ``'w'`` (text) or ``'wb'`` (bytes).

  Yields:
    The open temporary file.
  """
  root, ext = os.path.splitext(path)
  tmp = f'{root}.tmp{ext}'
  try:
    with open(tmp, mode) as f:
      yield f
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def set_aside(path: str, label: str, *, now: Optional[int] = None) -> str:
  """Renames ``path`` (a file or directory) to ``<label>_<name>_<time>``.

  Args:
    path: what to move out of the way.
    label: why, e.g. ``'damaged'`` or ``'stale'``.
    now: the time stamp (seconds); default: now.

  Returns:
    The new path, in the same directory.
  """
  directory, name = os.path.split(os.path.normpath(path))
  stamp = int(time.time()) if now is None else now
  new = os.path.join(directory, f'{label}_{name}_{stamp}')
  suffix = 1
  while os.path.exists(new):  # Twice in one second.
    new = os.path.join(directory, f'{label}_{name}_{stamp}.{suffix}')
    suffix += 1
  os.replace(path, new)
  return new
