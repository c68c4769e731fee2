"""Argument checks shared by the anchored transformations, written once.

Every message names the transformation (``what``) and, for a leaf, its path,
so that an error in a large model points at the argument or leaf at fault.
"""

from typing import Any

import jax.numpy as jnp
import optax

# Our wording of optax's message for an `update` that needs params.
NO_PARAMS_MSG = (
    'You are using a transformation that requires the current value of'
    ' parameters, but you are not passing `params` when calling `update`.'
)


def check_weight_decay(weight_decay: optax.ScalarOrSchedule, what: str):
  """A constant ``weight_decay`` must be >= 0 (a schedule is not evaluated)."""
  if isinstance(weight_decay, (int, float)) and weight_decay < 0:
    raise ValueError(
        f'{what}: weight_decay must be >= 0, got {weight_decay}.'
    )


def check_anchor_spec(anchor: Any, what: str):
  """``anchor`` is ``'params'``, ``'zeros'`` or a pytree (checked at init)."""
  if isinstance(anchor, str) and anchor not in ('params', 'zeros'):
    raise ValueError(
        f"{what}: unknown anchor {anchor!r}; expected 'params', 'zeros' or a"
        ' pytree of arrays with the structure of the params.'
    )


def check_inexact(path: str, leaf: Any, what: str) -> None:
  """A leaf that is regularised must have a floating-point dtype."""
  if not jnp.issubdtype(leaf.dtype, jnp.inexact):
    raise ValueError(
        f'{what} needs floating-point params, but leaf {path} has dtype'
        f' {leaf.dtype}; exclude it with `mask=`.'
    )


def check_params(params: Any) -> None:
  """``update`` was given the params (the anchored transformations need them)."""
  if params is None:
    raise ValueError(NO_PARAMS_MSG)
