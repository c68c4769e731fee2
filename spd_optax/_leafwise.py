"""Running SPD leaf by leaf: the CPU chain, and splitting a leafwise state.

SPD needs two reductions over a leaf's inner update before it can write that
leaf's final update, so the inner update of every leaf is materialised. Given
the whole tree at once, XLA:CPU's concurrency-optimised scheduler computes the
inner update of *every* leaf first, keeping a params-sized set of temporaries
alive; on CPU the fresh pages for them cost more than the arithmetic (4-5x an
AdamW step on ViT-B/16 shapes).

On CPU, SPD threads an exact zero computed from one leaf's result into the
next leaf's inputs (:func:`after`, :func:`zero_after`), so XLA finishes a leaf
before it starts the next and reuses one leaf's worth of temporaries. The zero
is exact (``x + 0.0 == x`` for every finite or infinite ``x``; only the sign of
a zero can change), so the numbers do not change.

Around a whole-tree inner optimizer (:class:`WholeTree`) the chain can only
start after it, so the inner updates of all leaves still exist at once.
:func:`spd_optax.adamspd` builds its inner optimizer itself
(``optax.scale_by_adam``, which treats each leaf on its own) and calls it once
per leaf instead (:class:`PerLeaf`), so that the chain covers it too. Users
cannot ask for that path: whether an arbitrary transformation treats its
leaves apart cannot be checked (global-norm clipping, a mask computed from
paths), and running one that does not leaf by leaf changes its maths.
"""

from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp


def sequencing_enabled() -> bool:
  """Whether to chain the leaves: on CPU only.

  The problem is XLA:CPU's scheduler; on GPU and TPU a chain would keep XLA
  from fusing small leaves into one kernel, so it is not used there.
  """
  return jax.default_backend() == 'cpu'


# Leaves smaller than this are left out of the chain: their temporaries are
# small, and running them alongside the big ones keeps both cores busy (on a
# ViT-Ti, whose largest leaf has 147k elements, chaining every leaf costs 8%
# of a train step).
MIN_CHAINED_SIZE = 1 << 18


def worth_chaining(leaf: Any) -> bool:
  """Whether ``leaf`` is big enough for its temporaries to matter."""
  return int(jnp.size(leaf)) >= MIN_CHAINED_SIZE


def after(x: Any, zero: Optional[jax.Array]) -> Any:
  """``x + zero``: ``x`` unchanged, but computed after ``zero`` (an exact 0).

  Numeric arrays only; anything else (and ``zero=None``) passes through.
  """
  if zero is None or not hasattr(x, 'dtype'):
    return x
  if not jnp.issubdtype(x.dtype, jnp.number):
    return x
  return x + zero.astype(x.dtype)


def zero_after(value: jax.Array) -> jax.Array:
  """An exact float32 zero that XLA can only compute once ``value`` is known.

  ``0 * finite == 0`` exactly, and a non-finite ``value`` is replaced first, so
  a NaN in one leaf never leaks into the next.
  """
  value = jnp.sum(value.astype(jnp.float32))
  return 0.0 * jnp.where(jnp.isfinite(value), value, 0.0)


def chain_state(
    leaf_state: Any, split_def: Any, is_per_leaf: list[bool],
    zero: Optional[jax.Array],
) -> Any:
  """One leaf's inner state made to depend on ``zero``.

  The shared leaves (step counts) are chained when there are any: that delays
  the leaf's update without holding back its moment updates, which XLA may
  then run alongside the previous leaf. Otherwise the per-leaf arrays are.
  """
  if zero is None:
    return leaf_state
  nodes = split_def.flatten_up_to(leaf_state)
  shared_numbers = [
      not per_leaf and hasattr(node, 'dtype')
      and jnp.issubdtype(node.dtype, jnp.number)
      for node, per_leaf in zip(nodes, is_per_leaf)
  ]
  chain = shared_numbers if any(shared_numbers) else is_per_leaf
  return split_def.unflatten([
      after(node, zero) if link else node for node, link in zip(nodes, chain)
  ])


class LeafChain:
  """The CPU ordering of the leaves, one leaf at a time in a loop.

  For each leaf, :meth:`zero_for` gives the exact zero to add to its inputs
  (``None`` when there is none: off CPU, outside ``jit``, a small leaf, or the
  first chained leaf), and :meth:`done` makes the next chained leaf wait for
  this leaf's ``value``.
  """

  def __init__(self, leaves: Sequence[Any]):
    # It only matters to XLA's scheduler: not when running eagerly.
    self._enabled = sequencing_enabled() and any(
        isinstance(x, jax.core.Tracer) for x in leaves)
    self._zero = None
    self._linked = False

  def zero_for(self, leaf: Any) -> Optional[jax.Array]:
    self._linked = self._enabled and worth_chaining(leaf)
    return self._zero if self._linked else None

  def done(self, value: jax.Array) -> None:
    if self._linked:
      self._zero = zero_after(value)


