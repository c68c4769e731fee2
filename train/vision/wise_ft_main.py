r"""WiSE-FT on a finished run: ``python -m train.vision.wise_ft_main --workdir DIR``.

    python -m train.vision.wise_ft_main --workdir runs/in1k_spd --alphas 0,0.25,0.5,0.75,1

Evaluates, on every eval set of the run's config, the weights
:math:`(1 - \alpha)\, \theta_\text{start} + \alpha\, \theta_\text{fine-tuned}`
for each alpha (default: the config's ``wise_ft.alphas``, else 0, .25, .5,
.75, 1), prints a table and writes ``DIR/wise_ft.json``. The run must be
finished and have its ``start_model.npz`` (``train.vision.wise_ft``).
"""

from absl import app
from absl import flags

from train.core import library_noise
from train.core import metrics
from train.vision import wise_ft

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, "A finished run's workdir.")
flags.DEFINE_list('alphas', None, 'Comma-separated alphas in [0, 1];'
                  " default: the config's, else 0,.25,.5,.75,1.")
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  library_noise.quiet_libraries()
  alphas = [float(a) for a in FLAGS.alphas] if FLAGS.alphas else None
  by_alpha = wise_ft.evaluate_finished_run(FLAGS.workdir, alphas)
  sets = list(next(iter(by_alpha.values())))
  rows = [[a] + [100 * r[s] for s in sets] for a, r in by_alpha.items()]
  print(metrics.format_table(
      rows, ['alpha'] + [s.removeprefix('eval/').removesuffix('_accuracy')
                         for s in sets]))


if __name__ == '__main__':
  app.run(main)
