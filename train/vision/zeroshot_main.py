r"""Zero-shot CLIP on every evaluation set of a config: no training.

    python -m train.vision.zeroshot_main --config configs/domainnet_clip.py \
        --workdir runs/dn_zeroshot

Builds the model exactly as step 0 of a ``head_init='zeroshot'`` run, with
CLIP's zero-shot head (``train.vision.zeroshot``, cached in the workdir),
evaluates it on the ID split and every OOD set as a run does
(``train.vision.evaluation.evaluate_zero_shot``), prints the accuracies and writes
them to ``WORKDIR/zeroshot.json``.
"""

import json
import logging
import os

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from train.vision import checks
from train.vision import evaluation
from train.core import files
from train.core import library_noise
from train.core import metrics

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Where the head and results go.')
config_flags.DEFINE_config_file('config', None, 'A configs/*.py file.',
                                lock_config=True)
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  library_noise.quiet_libraries()
  config, workdir = FLAGS.config, os.path.abspath(FLAGS.workdir)
  if config.model.head_init != 'zeroshot':
    logging.info("Zero-shot evaluation: config.model.head_init=%r ->"
                 " 'zeroshot'.", config.model.head_init)
    config.model.head_init = 'zeroshot'
  checks.check(config, num_devices=jax.device_count())
  results = evaluation.evaluate_zero_shot(config, workdir)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, evaluation.ZERO_SHOT_RESULTS)
    with files.atomic_write(path) as f:
      json.dump(results, f, indent=2, sort_keys=True)
    rows = [[k.removeprefix('eval/').removesuffix('_accuracy'), v]
            for k, v in results.items()]
    print(metrics.format_table(rows, ['eval set', 'zero-shot accuracy']))


if __name__ == '__main__':
  app.run(main)
