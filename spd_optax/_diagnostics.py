"""What SPD did: per-leaf diagnostics and scalars ready to log."""

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from spd_optax import _masks
from spd_optax._spd import ProjectionDiagnostics
from spd_optax._spd import SPDState


def _find_spd_states(opt_state) -> list[SPDState]:
  return [
      s
      for s in jax.tree.leaves(
          opt_state, is_leaf=lambda s: isinstance(s, SPDState)
      )
      if isinstance(s, SPDState)
  ]


def get_diagnostics(opt_state: optax.OptState) -> ProjectionDiagnostics:
  """The per-leaf diagnostics of the (single) SPD state in ``opt_state``.

  Args:
    opt_state: an optimizer state containing one :class:`SPDState`.

  Returns:
    Its :class:`ProjectionDiagnostics`: trees with the params' structure.

  Examples:
    >>> import jax.numpy as jnp, spd_optax
    >>> opt = spd_optax.adamspd(1e-3)
    >>> state = opt.init({'w': jnp.zeros(3)})
    >>> spd_optax.get_diagnostics(state).projected['w']
    Array(False, dtype=bool)
  """
  states = _find_spd_states(opt_state)
  if len(states) != 1:
    raise ValueError(
        f'get_diagnostics: expected one SPDState in the optimizer state,'
        f' found {len(states)}.'
    )
  return states[0].diagnostics


def _counted_leaves(tree: Any, mask: Optional[_masks.LeafFlags]) -> list[Any]:
  """The leaves of a diagnostics tree that SPD acts on and ``mask`` keeps.

  ``mask`` has the params' forms: a pytree of bools (or a prefix), or a
  callable of a tree with the params' structure (e.g.
  :func:`spd_optax.exclude_paths`).
  """
  leaves = jax.tree.leaves(tree, is_leaf=_masks.is_masked_node)
  if mask is None:
    keep = [True] * len(leaves)
  else:
    like_params = jax.tree.map(
        lambda x: jnp.zeros([]) if _masks.is_masked_node(x) else x,
        tree, is_leaf=_masks.is_masked_node,
    )
    keep = _masks.resolve_flags(mask, like_params, 'mask')
  return [x for x, k in zip(leaves, keep)
          if k and not _masks.is_masked_node(x)]


def projected_fraction(
    opt_state: optax.OptState, mask: Optional[_masks.LeafFlags] = None
) -> jax.Array:
  """Fraction of the selected layers that SPD projected at the last step.

  A stacked leaf counts each of its layers. Over all SPD states found.

  Args:
    opt_state: an optimizer state holding one or more :class:`SPDState`.
    mask: the leaves to count (all that SPD acts on by default), in the forms
      of SPD's ``mask``; e.g. ``spd_optax.exclude_paths(
      spd_optax.KEY_BIAS_PATTERN)`` leaves out the attention key biases,
      whose projection is a coin toss (their true gradient is zero).

  Returns:
    A float32 scalar in [0, 1].
  """
  fired = []
  for s in _find_spd_states(opt_state):
    fired += [jnp.ravel(x)
              for x in _counted_leaves(s.diagnostics.projected, mask)]
  if not fired:
    raise ValueError(
        'projected_fraction: the optimizer state holds no SPD, or `mask`'
        ' leaves out every leaf it acts on.'
    )
  return jnp.mean(jnp.concatenate(fired).astype(jnp.float32))


def diagnostics_summary(
    opt_state: optax.OptState, mask: Optional[_masks.LeafFlags] = None
) -> dict[str, jax.Array]:
  """Scalars ready to log: projected fraction, fire rate, deviation norm.

  Args:
    opt_state: an optimizer state holding one or more :class:`SPDState`.
    mask: the leaves to count (all that SPD acts on by default), as in
      :func:`projected_fraction`.

  Returns:
    ``{'spd/projected_fraction', 'spd/fire_rate', 'spd/mean_ratio',
    'spd/deviation_norm'}``: the fraction of layers projected at the last
    step, the fraction of (layer, step) pairs projected since ``init``, the
    mean :math:`r_t` over the projected layers at the last step, and the
    global norm of :math:`\\theta_t - \\theta_0` over the selected leaves.

  Examples:
    >>> import jax.numpy as jnp, spd_optax
    >>> opt = spd_optax.adamspd(1e-3)
    >>> state = opt.init({'w': jnp.zeros(3)})
    >>> sorted(spd_optax.diagnostics_summary(state))
    ['spd/deviation_norm', 'spd/fire_rate', 'spd/mean_ratio', 'spd/projected_fraction']
  """
  states = _find_spd_states(opt_state)
  if not states:
    raise ValueError('diagnostics_summary: the optimizer state holds no SPD.')

  def cat(field):
    leaves = [
        jnp.ravel(x) for s in states for x in _counted_leaves(field(s), mask)
    ]
    return (jnp.concatenate(leaves) if leaves else jnp.zeros([0])).astype(
        jnp.float32
    )

  projected = cat(lambda s: s.diagnostics.projected)
  ratio = cat(lambda s: s.diagnostics.ratio)
  steps = jnp.maximum(
      sum(s.count for s in states) / len(states), 1
  ).astype(jnp.float32)
  num_fired = jnp.sum(projected)
  return {
      'spd/projected_fraction': jnp.mean(projected),
      'spd/fire_rate': jnp.mean(cat(lambda s: s.diagnostics.num_projected))
      / steps,
      'spd/mean_ratio': jnp.sum(ratio * projected) / jnp.maximum(num_fired, 1),
      'spd/deviation_norm': jnp.sqrt(
          jnp.sum(jnp.square(cat(lambda s: s.diagnostics.deviation_norm)))
      ),
  }
