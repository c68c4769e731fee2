"""Where a run's numbers go: JSON lines, TensorBoard events and a summary.

Only process 0 writes. ``metrics.jsonl`` holds one object per logged step
(``{"step": 10, "train/loss": ..., ...}``) and is the file tests, plots and
resumption read back; TensorBoard gets the same scalars.
"""

import json
import logging
import os
from typing import Any, Mapping

import jax
import numpy as np
from tensorboardX import SummaryWriter

from train.core import files


class MetricWriter:
  """Appends scalars to ``workdir/metrics.jsonl`` and TensorBoard events."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if self.enabled and tensorboard:
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def truncate_after(self, step: int) -> None:
    """Drops lines logged after ``step`` (a resumed run logs them again).

    A last line torn by a kill during its write is removed too, before
    anything is appended after it.
    """
    if not self.enabled or not os.path.exists(self.path):
      return
    rows = read_jsonl(self.path)
    kept = [r for r in rows if r['step'] <= step]
    with open(self.path, 'rb') as f:
      f.seek(max(os.path.getsize(self.path) - 1, 0))
      torn = f.read(1) not in (b'', b'\n')
    if torn:
      logging.warning('Removed a torn last line (cut by a kill) from %s.',
                      self.path)
    if torn or len(kept) != len(rows):
      with files.atomic_write(self.path) as f:
        for r in kept:
          f.write(json.dumps(r) + '\n')

  def has_row(self, step: int, prefix: str) -> bool:
    """Whether a row of ``step`` has a key starting with ``prefix``."""
    if not self.enabled or not os.path.exists(self.path):
      return False
    return any(r['step'] == step and any(k.startswith(prefix) for k in r)
               for r in read_jsonl(self.path))

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    row = {'step': int(step)}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    with open(self.path, 'a') as f:
      f.write(json.dumps(row) + '\n')
    if self._tb is not None:
      for k, v in row.items():
        if k != 'step':
          self._tb.add_scalar(k, v, step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  """The rows of a metrics file; a last line cut short by a kill is dropped."""
  rows = []
  with open(path) as f:
    for line in f:
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        if line.endswith('\n'):  # Not a torn last line: really broken.
          raise
  return rows


def format_table(rows: list[list[Any]], header: list[str]) -> str:
  """A plain-text table with right-aligned numbers."""
  cells = [header] + [
      [f'{c:.4f}' if isinstance(c, float) else str(c) for c in r] for r in rows
  ]
  widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
  lines = []
  for j, r in enumerate(cells):
    lines.append('  '.join(
        c.ljust(w) if i == 0 else c.rjust(w)
        for i, (c, w) in enumerate(zip(r, widths))
    ))
    if j == 0:
      lines.append('  '.join('-' * w for w in widths))
  return '\n'.join(lines)
