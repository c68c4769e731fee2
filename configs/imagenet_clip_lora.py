r"""PEFT: LoRA adapters on CLIP ViT-B/16 for ImageNet, with SPD at anchor 0.

    python -m train --config configs/imagenet_clip_lora.py --workdir runs/lora
    # Plain LoRA (no SPD):  --config.optimizer.name=adam
    python -m train.vision.wise_ft_main --workdir runs/lora   # WiSE-FT from zero-shot

Everything as ``configs/imagenet_clip.py`` (data, weights, OOD sets), but the
pre-trained weights stay frozen: only rank-16 LoRA factors on every attention
and MLP projection, and the head, are trained. The head starts as CLIP's
zero-shot classifier (zero-shot evaluation: that config's command), so
WiSE-FT interpolates from zero-shot CLIP. SPD's anchor is zero (nothing
stored), so it pulls back the adapters whose growth is inconsistent with the
loss, as the paper does for its LoRA experiments. The learning rate
is LoRA's usual, higher one; this setting is ours, not a row of the paper.
"""

import ml_collections

from configs import imagenet_clip


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  config = imagenet_clip.get_config(arg)
  config.model.lora_rank = 16
  config.model.lora_alpha = 32.0
  config.model.drop_path_rate = 0.1
  config.optimizer.name = 'spd'  # Anchor 0 for the adapters.
  config.optimizer.learning_rate = 5e-4
  config.optimizer.weight_decay = 1.0
  config.num_train_steps = 10 * 1_268_000 // 512  # 10 epochs.
  return config
