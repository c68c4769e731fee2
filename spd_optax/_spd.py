r"""Selective Projection Decay (SPD) as an optax wrapper, and Adam-SPD.

SPD (Tian, Huang, Kira, NeurIPS 2024) regularises fine-tuning selectively: a
layer whose gradient disagrees with the direction it has already moved from
its pre-trained weights is pulled back towards them; layers making consistent
progress move freely.

:func:`selective_projection_decay`, its non-selective ablation
:func:`projection_decay` and the paper's optimizer :func:`adamspd` share one
body, :func:`_anchored_projection`: it keeps the anchor and the diagnostics in
an :class:`SPDState`, runs the inner optimizer (on the whole tree, or one leaf
at a time, :mod:`spd_optax._leafwise`) and hands each selected leaf to
:func:`spd_optax._projection.project_leaf`.
"""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from spd_optax import _anchors
from spd_optax import _checks
from spd_optax import _leafwise
from spd_optax import _masks
from spd_optax import _projection


class ProjectionDiagnostics(NamedTuple):
  r"""What the projection did at the last step, per selected leaf.

  Each field is a tree with the structure of the params; leaves that the
  transformation does not act on hold ``optax.MaskedNode``. A leaf stacked
  along a leading layer axis (``stacked_layers``) holds one value per layer.

  Attributes:
    projected: bool, shape ``()`` or ``(num_layers,)``: whether the leaf was
      projected at the last step (:math:`c_t < 0`).
    ratio: float32, same shape: :math:`r_t \in [0, 1]`, applied only where
      projected.
    deviation_norm: float32, same shape: :math:`\|\theta_t - \theta_0\|`
      after the step.
    num_projected: int32, same shape: the steps on which the leaf was
      projected since ``init``.
  """

  projected: Any  # bool, shape () or (num_layers,): projected this step.
  ratio: Any  # float32, same shape: r_t in [0, 1] (applied only if projected).
  deviation_norm: Any  # float32: ||theta_t - theta_0|| after the step.
  num_projected: Any  # int32: steps on which this leaf was projected so far.


@_anchors.anchored_state
class SPDState(NamedTuple):
  r"""State of :func:`selective_projection_decay` (and its variants).

  Attributes:
    count: int32 scalar, the number of updates so far (schedules read it).
    inner_state: the wrapped optimizer's state.
    anchor: :math:`\theta_0` per selected leaf (in ``anchor_dtype``),
      ``optax.MaskedNode`` elsewhere; ``optax.EmptyState()`` for
      ``anchor='zeros'``, which stores nothing.
    diagnostics: :class:`ProjectionDiagnostics` of the last step.
  """

  count: jax.Array  # shape=(), dtype=jnp.int32.
  inner_state: optax.OptState  # The wrapped optimizer's state.
  # The anchor theta_0 per selected leaf (dtype `anchor_dtype`), MaskedNode
  # elsewhere; optax.EmptyState() for the zero anchor, which stores nothing.
  anchor: Any
  diagnostics: ProjectionDiagnostics


def _scalar_or_schedule(value: optax.ScalarOrSchedule, count: jax.Array):
  return value(count) if callable(value) else value


def _layer_shape(leaf: Any, stacked: bool, path: str, what: str):
  if not stacked:
    return ()
  if len(leaf.shape) == 0:
    raise ValueError(
        f'{what}: leaf {path} is a scalar and cannot be stacked along a'
        ' leading layer axis; leave it out of `stacked_layers`.'
    )
  return (leaf.shape[0],)


def _initial_diagnostics(
    params: optax.Params, selected: list[bool], stacked: list[bool], what: str
) -> ProjectionDiagnostics:
  """Zeros per selected leaf (one per layer if stacked), MaskedNode elsewhere."""
  paths, leaves, treedef = _masks.leaves_with_paths(params)

  def per_leaf(make):
    return treedef.unflatten([
        make(_layer_shape(leaf, st, path, what)) if sel else optax.MaskedNode()
        for path, leaf, sel, st in zip(paths, leaves, selected, stacked)
    ])

  return ProjectionDiagnostics(
      projected=per_leaf(lambda s: jnp.zeros(s, bool)),
      ratio=per_leaf(lambda s: jnp.zeros(s, jnp.float32)),
      deviation_norm=per_leaf(lambda s: jnp.zeros(s, jnp.float32)),
      num_projected=per_leaf(lambda s: jnp.zeros(s, jnp.int32)),
  )


