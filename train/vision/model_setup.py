"""The model of a run, built from its config: architecture, weights, head.

``make_model`` is the one place that turns ``config.model``,
``config.pretrained`` and ``config.zeroshot`` into a model: the ViT or CLIP
image tower of ``config.model.name`` (``train.vision.vit``), the pre-trained
weights of ``config.pretrained.path`` loaded into it (``train.vision.pretrained``:
``dont_load`` leaves stay fresh), and, for ``head_init='zeroshot'``, CLIP's
zero-shot head (``train.vision.zeroshot``). What the optimizer then trains is
``train.vision.train_modes.trainable``'s business.

    >>> from flax import nnx
    >>> from configs import tiny
    >>> model = make_model(tiny.get_config(), nnx.Rngs(0))
    >>> model.head.kernel.shape
    (32, 10)
"""

import logging
from typing import Optional

from flax import nnx
import jax.numpy as jnp
import ml_collections

from train.vision import vit
from train.vision import pretrained
from train.vision import zeroshot


def make_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs,
               workdir: Optional[str] = None) -> vit.VisionTransformer:
  """The ViT of ``config.model``, with pre-trained weights when given.

  Args:
    config: a checked run config (``train.vision.checks``).
    rngs: the model's initialisation randomness.
    workdir: where the zero-shot head is cached (None: not cached).

  Returns:
    The model, on the default device (``train.vision.mesh.shard_module`` places it).
  """
  kwargs = vit.get_model_kwargs(config.model.name)
  kwargs.update(
      num_classes=config.model.num_classes,
      image_size=config.dataset.image_size,
      drop_path_rate=config.model.drop_path_rate,
      lora_rank=config.model.lora_rank,
      param_dtype=jnp.dtype(config.model.param_dtype),
  )
  if config.model.pool:
    kwargs['pool'] = config.model.pool
  if config.model.lora_alpha:
    kwargs['lora_alpha'] = config.model.lora_alpha
  if config.model.dtype:  # Activations only: params keep param_dtype.
    kwargs['dtype'] = jnp.dtype(config.model.dtype)
  zero_shot = config.model.head_init == 'zeroshot'
  model = vit.VisionTransformer(**kwargs, normalize_features=zero_shot,
                                   rngs=rngs)
  if config.pretrained.path:
    report = pretrained.load_pretrained(
        model, config.pretrained.path,
        dont_load=tuple(config.pretrained.dont_load))
    logging.info('Loaded pre-trained weights: %s', report)
  if zero_shot:
    zeroshot.init_head(model, config, workdir)
  return model
