"""Joining the other processes of a multi-host run, before JAX starts.

Every process of a multi-host run (a TPU pod slice, a SLURM job, or a launch
by hand) runs the same command; :func:`join_cluster` calls
``jax.distributed.initialize`` when the environment says this process is one
of several, and does nothing otherwise. By hand (or on CPUs, over gloo) set
``JAX_COORDINATOR_ADDRESS=host0:port``, ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID``; on SLURM, TPU pods and other clusters JAX reads the
cluster's own variables.
"""

import os
from typing import Mapping, Optional

import jax

# Variables whose presence means JAX can find the cluster by itself.
CLUSTERS = ('SLURM_JOB_ID', 'TPU_WORKER_HOSTNAMES',
            'MEGASCALE_COORDINATOR_ADDRESS', 'OMPI_COMM_WORLD_SIZE')


def join_cluster(env: Optional[Mapping[str, str]] = None) -> None:
  """``jax.distributed.initialize`` when launched as one of many processes.

  Call it before anything touches a JAX backend.
  """
  env = os.environ if env is None else env
  if 'JAX_COORDINATOR_ADDRESS' in env and 'JAX_NUM_PROCESSES' in env:
    jax.distributed.initialize(
        env['JAX_COORDINATOR_ADDRESS'],
        num_processes=int(env['JAX_NUM_PROCESSES']),
        process_id=int(env['JAX_PROCESS_ID']))
  elif any(name in env for name in CLUSTERS):
    jax.distributed.initialize()
