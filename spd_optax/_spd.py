r"""Selective Projection Decay (SPD) as an optax wrapper.

SPD (Tian, Huang, Kira, NeurIPS 2024) regularises fine-tuning selectively: a
layer whose gradient disagrees with the direction it has already moved from
its pre-trained weights is pulled back towards them; layers making consistent
progress move freely.
"""

from typing import Any, Optional

import optax

from spd_optax import _transform
from spd_optax import _tree
from spd_optax._transform import AnchorSpec


def selective_projection_decay(
    inner: optax.GradientTransformation,
    weight_decay: optax.ScalarOrSchedule = 1.0,
    *,
    anchor: AnchorSpec = 'params',
    mask: Optional[_tree.LeafFlags] = None,
    anchor_dtype: Optional[Any] = None,
    stacked_layers: Optional[_tree.LeafFlags] = None,
    leafwise: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""Wraps an optimizer with Selective Projection Decay (SPD).

  Per parameter tensor (a "layer") with anchor :math:`\theta_0`, raw gradient
  :math:`g_t` and the inner optimizer's update :math:`u_t`:

  .. math::

    p_t &= \theta_{t-1} + u_t \\
    c_t &= -\langle g_t, \theta_{t-1} - \theta_0 \rangle \\
    r_t &= \mathrm{clip}\left(
        \frac{\|p_t - \theta_0\| - \|\theta_{t-1} - \theta_0\|}
             {\|p_t - \theta_0\|}, 0, 1\right) \\
    \theta_t &= \begin{cases}
        p_t - \lambda r_t (p_t - \theta_0) & c_t < 0 \\
        p_t & \text{otherwise}
    \end{cases}

  and the returned update is :math:`\theta_t - \theta_{t-1}`. :math:`\lambda`
  (``weight_decay``) is not scaled by the learning rate; with
  :math:`\lambda = 1` a projected layer ends the step on the sphere of radius
  :math:`\|\theta_{t-1} - \theta_0\|` around the anchor. Norms and inner
  products are computed in float32 (or float64), :math:`r_t = 0` when
  :math:`\|p_t - \theta_0\| = 0`, and everything runs inside ``jit`` with no
  host round-trip.

  SPD needs the raw gradient and the final, learning-rate-scaled update, so it
  wraps the *whole* optimizer (clipping, schedules and all) rather than being
  one member of a ``chain``.

  The anchor is captured in ``init``: with ``anchor='params'`` call ``init``
  on the pre-trained weights, or reset it later with
  :func:`spd_optax.set_anchor` after loading them.

  Leaves with an exactly zero true gradient get a coin toss: the attention
  *key bias* is one (softmax ignores a shift of the scores that is the same
  for every key), so the inner optimizer moves it by rounding noise and
  :math:`c_t` has that noise's sign. It then counts in the projected fraction
  and fire rate at random. ``mask=spd_optax.exclude_paths(
  spd_optax.KEY_BIAS_PATTERN)`` leaves such leaves out of SPD, and the same
  ``mask=`` on :func:`spd_optax.diagnostics_summary` leaves them out of the
  diagnostics only.

  Args:
    inner: the optimizer to wrap, e.g. ``optax.adam(1e-4)``.
    weight_decay: :math:`\lambda \ge 0`, a float or a schedule of the step.
    anchor: ``'params'`` (a copy of the params at ``init``: full fine-tuning),
      ``'zeros'`` (:math:`\theta_0 = 0`, e.g. LoRA adapters; stores nothing),
      or a pytree of arrays with the structure of the params.
    mask: the leaves SPD acts on: a pytree of bools (or a prefix of the
      params' structure) or a callable returning one. Other leaves get the
      inner update untouched and store no anchor (e.g. a new head).
    anchor_dtype: dtype of the stored anchors (e.g. ``jnp.bfloat16`` to halve
      their memory); ``None`` keeps the params' dtype.
    stacked_layers: leaves whose leading axis stacks separate layers (models
      that scan over their blocks); SPD then selects and projects each slice
      along that axis on its own. Same forms as ``mask``.
    leafwise: set when ``inner`` treats every leaf on its own (``adam``,
      ``adamw``, ``sgd``, ``lion``, ``rmsprop``, ``adafactor``...; not
      global-norm clipping or L-BFGS): SPD then runs ``inner`` one leaf at a
      time, which on CPU keeps one leaf's temporaries alive instead of the
      whole model's (about 2x faster there). Same numbers either way, to
      float32 rounding; a state that cannot be split by leaf (``optax.masked``)
      or that holds a random key shared by the tree (``optax.noisy_sgd``) is
      refused with a ``ValueError`` naming the state entry.

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is :class:`SPDState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, spd_optax
    >>> target = jnp.array([1.0, -2.0, 3.0])
    >>> loss = lambda p: jnp.sum((p - target) ** 2)
    >>> params = jnp.zeros(3)  # The "pre-trained" weights: the anchor.
    >>> opt = spd_optax.selective_projection_decay(optax.adam(0.1), 1.0)
    >>> state = opt.init(params)
    >>> for _ in range(5):
    ...   grads = jax.grad(loss)(params)
    ...   updates, state = opt.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f'{loss(params):.2f}')  # Consistent progress: never projected.
    8.78

  References:
    Tian, Huang, Kira, `Rethinking Weight Decay for Robust Fine-Tuning of
    Foundation Models <https://arxiv.org/abs/2411.01713>`_, NeurIPS 2024.
  """
  return _transform.anchored_projection(
      inner, weight_decay, anchor, mask, anchor_dtype, stacked_layers,
      selective=True, what='selective_projection_decay', leafwise=leafwise,
  )


def projection_decay(
    inner: optax.GradientTransformation,
    weight_decay: optax.ScalarOrSchedule = 1.0,
    *,
    anchor: AnchorSpec = 'params',
    mask: Optional[_tree.LeafFlags] = None,
    anchor_dtype: Optional[Any] = None,
    stacked_layers: Optional[_tree.LeafFlags] = None,
    leafwise: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""The non-selective ablation of SPD: project every layer at every step.

  Identical to :func:`selective_projection_decay` with the condition
  :math:`c_t < 0` replaced by "always":
  :math:`\theta_t = p_t - \lambda r_t (p_t - \theta_0)`.

  Args:
    inner: the optimizer to wrap.
    weight_decay: :math:`\lambda \ge 0`, a float or a schedule.
    anchor: ``'params'``, ``'zeros'`` or a pytree, as in
      :func:`selective_projection_decay`.
    mask: the leaves to act on.
    anchor_dtype: dtype of the stored anchors.
    stacked_layers: leaves whose leading axis stacks separate layers.
    leafwise: run a leafwise ``inner`` one leaf at a time, as in
      :func:`selective_projection_decay`.

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is :class:`SPDState`.

  Examples:
    >>> import jax.numpy as jnp, optax, spd_optax
    >>> opt = spd_optax.projection_decay(optax.sgd(0.1), 1.0)
    >>> params = jnp.zeros(2)
    >>> state = opt.init(params)
    >>> updates, state = opt.update(jnp.ones(2), state, params)
    >>> updates  # At the anchor nothing grows back: r = 1, projected to 0.
    Array([0., 0.], dtype=float32)

  References:
    Tian, Huang, Kira, NeurIPS 2024 (the ablation of the selection rule).
  """
  return _transform.anchored_projection(
      inner, weight_decay, anchor, mask, anchor_dtype, stacked_layers,
      selective=False, what='projection_decay', leafwise=leafwise,
  )

