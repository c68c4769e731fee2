"""The optimizer of a fine-tuning run, built from ``config.optimizer``.

Every method the paper compares is one name away, on the same schedule and
clipping, so that ablations differ in one line of config:

- ``adam``: no decay.
- ``adamw``: decoupled decay towards 0 (``weight_decay`` scaled by the lr, as
  in optax).
- ``l2sp``: Adam on the loss plus ``lambda/2 ||theta - theta0||^2``.
- ``spd``: Adam-SPD. Full fine-tuning anchors at the weights the optimizer is
  built from (the loaded pre-trained weights); with LoRA the anchor is zero.
- ``projection``: the paper's ablation, SPD's projection applied to every
  layer at every step (no selection), around the same Adam.
- ``ftp``: FTP (the same authors' trainable projection, NeurIPS 2023) around
  Adam: ``weight_decay`` is then FTP's ``k`` in [0, 1] (1 the strongest), and
  each output unit of a kernel is one of its rows, as in the authors' PyTorch
  layout. It anchors at the weights it is built from, LoRA adapters too.

The peak learning rate and ``weight_decay`` are injected hyperparameters
(``optax.inject_hyperparams``): they live in the optimizer state as arrays,
so runs that differ only in them (a sweep) compile to the same program, and
:func:`keyed_by_config` lets such runs in one process reuse one compiled step.

A new head has no pre-trained weights to return to: ``decay_head=False``
leaves it out of L2-SP, SPD and FTP (plain Adam), as the paper's code would
need a mask for.
"""

import json
import re
from typing import Any

import jax
import ml_collections
import optax

import spd_optax

METHODS = ('adam', 'adamw', 'l2sp', 'spd', 'projection', 'ftp')


def schedule_shape(warmup_steps: int, num_steps: int,
                   decay: str = 'cosine', *, init_value: float = 0.0,
                   end_value: float = 0.0) -> optax.Schedule:
  """Linear warmup from ``init_value`` (0 by default) to 1, then cosine (or
  ``decay='linear'``, as ``transformers``' default scheduler) decay to
  ``end_value`` (0 by default) at ``num_steps``; values relative to the peak
  learning rate."""
  warmup = min(warmup_steps, max(num_steps - 1, 0))
  if decay == 'linear':
    return optax.join_schedules(
        [optax.linear_schedule(init_value, 1.0, warmup),
         optax.linear_schedule(1.0, end_value, max(num_steps - warmup, 1))],
        [warmup])
  return optax.warmup_cosine_decay_schedule(
      init_value=init_value,
      peak_value=1.0,
      warmup_steps=warmup,
      decay_steps=max(num_steps, 1),
      end_value=end_value,
  )


def _shape_of(config: ml_collections.ConfigDict) -> optax.Schedule:
  """The schedule of ``config.optimizer`` relative to its peak (its optional
  ``warmup_init_fraction`` and ``end_fraction``: 0 when absent)."""
  opt = config.optimizer
  return schedule_shape(opt.warmup_steps, config.num_train_steps,
                        opt.get('decay', 'cosine'),
                        init_value=opt.get('warmup_init_fraction', 0.0),
                        end_value=opt.get('end_fraction', 0.0))


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup to ``learning_rate``, then cosine decay to 0 (or from
  and to the fractions of it that ``warmup_init_fraction`` and
  ``end_fraction`` give)."""
  opt = config.optimizer
  shape = _shape_of(config)
  return lambda count: opt.learning_rate * shape(count)


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
    config: the run's config, checked (``train.core.config_checks``); reads
      ``optimizer.*`` (``optimizer.decay``: 'cosine' when absent, or
      'linear') and ``num_train_steps``.
    lora: whether the trained params are LoRA adapters (plus a head): SPD and
      L2-SP then anchor at zero.

  Returns:
    An optax transformation; gradient clipping comes first, and
    ``optax.apply_if_finite`` wraps it all when ``skip_nonfinite`` is set.
  """
  opt = config.optimizer
  shape = _shape_of(config)
  clip = (
      [optax.clip_by_global_norm(opt.grad_clip_norm)]
      if opt.grad_clip_norm
      else []
  )

  def build(learning_rate, weight_decay):
    # learning_rate and weight_decay arrive as arrays (injected).
    schedule = lambda count: learning_rate * shape(count)
    return optax.chain(*clip, _method(opt, schedule, weight_decay, lora))

  tx = optax.inject_hyperparams(build)(
      learning_rate=opt.learning_rate, weight_decay=opt.weight_decay)
  if opt.skip_nonfinite:
    tx = optax.apply_if_finite(tx, max_consecutive_errors=opt.max_nonfinite)
  return tx


