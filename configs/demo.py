r"""The embedded default: the paper's comparison on real digits, on a laptop CPU.

    python -m train.demo --workdir runs/demo

(``--config configs/demo.py`` is the default; ``configs/demo.py:smoke`` is a
shrunk version for tests; ``configs/demo.py:full_grid`` sweeps every
regulariser over the whole learning-rate-by-strength grid.) Nothing is
downloaded: the data are scikit-learn's 1,797 handwritten digits, served
through TFDS by ``train.demo.digits_domains`` in a clean domain, seven
label-preserving shifts the foundation sees without labels (rotate, invert,
noise, blur, thick strokes, colour, small: "near" OOD) and five it never sees
(shear, elastic, outline, occlude, clutter: "far" OOD), split by digit into
``pretrain`` (697), ``train`` (400), ``validation`` (300) and ``test`` (400).

**The foundation, and why this one.** The paper's regime (docs/algorithm.rst,
"The regime SPD is for") is a foundation pre-trained on broad data that
covers the shifted domains, on a task other than the downstream one, without
the downstream labels: CLIP has never been trained on ImageNet's labels, a
linear probe on it is well below fine-tuning in distribution, and
fine-tuning on one domain costs some of its robustness elsewhere. We mimic
each part, and only those:

- *Broad data covering the near OOD domains, without the task's labels*: the
  ``mixture`` of the clean and the seven near domains of the 697 ``pretrain``
  digits; their labels are never read. The five far domains are in no
  pre-training data.
- *A task other than the downstream one*: self-supervised contrastive
  learning (SimCLR's loss, ``train.demo.contrastive``) whose two views of an image
  are one digit rendered in two different domains, so that, like CLIP's
  image-text pairs, it learns what stays the same across renderings. We chose
  it over "another label set" (e.g. parity, or a subset of the classes),
  which would hand the foundation part of the downstream labels, and over
  "the same labels on the other domains", which is the forgetting-only
  regime an older demo measured.
- *Fine-tuning on one domain*: a new head on the 400 clean ``train`` digits
  only; picked on the 300 clean ``validation`` digits (never trained on); ID
  is the clean ``test`` split, near (far) OOD the mean over the seven (five)
  shifted ``test`` splits (the same 400 held-out digits, transformed).

**The protocol, the paper's.** The paper fixes one learning rate for every
method and tunes only each regulariser's strength on ID validation. So the
demo first sweeps the learning rate of vanilla fine-tuning (AdamW) and of
LoRA, picks each on validation (mean over seeds), then runs L2-SP, Adam-SPD,
the non-selective projection and FTP at AdamW's picked rate, and LoRA+SPD at
LoRA's (``lr_of``), each over its strength. The linear probe and LP-FT sweep
their own learning rates; WiSE-FT interpolates the LP-FT runs picked on
validation. ``:full_grid`` instead runs each regulariser over every learning
rate of its reference method times every strength (``lr_grid``), and reports
the verdicts under both protocols from that one grid.

**The grids.** Log-spaced, in half decades, from a strength that changes
little to one that costs ID accuracy (measured at AdamW's picked rate, one
seed: SPD at lambda 10 loses about 10 ID points, L2-SP and the projection at
lambda 1 about 10 and 16): SPD and LoRA+SPD lambda 0.1 .. 10, L2-SP 0.01 ..
10, the projection 0.03 .. 1. FTP's k is no decay rate but a factor in
[0, 1] on the positive part of its radius's hypergradient (the part that
shrinks the radius; 1, the authors' default, the strongest), so its grid is
that whole range in equal steps, 0, 0.25, .., 1, chosen before any FTP run;
FTP's own rate (mu = 1e-2) is the authors' and is not tuned. In this regime's
60 steps the radius, starting at 1e-8, can grow by at most about mu per step,
so even k = 0 projects: the diagnostics say how much. The learning rates span 1e-4 .. 1e-2 for AdamW
and LP-FT, so that a pick at the edge of a grid is visible. Nothing was tuned
to make a method win, and every number is reported, with SPD's diagnostics
(fire rate, mean projection ratio over training, deviation from the
pre-trained weights; the attention key biases left out) and FTP's (the mean
over training of the share of its move each row kept, gamma / norm, and of
the fraction of rows at the radius) beside each run.
The demo prints whether the regime holds (a linear probe at least 5 points
below vanilla fine-tuning on ID) on its own measurements.

Measured: see the README (its demo section is written from the run).
"""

