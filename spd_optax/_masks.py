r"""Masks by parameter path: leave leaves out of SPD or out of its diagnostics.

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
from typing import Any

import jax
import optax

# The attention key bias under the names used by Flax (``key/bias``, as in
# big_vision and this project's ViT), Hugging Face ViT (``key/bias``) and CLIP
# (``k_proj/bias``). A fused ``qkv`` bias is one leaf and cannot be split.
KEY_BIAS_PATTERN = r'(^|/)(key|k_proj)/bias$'


def _entry_name(entry: Any) -> str:
  for attribute in ('key', 'name', 'idx'):
    if hasattr(entry, attribute):
      return str(getattr(entry, attribute))
  return str(entry)


def path_name(path: tuple[Any, ...]) -> str:
  """A tree path as ``'/'``-joined names, e.g. ``'blocks/0/attn/key/bias'``.

  The ``.value`` of an ``nnx.Variable`` is dropped, so that a model's state
  and its pure arrays (``nnx.as_pure``) give the same names.
  """
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and (
      path[-1].name == 'value'):
    path = path[:-1]
  return '/'.join(_entry_name(entry) for entry in path)


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
