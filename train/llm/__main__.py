r"""LoRA fine-tuning of a decoder LLM with SPD, then the commonsense sets.

    python -m train.llm --config configs/commonsense.py:smoke --workdir runs/llm_smoke
    python -m train.llm --config configs/commonsense.py:llama7b,spd \
        --workdir runs/llama7b_spd --config.model.path=/data/llama-7b-hf \
        --config.data.dir=/data/LLM-Adapters

Override any config field on the command line; running again with the same
workdir resumes from its newest checkpoint. On a cluster (SLURM, TPU pods, or
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``)
every process runs this same command. A signal saves and exits 0, a full
disk ends in one line (``train.core.command_line``).
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from train.core import command_line
from train.llm import loop

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Where checkpoints and metrics go.')
config_flags.DEFINE_config_file(
    'config', None, 'configs/commonsense.py:<model>,<optimizer>',
    lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  command_line.run(loop.train_and_evaluate, FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
