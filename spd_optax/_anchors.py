r"""The anchor :math:`\theta_0`: stored at ``init``, read at each step, reset.

The anchored transformations (SPD, its non-selective variant and L2-SP) keep
the anchor in their state's ``anchor`` field: one copy per selected leaf,
``optax.MaskedNode`` elsewhere, ``optax.EmptyState()`` for the zero anchor.
:func:`set_anchor` finds those states anywhere in an optimizer state. The
state classes register themselves with :func:`anchored_state`, so this module
needs nothing from the transformations (which import it).
"""

from collections.abc import Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import optax

from spd_optax import _checks
from spd_optax import _masks

# The anchor theta_0 of SPD and L2-SP: 'params' (a copy of the params at
# init: full fine-tuning), 'zeros' (PEFT adapters: stores nothing), or a
# pytree of arrays with the params' structure. Public as spd_optax.AnchorSpec.
AnchorSpec = Union[str, optax.Params]

# The state classes whose `anchor` field `set_anchor` resets.
_ANCHORED_STATES: list[type] = []


def anchored_state(cls: type) -> type:
  """Class decorator: ``set_anchor`` resets the ``anchor`` of ``cls`` states."""
  if cls not in _ANCHORED_STATES:
    _ANCHORED_STATES.append(cls)
  return cls


def is_zero_anchor(anchor: AnchorSpec) -> bool:
  return isinstance(anchor, str) and anchor == 'zeros'


def copy_leaf(leaf: Any, dtype: Any) -> Any:
  """A fresh copy of ``leaf`` in ``dtype``, keeping its sharding.

  The copy matters: a state that aliases the params breaks a train step that
  donates both. ``jax.ShapeDtypeStruct`` leaves stay abstract.
  """
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(
        leaf.shape, dtype, sharding=getattr(leaf, 'sharding', None)
    )
  return jnp.array(leaf, dtype=dtype, copy=True)


def init_anchor(
    params: optax.Params,
    anchor: AnchorSpec,
    selected: Sequence[bool],
    anchor_dtype: Any,
    what: str,
) -> Any:
  """Builds the anchor kept in the state, checking the selected leaves.

  Args:
    params: the parameter tree at ``init``.
    anchor: ``'params'``, ``'zeros'`` or a pytree with the structure of
      ``params``.
    selected: one bool per leaf; unselected leaves store ``optax.MaskedNode``.
    anchor_dtype: dtype of the stored anchors; ``None`` keeps the params'.
    what: the transformation's name, for error messages.

  Returns:
    ``optax.EmptyState()`` for the zero anchor (nothing is stored); otherwise
    a tree with the structure of ``params`` whose leaves are anchor arrays
    (selected leaves) or ``MaskedNode`` (others).
  """
  paths, param_leaves, treedef = _masks.leaves_with_paths(params)
  if is_zero_anchor(anchor):
    for path, leaf, sel in zip(paths, param_leaves, selected):
      if sel:
        _checks.check_inexact(path, leaf, what)
    return optax.EmptyState()
  _checks.check_anchor_spec(anchor, what)
  if isinstance(anchor, str):  # 'params'
    anchor_leaves = param_leaves
  else:
    anchor_leaves = _anchor_leaves_like(anchor, params, paths, what)
  out = []
  for path, param, ref, sel in zip(paths, param_leaves, anchor_leaves, selected):
    if not sel:
      out.append(optax.MaskedNode())
      continue
    _checks.check_inexact(path, param, what)
    if tuple(ref.shape) != tuple(param.shape):
      raise ValueError(
          f'{what}: anchor leaf {path} has shape {tuple(ref.shape)} but the'
          f' param has shape {tuple(param.shape)}.'
      )
    if anchor_dtype is None and ref.dtype != param.dtype:
      raise ValueError(
          f'{what}: anchor leaf {path} has dtype {ref.dtype} but the param has'
          f' dtype {param.dtype}; pass `anchor_dtype=` to store anchors in'
          ' another dtype.'
      )
    out.append(copy_leaf(ref, anchor_dtype or param.dtype))
  return treedef.unflatten(out)


