r"""L2-SP: an L2 penalty towards the starting point, the paper's baseline."""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from spd_optax import _anchors
from spd_optax import _checks
from spd_optax import _masks


@_anchors.anchored_state
class L2SPState(NamedTuple):
  r"""State of :func:`l2sp`.

  Attributes:
    count: int32 scalar, the number of updates so far (schedules read it).
    anchor: :math:`\theta_0` per selected leaf, ``optax.MaskedNode``
      elsewhere; ``optax.EmptyState()`` for ``anchor='zeros'``.
  """

  count: jax.Array  # shape=(), dtype=jnp.int32.
  # The anchor per selected leaf, MaskedNode elsewhere; EmptyState for zeros.
  anchor: Any


def l2sp(
    weight_decay: optax.ScalarOrSchedule,
    *,
    anchor: _anchors.AnchorSpec = 'params',
    mask: Optional[_masks.LeafFlags] = None,
    anchor_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""Adds the L2-SP gradient :math:`\lambda (\theta - \theta_0)`.

  The gradient of :math:`\frac{\lambda}{2}\|\theta - \theta_0\|^2`, added to
  the incoming gradient. Put it *before* the optimizer in a ``chain`` (the
  paper's Algorithm 1: Adam on the regularised loss):

  .. math::

    g_t \leftarrow g_t + \lambda (\theta_{t-1} - \theta_0)

  Args:
    weight_decay: :math:`\lambda \ge 0`, a float or a schedule.
    anchor: ``'params'`` (copy of the params at ``init``), ``'zeros'`` (plain
      coupled L2) or a pytree with the params' structure.
    mask: the leaves to regularise (pytree of bools, prefix, or callable).
    anchor_dtype: dtype of the stored anchors; ``None`` keeps the params'.

  Returns:
    A ``GradientTransformation`` whose state is :class:`L2SPState`.

  Examples:
    >>> import jax.numpy as jnp, optax, spd_optax
    >>> opt = optax.chain(spd_optax.l2sp(0.5), optax.sgd(1.0))
    >>> state = opt.init(jnp.zeros(2))  # Anchor at 0.
    >>> updates, state = opt.update(jnp.zeros(2), state, jnp.ones(2))
    >>> updates  # -lr * lambda * (theta - theta0)
    Array([-0.5, -0.5], dtype=float32)

  References:
    Li, Grandvalet, Davoine, `Explicit Inductive Bias for Transfer Learning
    with Convolutional Networks <https://arxiv.org/abs/1802.01483>`_, ICML
    2018.
  """
  what = 'l2sp'
  _checks.check_weight_decay(weight_decay, what)
  _checks.check_anchor_spec(anchor, what)
  zero_anchor = _anchors.is_zero_anchor(anchor)

  def init_fn(params):
    selected = _masks.selected_leaves(mask, params)
    stored = _anchors.init_anchor(params, anchor, selected, anchor_dtype, what)
    return L2SPState(count=jnp.zeros([], jnp.int32), anchor=stored)

  def update_fn(updates, state, params=None):
    _checks.check_params(params)
    lam = weight_decay(state.count) if callable(weight_decay) else weight_decay
    selected = _masks.selected_leaves(mask, params)
    update_leaves, treedef = jax.tree.flatten(updates)
    param_leaves = jax.tree.leaves(params)
    anchor_leaves = _anchors.anchor_leaves(state.anchor, zero_anchor,
                                           len(param_leaves), params)
    out = []
    for g, p, a, sel in zip(update_leaves, param_leaves, anchor_leaves, selected):
      if not sel:
        out.append(g)
        continue
      dtype = jnp.promote_types(p.dtype, jnp.float32)
      dev = p.astype(dtype) if a is None else p.astype(dtype) - a.astype(dtype)
      out.append((g.astype(dtype) + lam * dev).astype(g.dtype))
    new_state = L2SPState(
        count=optax.safe_increment(state.count), anchor=state.anchor
    )
    return treedef.unflatten(out), new_state

  return optax.GradientTransformation(init_fn, update_fn)


def adaml2sp(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: optax.ScalarOrSchedule = 1e-2,
    *,
    anchor: _anchors.AnchorSpec = 'params',
    mask: Optional[_masks.LeafFlags] = None,
    anchor_dtype: Optional[Any] = None,
    mu_dtype: Optional[Any] = None,
    nesterov: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Adam on the L2-SP-regularised loss: ``chain(l2sp(...), adam(...))``.

  Args:
    learning_rate: a float or a schedule.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: added to the denominator outside the square root.
    eps_root: added to the denominator inside the square root.
    weight_decay: L2-SP's :math:`\lambda`.
    anchor: ``'params'``, ``'zeros'`` or a pytree.
    mask: the leaves to regularise.
    anchor_dtype: dtype of the stored anchors.
    mu_dtype: dtype of Adam's first moment.
    nesterov: use Nesterov momentum.

  Returns:
    A ``GradientTransformationExtraArgs``.

  Examples:
    >>> import jax.numpy as jnp, spd_optax
    >>> opt = spd_optax.adaml2sp(1e-3, weight_decay=0.1)
    >>> state = opt.init({'w': jnp.ones(2)})
  """
  return optax.chain(
      l2sp(weight_decay, anchor=anchor, mask=mask, anchor_dtype=anchor_dtype),
      optax.adam(
          learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
          mu_dtype=mu_dtype, nesterov=nesterov,
      ),
  )
