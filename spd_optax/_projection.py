r"""The projection of one leaf: SPD's arithmetic, apart from the bookkeeping.

Everything here is per leaf (or per stack of layers) and pure: the reductions
that decide whether a leaf is projected and by how much, and the final update.
:mod:`spd_optax._spd` calls it for each selected leaf.
"""

import jax.numpy as jnp


def project_leaf(grad, update, param, anchor, weight_decay, stacked, selective,
                  step_size):
  r"""SPD for one leaf (or one stack of layers). See SPD.md for the math.

  With the deviations :math:`d_0 = \theta_{t-1} - \theta_0` and
  :math:`d_1 = d_0 + u`, the growth of the squared deviation is computed as
  :math:`\|d_1\|^2 - \|d_0\|^2 = \langle 2 d_0 + u, u \rangle`, and
  :math:`r = (\|d_1\| - \|d_0\|) / \|d_1\|` as that growth over
  :math:`(\|d_1\| + \|d_0\|) \|d_1\|`: the same number, without the
  cancellation of two nearly equal norms, and from reductions over ``d0`` and
  ``u`` alone (no ``d1`` is materialised).

  The inner update is ``step_size * update``: 1 for a complete inner
  optimizer, ``-lr`` when the learning rate is applied here rather than by
  the inner optimizer (adamspd). The reductions run over ``update`` itself
  and are scaled after, so XLA materialises one array per leaf for them and
  for the final update.

  Reductions run in float32 (float64 when the params are), whatever the
  params' dtype; the returned update keeps the inner update's dtype.
  """
  dtype = jnp.promote_types(param.dtype, jnp.float32)
  raw = update.astype(dtype)
  update = apply_step_size(update, step_size)
  step_size = step_size.astype(dtype)
  u = update.astype(dtype)
  dev_prev = param.astype(dtype)
  if anchor is not None:
    dev_prev = dev_prev - anchor.astype(dtype)
  axes = tuple(range(1 if stacked else 0, param.ndim))
  # c_t = -<g, theta - theta0>; project when c_t < 0.
  alignment = -jnp.sum(grad.astype(dtype) * dev_prev, axis=axes)
  norm_prev_sq = jnp.sum(dev_prev * dev_prev, axis=axes)
  growth = (2 * step_size * jnp.sum(dev_prev * raw, axis=axes)
            + step_size * step_size * jnp.sum(raw * raw, axis=axes))
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
  new_update = (u - scale_b * (dev_prev + u)).astype(update.dtype)
  deviation_norm = jnp.abs(1 - scale) * norm_new
  return (
      new_update,
      projected,
      ratio.astype(jnp.float32),
      deviation_norm.astype(jnp.float32),
  )


def apply_step_size(update, step_size):
  """``step_size * update`` in the update's dtype, as ``optax.scale`` does."""
  return update * jnp.asarray(step_size, dtype=update.dtype)

