"""Orbax checkpoints of a run: model, optimizer state and the data position.

Saves are atomic (Orbax writes a temporary directory and renames it when
complete), keep the newest ``keep`` steps, and restore onto whatever sharding
the freshly built model and optimizer already have, so a run resumes on a mesh
of any shape. A newest checkpoint that cannot be read (truncated, half
written) is reported by name and the previous one is used instead; the
damaged one is moved aside (``damaged_step_<N>_<time>``), never deleted. A
failed save leaves only a temporary directory that no restore reads, and an
existing step is never overwritten.
"""

import json
import logging
import os
import time
from typing import Any, Optional

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp


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
  the NNX states); ``meta`` is small JSON (the step, the data position).
  """

  def __init__(self, directory: str, *, keep: int = 3):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False
        ),
        item_names=('model', 'optimizer', 'meta'),
    )

  def all_steps(self) -> list[int]:
    self._manager.reload()  # Steps another process or run may have written.
    return sorted(self._manager.all_steps())

  def save(self, step: int, model: Any, optimizer: Any, meta: dict) -> None:
    self._manager.save(
        step,
        args=ocp.args.Composite(
            model=ocp.args.StandardSave(model),
            optimizer=ocp.args.StandardSave(optimizer),
            meta=ocp.args.JsonSave(meta),
        ),
        force=True,
    )
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
      return step, restored['model'], restored['optimizer'], restored['meta']
    if failed:
      raise RuntimeError(
          f'No checkpoint in {self.directory} can be restored: '
          + '; '.join(f'step {s}: {e}' for s, e in failed)
      )
    return None

  def _set_aside(self, step: int) -> str:
    """Renames a damaged step out of the way (the run will save it anew)."""
    src = os.path.join(self.directory, str(step))
    dst = os.path.join(self.directory, f'damaged_step_{step}_{int(time.time())}')
    if jax.process_index() == 0 and os.path.exists(src):
      os.replace(src, dst)
    multihost_utils.sync_global_devices(f'set aside damaged step {step}')
    self._manager.reload()
    return dst

  def close(self) -> None:
    self._manager.close()


def read_step(directory: str, step: int) -> dict[str, Any]:
  """A saved step as host NumPy arrays, without a model to restore into.

  For inspection and tests: ``{'model': ..., 'optimizer': ..., 'meta': ...}``
  with nested dicts of arrays, as saved.
  """
  path = os.path.join(os.path.abspath(directory), str(step))
  checkpointer = ocp.StandardCheckpointer()
  out = {}
  for item in ('model', 'optimizer'):
    metadata = checkpointer.metadata(os.path.join(path, item))
    tree = getattr(metadata, 'item_metadata', metadata)
    target = jax.tree.map(
        lambda m: np.zeros(m.shape, m.dtype), getattr(tree, 'tree', tree))
    out[item] = checkpointer.restore(os.path.join(path, item), target)
  with open(os.path.join(path, 'meta', 'metadata')) as f:
    out['meta'] = json.load(f)
  return out