import ml_collections

from configs import common

# The OOD domains: train.demo.digits_domains.SHIFTS and FAR_SHIFTS (a test checks
# they agree; this module imports no training code).
SHIFTS = ('rotate', 'invert', 'noise', 'blur', 'thick', 'color', 'small')
FAR_SHIFTS = ('shear', 'elastic', 'outline', 'occlude', 'clutter')


def _digits_dataset(config: ml_collections.ConfigDict, domain: str,
                    train_split: str) -> None:
  d = config.dataset
  d.name = f'digits_domains/{domain}'
  d.tfds_module = 'train.demo.digits_domains'  # Registers the builder.
  d.prepare = True  # Built from scikit-learn's digits on first use.
  d.train_split = train_split
  d.val_split = 'validation'
  d.eval_split = 'test'
  d.image_size = 32
  d.num_classes = 10
  d.mean = (0.5, 0.5, 0.5)
  d.std = (0.5, 0.5, 0.5)
  d.augment.random_resized_crop = False
  d.augment.flip = False  # Digits are not mirror-symmetric.
  d.augment.mixup_alpha = 0.0
  d.augment.cutmix_alpha = 0.0
  d.augment.label_smoothing = 0.1
  d.cache_in_memory = True  # A few MB of digits: decode them once.


def _method(overrides: dict, grid_key: str, grid: tuple, *, of: str = '',
            lr_of: str = '') -> ml_collections.ConfigDict:
  """A method: fixed overrides of ``finetune``, and the swept field.

  Args:
    overrides: ``finetune`` fields this method sets, by dotted key.
    grid_key: the swept field; ``grid`` its values.
    of: for WiSE-FT, the method whose picked runs it interpolates.
    lr_of: run at the ``optimizer.learning_rate`` that this other method
      picked on validation (the paper's shared learning rate).
  """
  return ml_collections.ConfigDict({
      'overrides': tuple(overrides.items()), 'grid_key': grid_key,
      'grid': tuple(grid), 'of': of, 'lr_of': lr_of, 'lr_grid': ()})


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """The demo; ``'smoke'`` shrinks it (tests), ``'full_grid'`` widens it.

  Args:
    arg: ``''`` (the paper's shared-learning-rate protocol), ``'smoke'``
      (fewer values, seeds and steps: seconds per run, for tests) or
      ``'full_grid'`` (every regulariser over every learning rate of its
      reference method).
  """
  if arg not in ('', 'smoke', 'full_grid'):
    raise ValueError(f"configs/demo.py:{arg}: expected '', 'smoke' or"
                     " 'full_grid'.")
  smoke = arg == 'smoke'
  config = ml_collections.ConfigDict()
  config.data_dir = ''  # TFDS data_dir; '' = WORKDIR/tfds.
  # Fine-tuning runs trained at once, each in its own process (train.demo.sweep);
  # 0: one per CPU core (at most 4) on CPU, one on an accelerator.
  config.workers = 0
  config.seeds = (0,) if smoke else (0, 1, 2)  # Paired across methods.
  # The OOD domains: near (seen unlabelled in pre-training) and far (never
  # seen); the smoke test reads fewer, to build and evaluate less.
  config.shifts = ('rotate', 'invert', 'color') if smoke else SHIFTS
  config.far_shifts = ('shear', 'occlude') if smoke else FAR_SHIFTS
  config.min_id_gap = 0.05  # The regime: LP at least this far below FT (ID).
  config.vanilla = 'FT (AdamW)'  # The method the regime is checked against.
  config.linear_probe = 'LP'

  # Stage 1: the foundation, self-supervised (train.demo.contrastive).
  f = common.base_config()
  f.model.name = 'xs/8'
  _digits_dataset(f, 'mixture', 'pretrain')
  f.optimizer.name = 'adamw'
  f.optimizer.learning_rate = 2e-3
  f.optimizer.weight_decay = 0.05
  f.optimizer.warmup_steps = 10 if smoke else 50
  f.batch_size = 64 if smoke else 128  # Digits per step; two views each.
  f.num_train_steps = 100 if smoke else 300
  f.temperature = 0.2  # Of the contrastive softmax.
  f.embedding_dim = 64  # The projection head's output (dropped afterwards).
  config.foundation = f

  # Stage 2: fine-tuning on the clean domain, from the foundation.
  t = common.base_config()
  t.model.name = f.model.name
  t.model.num_classes = 10
  _digits_dataset(t, 'clean', 'train')
  t.dataset.ood = ml_collections.ConfigDict({
      d: {'name': f'digits_domains/{d}', 'split': 'test'}
      for d in config.shifts + config.far_shifts})
  t.pretrained.dont_load = ('head',)  # A new head, as in the paper.
  t.optimizer.name = 'adamw'
  t.optimizer.learning_rate = 1e-3
  t.optimizer.weight_decay = 0.1
  t.optimizer.warmup_steps = 6
  t.lp_ft.probe_steps = 20 if smoke else 30
  t.lp_ft.probe_learning_rate = 1e-2
  t.batch_size = 64 if smoke else 32
  t.eval_batch_size = 400  # One batch per eval split.
  t.num_train_steps = 40 if smoke else 60  # ~5 epochs of the 400 digits.
  t.log_every_steps = 5  # SPD's diagnostics over training, not at the end.
  t.eval_every_steps = 10**9  # At the end only (not at LP-FT's boundary).
  t.checkpoint_every_steps = 10**9  # The end (and LP-FT's boundary) only.
  t.keep_checkpoints = 1
  t.progress_bar = False
  config.finetune = t

  alphas = (0.0, 0.25, 0.5, 0.75, 1.0)
  lrs = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
  lora_lrs = (1e-3, 3e-3, 1e-2, 3e-2)
  spd_lambdas = (0.1, 0.3, 1.0, 3.0, 10.0)
  ftp_ks = (0.0, 0.25, 0.5, 0.75, 1.0)  # k's whole range (module docstring).
  vanilla, lora = 'FT (AdamW)', 'LoRA'
  methods = {
      'LP': _method({'train_mode': 'linear_probe', 'optimizer.name': 'adam'},
                    'optimizer.learning_rate', (1e-2, 3e-2)),
      vanilla: _method({}, 'optimizer.learning_rate', lrs),
      'L2-SP': _method({'optimizer.name': 'l2sp'}, 'optimizer.weight_decay',
                       (0.01, 0.1, 1.0, 10.0), lr_of=vanilla),
      'SPD': _method({'optimizer.name': 'spd'}, 'optimizer.weight_decay',
                     spd_lambdas, lr_of=vanilla),
      'Projection (ablation)': _method(
          {'optimizer.name': 'projection'}, 'optimizer.weight_decay',
          (0.03, 0.1, 0.3, 1.0), lr_of=vanilla),
      'LP-FT': _method({'train_mode': 'lp_ft'}, 'optimizer.learning_rate',
                       lrs),
      'WiSE-FT': _method({}, 'wise_ft.alpha', alphas, of='LP-FT'),
      lora: _method({'optimizer.name': 'adam', 'model.lora_rank': 8},
                    'optimizer.learning_rate', lora_lrs),
      'LoRA+SPD': _method({'optimizer.name': 'spd', 'model.lora_rank': 8},
                          'optimizer.weight_decay', spd_lambdas, lr_of=lora),
      # Last, so that every other method keeps its place (and colour).
      'FTP': _method({'optimizer.name': 'ftp'}, 'optimizer.weight_decay',
                     ftp_ks, lr_of=vanilla),
  }
  if arg == 'full_grid':  # Every regulariser at every rate of its reference.
    for spec in methods.values():
      if spec.lr_of:
        spec.lr_grid = methods[spec.lr_of].grid
  if smoke:  # The regime's two methods, SPD, LP-FT, WiSE-FT, FTP; CI time.
    methods = {k: methods[k] for k in ('LP', vanilla, 'SPD', 'LP-FT',
                                       'WiSE-FT', 'FTP')}
    methods['LP']['grid'] = (3e-2,)
    methods[vanilla]['grid'] = (1e-3, 3e-3)
    methods['SPD']['grid'] = (1.0,)
    methods['LP-FT']['grid'] = (1e-3,)
    methods['WiSE-FT']['grid'] = (0.0, 0.5, 1.0)
    methods['FTP']['grid'] = (1.0,)
  config.method_order = tuple(methods)
  config.methods = ml_collections.ConfigDict(methods)
  return config
