r"""The embedded default: robust fine-tuning on real digits, on a laptop CPU.

    python -m train.demo --workdir runs/demo

(``--config configs/demo.py`` is the default; ``configs/demo.py:smoke`` is a
seconds-long version for tests.) Nothing is downloaded: the data are
scikit-learn's 1,797 handwritten digits, served through TFDS by
``train.digits_domains`` in a clean domain and seven shifted ones.

1. Foundation: a small ViT (``xs/8``, 0.2M params) is pre-trained from
   scratch on the ``mixture`` of all eight domains (700 digits x 8), so that
   it is robust to all of them. Its weights are kept in
   ``WORKDIR/foundation.npz`` and reused by later runs.
2. Fine-tuning, as in the paper: a new head, trained on the ``train`` split
   of the narrow ``clean`` domain only (400 other digits), for each method
   below and each seed; the hyperparameter of each method (its learning rate
   or its regularisation strength) is picked on the clean ``validation``
   split only. Then ID accuracy (clean ``test``) and OOD accuracy (the
   ``test`` split of every shifted domain) are reported.

Methods: AdamW, L2-SP and SPD (full fine-tuning), LoRA (adapters + head) with
plain Adam, and LoRA with SPD (anchor 0). Expected: all methods reach a
similar ID accuracy; SPD keeps more OOD accuracy than AdamW (see the README
for the measured table). About 8 minutes on 2 CPU cores.
"""

import ml_collections

from configs import common
from train import digits_domains


def _digits_dataset(config: ml_collections.ConfigDict, domain: str,
                    train_split: str) -> None:
  d = config.dataset
  d.name = f'digits_domains/{domain}'
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
  d.cache_in_memory = True  # 25 MB of digits: decode them once.


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """``arg='smoke'`` shrinks everything to seconds (tests)."""
  smoke = arg == 'smoke'
  config = ml_collections.ConfigDict()
  config.data_dir = ''  # TFDS data_dir; '' = WORKDIR/tfds.
  config.seeds = (0,) if smoke else (0, 1, 2)
  config.shifts = digits_domains.SHIFTS  # The OOD domains.

  # Stage 1: the "foundation" model.
  f = common.base_config()
  f.model.name = 'mu/4' if smoke else 'xs/8'
  f.model.num_classes = 10
  _digits_dataset(f, 'mixture', 'pretrain')
  f.dataset.ood = ml_collections.ConfigDict()
  f.dataset.val_split = ''
  f.pretrained.path = ''
  f.optimizer.name = 'adamw'
  f.optimizer.learning_rate = 2e-3
  f.optimizer.weight_decay = 0.05
  f.optimizer.warmup_steps = 5 if smoke else 100
  f.batch_size = 128
  f.eval_batch_size = 512
  f.num_train_steps = 60 if smoke else 1200
  f.log_every_steps = 10 if smoke else 100
  f.eval_every_steps = f.num_train_steps
  f.checkpoint_every_steps = 10 if smoke else 200
  f.keep_checkpoints = 1
  f.progress_bar = True
  config.foundation = f

  # Stage 2: fine-tuning on the clean domain, from the foundation.
  t = common.base_config()
  t.model.name = f.model.name
  t.model.num_classes = 10
  _digits_dataset(t, 'clean', 'train')
  t.pretrained.dont_load = ('head',)  # A new head, as in the paper.
  t.optimizer.warmup_steps = 5 if smoke else 10
  t.optimizer.learning_rate = 1e-3
  t.batch_size = 64
  t.eval_batch_size = 512
  t.num_train_steps = 10 if smoke else 150
  t.log_every_steps = 5 if smoke else 25
  t.eval_every_steps = t.num_train_steps
  t.checkpoint_every_steps = t.num_train_steps
  t.keep_checkpoints = 1
  t.progress_bar = False
  config.finetune = t

  # Each method: fixed overrides, and a grid picked on ID validation.
  def method(overrides, grid_key, grid):
    return ml_collections.ConfigDict({
        'overrides': tuple(overrides.items()), 'grid_key': grid_key,
        'grid': grid[:1] if smoke else grid})

  config.method_order = ('AdamW', 'L2-SP', 'SPD', 'LoRA', 'LoRA+SPD')
  config.methods = ml_collections.ConfigDict({
      'AdamW': method({'optimizer.name': 'adamw'},
                      'optimizer.weight_decay', (0.01, 0.1)),
      'L2-SP': method({'optimizer.name': 'l2sp'},
                      'optimizer.weight_decay', (0.01, 0.1)),
      'SPD': method({'optimizer.name': 'spd'},
                    'optimizer.weight_decay', (0.5, 1.0)),
      'LoRA': method({'optimizer.name': 'adam', 'model.lora_rank': 8},
                     'optimizer.learning_rate', (1e-3, 3e-3)),
      'LoRA+SPD': method({'optimizer.name': 'spd', 'model.lora_rank': 8,
                          'optimizer.learning_rate': 3e-3},
                         'optimizer.weight_decay', (0.5, 1.0)),
  })
  return config
