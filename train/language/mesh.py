"""The device mesh of an LLM run, and batches placed on it.

One mesh over every device of every process, with axes ('data', 'fsdp',
'tp'): Tunix's sharding rules put parameters over 'fsdp' and 'tp'
(``train.language.families``); a batch's rows are split over 'data' and 'fsdp'.
"""

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

BATCH_AXES = ('data', 'fsdp')


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """``config.mesh``'s (data, fsdp, tp) over all devices; data=-1: the rest."""
  n, fsdp, tp = jax.device_count(), config.mesh.fsdp, config.mesh.tp
  data = config.mesh.data if config.mesh.data > 0 else n // (fsdp * tp)
  if data * fsdp * tp != n:
    raise ValueError(f'config.mesh: data={config.mesh.data} x fsdp={fsdp} x'
                     f' tp={tp} does not cover the {n} devices.')
  # Auto axes: the compiler propagates shardings from parameters and batches.
  return jax.make_mesh((data, fsdp, tp), ('data', 'fsdp', 'tp'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def rows_sharding(mesh, axis: int = 0) -> NamedSharding:
  """Axis ``axis`` (the rows) split over the batch axes."""
  return NamedSharding(mesh, P(*([None] * axis), BATCH_AXES))


def to_global(host: np.ndarray, mesh, axis: int = 0) -> jax.Array:
  """A host array every process holds whole -> rows split over the mesh."""
  return jax.make_array_from_callback(host.shape, rows_sharding(mesh, axis),
                                      lambda index: host[index])