def _anchor_leaves_like(
    anchor: Any, params: optax.Params, paths: list[str], what: str
) -> list[Any]:
  """The leaves of an explicit anchor tree, checked against the params."""
  anchor_def = jax.tree.structure(anchor)
  params_def = jax.tree.structure(params)
  try:
    # Leaves are aligned by the params' structure; nnx Variables in the params
    # (as `nnx.Optimizer` passes them to `init`) are looked through.
    subtrees = anchor_def.flatten_up_to(params)
    anchor_leaves = jax.tree.leaves(anchor)
    if len(anchor_leaves) != len(paths) or any(
        len(jax.tree.leaves(s)) != 1 for s in subtrees
    ):
      raise ValueError('different number of leaves')
  except (ValueError, TypeError) as e:
    anchor_paths, _, _ = _masks.leaves_with_paths(anchor)
    missing = sorted(set(paths) - set(anchor_paths))
    extra = sorted(set(anchor_paths) - set(paths))
    raise ValueError(
        f'{what}: the anchor tree does not match the params. Missing from'
        f' the anchor: {missing[:5]}; not in the params: {extra[:5]}.'
        f' Anchor structure {anchor_def}, params structure {params_def}.'
    ) from e
  return anchor_leaves


def anchor_leaves(anchor: Any, zero_anchor: bool, num_leaves: int,
                  params: Any = None) -> list:
  """The stored anchor's leaves (MaskedNode kept), or Nones for a zero anchor.

  Aligned with ``jax.tree.leaves(params)``: inside ``optax.partition`` (or
  ``optax.masked``) the params hold ``MaskedNode`` where another
  transformation's leaves are, which have no leaf there but do in the
  anchor (built from the same masked params); given ``params``, those
  entries are dropped, wherever they come in the tree's order.
  """
  if zero_anchor:
    return [None] * num_leaves
  if params is None:
    return jax.tree.leaves(anchor, is_leaf=_masks.is_masked_node)
  return _masks.leaves_aligned(anchor, params)


def set_anchor_tree(old_anchor: Any, new_anchor: Any, what: str) -> Any:
  """Replaces the selected leaves of ``old_anchor`` by ``new_anchor``'s.

  ``new_anchor`` has the structure of the params (nnx Variables are looked
  through). Shapes must match; values are copied and cast to the stored dtype,
  keeping the stored sharding.
  """
  old_with_paths, old_def = jax.tree_util.tree_flatten_with_path(
      old_anchor, is_leaf=_masks.is_masked_node
  )
  new_leaves = jax.tree.leaves(new_anchor)
  if len(new_leaves) != len(old_with_paths):
    raise ValueError(
        f'{what}: the new anchor has {len(new_leaves)} leaves but the params'
        f' the optimizer was initialised with have {len(old_with_paths)}.'
        f' New anchor structure: {jax.tree.structure(new_anchor)}.'
    )
  out = []
  for (path, old), new in zip(old_with_paths, new_leaves):
    if _masks.is_masked_node(old):
      out.append(old)
      continue
    path = jax.tree_util.keystr(path)
    if tuple(jnp.shape(new)) != tuple(old.shape):
      raise ValueError(
          f'{what}: new anchor leaf {path} has shape {tuple(jnp.shape(new))}'
          f' but the stored anchor has shape {tuple(old.shape)}.'
      )
    value = jnp.array(new, dtype=old.dtype, copy=True)
    sharding = getattr(old, 'sharding', None)
    if sharding is not None and not isinstance(value, jax.core.Tracer):
      value = jax.device_put(value, sharding)
    out.append(value)
  return old_def.unflatten(out)


def _map_anchored_states(fn, opt_state):
  """Applies ``fn`` to every anchored state inside ``opt_state``."""
  anchored = tuple(_ANCHORED_STATES)
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
        anchor=set_anchor_tree(state.anchor, anchor, 'set_anchor')
    )

  new_state = _map_anchored_states(reset, opt_state)
  if not found:
    raise ValueError(
        'set_anchor: the optimizer state holds no SPDState or L2SPState.'
    )
  return new_state
