"""Orbax checkpoints of a run: model, optimizer state and the data position.

Saves are atomic (Orbax writes a temporary directory and renames it when
complete), keep the newest ``keep`` steps, and restore onto whatever sharding
the freshly built model and optimizer already have, so a run resumes on a mesh
of any shape. A newest checkpoint that cannot be read (truncated, half
written) is reported by name and the previous one is used instead; the
damaged one is moved aside (``damaged_step_<N>_<time>``), never deleted. A
failed save leaves only a temporary directory that no restore reads, and an
existing step is never overwritten.

Every step also records a checksum of each array (``train.core.integrity``),
verified on restore: a step whose numbers changed on disk is treated like an
unreadable one. No step is ever written with a NaN or inf in a parameter or
optimizer leaf (``FloatingPointError`` naming the leaves). With
``async_save``, Orbax writes in a background thread while training goes on;
``wait`` (and ``close``) block until the last save is durable.
"""

import errno
import logging
import os
import re
import time
from typing import Any, Optional

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from train.core import files
from train.core import integrity


class IntegrityError(ValueError):
  """A step's arrays do not match the checksums saved with them."""


def _handlers() -> dict[str, Any]:
  return {'model': ocp.StandardCheckpointHandler(),
          'optimizer': ocp.StandardCheckpointHandler(),
          'meta': ocp.JsonCheckpointHandler()}


def _abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs with the shardings of ``tree``'s arrays."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=getattr(x, 'sharding', None)
      ),
      tree,
  )