def _anchored_projection(
    inner: optax.GradientTransformation,
    weight_decay: optax.ScalarOrSchedule,
    *,
    anchor: _anchors.AnchorSpec,
    mask: Optional[_masks.LeafFlags],
    anchor_dtype: Optional[Any],
    stacked_layers: Optional[_masks.LeafFlags],
    selective: bool,
    what: str,
    leafwise: bool = False,
    learning_rate: Optional[optax.ScalarOrSchedule] = None,
) -> optax.GradientTransformationExtraArgs:
  """Shared body of :func:`selective_projection_decay`, its ablation and
  :func:`adamspd`.

  ``learning_rate``, when given, scales the inner updates by ``-lr`` inside the
  projection (``inner`` is then unscaled, e.g. ``optax.scale_by_adam``);
  otherwise the scale is 1, which XLA folds away.
  """
  _checks.check_weight_decay(weight_decay, what)
  _checks.check_anchor_spec(anchor, what)
  inner = optax.with_extra_args_support(inner)
  zero_anchor = _anchors.is_zero_anchor(anchor)

  def selected_leaves(params):
    selected = _masks.selected_leaves(mask, params)
    stacked = _masks.resolve_flags(stacked_layers, params, 'stacked_layers')
    return selected, stacked

  def init_fn(params):
    selected, stacked = selected_leaves(params)
    stored_anchor = _anchors.init_anchor(
        params, anchor, selected, anchor_dtype, what
    )
    diagnostics = _initial_diagnostics(params, selected, stacked, what)
    return SPDState(
        count=jnp.zeros([], jnp.int32),
        inner_state=inner.init(params),
        anchor=stored_anchor,
        diagnostics=diagnostics,
    )

  def update_fn(updates, state, params=None, **extra_args):
    _checks.check_params(params)
    grads = updates
    lam = jnp.asarray(_scalar_or_schedule(weight_decay, state.count))
    if learning_rate is None:
      step_size = jnp.ones([], jnp.float32)
    else:
      step_size = -jnp.asarray(_scalar_or_schedule(learning_rate, state.count))
    selected, stacked = selected_leaves(params)
    grad_leaves, treedef = jax.tree.flatten(grads)
    param_leaves = jax.tree.leaves(params)
    anchor_leaves = _anchors.anchor_leaves(state.anchor, zero_anchor,
                                           len(param_leaves))
    if leafwise:
      leaf_states, split_def, per_leaf = _leafwise.split_state(
          state.inner_state, params, what)
      new_leaf_states = []
    else:
      inner_updates, inner_state = inner.update(
          grads, state.inner_state, params, **extra_args
      )
      update_leaves = jax.tree.leaves(inner_updates)
    old = [
        jax.tree.leaves(field, is_leaf=_masks.is_masked_node)
        for field in state.diagnostics
    ]
    # Chain each leaf's inputs to the previous leaf's result so that XLA:CPU
    # finishes one leaf before it starts the next (see _leafwise). It only
    # matters to XLA's scheduler: not when running eagerly.
    sequence = (_leafwise.sequencing_enabled()
                and any(isinstance(g, jax.core.Tracer) for g in grad_leaves))
    zero = None  # Exact 0 that depends on the previous leaf (CPU only).
    new_updates, projected, ratio, deviation, num_projected = [], [], [], [], []
    for i, (g, p, a, sel, st) in enumerate(zip(
        grad_leaves, param_leaves, anchor_leaves, selected, stacked,
    )):
      link = sequence and _leafwise.worth_chaining(p)
      link_zero = zero if link else None
      p = _leafwise.after(p, link_zero)
      if leafwise:
        leaf_state = _leafwise.chain_state(
            leaf_states[i], split_def, per_leaf, link_zero)
        u, leaf_state = inner.update(g, leaf_state, p, **extra_args)
        new_leaf_states.append(leaf_state)
      else:
        u = _leafwise.after(update_leaves[i], link_zero)
      if not sel:
        new_updates.append(_projection.apply_step_size(u, step_size))
        for out in (projected, ratio, deviation, num_projected):
          out.append(optax.MaskedNode())
        continue
      u, fired, r, dev = _projection.project_leaf(g, u, p, a, lam, st, selective,
                                       step_size)
      if link:
        zero = _leafwise.zero_after(r)
      new_updates.append(u)
      projected.append(fired)
      ratio.append(r)
      deviation.append(dev)
      num_projected.append(old[3][i] + fired.astype(jnp.int32))
    if leafwise:
      inner_state = _leafwise.merge_states(
          new_leaf_states, split_def, per_leaf, params)
    diagnostics = ProjectionDiagnostics(
        *(treedef.unflatten(x)
          for x in (projected, ratio, deviation, num_projected))
    )
    new_state = SPDState(
        count=optax.safe_increment(state.count),
        inner_state=inner_state,
        anchor=state.anchor,
        diagnostics=diagnostics,
    )
    return treedef.unflatten(new_updates), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def selective_projection_decay(
    inner: optax.GradientTransformation,
    weight_decay: optax.ScalarOrSchedule = 1.0,
    *,
    anchor: _anchors.AnchorSpec = 'params',
    mask: Optional[_masks.LeafFlags] = None,
    anchor_dtype: Optional[Any] = None,
    stacked_layers: Optional[_masks.LeafFlags] = None,
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
  return _anchored_projection(
      inner, weight_decay, anchor=anchor, mask=mask, anchor_dtype=anchor_dtype,
      stacked_layers=stacked_layers, selective=True,
      what='selective_projection_decay', leafwise=leafwise,
  )


def projection_decay(
    inner: optax.GradientTransformation,
    weight_decay: optax.ScalarOrSchedule = 1.0,
    *,
    anchor: _anchors.AnchorSpec = 'params',
    mask: Optional[_masks.LeafFlags] = None,
    anchor_dtype: Optional[Any] = None,
    stacked_layers: Optional[_masks.LeafFlags] = None,
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
  return _anchored_projection(
      inner, weight_decay, anchor=anchor, mask=mask, anchor_dtype=anchor_dtype,
      stacked_layers=stacked_layers, selective=False, what='projection_decay',
      leafwise=leafwise,
  )


def adamspd(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: optax.ScalarOrSchedule = 1.0,
    *,
    anchor: _anchors.AnchorSpec = 'params',
    mask: Optional[_masks.LeafFlags] = None,
    anchor_dtype: Optional[Any] = None,
    stacked_layers: Optional[_masks.LeafFlags] = None,
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
  return _anchored_projection(
      optax.scale_by_adam(
          b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype,
          nesterov=nesterov,
      ),
      weight_decay, anchor=anchor, mask=mask, anchor_dtype=anchor_dtype,
      stacked_layers=stacked_layers, selective=True, what='adamspd',
      leafwise=True, learning_rate=learning_rate,
  )
