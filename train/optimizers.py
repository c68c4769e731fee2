"""The optimizer of a fine-tuning run, built from ``config.optimizer``.

Every method the paper compares is one name away, on the same schedule and
clipping, so that ablations differ in one line of config:

- ``adam``: no decay.
- ``adamw``: decoupled decay towards 0 (``weight_decay`` scaled by the lr, as
  in optax).
- ``l2sp``: Adam on the loss plus ``lambda/2 ||theta - theta0||^2``.
- ``spd``: Adam-SPD. Full fine-tuning anchors at the weights the optimizer is
  built from (the loaded pre-trained weights); with LoRA the anchor is zero.

A new head has no pre-trained weights to return to: ``decay_head=False``
leaves it out of L2-SP and SPD (plain Adam), as the paper's code would need a
mask for.
"""

from typing import Any

import jax
import ml_collections
import optax

import spd_optax

METHODS = ('adam', 'adamw', 'l2sp', 'spd')


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to ``learning_rate``, then cosine decay to 0."""
  opt = config.optimizer
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=opt.learning_rate,
      warmup_steps=min(opt.warmup_steps, max(config.num_train_steps - 1, 0)),
      decay_steps=max(config.num_train_steps, 1),
      end_value=0.0,
  )


def not_head_mask(params: Any) -> Any:
  """True for every leaf except those under a ``head`` attribute."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: 'head' not in jax.tree_util.keystr(path), params
  )


def make_optimizer(
    config: ml_collections.ConfigDict, *, lora: bool
) -> optax.GradientTransformation:
  """Builds the transformation named by ``config.optimizer.name``.

  Args:
    config: the run's config; reads ``optimizer.*`` and ``num_train_steps``.
    lora: whether the trained params are LoRA adapters (plus a head): SPD and
      L2-SP then anchor at zero.

  Returns:
    An optax transformation; gradient clipping comes first, and
    ``optax.apply_if_finite`` wraps it all when ``skip_nonfinite`` is set.
  """
  opt = config.optimizer
  if opt.name not in METHODS:
    raise ValueError(
        f'config.optimizer.name={opt.name!r} is not one of {METHODS}.'
    )
  schedule = learning_rate_schedule(config)
  adam_kwargs = dict(b1=opt.b1, b2=opt.b2, eps=opt.eps)
  anchor = 'zeros' if lora else 'params'
  mask = None if opt.decay_head else not_head_mask
  anchor_dtype = opt.anchor_dtype or None
  clip = (
      [optax.clip_by_global_norm(opt.grad_clip_norm)]
      if opt.grad_clip_norm
      else []
  )
  if opt.name == 'adam':
    tx = optax.chain(*clip, optax.adam(schedule, **adam_kwargs))
  elif opt.name == 'adamw':
    tx = optax.chain(
        *clip,
        optax.adamw(schedule, weight_decay=opt.weight_decay, **adam_kwargs),
    )
  elif opt.name == 'l2sp':
    tx = optax.chain(
        *clip,
        spd_optax.l2sp(
            opt.weight_decay, anchor=anchor, mask=mask, anchor_dtype=anchor_dtype
        ),
        optax.adam(schedule, **adam_kwargs),
    )
  else:  # spd
    # Clipping rescales the gradient by a positive factor, which leaves SPD's
    # test, the sign of <g, theta - theta0>, unchanged: it may come first,
    # and SPD then wraps Adam alone (adamspd's leaf-by-leaf path).
    tx = optax.chain(
        *clip,
        spd_optax.adamspd(
            schedule,
            weight_decay=opt.weight_decay,
            anchor=anchor,
            mask=mask,
            anchor_dtype=anchor_dtype,
            **adam_kwargs,
        ),
    )
  if opt.skip_nonfinite:
    tx = optax.apply_if_finite(tx, max_consecutive_errors=opt.max_nonfinite)
  return tx
