r"""Which leaves SPD acts on: per-leaf flags, and masks by parameter path.

The anchored transformations take per-leaf options (``mask``,
``stacked_layers``) as ``LeafFlags``; :func:`resolve_flags` expands one
into a Python bool per leaf. :func:`exclude_paths` builds a mask from regular
expressions over the leaves' paths.

Some parameters have an exactly zero true gradient, so that SPD's test on them
is decided by rounding noise. The attention *key bias* is one: a query
:math:`q_i` scores key :math:`k_j + b` as :math:`q_i \cdot k_j + q_i \cdot b`,
and the second term is the same for every key :math:`j`, which the softmax
over :math:`j` ignores. The loss does not depend on :math:`b` at all, Adam
moves it by normalised rounding noise, and SPD projects it or not by the sign
of that noise, which adds a coin toss per layer to ``projected_fraction`` and
``fire_rate``. :func:`exclude_paths` with :data:`KEY_BIAS_PATTERN` leaves such
leaves out, in one line.
"""

from collections.abc import Callable
import re
from typing import Any, Optional, Union

import jax
import numpy as np
import optax

# A bool, a pytree of bools (same structure as the params, or a prefix of it),
# or a callable that maps the params to such a pytree: the type of `mask=` and
# `stacked_layers=`. Public as spd_optax.LeafFlags.
LeafFlags = Union[bool, Any, Callable[[optax.Params], Any]]

# The attention key bias under the names used by Flax (``key/bias``, as in
# big_vision and this project's ViT), Hugging Face ViT (``key/bias``) and CLIP
# (``k_proj/bias``). A fused ``qkv`` bias is one leaf and cannot be split.
KEY_BIAS_PATTERN = r'(^|/)(key|k_proj)/bias$'


def is_masked_node(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def leaves_aligned(tree: Any, params: Any) -> list:
  """``tree``'s leaves (``MaskedNode`` kept), one per leaf of ``params``.

  ``tree`` has the structure of ``params`` with ``MaskedNode`` for the
  leaves a transformation does not act on. Inside ``optax.partition`` (or
  ``optax.masked``) ``params`` itself holds ``MaskedNode`` where another
  transformation's leaves are: no leaf of ``params``, but an entry of
  ``tree``'s; those entries are dropped, wherever they come in the order.
  """
  leaves = jax.tree.leaves(tree, is_leaf=is_masked_node)
  nodes = jax.tree.leaves(params, is_leaf=is_masked_node)
  if len(nodes) != len(leaves):
    raise ValueError(
        f'The optimizer state has {len(leaves)} entries where the params'
        f' have {len(nodes)} (MaskedNode counted): the state was built for'
        f' params of another structure.\nstate: {jax.tree.structure(tree, is_leaf=is_masked_node)}'
        f'\nparams: {jax.tree.structure(params, is_leaf=is_masked_node)}')
  return [x for x, p in zip(leaves, nodes) if not is_masked_node(p)]


def leaves_with_paths(tree: Any) -> tuple[list[str], list[Any], Any]:
  """Flattens ``tree`` into (path strings, leaves, treedef).

  The path strings (``"['enc']['w']"``) are the ones error messages name.
  """
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


def selected_leaves(
    mask: Optional[LeafFlags], params: optax.Params
) -> list[bool]:
  """The leaves a transformation acts on: all of them when ``mask`` is None."""
  return resolve_flags(True if mask is None else mask, params, 'mask')


def path_name(path: tuple[Any, ...]) -> str:
  """A tree path as ``'/'``-joined names, e.g. ``'blocks/0/attn/key/bias'``.

  The ``.value`` of an ``nnx.Variable`` is dropped, so that a model's state
  and its pure arrays (``nnx.as_pure``) give the same names.
  """
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and (
      path[-1].name == 'value'):
    path = path[:-1]
  return jax.tree_util.keystr(path, simple=True, separator='/')


def exclude_paths(*patterns: str) -> Callable[[optax.Params], Any]:
  r"""A mask that leaves out every leaf whose path matches a pattern.

  A leaf's path is its keys joined by ``'/'`` (``'blocks/0/attn/key/bias'``;
  list indices are numbers, an ``nnx.Variable``'s ``.value`` is dropped), and
  a pattern matches when ``re.search`` finds it there. The result is a
  callable for the ``mask=`` of :func:`selective_projection_decay`,
  :func:`adamspd`, :func:`l2sp`..., and of :func:`diagnostics_summary` and
  :func:`projected_fraction`.

  Left out of SPD, a leaf gets the inner optimizer's update untouched and
  stores no anchor; left out of the diagnostics, it does not count in the
  projected fraction, fire rate, mean ratio or deviation norm.

  Args:
    *patterns: regular expressions, e.g. :data:`KEY_BIAS_PATTERN` or
      ``r'^head'``.

  Returns:
    A function of the params returning a pytree of bools with their
    structure: ``False`` where a pattern matches.

  Examples:
    >>> import jax.numpy as jnp, spd_optax
    >>> params = {'attn': {'key': {'bias': jnp.zeros(4), 'kernel': jnp.ones((4, 4))},
    ...                    'query': {'bias': jnp.zeros(4)}},
    ...           'head': {'kernel': jnp.ones((4, 2))}}
    >>> mask = spd_optax.exclude_paths(spd_optax.KEY_BIAS_PATTERN, r'^head')
    >>> mask(params)
    {'attn': {'key': {'bias': False, 'kernel': True}, 'query': {'bias': True}}, 'head': {'kernel': False}}
    >>> opt = spd_optax.adamspd(1e-3, mask=mask)  # No SPD on key biases or the head.
  """
  compiled = [re.compile(p) for p in patterns]

  def mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: not any(c.search(path_name(path)) for c in compiled),
        params,
    )

  return mask
