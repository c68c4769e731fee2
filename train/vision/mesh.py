"""The device mesh of a run, and placing batches and modules on it.

A run's mesh is ``('data', 'fsdp')`` over every device of every process:
``config.mesh.fsdp`` shards params, optimizer state and anchors over its axis
(by the partitioning metadata of ``train.vision.vit``), the rest of the devices
are data-parallel, and a batch is split over both axes. The mesh's axes are
``Auto``: the compiler propagates shardings from the annotated params and
batches through the model. ``train.vision.checks`` refuses a mesh that does not
cover the devices.
"""

from flax import nnx
import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """A ``('data', 'fsdp')`` mesh over every device of every process."""
  fsdp = config.mesh.fsdp
  data = config.mesh.data if config.mesh.data > 0 else (
      jax.device_count() // fsdp)
  return jax.make_mesh((data, fsdp), ('data', 'fsdp'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Batches are split over every device (both mesh axes)."""
  return NamedSharding(mesh, P(('data', 'fsdp')))


def shard_batch(batch: dict, mesh: jax.sharding.Mesh) -> dict:
  """This process's slice of a global batch -> a global sharded array."""
  sharding = batch_sharding(mesh)
  return {
      k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
      for k, v in batch.items()
  }


def shard_module(module: nnx.Module, mesh: jax.sharding.Mesh) -> None:
  """Places every array of ``module`` by its partitioning metadata."""
  state = nnx.state(module)
  shardings = nnx.get_named_sharding(state, mesh)
  nnx.update(module, jax.device_put(state, shardings))
