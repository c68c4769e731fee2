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

Around a whole-tree inner optimizer the chain can only start after it, so the
inner updates of all leaves still exist at once. When the inner optimizer
treats each leaf on its own (Adam, AdamW, SGD, Lion, RMSProp; not global-norm
clipping), SPD instead calls it once per leaf (:func:`split_state`,
:func:`chain_state`, :func:`merge_states`) and the chain covers it too.
"""

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


def _is_subtree_like(params_def):
  return lambda x: jax.tree.structure(x) == params_def


def _is_random_key(node: Any) -> bool:
  """A typed key (``jax.random.key``) or a raw one (uint32, shape (2,))."""
  dtype = getattr(node, 'dtype', None)
  if dtype is None:
    return False
  if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return True
  return dtype == jnp.uint32 and jnp.shape(node) == (2,)


def split_state(
    state: Any, params: Any, what: str
) -> tuple[list[Any], Any, list[bool]]:
  """Splits an optimizer state into one state per leaf of ``params``.

  Every subtree of ``state`` with the structure of ``params`` (Adam's
  ``mu``/``nu``, momentum...) is replaced by its i-th leaf; every other leaf
  (step counts, hyperparameters) is shared.

  Args:
    state: the inner optimizer's state for the whole ``params`` tree.
    params: the params.
    what: the transformation's name, for error messages.

  Returns:
    ``(states, treedef, is_per_leaf)``: the per-leaf states, the treedef of a
    split state, and which of its leaves come from params-shaped subtrees.

  Raises:
    ValueError: if the state holds a random key (``optax.noisy_sgd``'s: every
      leaf would draw the same noise) or a non-scalar array outside the
      params-shaped subtrees (e.g. ``optax.masked``'s), which cannot be split
      by leaf.
  """
  params_def = jax.tree.structure(params)
  num_leaves = params_def.num_leaves
  is_subtree = _is_subtree_like(params_def)
  nodes_with_paths, split_def = jax.tree_util.tree_flatten_with_path(
      state, is_leaf=is_subtree
  )
  is_per_leaf = []
  for path, node in nodes_with_paths:
    per_leaf = is_subtree(node)
    if not per_leaf and _is_random_key(node):
      raise ValueError(
          f'{what}(leafwise=True): the inner optimizer state holds a random'
          f' key at {jax.tree_util.keystr(path)}, shared by the whole tree'
          ' (e.g. optax.noisy_sgd, optax.add_noise): run one leaf at a time,'
          ' every leaf would draw the same noise. Use leafwise=False.'
      )
    if not per_leaf and jnp.ndim(node) > 0:
      raise ValueError(
          f'{what}(leafwise=True): the inner optimizer state holds an array'
          f' of shape {jnp.shape(node)} at {jax.tree_util.keystr(path)},'
          ' outside the subtrees shaped like the params, so it cannot be run'
          ' one leaf at a time (e.g. a masked optimizer, or one whose state'
          ' is not kept per leaf).'
          ' Use leafwise=False.'
      )
    is_per_leaf.append(per_leaf)
  per_node_leaves = [
      params_def.flatten_up_to(node) if per_leaf else None
      for (_, node), per_leaf in zip(nodes_with_paths, is_per_leaf)
  ]
  states = []
  for i in range(num_leaves):
    states.append(split_def.unflatten([
        leaves[i] if per_leaf else node
        for (_, node), leaves, per_leaf in zip(
            nodes_with_paths, per_node_leaves, is_per_leaf)
    ]))
  return states, split_def, is_per_leaf


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
