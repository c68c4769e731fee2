r"""Adam-SPD, the paper's optimizer: ``optax.adam`` wrapped by SPD."""

from typing import Any, Optional

import optax

from spd_optax import _transform
from spd_optax import _tree
from spd_optax._transform import AnchorSpec


def adamspd(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: optax.ScalarOrSchedule = 1.0,
    *,
    anchor: AnchorSpec = 'params',
    mask: Optional[_tree.LeafFlags] = None,
    anchor_dtype: Optional[Any] = None,
    stacked_layers: Optional[_tree.LeafFlags] = None,
    mu_dtype: Optional[Any] = None,
    nesterov: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Adam with Selective Projection Decay: the paper's Adam-SPD.

  ``optax.adam`` wrapped by :func:`selective_projection_decay`; SPD replaces
  AdamW's decoupled decay (there is no other decay). It computes the same
  numbers (to float32 rounding) faster: Adam runs leaf by leaf
  (``leafwise=True``) and its learning rate is applied inside the projection,
  so the state's ``inner_state`` is that of ``optax.scale_by_adam`` and the
  learning-rate schedule reads :attr:`SPDState.count`. Gradient clipping may
  go before it, ``optax.chain(optax.clip_by_global_norm(1.0), adamspd(...))``:
  a positive rescaling of the gradient does not change SPD's test.

  Args:
    learning_rate: a float or a schedule.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: added to the denominator outside the square root.
    eps_root: added to the denominator inside the square root.
    weight_decay: SPD's :math:`\lambda` (not scaled by the learning rate).
    anchor: ``'params'``, ``'zeros'`` or a pytree.
    mask: the leaves SPD acts on (all others get plain Adam).
    anchor_dtype: dtype of the stored anchors.
    stacked_layers: leaves whose leading axis stacks separate layers.
    mu_dtype: dtype of Adam's first moment.
    nesterov: use Nesterov momentum in Adam.

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is :class:`SPDState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, spd_optax
    >>> params = {'w': jnp.ones((2, 2)), 'b': jnp.zeros(2)}
    >>> opt = spd_optax.adamspd(1e-2, weight_decay=1.0)
    >>> state = opt.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = opt.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> print(f"{params['w'][0, 0]:.4f}")
    0.9900

  References:
    Tian, Huang, Kira, NeurIPS 2024; Kingma and Ba, Adam, ICLR 2015.
  """
  # optax.adam is scale_by_adam followed by a -lr scaling; the scaling is
  # done inside the projection instead (same numbers, one fewer params-sized
  # temporary on CPU), and Adam runs leaf by leaf (it treats leaves apart).
  return _transform.anchored_projection(
      optax.scale_by_adam(
          b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype,
          nesterov=nesterov,
      ),
      weight_decay, anchor, mask, anchor_dtype, stacked_layers,
      selective=True, what='adamspd', leafwise=True,
      learning_rate=learning_rate,
  )

