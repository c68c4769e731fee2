r"""The paper's DomainNet setting: one domain in, the other five out.

The head starts as CLIP's zero-shot classifier (``model.head_init=
'zeroshot'``): DomainNet's TFDS label names (``aircraft_carrier`` ->
"aircraft carrier") in OpenAI's 80 ImageNet prompt templates
(``configs/imagenet_clip.py``), so step 0 is zero-shot CLIP and WiSE-FT runs
between two whole classifiers.

Zero-shot CLIP (no training; the source domain and the five others)::

    python -m train.vision.zeroshot_main --config configs/domainnet_clip.py \
        --workdir runs/dn_zeroshot

Fine-tuning, one command per method (another source domain:
``--config configs/domainnet_clip.py:sketch``)::

    python -m train --config configs/domainnet_clip.py --workdir runs/dn_spd
    python -m train --config configs/domainnet_clip.py --workdir runs/dn_adamw \
        --config.optimizer.name=adamw --config.optimizer.weight_decay=0.1
    python -m train --config configs/domainnet_clip.py --workdir runs/dn_l2sp \
        --config.optimizer.name=l2sp --config.optimizer.weight_decay=0.01
    python -m train --config configs/domainnet_clip.py --workdir runs/dn_proj \
        --config.optimizer.name=projection   # SPD without selection
    python -m train --config configs/domainnet_clip.py --workdir runs/dn_lp \
        --config.train_mode=linear_probe --config.optimizer.name=adam \
        --config.optimizer.learning_rate=1e-3
    python -m train --config configs/domainnet_clip.py --workdir runs/dn_lpft \
        --config.train_mode=lp_ft --config.lp_ft.probe_steps=1000
    python -m train --config configs/domainnet_clip.py --workdir runs/dn_lora \
        --config.model.lora_rank=16 --config.model.lora_alpha=32 \
        --config.optimizer.learning_rate=5e-4

(``--config.model.head_init=''`` starts from a zero head instead). WiSE-FT
from the zero-shot start, on a finished run::

    python -m train.vision.wise_ft_main --workdir runs/dn_spd --alphas 0,0.25,0.5,0.75,1

Data: TFDS ``domainnet`` (six domains, 345 classes), prepared with::

    tfds build domainnet --file_format=array_record \
        --data_dir=$HOME/tensorflow_datasets

Weights and tokenizer: ``openai/clip-vit-base-patch16`` from Hugging Face, as
in ``configs/imagenet_clip.py`` (the folder's ``tokenizer.json`` is read).

Settings as reported by the paper: learning rate 2e-5, 60 epochs, drop-path
0.2, label smoothing 0.1, Mixup 0.8, CutMix 1.0, lambda = 1 for Adam-SPD.
Target: the paper's DomainNet results (CLIP ViT-Base, trained on real), where
Adam-SPD raises both ID and the average OOD accuracy over AdamW and L2-SP.
Not run to the end here (no accelerator); compare with the paper's table.
"""

import ml_collections

from configs import common
from configs import imagenet_clip

DOMAINS = ('clipart', 'infograph', 'painting', 'quickdraw', 'real', 'sketch')
TRAIN_SIZE = {'real': 120_906}  # Images in the train split, for the epochs.


def get_config(arg: str = 'real') -> ml_collections.ConfigDict:
  """``arg``: the in-distribution domain (default ``real``)."""
  source = arg or 'real'
  if source not in DOMAINS:
    raise ValueError(f'configs/domainnet_clip.py:{source}: the domain must be'
                     f' one of {DOMAINS}.')
  config = common.base_config()
  imagenet_clip.clip_vit_b16(config, num_classes=345)

  d = config.dataset
  d.name = f'domainnet/{source}'
  d.train_split = 'train[:98%]'
  d.val_split = 'train[98%:]'
  d.eval_split = 'test'
  d.ood = ml_collections.ConfigDict({
      other: {'name': f'domainnet/{other}', 'split': 'test'}
      for other in DOMAINS if other != source})

  config.optimizer.name = 'spd'
  config.optimizer.learning_rate = 2e-5
  config.optimizer.weight_decay = 1.0
  config.optimizer.warmup_steps = 500
  config.batch_size = 256
  config.eval_batch_size = 1024
  config.num_train_steps = 60 * TRAIN_SIZE.get(source, 120_906) // 256
  config.log_every_steps = 100
  config.eval_every_steps = 2000
  config.checkpoint_every_steps = 2000
  return config
