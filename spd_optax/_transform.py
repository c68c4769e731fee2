r"""The anchored projection: SPD's state, and the transformation's body.

:func:`anchored_projection` is what :func:`spd_optax.selective_projection_decay`,
:func:`spd_optax.projection_decay` and :func:`spd_optax.adamspd` return: it
keeps the anchor and the diagnostics in an :class:`SPDState`, runs the inner
optimizer (on the whole tree, or one leaf at a time) and hands each selected
leaf to :func:`spd_optax._projection.project_leaf`.
"""

from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import optax
from optax._src import base  # For NO_PARAMS_MSG, optax's own wording.

from spd_optax import _leafwise
from spd_optax import _projection
from spd_optax import _tree

AnchorSpec = Union[str, optax.Params]


class ProjectionDiagnostics(NamedTuple):
  r"""What the projection did at the last step, per selected leaf.

  Each field is a tree with the structure of the params; leaves that the
  transformation does not act on hold ``optax.MaskedNode``. A leaf stacked
  along a leading layer axis (``stacked_layers``) holds one value per layer.

  Attributes:
    projected: bool, shape ``()`` or ``(num_layers,)``: whether the leaf was
      projected at the last step (:math:`c_t < 0`).
    ratio: float32, same shape: :math:`r_t \in [0, 1]`, applied only where
      projected.
    deviation_norm: float32, same shape: :math:`\|\theta_t - \theta_0\|`
      after the step.
    num_projected: int32, same shape: the steps on which the leaf was
      projected since ``init``.
  """

  projected: Any  # bool, shape () or (num_layers,): projected this step.
  ratio: Any  # float32, same shape: r_t in [0, 1] (applied only if projected).
  deviation_norm: Any  # float32: ||theta_t - theta_0|| after the step.
  num_projected: Any  # int32: steps on which this leaf was projected so far.


class SPDState(NamedTuple):
  r"""State of :func:`selective_projection_decay` (and its variants).

  Attributes:
    count: int32 scalar, the number of updates so far (schedules read it).
    inner_state: the wrapped optimizer's state.
    anchor: :math:`\theta_0` per selected leaf (in ``anchor_dtype``),
      ``optax.MaskedNode`` elsewhere; ``optax.EmptyState()`` for
      ``anchor='zeros'``, which stores nothing.
    diagnostics: :class:`ProjectionDiagnostics` of the last step.
  """

  count: jax.Array  # shape=(), dtype=jnp.int32.
  inner_state: optax.OptState  # The wrapped optimizer's state.
  # The anchor theta_0 per selected leaf (dtype `anchor_dtype`), MaskedNode
  # elsewhere; optax.EmptyState() for the zero anchor, which stores nothing.
  anchor: Any
  diagnostics: ProjectionDiagnostics


def _scalar_or_schedule(value: optax.ScalarOrSchedule, count: jax.Array):
  return value(count) if callable(value) else value


def _check_weight_decay(weight_decay: optax.ScalarOrSchedule, what: str):
  if isinstance(weight_decay, (int, float)) and weight_decay < 0:
    raise ValueError(
        f'{what}: weight_decay must be >= 0, got {weight_decay}.'
    )


def _check_anchor_spec(anchor: AnchorSpec, what: str):
  if isinstance(anchor, str) and anchor not in ('params', 'zeros'):
    raise ValueError(
        f"{what}: unknown anchor {anchor!r}; expected 'params', 'zeros' or a"
        ' pytree of arrays with the structure of the params.'
    )


def _layer_shape(leaf: Any, stacked: bool, path: str, what: str):
  if not stacked:
    return ()
  if len(leaf.shape) == 0:
    raise ValueError(
        f'{what}: leaf {path} is a scalar and cannot be stacked along a'
        ' leading layer axis; leave it out of `stacked_layers`.'
    )
  return (leaf.shape[0],)