class Checkpointer:
  """Saves and restores ``{'model': ..., 'optimizer': ..., 'meta': {...}}``.

  ``model`` and ``optimizer`` are pure pytrees of arrays (``nnx.as_pure`` of
  the NNX states); ``meta`` is small JSON (the step, the data position) to
  which ``save`` adds the checksums.
  """

  def __init__(self, directory: str, *, keep: int = 3,
               async_save: bool = False):
    self.directory = os.path.abspath(directory)
    self._async = async_save
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True,
            enable_async_checkpointing=async_save,
        ),
        item_handlers=_handlers(),
    )

  def all_steps(self) -> list[int]:
    self._manager.reload()  # Steps another process or run may have written.
    return sorted(self._manager.all_steps())

  def save(self, step: int, model: Any, optimizer: Any, meta: dict) -> None:
    """Saves ``step``; returns once written (or, if async, once copied).

    Raises:
      FloatingPointError: naming every leaf with a NaN or inf; nothing is
        written.
    """
    checksums, nonfinite = integrity.fingerprint(
        {'model': model, 'optimizer': optimizer})
    if nonfinite:
      raise FloatingPointError(
          f'Not saving step {step} to {self.directory}: non-finite values in'
          f' {len(nonfinite)} leaves: {", ".join(nonfinite[:8])}'
          f'{" ..." if len(nonfinite) > 8 else ""}. The newest checkpoint'
          ' predates them.')
    self._manager.save(
        step,
        args=ocp.args.Composite(
            model=ocp.args.StandardSave(model),
            optimizer=ocp.args.StandardSave(optimizer),
            meta=ocp.args.JsonSave(dict(meta, checksums=checksums)),
        ),
        force=True,
    )
    if not self._async:
      self.wait()

  def wait(self) -> None:
    """Blocks until the last save is complete on disk."""
    self._manager.wait_until_finished()

  def restore_latest(
      self, model_like: Any, optimizer_like: Any
  ) -> Optional[tuple[int, Any, Any, dict]]:
    """Restores the newest readable step onto the targets' shardings.

    Args:
      model_like: a pytree of arrays shaped and sharded like the saved model.
      optimizer_like: likewise for the optimizer state.

    Returns:
      ``(step, model, optimizer, meta)``, or None when there is no
      checkpoint. A step that fails to restore is skipped with a warning
      that names it and the step used instead.
    """
    failed = []
    for step in reversed(self.all_steps()):
      try:
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                model=ocp.args.StandardRestore(_abstract_like(model_like)),
                optimizer=ocp.args.StandardRestore(
                    _abstract_like(optimizer_like)
                ),
                meta=ocp.args.JsonRestore(),
            ),
        )
        self._verify(step, restored)
      except Exception as e:  # pylint: disable=broad-except
        failed.append((step, e))
        logging.warning(
            'Checkpoint step %d in %s cannot be restored (%s: %s); trying'
            ' the previous one.', step, self.directory, type(e).__name__, e
        )
        continue
      if failed:
        moved = [self._set_aside(s) for s, _ in failed]
        logging.warning(
            'Resuming from checkpoint step %d in %s because newer step(s) %s'
            ' cannot be read; they were moved, not deleted, to %s.',
            step, self.directory, [s for s, _ in failed], moved,
        )
      meta = dict(restored['meta'])
      meta.pop('checksums', None)
      return step, restored['model'], restored['optimizer'], meta
    if failed:
      raise RuntimeError(
          f'No checkpoint in {self.directory} can be restored: '
          + '; '.join(f'step {s}: {e}' for s, e in failed)
      )
    return None

  def _verify(self, step: int, restored: dict) -> None:
    """Raises ``IntegrityError`` naming the leaves whose bits changed."""
    expected = restored['meta'].get('checksums')
    if expected is None:
      logging.warning('Checkpoint step %d in %s has no checksums (an older'
                      ' version wrote it); its data are not verified.',
                      step, self.directory)
      return
    bad = integrity.mismatches(
        expected, {'model': restored['model'],
                   'optimizer': restored['optimizer']})
    if bad:
      raise IntegrityError(
          f'the data of {len(bad)} array(s) do not match the checksums saved'
          f' with them (damaged on disk): {", ".join(bad[:8])}'
          f'{" ..." if len(bad) > 8 else ""}')

  def _set_aside(self, step: int) -> str:
    """Renames a damaged step out of the way (the run will save it anew)."""
    src = os.path.join(self.directory, str(step))
    dst = None
    if jax.process_index() == 0 and os.path.exists(src):
      dst = files.set_aside(src, 'damaged_step')
    multihost_utils.sync_global_devices(f'set aside damaged step {step}')
    self._manager.reload()
    return dst or f'{src} (moved aside by process 0)'

  def close(self) -> None:
    """Waits for the last save, then releases Orbax's resources."""
    if self._manager is not None:
      manager, self._manager = self._manager, None
      manager.wait_until_finished()
      manager.close()

  def __enter__(self) -> 'Checkpointer':
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_step(directory: str, step: int) -> dict[str, Any]:
  """A saved step as host NumPy arrays, without a model to restore into.

  For inspection and tests: ``{'model': ..., 'optimizer': ..., 'meta': ...}``
  with nested dicts of arrays, as saved.
  """
  with ocp.CheckpointManager(os.path.abspath(directory),
                             item_handlers=_handlers()) as manager:
    metadata = manager.item_metadata(step)
    targets = {
        item: jax.tree.map(lambda m: np.zeros(m.shape, m.dtype),
                           getattr(metadata[item], 'tree', metadata[item]))
        for item in ('model', 'optimizer')
    }
    out = manager.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(targets['model']),
        optimizer=ocp.args.StandardRestore(targets['optimizer']),
        meta=ocp.args.JsonRestore(),
    ))
  return {'model': out['model'], 'optimizer': out['optimizer'],
          'meta': out['meta']}


def disk_full_error(e: BaseException) -> Optional[OSError]:
  """The ENOSPC ``OSError`` behind ``e`` (its causes included), or None."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
      return e
    if 'No space left on device' in str(e):  # Wrapped by TensorStore.
      path = re.search(r'Failed writing: "([^"]+)"', str(e))
      return OSError(errno.ENOSPC, str(e), path and path.group(1))
    e = e.__cause__ or e.__context__
  return None
