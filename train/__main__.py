r"""Fine-tune a ViT with SPD: ``python -m train --config configs/X.py --workdir DIR``.

Override any config field on the command line, e.g.
``--config.optimizer.name=spd --config.optimizer.weight_decay=0.5``. Running
again with the same workdir resumes from its newest checkpoint; a signal
saves and exits 0, a full disk ends in one line (``train.core.command_line``).
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from train.core import command_line
from train.vision import finetune

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Where checkpoints and metrics go.')
config_flags.DEFINE_config_file(
    'config', None, 'A configs/*.py file.', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  command_line.run(finetune.train_and_evaluate, FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