class WholeTree:
  """The inner update of every leaf, computed at once on the whole tree."""

  def __init__(self, inner, grads, state, params, extra_args):
    updates, self._state = inner.update(grads, state, params, **extra_args)
    self._leaves = jax.tree.leaves(updates)

  def leaf(self, i: int, grad: Any, param: Any, zero: Optional[jax.Array]):
    del grad, param  # Used already, on the whole tree.
    return after(self._leaves[i], zero)

  def new_state(self) -> Any:
    return self._state


class PerLeaf:
  """The inner update of one leaf at a time (call :meth:`leaf` for every
  leaf, in order), for an inner optimizer that treats each leaf on its own."""

  def __init__(self, inner, grads, state, params, extra_args):
    del grads  # Given leaf by leaf.
    self._inner, self._params, self._extra_args = inner, params, extra_args
    self._states, self._split_def, self._per_leaf = split_state(state, params)
    self._new_states = []

  def leaf(self, i: int, grad: Any, param: Any, zero: Optional[jax.Array]):
    leaf_state = chain_state(
        self._states[i], self._split_def, self._per_leaf, zero)
    update, leaf_state = self._inner.update(
        grad, leaf_state, param, **self._extra_args)
    self._new_states.append(leaf_state)
    return update

  def new_state(self) -> Any:
    return merge_states(
        self._new_states, self._split_def, self._per_leaf, self._params)


def _is_subtree_like(params_def):
  return lambda x: jax.tree.structure(x) == params_def


def split_state(state: Any, params: Any) -> tuple[list[Any], Any, list[bool]]:
  """Splits an optimizer state into one state per leaf of ``params``.

  Every subtree of ``state`` with the structure of ``params`` (Adam's
  ``mu``/``nu``) is replaced by its i-th leaf; every other leaf (the step
  count) is shared.

  Args:
    state: the inner optimizer's state for the whole ``params`` tree.
    params: the params.

  Returns:
    ``(states, treedef, is_per_leaf)``: the per-leaf states, the treedef of a
    split state, and which of its leaves come from params-shaped subtrees.

  Raises:
    ValueError: if the state holds a non-scalar array outside the
      params-shaped subtrees (e.g. ``optax.masked``'s), which cannot be split
      by leaf: only an inner optimizer built for it may run here.
  """
  params_def = jax.tree.structure(params)
  is_subtree = _is_subtree_like(params_def)
  nodes_with_paths, split_def = jax.tree_util.tree_flatten_with_path(
      state, is_leaf=is_subtree
  )
  is_per_leaf = [is_subtree(node) for _, node in nodes_with_paths]
  for (path, node), per_leaf in zip(nodes_with_paths, is_per_leaf):
    if not per_leaf and jnp.ndim(node) > 0:
      raise ValueError(
          'spd_optax: the inner optimizer state holds an array of shape'
          f' {jnp.shape(node)} at {jax.tree_util.keystr(path)}, outside the'
          ' subtrees shaped like the params: it cannot run one leaf at a time.'
      )
  per_node_leaves = [
      params_def.flatten_up_to(node) if per_leaf else None
      for (_, node), per_leaf in zip(nodes_with_paths, is_per_leaf)
  ]
  return [
      split_def.unflatten([
          leaves[i] if per_leaf else node
          for (_, node), leaves, per_leaf in zip(
              nodes_with_paths, per_node_leaves, is_per_leaf)
      ])
      for i in range(params_def.num_leaves)
  ], split_def, is_per_leaf


def merge_states(
    states: list[Any], split_def: Any, is_per_leaf: list[bool], params: Any
) -> Any:
  """Inverse of :func:`split_state` for the states the leaves returned.

  Shared leaves (step counts) are taken from the first leaf's state: a
  leafwise optimizer updates them the same way for every leaf.
  """
  params_def = jax.tree.structure(params)
  flat = [split_def.flatten_up_to(s) for s in states]
  merged = [
      params_def.unflatten([f[k] for f in flat]) if per_leaf else flat[0][k]
      for k, per_leaf in enumerate(is_per_leaf)
  ]
  return split_def.unflatten(merged)
