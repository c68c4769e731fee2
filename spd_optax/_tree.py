"""Per-leaf bookkeeping shared by the anchored transformations.

The anchored transformations (SPD, its non-selective variant and L2-SP) all
work leaf by leaf on the flattened parameter tree. This module resolves the
per-leaf options (``mask``, ``stacked_layers``), builds the anchor leaves and
reports bad input with the path of the leaf at fault.
"""

from collections.abc import Callable, Sequence
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

# A bool, a pytree of bools (same structure as the params, or a prefix of it),
# or a callable that maps the params to such a pytree.
LeafFlags = Union[bool, Any, Callable[[optax.Params], Any]]

MaskedNode = optax.MaskedNode


def is_masked_node(x: Any) -> bool:
  return isinstance(x, MaskedNode)


def leaves_with_paths(tree: Any) -> tuple[list[str], list[Any], Any]:
  """Flattens ``tree`` into (path strings, leaves, treedef)."""
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = [jax.tree_util.keystr(path) for path, _ in path_leaves]
  leaves = [leaf for _, leaf in path_leaves]
  return paths, leaves, treedef


def resolve_flags(
    flags: LeafFlags, params: optax.Params, name: str
) -> list[bool]:
  """Expands ``flags`` into one Python bool per leaf of ``params``.

  Args:
    flags: ``None``/bool (the same for every leaf), a pytree of bools with the
      structure of ``params`` or a prefix of it, or a callable returning one.
    params: the parameter tree.
    name: the argument's name, for error messages.

  Returns:
    A list of bools aligned with ``jax.tree.leaves(params)``.
  """
  num_leaves = len(jax.tree.leaves(params))
  if callable(flags):
    flags = flags(params)
  if flags is None or isinstance(flags, (bool, np.bool_)):
    return [bool(flags)] * num_leaves
  flag_leaves, flag_def = jax.tree.flatten(flags)
  try:
    subtrees = flag_def.flatten_up_to(params)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f'`{name}` must be a bool, or a pytree of bools with the structure of'
        f' the params (or a prefix of it), or a callable returning one; its'
        f' structure {flag_def} does not fit the params'
        f' {jax.tree.structure(params)}: {e}'
    ) from e
  resolved = []
  for flag, subtree in zip(flag_leaves, subtrees):
    try:
      flag = bool(flag)
    except Exception as e:  # A traced or multi-element array.
      raise ValueError(
          f'`{name}` leaves must be Python bools known at trace time, got'
          f' {flag!r}.'
      ) from e
    resolved.extend([flag] * len(jax.tree.leaves(subtree)))
  return resolved


def is_abstract(leaf: Any) -> bool:
  return isinstance(leaf, jax.ShapeDtypeStruct)


def check_inexact(path: str, leaf: Any, what: str) -> None:
  if not jnp.issubdtype(leaf.dtype, jnp.inexact):
    raise ValueError(
        f'{what} needs floating-point params, but leaf {path} has dtype'
        f' {leaf.dtype}; exclude it with `mask=`.'
    )


def copy_leaf(leaf: Any, dtype: Any) -> Any:
  """A fresh copy of ``leaf`` in ``dtype``, keeping its sharding.

  The copy matters: a state that aliases the params breaks a train step that
  donates both. ``jax.ShapeDtypeStruct`` leaves stay abstract.
  """
  if is_abstract(leaf):
    return jax.ShapeDtypeStruct(
        leaf.shape, dtype, sharding=getattr(leaf, 'sharding', None)
    )
  return jnp.array(leaf, dtype=dtype, copy=True)


def init_anchor(
    params: optax.Params,
    anchor: Any,
    selected: Sequence[bool],
    anchor_dtype: Any,
    what: str,
) -> Any:
  """Builds the anchor tree kept in the state.

  Args:
    params: the parameter tree at ``init``.
    anchor: ``'params'`` or a pytree with the structure of ``params``.
    selected: one bool per leaf; unselected leaves store ``optax.MaskedNode``.
    anchor_dtype: dtype of the stored anchors; ``None`` keeps the params'.
    what: the transformation's name, for error messages.

  Returns:
    A tree with the structure of ``params`` whose leaves are anchor arrays
    (selected leaves) or ``MaskedNode`` (others).
  """
  paths, param_leaves, treedef = leaves_with_paths(params)
  if isinstance(anchor, str):
    if anchor != 'params':
      raise ValueError(
          f"{what}: unknown anchor {anchor!r}; expected 'params', 'zeros' or"
          ' a pytree of arrays with the structure of the params.'
      )
    anchor_leaves = param_leaves
  else:
    anchor_leaves = _anchor_leaves_like(anchor, params, paths, what)
  out = []
  for path, param, ref, sel in zip(paths, param_leaves, anchor_leaves, selected):
    if not sel:
      out.append(MaskedNode())
      continue
    check_inexact(path, param, what)
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
    anchor_paths, _, _ = leaves_with_paths(anchor)
    missing = sorted(set(paths) - set(anchor_paths))
    extra = sorted(set(anchor_paths) - set(paths))
    raise ValueError(
        f'{what}: the anchor tree does not match the params. Missing from'
        f' the anchor: {missing[:5]}; not in the params: {extra[:5]}.'
        f' Anchor structure {anchor_def}, params structure {params_def}.'
    ) from e
  return anchor_leaves


def set_anchor_tree(old_anchor: Any, new_anchor: Any, what: str) -> Any:
  """Replaces the selected leaves of ``old_anchor`` by ``new_anchor``'s.

  ``new_anchor`` has the structure of the params (nnx Variables are looked
  through). Shapes must match; values are copied and cast to the stored dtype,
  keeping the stored sharding.
  """
  old_with_paths, old_def = jax.tree_util.tree_flatten_with_path(
      old_anchor, is_leaf=is_masked_node
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
    if is_masked_node(old):
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


def anchor_leaves(anchor: Any, zero_anchor: bool, num_leaves: int) -> list:
  """The stored anchor's leaves (MaskedNode kept), or Nones for a zero anchor."""
  if zero_anchor:
    return [None] * num_leaves
  return jax.tree.leaves(anchor, is_leaf=is_masked_node)
