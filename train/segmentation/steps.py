r"""The jitted programs of segmentation fine-tuning: train step, prediction.

The model (``train.segmentation.upernet.UperNet``) is split once into its
graph and three pure trees: ``params`` (``nnx.Param``, what the optimizer
updates), ``batch_stats`` (BatchNorm's running statistics, which a training
step replaces by the updated ones) and ``rest`` (everything else: the
unused dropout stream's state). Images travel as uint8 and are normalised on
the device: :math:`(x / 255 - \mu) / \sigma` with ImageNet's mean and std.

The loss is mmsegmentation's ``CrossEntropyLoss`` (``avg_non_ignore=False``,
its default): per-pixel cross-entropy, 0 at ignored pixels (255), averaged
over all the batch's pixels; with the auxiliary head, its loss times
``auxiliary_loss_weight`` (0.4) is added. BatchNorm normalises by the
statistics of the whole global batch (the batch is one array over the mesh,
as SyncBN in mmseg).
"""

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import optax

import spd_optax
from train.segmentation import pretrained
from train.segmentation import upernet

IGNORE = 255


def split(model: nnx.Module) -> tuple[Any, dict, dict, dict]:
  """``(graphdef, params, batch_stats, rest)``, the trees as pure dicts."""
  graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat,
                                            ...)
  return (graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(stats),
          nnx.to_pure_dict(rest))


def normalise(images: jax.Array) -> jax.Array:
  """uint8 ``[B, H, W, 3]`` -> float32, ImageNet-normalised."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(pretrained.IMAGENET_MEAN)) / jnp.asarray(
      pretrained.IMAGENET_STD)


def pixel_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean over all pixels of the cross-entropy, 0 where ``labels`` is 255."""
  labels = labels.astype(jnp.int32)
  valid = labels != IGNORE
  ce = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), jnp.where(valid, labels, 0))
  return jnp.mean(jnp.where(valid, ce, 0.0))


def loss_fn(params, stats, rest, graphdef, batch, key, aux_weight: float):
  """``(loss, (new batch_stats, main loss))`` of one training batch."""
  model = nnx.merge(graphdef, params, stats, rest)
  out = model(normalise(batch['image']), deterministic=False,
              dropout_key=key)
  main = pixel_loss(out['logits'], batch['label'])
  loss = main
  if 'auxiliary_logits' in out:
    loss = loss + aux_weight * pixel_loss(out['auxiliary_logits'],
                                          batch['label'])
  new_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
  return loss, (new_stats, main)


def make_train_step(graphdef, tx: optax.GradientTransformation, *,
                    aux_weight: float, spd: bool):
  """``step(params, stats, opt_state, rest, batch, key) -> (params, stats,
  opt_state, metrics)``, jitted, the first three donated. ``spd``: add
  SPD's diagnostics (``spd_optax.diagnostics_summary``) to the metrics."""

  def step(params, stats, opt_state, rest, batch, key):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (stats, main)), grads = grad_fn(params, stats, rest, graphdef,
                                           batch, key, aux_weight)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    out = {'train/loss': loss, 'train/decode_loss': main,
           'train/grad_norm': optax.tree.norm(grads)}
    if spd:
      out.update({k.replace('spd/', 'train/spd_'): v for k, v in
                  spd_optax.diagnostics_summary(opt_state).items()})
    return params, stats, opt_state, out

  return jax.jit(step, donate_argnums=(0, 1, 2))


def forward_logits(graphdef, params, stats, rest, images) -> jax.Array:
  """Evaluation logits ``[B, h, w, K]`` of uint8 ``images`` (BatchNorm on
  its running statistics, no drop path)."""
  model = nnx.merge(graphdef, params, stats, rest)
  return model(normalise(images), deterministic=True)['logits']


def resize_to(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear, ``align_corners=False``, no antialiasing (PyTorch's)."""
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  return upernet.resize(x, tuple(size))


def initial_opt_state(tx: optax.GradientTransformation, params: Any) -> Any:
  """``tx.init`` jitted, so the state lands on the params' shardings."""
  return jax.jit(tx.init)(params)
