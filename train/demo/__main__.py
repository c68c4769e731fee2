r"""The main command: robust fine-tuning methods compared by their frontiers.

    python -m train.demo --workdir runs/demo

Runs ``train.demo.comparison.run_comparison`` on ``configs/demo.py`` (the default
``--config``; ``configs/demo.py:smoke`` is a shrunk version for tests): a
foundation pre-trained without labels, every method of the paper's comparison
over its strength and several seeds, the table, the verdicts and the frontier
plot (``WORKDIR/results.json``, ``WORKDIR/results.png``). Running it again
reuses what is finished, also from a moved or copied workdir; Ctrl-C saves
every running run and exits 0.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from train.demo import comparison
from train.core import preemption

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))  # train/demo/__main__.py -> the checkout.
_DEFAULT_CONFIG = os.path.join(_REPO, 'configs', 'demo.py')
FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', 'runs/demo', 'Where everything is written.')
config_flags.DEFINE_config_file('config', _DEFAULT_CONFIG,
                                'configs/demo.py or a variant.',
                                lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if os.path.exists(FLAGS.workdir) and not os.path.isdir(FLAGS.workdir):
    raise app.UsageError(f'--workdir {FLAGS.workdir} is a file, not a folder')
  logging.set_verbosity(logging.WARNING)  # The progress bars say enough.
  try:
    comparison.run_comparison(FLAGS.config, FLAGS.workdir)
  except preemption.Preempted as e:  # Every started run saved: a clean stop.
    print(f'\n{e}', file=sys.stderr)


if __name__ == '__main__':
  app.run(main)
