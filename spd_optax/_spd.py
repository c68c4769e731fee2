r"""Selective Projection Decay (SPD) as an optax wrapper, and Adam-SPD.

SPD (Tian, Huang, Kira, NeurIPS 2024) regularises fine-tuning selectively: a
layer whose gradient disagrees with the direction it has already moved from
its pre-trained weights is pulled back towards them; layers making consistent
progress move freely.

:func:`selective_projection_decay`, its non-selective ablation
:func:`projection_decay` and the paper's optimizer :func:`adamspd` share one
body, :func:`_anchored_projection`: it keeps the anchor and the diagnostics in
an :class:`SPDState`, runs the inner optimizer (on the whole tree, or, for
the Adam that :func:`adamspd` builds, one leaf at a time:
:mod:`spd_optax._leafwise`) and hands each selected leaf to
:func:`spd_optax._projection.project_leaf`. The algorithm, in the paper's
notation, is the docs page :doc:`/algorithm` (docs/algorithm.rst).
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


def _unprojected(update: Any) -> _projection.LeafProjection:
  """A leaf that SPD does not act on: its update, no diagnostics."""
  return _projection.LeafProjection(
      update, optax.MaskedNode(), optax.MaskedNode(), optax.MaskedNode())


def _diagnostics(
    leaves: list[_projection.LeafProjection],
    previous: ProjectionDiagnostics,
    treedef: Any,
    params: Any,
) -> ProjectionDiagnostics:
  """This step's :class:`ProjectionDiagnostics`, counting on from ``previous``."""
  counts = [
      old if _masks.is_masked_node(leaf.projected)
      else old + leaf.projected.astype(jnp.int32)
      for leaf, old in zip(leaves, _masks.leaves_aligned(
          previous.num_projected, params))
  ]
  field = lambda name: treedef.unflatten([getattr(x, name) for x in leaves])
  return ProjectionDiagnostics(
      projected=field('projected'),
      ratio=field('ratio'),
      deviation_norm=field('deviation_norm'),
      num_projected=treedef.unflatten(counts),
  )


def _refuse_leafwise(leafwise: bool, what: str) -> None:
  """``leafwise=True`` is refused: running a user's ``inner`` one leaf at a
  time changes its maths whenever it couples leaves, which cannot be seen."""
  if leafwise:
    raise ValueError(
        f'{what}(leafwise=True): running `inner` one leaf at a time computes'
        ' what it computes on the whole tree only when it treats every leaf'
        ' on its own, which cannot be checked from outside: global-norm'
        ' clipping (optax.clip_by_global_norm, also inside a chain), a mask'
        ' computed from paths or a transformation of your own that couples'
        ' leaves would silently give other updates. Only spd_optax.adamspd,'
        ' whose Adam this library builds, runs leaf by leaf; clipping may go'
        ' before it: optax.chain(optax.clip_by_global_norm(1.0),'
        ' spd_optax.adamspd(...)). Leave leafwise=False.'
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
    per_leaf_inner: bool = False,
    learning_rate: Optional[optax.ScalarOrSchedule] = None,
) -> optax.GradientTransformationExtraArgs:
  """Shared body of :func:`selective_projection_decay`, its ablation and
  :func:`adamspd`.

  ``per_leaf_inner`` runs ``inner`` one leaf at a time: only for an ``inner``
  this library builds and knows to treat each leaf on its own.
  ``learning_rate``, when given, scales the inner updates by ``-lr`` inside
  the projection (``inner`` is then unscaled, e.g. ``optax.scale_by_adam``).
  """
  _checks.check_weight_decay(weight_decay, what)
  _checks.check_anchor_spec(anchor, what)
  inner = optax.with_extra_args_support(inner)
  zero_anchor = _anchors.is_zero_anchor(anchor)
  inner_updates = _leafwise.PerLeaf if per_leaf_inner else _leafwise.WholeTree

  def selected_leaves(params):
    selected = _masks.selected_leaves(mask, params)
    stacked = _masks.resolve_flags(stacked_layers, params, 'stacked_layers')
    return selected, stacked

  def init_fn(params):
    selected, stacked = selected_leaves(params)
    return SPDState(
        count=jnp.zeros([], jnp.int32),
        inner_state=inner.init(params),
        anchor=_anchors.init_anchor(
            params, anchor, selected, anchor_dtype, what),
        diagnostics=_initial_diagnostics(params, selected, stacked, what),
    )

  def update_fn(updates, state, params=None, **extra_args):
    _checks.check_params(params)
    lam = jnp.asarray(_scalar_or_schedule(weight_decay, state.count))
    lr = None if learning_rate is None else jnp.asarray(
        _scalar_or_schedule(learning_rate, state.count))
    selected, stacked = selected_leaves(params)
    grad_leaves, treedef = jax.tree.flatten(updates)
    param_leaves = jax.tree.leaves(params)
    anchors = _anchors.anchor_leaves(state.anchor, zero_anchor,
                                     len(param_leaves), params)
    inner_step = inner_updates(
        inner, updates, state.inner_state, params, extra_args)
    chain = _leafwise.LeafChain(grad_leaves)
    leaves = []
    for i, (g, p, a, sel, st) in enumerate(zip(
        grad_leaves, param_leaves, anchors, selected, stacked)):
      zero = chain.zero_for(p)
      p = _leafwise.after(p, zero)
      u = inner_step.leaf(i, g, p, zero)
      if not sel:
        leaves.append(_unprojected(_projection.scale_update(u, lr)))
        continue
      leaves.append(_projection.project_leaf(
          grad=g, update=u, param=p, anchor=a, weight_decay=lam, stacked=st,
          selective=selective, learning_rate=lr))
      chain.done(leaves[-1].ratio)
    new_state = SPDState(
        count=optax.safe_increment(state.count),
        inner_state=inner_step.new_state(),
        anchor=state.anchor,
        diagnostics=_diagnostics(leaves, state.diagnostics, treedef, params),
    )
    return treedef.unflatten([x.update for x in leaves]), new_state

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
    leafwise: must be ``False``; ``True`` is refused with a ``ValueError``.
      Running ``inner`` one leaf at a time (about 2x faster on CPU) changes
      its maths whenever it couples leaves (global-norm clipping, a mask
      computed from paths, a transformation of your own), which cannot be
      checked from outside. :func:`adamspd` runs its own Adam leaf by leaf.

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
  _refuse_leafwise(leafwise, 'selective_projection_decay')
  return _anchored_projection(
      inner, weight_decay, anchor=anchor, mask=mask, anchor_dtype=anchor_dtype,
      stacked_layers=stacked_layers, selective=True,
      what='selective_projection_decay',
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
    leafwise: must be ``False``, as in :func:`selective_projection_decay`.

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
  _refuse_leafwise(leafwise, 'projection_decay')
  return _anchored_projection(
      inner, weight_decay, anchor=anchor, mask=mask, anchor_dtype=anchor_dtype,
      stacked_layers=stacked_layers, selective=False, what='projection_decay',
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
  numbers (to float32 rounding) faster: Adam, which treats each leaf on its
  own, runs leaf by leaf and its learning rate is applied inside the projection,
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
      per_leaf_inner=True, learning_rate=learning_rate,
  )
