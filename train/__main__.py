r"""Fine-tune a ViT with SPD: ``python -m train --config configs/X.py --workdir DIR``.

Override any config field on the command line, e.g.
``--config.optimizer.name=spd --config.optimizer.weight_decay=0.5``. Running
again with the same workdir resumes from its newest checkpoint.
"""

import logging as std_logging

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from train import train

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Where checkpoints and metrics go.')
config_flags.DEFINE_config_file(
    'config', None, 'A configs/*.py file.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietLibraries(std_logging.Filter):
  """Drops the libraries' INFO chatter (Orbax logs every file it writes)."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or not any(
        f'/{lib}/' in record.pathname for lib in ('orbax', 'etils', 'grain',
                                                  'tensorflow_datasets'))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if _on_cluster():  # Before anything touches a JAX backend.
    jax.distributed.initialize()
  logging.info('JAX process %d/%d, %d local devices', jax.process_index(),
               jax.process_count(), jax.local_device_count())
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def _on_cluster() -> bool:
  """Whether a multi-host launcher (SLURM, TPU pod, coordinator env) is set."""
  import os  # pylint: disable=g-import-not-at-top
  return any(v in os.environ for v in (
      'JAX_COORDINATOR_ADDRESS', 'SLURM_JOB_ID', 'TPU_WORKER_HOSTNAMES',
      'MEGASCALE_COORDINATOR_ADDRESS'))


if __name__ == '__main__':
  app.run(main)
