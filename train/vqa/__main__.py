r"""LoRA fine-tuning of PaliGemma on VQAv2 with SPD, then nine OOD VQA sets.

    python -m train.vqa --config configs/vqa.py:smoke --workdir runs/vqa_smoke
    python -m train.vqa --config configs/vqa.py:paligemma_3b,spd \
        --workdir runs/paligemma_spd \
        --config.model.path=/data/paligemma-3b-pt-224 --config.data.dir=/data/vqa

Override any config field on the command line; running again with the same
workdir resumes from its newest checkpoint; ``--config.num_train_steps=0``
evaluates the pre-trained model. On a cluster every process runs this same
command. A signal saves and exits 0, a full disk ends in one line
(``train.core.command_line``).
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from train.core import command_line
from train.vqa import loop

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Where checkpoints and metrics go.')
config_flags.DEFINE_config_file(
    'config', None, 'configs/vqa.py:<model>,<method>', lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  command_line.run(loop.train_and_evaluate, FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