def _method(opt, schedule, weight_decay, lora: bool):
  """The unclipped transformation of ``opt.name``."""
  adam_kwargs = dict(b1=opt.b1, b2=opt.b2, eps=opt.eps)
  anchored = dict(
      anchor='zeros' if lora else 'params',
      mask=None if opt.decay_head else not_head_mask,
      anchor_dtype=opt.anchor_dtype or None,
  )
  if opt.name == 'adam':
    return optax.adam(schedule, **adam_kwargs)
  if opt.name == 'adamw':
    return optax.adamw(schedule, weight_decay=weight_decay, **adam_kwargs)
  if opt.name == 'l2sp':
    return optax.chain(spd_optax.l2sp(weight_decay, **anchored),
                       optax.adam(schedule, **adam_kwargs))
  if opt.name == 'ftp':
    # The authors' AdamP with their default decay (none); a Flax kernel is
    # (..., in, out), so its output units, PyTorch's rows, are its last axis.
    # LoRA adapters are anchored where they start too: around zero, FTP's
    # first step (radius 1e-8) would collapse the random A onto 0.
    return spd_optax.adamftp(schedule, k=weight_decay, row_axis='last',
                             **{**anchored, 'anchor': 'params'},
                             **adam_kwargs)
  if opt.name == 'projection':
    return spd_optax.projection_decay(
        optax.adam(schedule, **adam_kwargs), weight_decay, **anchored)
  # spd. Clipping rescales the gradient by a positive factor, which leaves
  # SPD's test, the sign of <g, theta - theta0>, unchanged: it may come
  # first, and SPD then wraps Adam alone (adamspd's leaf-by-leaf path).
  return spd_optax.adamspd(schedule, weight_decay=weight_decay, **anchored,
                           **adam_kwargs)


_INJECTED = ('learning_rate', 'weight_decay')


class KeyedTransformation(optax.GradientTransformationExtraArgs):
  """A transformation that compares equal by a key, to share compiled steps.

  ``nnx.Optimizer`` keeps its transformation in the graph definition, which
  keys ``nnx.jit``'s cache: two runs of a sweep would trace and compile the
  same step twice. Their updates differ only in the injected values, which
  are read from the state, so equality compares ``key`` (the config without
  them) instead of the functions' identities.
  """

  key: str

  def __eq__(self, other):
    return type(other) is KeyedTransformation and self.key == other.key

  def __hash__(self):
    return hash(self.key)


def keyed_by_config(tx: optax.GradientTransformation,
                    config: ml_collections.ConfigDict, *,
                    lora: bool) -> KeyedTransformation:
  """``tx``, equal to the transformation of any config that differs from
  ``config`` only in ``optimizer.learning_rate`` and ``weight_decay``.

  Args:
    tx: built from ``config`` (its ``optimizer``, ``num_train_steps``,
      ``train_mode`` and ``lp_ft``) and ``lora`` only.
    config: the run's config.
    lora: as given to :func:`make_optimizer`.
  """
  opt = {k: v for k, v in json.loads(config.optimizer.to_json()).items()
         if k not in _INJECTED}
  key = json.dumps([opt, config.num_train_steps, config.get('train_mode'),
                    json.loads(config.lp_ft.to_json()) if 'lp_ft' in config
                    else None, lora], sort_keys=True)
  out = KeyedTransformation(tx.init, tx.update)
  out.key = key
  return out