def anchored_projection(
    inner: optax.GradientTransformation,
    weight_decay: optax.ScalarOrSchedule,
    anchor: AnchorSpec,
    mask: Optional[_tree.LeafFlags],
    anchor_dtype: Optional[Any],
    stacked_layers: Optional[_tree.LeafFlags],
    selective: bool,
    what: str,
    leafwise: bool = False,
    learning_rate: Optional[optax.ScalarOrSchedule] = None,
) -> optax.GradientTransformationExtraArgs:
  """Shared body of :func:`selective_projection_decay`, its ablation and
  :func:`adamspd`.

  ``learning_rate``, when given, scales the inner updates by ``-lr`` inside the
  projection (``inner`` is then unscaled, e.g. ``optax.scale_by_adam``);
  otherwise the scale is 1, which XLA folds away.
  """
  _check_weight_decay(weight_decay, what)
  _check_anchor_spec(anchor, what)
  inner = optax.with_extra_args_support(inner)
  zero_anchor = isinstance(anchor, str) and anchor == 'zeros'

  def selected_leaves(params):
    selected = _tree.resolve_flags(
        True if mask is None else mask, params, 'mask'
    )
    stacked = _tree.resolve_flags(stacked_layers, params, 'stacked_layers')
    return selected, stacked

  def init_fn(params):
    paths, leaves, treedef = _tree.leaves_with_paths(params)
    selected, stacked = selected_leaves(params)
    if zero_anchor:
      stored_anchor = optax.EmptyState()
      for path, leaf, sel in zip(paths, leaves, selected):
        if sel:
          _tree.check_inexact(path, leaf, what)
    else:
      stored_anchor = _tree.init_anchor(
          params, anchor, selected, anchor_dtype, what
      )

    def per_leaf(make):
      return treedef.unflatten([
          make(_layer_shape(leaf, st, path, what)) if sel else optax.MaskedNode()
          for path, leaf, sel, st in zip(paths, leaves, selected, stacked)
      ])

    diagnostics = ProjectionDiagnostics(
        projected=per_leaf(lambda s: jnp.zeros(s, bool)),
        ratio=per_leaf(lambda s: jnp.zeros(s, jnp.float32)),
        deviation_norm=per_leaf(lambda s: jnp.zeros(s, jnp.float32)),
        num_projected=per_leaf(lambda s: jnp.zeros(s, jnp.int32)),
    )
    return SPDState(
        count=jnp.zeros([], jnp.int32),
        inner_state=inner.init(params),
        anchor=stored_anchor,
        diagnostics=diagnostics,
    )

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError(base.NO_PARAMS_MSG)
    grads = updates
    lam = jnp.asarray(_scalar_or_schedule(weight_decay, state.count))
    if learning_rate is None:
      step_size = jnp.ones([], jnp.float32)
    else:
      step_size = -jnp.asarray(_scalar_or_schedule(learning_rate, state.count))
    selected, stacked = selected_leaves(params)
    grad_leaves, treedef = jax.tree.flatten(grads)
    param_leaves = jax.tree.leaves(params)
    anchor_leaves = _tree.anchor_leaves(state.anchor, zero_anchor,
                                        len(param_leaves))
    if leafwise:
      leaf_states, split_def, per_leaf = _leafwise.split_state(
          state.inner_state, params, what)
      new_leaf_states = []
    else:
      inner_updates, inner_state = inner.update(
          grads, state.inner_state, params, **extra_args
      )
      update_leaves = jax.tree.leaves(inner_updates)
    old = [
        jax.tree.leaves(field, is_leaf=_tree.is_masked_node)
        for field in state.diagnostics
    ]
    # Chain each leaf's inputs to the previous leaf's result so that XLA:CPU
    # finishes one leaf before it starts the next (see _leafwise). It only
    # matters to XLA's scheduler: not when running eagerly.
    sequence = (_leafwise.sequencing_enabled()
                and any(isinstance(g, jax.core.Tracer) for g in grad_leaves))
    zero = None  # Exact 0 that depends on the previous leaf (CPU only).
    new_updates, projected, ratio, deviation, num_projected = [], [], [], [], []
    for i, (g, p, a, sel, st) in enumerate(zip(
        grad_leaves, param_leaves, anchor_leaves, selected, stacked,
    )):
      link = sequence and _leafwise.worth_chaining(p)
      link_zero = zero if link else None
      p = _leafwise.after(p, link_zero)
      if leafwise:
        leaf_state = _leafwise.chain_state(
            leaf_states[i], split_def, per_leaf, link_zero)
        u, leaf_state = inner.update(g, leaf_state, p, **extra_args)
        new_leaf_states.append(leaf_state)
      else:
        u = _leafwise.after(update_leaves[i], link_zero)
      if not sel:
        new_updates.append(_projection.apply_step_size(u, step_size))
        for out in (projected, ratio, deviation, num_projected):
          out.append(optax.MaskedNode())
        continue
      u, fired, r, dev = _projection.project_leaf(g, u, p, a, lam, st, selective,
                                       step_size)
      if link:
        zero = _leafwise.zero_after(r)
      new_updates.append(u)
      projected.append(fired)
      ratio.append(r)
      deviation.append(dev)
      num_projected.append(old[3][i] + fired.astype(jnp.int32))
    if leafwise:
      inner_state = _leafwise.merge_states(
          new_leaf_states, split_def, per_leaf, params)
    diagnostics = ProjectionDiagnostics(
        *(treedef.unflatten(x)
          for x in (projected, ratio, deviation, num_projected))
    )
    new_state = SPDState(
        count=optax.safe_increment(state.count),
        inner_state=inner_state,
        anchor=state.anchor,
        diagnostics=diagnostics,
    )
    return treedef.unflatten(new_updates), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)

