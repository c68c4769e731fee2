"""A tiny run for tests and smoke checks: a 2-block ViT on the digits.

    python -m train --config configs/tiny.py --workdir /tmp/tiny

Seconds on a laptop CPU. The data are built on first use from scikit-learn's
handwritten digits (``train.demo.digits_domains``); nothing is downloaded.
"""

import ml_collections

from configs import common


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  del arg
  config = common.base_config()
  config.model.name = 'mu/4'
  config.model.num_classes = 10
  config.dataset.name = 'digits_domains/clean'
  config.dataset.tfds_module = 'train.demo.digits_domains'
  config.dataset.prepare = True  # Built from scikit-learn on first use.
  config.dataset.train_split = 'train'
  config.dataset.val_split = 'validation'
  config.dataset.eval_split = 'test'
  config.dataset.image_size = 32
  config.dataset.num_classes = 10
  config.dataset.ood = ml_collections.ConfigDict({
      'rotate': {'name': 'digits_domains/rotate', 'split': 'test'},
      'invert': {'name': 'digits_domains/invert', 'split': 'test'},
  })
  config.dataset.augment.random_resized_crop = False
  config.dataset.augment.flip = False
  config.dataset.augment.mixup_alpha = 0.0
  config.dataset.augment.cutmix_alpha = 0.0
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 2
  config.batch_size = 32
  config.eval_batch_size = 64
  config.num_train_steps = 6
  config.log_every_steps = 2
  config.eval_every_steps = 3
  config.checkpoint_every_steps = 3
  config.progress_bar = False
  return config
