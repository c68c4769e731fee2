r"""Swin + UperNet fine-tuning with SPD on PASCAL-Context, clean and corrupted.

    python -m train.segmentation --config configs/segmentation.py:smoke \
        --workdir runs/seg_smoke
    python -m train.segmentation --config configs/segmentation.py:spd \
        --workdir runs/seg_spd \
        --config.model.path=/data/swin-tiny-patch4-window7-224 \
        --config.data.dir=/data/VOCdevkit/VOC2010

Override any config field on the command line; running again with the same
workdir resumes from its newest checkpoint. On a cluster every process runs
this same command. A signal saves and exits 0, a full disk ends in one line
(``train.core.command_line``).
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from train.core import command_line
from train.segmentation import loop

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Where checkpoints and metrics go.')
config_flags.DEFINE_config_file(
    'config', None, 'configs/segmentation.py:<variant>', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  command_line.run(loop.train_and_evaluate, FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
