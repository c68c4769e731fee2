r"""The projection of one leaf: SPD's arithmetic, apart from the bookkeeping.

Everything here is per leaf (or per stack of layers) and pure: the reductions
that decide whether a leaf is projected and by how much, and the final update.
:mod:`spd_optax._spd` calls :func:`project_leaf` for each selected leaf. The
formulas are those of :doc:`/algorithm` (docs/algorithm.rst).
"""

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp


class LeafProjection(NamedTuple):
  """What :func:`project_leaf` returns for one leaf."""

  update: jax.Array  # theta_t - theta_{t-1}, in the inner update's dtype.
  projected: jax.Array  # bool, shape () or (num_layers,): c_t < 0.
  ratio: jax.Array  # float32, same shape: r_t in [0, 1].
  deviation_norm: jax.Array  # float32, same shape: ||theta_t - theta_0||.


def project_leaf(
    *,
    grad: jax.Array,
    update: jax.Array,
    param: jax.Array,
    anchor: Optional[jax.Array],
    weight_decay: jax.Array,
    stacked: bool,
    selective: bool,
    learning_rate: Optional[jax.Array] = None,
) -> LeafProjection:
  r"""SPD for one leaf (or one stack of layers), as in :doc:`/algorithm`.

  With the deviations :math:`d_0 = \theta_{t-1} - \theta_0` and
  :math:`d_1 = d_0 + u_t`, the growth of the squared deviation is computed as
  :math:`\|d_1\|^2 - \|d_0\|^2 = \langle 2 d_0 + u_t, u_t \rangle`, and
  :math:`r_t = (\|d_1\| - \|d_0\|) / \|d_1\|` as that growth over
  :math:`(\|d_1\| + \|d_0\|) \|d_1\|`: the same number, without the
  cancellation of two nearly equal norms, and from reductions over ``d0`` and
  ``u`` alone (no ``d1`` is materialised).

  Args:
    grad: the raw gradient :math:`g_t`.
    update: the inner optimizer's update :math:`u_t`; with ``learning_rate``,
      its unscaled direction (:math:`u_t` is ``-learning_rate * update``). The
      reductions then run over ``update`` itself and are scaled after, so XLA
      materialises one array per leaf for them and for the final update.
    param: :math:`\theta_{t-1}`.
    anchor: :math:`\theta_0`, or ``None`` for the zero anchor.
    weight_decay: :math:`\lambda`.
    stacked: whether the leading axis stacks separate layers.
    selective: SPD (project where :math:`c_t < 0`), or its ablation (always).
    learning_rate: see ``update``; ``None`` when ``update`` is :math:`u_t`.

  Returns:
    The final update (in the inner update's dtype) and the diagnostics, whose
    reductions ran in float32 (float64 when the params are), whatever the
    params' dtype.
  """
  dtype = jnp.promote_types(param.dtype, jnp.float32)
  raw = update.astype(dtype)
  u = scale_update(update, learning_rate).astype(dtype)
  dev_prev = param.astype(dtype)
  if anchor is not None:
    dev_prev = dev_prev - anchor.astype(dtype)
  axes = tuple(range(1 if stacked else 0, param.ndim))
  alignment = -jnp.sum(grad.astype(dtype) * dev_prev, axis=axes)  # c_t
  norm_prev_sq = jnp.sum(dev_prev * dev_prev, axis=axes)
  cross = jnp.sum(dev_prev * raw, axis=axes)
  square = jnp.sum(raw * raw, axis=axes)
  if learning_rate is None:
    growth = 2 * cross + square
  else:
    step = -jnp.asarray(learning_rate).astype(dtype)
    growth = 2 * step * cross + step * step * square
  norm_prev = jnp.sqrt(norm_prev_sq)
  norm_new = jnp.sqrt(jnp.maximum(norm_prev_sq + growth, 0))
  nonzero = norm_new > 0
  safe_norm_new = jnp.where(nonzero, norm_new, 1)
  ratio = jnp.where(
      nonzero,
      jnp.clip(growth / (safe_norm_new + norm_prev) / safe_norm_new, 0, 1),
      0,
  )
  if selective:
    projected = alignment < 0
  else:
    projected = jnp.ones(alignment.shape, dtype=bool)
  scale = jnp.where(projected, weight_decay.astype(dtype) * ratio, 0)
  scale_b = scale.reshape(scale.shape + (1,) * (param.ndim - scale.ndim))
  return LeafProjection(
      update=(u - scale_b * (dev_prev + u)).astype(update.dtype),
      projected=projected,
      ratio=ratio.astype(jnp.float32),
      deviation_norm=(jnp.abs(1 - scale) * norm_new).astype(jnp.float32),
  )


def scale_update(
    update: jax.Array, learning_rate: Optional[jax.Array]
) -> jax.Array:
  """``-learning_rate * update`` in the update's dtype, as ``optax.scale``
  does; ``update`` itself when ``learning_rate`` is ``None``."""
  if learning_rate is None:
    return update
  return update * jnp.asarray(-jnp.asarray(learning_rate), dtype=update.dtype)