def top_level_labels(backbone: str = 'backbone'):
  """``params -> labels``: ``'backbone'`` for every leaf under the top-level
  key ``backbone``, ``'head'`` for every other leaf (a new decoder)."""

  def labels(params):
    def label(path, _):
      first = path[0]
      name = getattr(first, 'key', getattr(first, 'name', None))
      return 'backbone' if name == backbone else 'head'
    out = jax.tree_util.tree_map_with_path(label, params)
    if 'backbone' not in jax.tree.leaves(out):  # All would get plain AdamW.
      keys = sorted({jax.tree_util.keystr(path[:1]) for path, _ in
                     jax.tree_util.tree_flatten_with_path(params)[0]})
      raise ValueError(f'No parameter under the top-level key {backbone!r}'
                       f' (the backbone); the top-level keys are {keys}')
    return out

  return labels


def decay_mask(patterns) -> Any:
  """``params -> bools``: False for the leaves whose path (``keystr``)
  matches one of the regular expressions ``patterns`` (no weight decay)."""
  compiled = [re.compile(p) for p in patterns]

  def mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(c.search(jax.tree_util.keystr(path))
                                for c in compiled), params)

  return mask


def make_backbone_and_head_optimizer(
    config: ml_collections.ConfigDict, *, backbone: str = 'backbone',
    frozen_backbone: bool = False) -> optax.GradientTransformation:
  """``config.optimizer.name`` on ``params[backbone]``, AdamW on the rest.

  The head-and-backbone composition (``optax.partition``): a pre-trained
  backbone takes the method (SPD, L2-SP, the projection ablation, AdamW...,
  anchored at the weights its state is set to), and a new decoder, which has
  nothing to return to, takes plain AdamW with ``optimizer.head_weight_decay``
  on the same schedule. ``frozen_backbone``: the backbone's updates are 0
  (``optax.set_to_zero``: a linear probe's counterpart, the decoder alone
  trained; clipping is then over the head's gradient alone). AdamW's decay
  leaves out the leaves whose path matches a
  pattern of ``optimizer.no_decay`` (mmseg's Swin configs: norms and
  relative position tables), on the backbone (``adamw``) and the head.
  Clipping (``grad_clip_norm``) is over the whole gradient, first;
  the peak learning rate and ``weight_decay`` (the backbone's) are injected
  as in :func:`make_optimizer`, and ``skip_nonfinite`` wraps it all.

  Args:
    config: the run's config (``optimizer.*``, ``num_train_steps``).
    backbone: the top-level key of the backbone's params.
    frozen_backbone: train the head alone.
  """
  opt = config.optimizer
  shape = _shape_of(config)
  clip = ([optax.clip_by_global_norm(opt.grad_clip_norm)]
          if opt.grad_clip_norm else [])
  adam_kwargs = dict(b1=opt.b1, b2=opt.b2, eps=opt.eps)

  no_decay = decay_mask(opt.get('no_decay', ()))

  def build(learning_rate, weight_decay):
    schedule = lambda count: learning_rate * shape(count)
    if frozen_backbone:
      body = optax.set_to_zero()
    elif opt.name == 'adamw':
      body = optax.adamw(schedule, weight_decay=weight_decay, mask=no_decay,
                         **adam_kwargs)
    else:
      body = _method(opt, schedule, weight_decay, lora=False)
    head = optax.adamw(schedule, weight_decay=opt.head_weight_decay,
                       mask=no_decay, **adam_kwargs)
    if frozen_backbone:  # Clipped on the head's gradient alone.
      return optax.partition({'backbone': body, 'head': optax.chain(
          *clip, head)}, top_level_labels(backbone))
    return optax.chain(*clip, optax.partition(
        {'backbone': body, 'head': head}, top_level_labels(backbone)))

  tx = optax.inject_hyperparams(build)(
      learning_rate=opt.learning_rate, weight_decay=opt.weight_decay)
  if opt.skip_nonfinite:
    tx = optax.apply_if_finite(tx, max_consecutive_errors=opt.max_nonfinite)
  return tx
