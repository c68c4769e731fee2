"""Resetting the anchor of SPD and L2-SP states from loaded weights."""

import jax
import optax

from spd_optax import _l2sp
from spd_optax import _transform
from spd_optax import _tree


def _map_anchored_states(fn, opt_state):
  """Applies ``fn`` to every anchored state inside ``opt_state``."""
  anchored = (_transform.SPDState, _l2sp.L2SPState)
  return jax.tree.map(
      lambda s: fn(s) if isinstance(s, anchored) else s,
      opt_state,
      is_leaf=lambda s: isinstance(s, anchored),
  )


def set_anchor(opt_state: optax.OptState, anchor: optax.Params):
  """Returns ``opt_state`` with every stored anchor reset to ``anchor``.

  Training loops often build the optimizer (and call ``init``) before the
  pre-trained checkpoint is restored; call this once the weights are loaded,
  or SPD and L2-SP pull towards the random initialisation. It reaches the
  anchored states anywhere in the state tree (inside ``chain``,
  ``inject_hyperparams``, ``MultiSteps``...), keeps each anchor's dtype,
  sharding and mask, and works under ``jit``.

  Args:
    opt_state: an optimizer state holding :class:`SPDState` or
      :class:`L2SPState` values.
    anchor: the new anchor, with the structure of the params.

  Returns:
    The new optimizer state.

  Raises:
    ValueError: if the state holds no anchor to set (a zero anchor stores
      none), or the new anchor's structure or shapes do not match.

  Examples:
    >>> import jax.numpy as jnp, spd_optax
    >>> opt = spd_optax.adamspd(1e-3)
    >>> state = opt.init({'w': jnp.zeros(3)})  # Before loading weights.
    >>> state = spd_optax.set_anchor(state, {'w': jnp.ones(3)})
    >>> state.anchor['w']
    Array([1., 1., 1.], dtype=float32)
  """
  found = []

  def reset(state):
    if isinstance(state.anchor, optax.EmptyState):
      raise ValueError(
          "set_anchor: this optimizer uses anchor='zeros', which stores no"
          ' anchor to set.'
      )
    found.append(state)
    return state._replace(
        anchor=_tree.set_anchor_tree(state.anchor, anchor, 'set_anchor')
    )

  new_state = _map_anchored_states(reset, opt_state)
  if not found:
    raise ValueError(
        'set_anchor: the optimizer state holds no SPDState or L2SPState.'
    )
  return new_state

