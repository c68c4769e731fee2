r"""Fast Trainable Projection (FTP) as an optax wrapper, and Adam-FTP.

FTP (Tian, Dai, Ma, Huang, Kira, NeurIPS 2023) keeps each fine-tuned tensor
within a learned L1 distance of its pre-trained weights: every row of the
move that the inner optimizer proposes is scaled back onto a radius
:math:`\gamma`, one per tensor, which a small Adam of its own learns from a
hypergradient. It is SPD's predecessor by the same authors and SPD's paper
compares against it.

The per-tensor state (:math:`\gamma`, its two moments, the previous move
:math:`c_{t-1}` and its inverse row norms) is kept in flat tuples, one entry
per leaf of the params (``optax.MaskedNode`` for the leaves left out), and
not in trees with the params' structure: ``optax.tree.map_params`` maps only
the trees that hold one value per parameter (the anchor and :math:`c_{t-1}`),
so a partition spec of a weight matrix is never given to its scalar
:math:`\gamma`.
"""

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from spd_optax import _anchors
from spd_optax import _checks
from spd_optax import _diagnostics
from spd_optax import _masks

# The file's floor on gamma and offset of the row norms.
_TINY = 1e-8


@_anchors.anchored_state
class FTPState(NamedTuple):
  r"""State of :func:`fast_trainable_projection` (and :func:`adamftp`).

  Attributes:
    count: int32 scalar, the number of updates so far (schedules read it).
    inner_state: the wrapped optimizer's state.
    anchor: :math:`\theta_0` per selected leaf (in ``anchor_dtype``),
      ``optax.MaskedNode`` elsewhere; ``optax.EmptyState()`` for
      ``anchor='zeros'``.
    gamma: one entry per leaf of the params: the radius :math:`\gamma`,
      float32 (float64 for float64 params), shape ``()`` or
      ``(num_layers,)``; ``MaskedNode`` for the leaves left out.
    gamma_mu: same, the first moment of :math:`\gamma`'s Adam.
    gamma_nu: same, its second moment.
    prev_move: :math:`c_{t-1}` per selected leaf, the params' shape and dtype
      (``MaskedNode`` elsewhere).
    prev_inv_norm: one entry per leaf: :math:`1 / \|c_{t-1}\|_1` per row,
      float32 (float64), the leaf's shape with the summed axes of size 1.
  """

  count: jax.Array  # shape=(), dtype=jnp.int32.
  inner_state: optax.OptState  # The wrapped optimizer's state.
  anchor: Any  # theta_0 per selected leaf; EmptyState for the zero anchor.
  gamma: tuple  # Per leaf: float32 () or (num_layers,), the radius.
  gamma_mu: tuple  # Per leaf: same shape, gamma's first moment.
  gamma_nu: tuple  # Per leaf: same shape, gamma's second moment.
  prev_move: Any  # c_{t-1}: the params' structure, shapes and dtypes.
  prev_inv_norm: tuple  # Per leaf: 1 / row L1 norm of c_{t-1} (keepdims).


class _Geometry(NamedTuple):
  """Which axes one row's norm sums over, and which make up a layer."""

  rows: tuple[int, ...]  # Summed for one row's L1 norm and inner product.
  layer: tuple[int, ...]  # Summed for one layer's hypergradient and max.


def _geometry(shape, stacked: bool, row_axis: str, path: str,
              what: str) -> _Geometry:
  """The file's reductions for a leaf of ``shape``.

  A matrix (or higher) has one norm per entry of its first (or last) axis;
  a vector or a scalar has one norm in all. A stacked leaf is one such tensor per slice
  along its leading axis.
  """
  lead = 1 if stacked else 0
  if stacked and not shape:
    raise ValueError(
        f'{what}: leaf {path} is a scalar and cannot be stacked along a'
        ' leading layer axis; leave it out of `stacked_layers`.'
    )
  layer = tuple(range(lead, len(shape)))
  if len(layer) < 2:
    return _Geometry(rows=layer, layer=layer)
  keep = layer[0] if row_axis == 'first' else layer[-1]
  return _Geometry(rows=tuple(a for a in layer if a != keep), layer=layer)


def _compute_dtype(leaf: Any):
  return jnp.promote_types(leaf.dtype, jnp.float32)


def _init_leaf(param: Any, geometry: _Geometry):
  """(gamma, its moments, c_0 = 0, 1 / norm_0 = 0) for one selected leaf.

  The small entries are reductions of zeros, so that under an explicit mesh
  they get the sharding the update gives them; each is its own buffer, so
  that a step may donate the state.
  """
  zeros = jnp.zeros_like(param, dtype=_compute_dtype(param))
  inv_norm = jnp.sum(zeros, axis=geometry.rows, keepdims=True)
  per_layer = jnp.sum(zeros, axis=geometry.layer)
  gamma = per_layer + _TINY  # The file's radius at the first step.
  return (gamma, jnp.zeros_like(per_layer), jnp.zeros_like(per_layer),
          jnp.zeros_like(param), inv_norm)


def _expand(x, ndim):
  """A per-layer value broadcast against a leaf with ``ndim`` axes."""
  return x.reshape(x.shape + (1,) * (ndim - x.ndim))


def _project_leaf(grad, update, param, anchor, old, hyper, geometry):
  """FTP's step for one selected leaf; returns (update, new per-leaf state)."""
  gamma, mu, nu, prev_move, prev_inv_norm = old
  k, rate, b1, b2, eps, t = hyper
  dtype = _compute_dtype(param)
  deviation = param.astype(dtype)  # theta_{t-1} - theta_0.
  if anchor is not None:
    deviation = deviation - anchor.astype(dtype)
  move = deviation + update.astype(dtype)  # c_t.
  norm = jnp.sum(jnp.abs(move), axis=geometry.rows, keepdims=True) + _TINY
  # Hypergradient: <g_t, c_{t-1}> / ||c_{t-1}||_1 per row, summed per layer.
  # Zero at the first step (c_0 = 0), which leaves gamma at its floor.
  row_dot = jnp.sum(grad.astype(dtype) * prev_move.astype(dtype),
                    axis=geometry.rows, keepdims=True)
  hypergrad = jnp.sum(row_dot * prev_inv_norm, axis=geometry.layer)
  hypergrad = jnp.where(hypergrad > 0, k * hypergrad, hypergrad)
  mu = b1 * mu + (1 - b1) * hypergrad
  nu = b2 * nu + (1 - b2) * hypergrad * hypergrad
  mu_hat = mu / (1 - b1**t)
  nu_hat = nu / (1 - b2**t)
  gamma = gamma - rate * mu_hat / (jnp.sqrt(nu_hat) + eps)
  gamma = jnp.clip(gamma, _TINY, jnp.max(norm, axis=geometry.layer))
  inv_norm = 1 / norm
  kept = jnp.clip(_expand(gamma, param.ndim) * inv_norm, 0, 1)
  # theta_0 + kept * c_t - theta_{t-1}, from the deviation rather than the
  # weights: exact at the anchor, where kept * c_t may be far below their ulp.
  new_update = (kept * move - deviation).astype(update.dtype)
  return new_update, (gamma, mu, nu, move.astype(prev_move.dtype), inv_norm)


def _hyperparameters(state, k, gamma_learning_rate, b1, b2, eps, dtype):
  """The per-step scalars of gamma's Adam, in ``dtype``."""
  at = lambda v: jnp.asarray(v(state.count) if callable(v) else v, dtype)
  t = (state.count + 1).astype(dtype)  # The file's shared step counter.
  return (at(k), at(gamma_learning_rate), jnp.asarray(b1, dtype),
          jnp.asarray(b2, dtype), jnp.asarray(eps, dtype), t)


def _pack(count, inner_state, anchor, per_leaf, treedef) -> FTPState:
  """An :class:`FTPState` from one (gamma, mu, nu, c, 1 / n) per leaf."""
  if not per_leaf:
    # No leaves: optax.tree.map_params' placeholder (or empty params). An
    # array, a leaf, stands for each tuple, so that this state is a prefix of
    # any other and map_params leaves those tuples alone.
    return FTPState(count, inner_state, anchor, *(jnp.zeros([0]),) * 3,
                    treedef.unflatten([]), jnp.zeros([0]))
  gamma, mu, nu, prev_move, inv_norm = zip(*per_leaf)
  return FTPState(
      count=count, inner_state=inner_state, anchor=anchor,
      gamma=gamma, gamma_mu=mu, gamma_nu=nu,
      prev_move=treedef.unflatten(prev_move), prev_inv_norm=inv_norm,
  )


def _check_k(k: optax.ScalarOrSchedule, what: str):
  if isinstance(k, (int, float)) and not 0 <= k <= 1:
    raise ValueError(f'{what}: k must be in [0, 1], got {k}.')


def fast_trainable_projection(
    inner: optax.GradientTransformation,
    k: optax.ScalarOrSchedule = 1.0,
    *,
    anchor: _anchors.AnchorSpec = 'params',
    mask: Optional[_masks.LeafFlags] = None,
    anchor_dtype: Optional[Any] = None,
    stacked_layers: Optional[_masks.LeafFlags] = None,
    row_axis: str = 'first',
    gamma_learning_rate: optax.ScalarOrSchedule = 1e-2,
    gamma_b1: float = 0.9,
    gamma_b2: float = 0.999,
    gamma_eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
  r"""Wraps an optimizer with Fast Trainable Projection (FTP).

  Per parameter tensor with anchor :math:`\theta_0`, raw gradient
  :math:`g_t` and the inner optimizer's update :math:`u_t`, the unprojected
  move and its L1 norm per row :math:`i` (the sum over every other axis) are

  .. math::

    c_t = \theta_{t-1} + u_t - \theta_0, \qquad
    n_{t,i} = \|c_{t,i}\|_1 + 10^{-8};

  the radius :math:`\gamma`, one per tensor, is :math:`10^{-8}` at the first
  step and afterwards takes an Adam step (rate :math:`\mu`, bias corrections
  at the shared step count :math:`t`) on the hypergradient

  .. math::

    h_t = \sum_i \frac{\langle g_{t,i}, c_{t-1,i} \rangle}{n_{t-1,i}},
    \qquad h_t \leftarrow k\, h_t \ \text{if}\ h_t > 0,

  is clipped to :math:`[10^{-8}, \max_i n_{t,i}]`, and the new weights are

  .. math::

    \theta_{t,i} = \theta_{0,i}
        + \mathrm{clip}\left(\frac{\gamma_t}{n_{t,i}}, 0, 1\right) c_{t,i}.

  The returned update is :math:`\theta_t - \theta_{t-1}`. At the first step
  the radius is :math:`10^{-8}`: every selected tensor stays within that L1
  distance of its anchor while the inner optimizer's moments take their
  first step, as in the authors' code. A vector (bias, norm scale) or a
  scalar has one row; a tensor stacked along ``stacked_layers`` is one tensor
  per slice, with its own :math:`\gamma`. :math:`k \in [0, 1]` damps the
  hypergradients that would shrink :math:`\gamma`: 1 (the strongest
  constraint) by default. Reductions run in float32 (float64 for float64
  params).

  Memory: the anchor (as SPD's; ``anchor_dtype`` may halve it) and
  :math:`c_{t-1}` in the params' dtype, one params-sized tree each, plus a
  few numbers per row; the inner optimizer's state besides.

  Rows: the authors' PyTorch weights are ``(out, in)``, so their rows are
  output units; a Flax kernel is ``(in, out)`` (``(..., in, out)`` for a
  convolution), whose output units are ``row_axis='last'``.

  Args:
    inner: the optimizer to wrap, e.g. ``optax.adamw(1e-4)``.
    k: the damping of positive hypergradients, in [0, 1]; a float or a
      schedule of the step.
    anchor: ``'params'`` (a copy of the params at ``init``), ``'zeros'``
      (:math:`\theta_0 = 0`) or a pytree of arrays with the params' structure.
      Reset it after loading weights with :func:`spd_optax.set_anchor`. The
      first step projects every selected leaf onto the radius
      :math:`10^{-8}` around its anchor: with ``'zeros'``, a leaf that starts
      away from zero (LoRA's random :math:`A`) collapses onto it, so anchor
      adapters where they start (``'params'``).
    mask: the leaves FTP acts on (pytree of bools, prefix or callable); the
      others (a new head) get the inner update untouched and store nothing.
    anchor_dtype: dtype of the stored anchors; ``None`` keeps the params'.
    stacked_layers: leaves whose leading axis stacks separate layers.
    row_axis: ``'first'`` or ``'last'``: the axis of a layer (of 2 dims or
      more) with one norm per entry.
    gamma_learning_rate: :math:`\mu`, the rate of :math:`\gamma`'s Adam.
    gamma_b1: its first-moment decay.
    gamma_b2: its second-moment decay.
    gamma_eps: added to its denominator.

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is :class:`FTPState`.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, spd_optax
    >>> target = jnp.array([1.0, -2.0, 3.0])
    >>> loss = lambda p: jnp.sum((p - target) ** 2)
    >>> params = jnp.zeros(3)  # The "pre-trained" weights: the anchor.
    >>> opt = spd_optax.fast_trainable_projection(optax.adam(0.1), k=1.0)
    >>> state = opt.init(params)
    >>> for _ in range(5):
    ...   grads = jax.grad(loss)(params)
    ...   updates, state = opt.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(f'{loss(params):.2f}, gamma {state.gamma[0]:.3f}')
    13.86, gamma 0.035

  References:
    Tian, Dai, Ma, Huang, Kira, `Fast Trainable Projection for Robust
    Fine-Tuning <https://arxiv.org/abs/2310.19182>`_, NeurIPS 2023.
  """
  what = 'fast_trainable_projection'
  _check_k(k, what)
  if row_axis not in ('first', 'last'):
    raise ValueError(
        f"{what}: row_axis must be 'first' or 'last', got {row_axis!r}.")
  _checks.check_anchor_spec(anchor, what)
  inner = optax.with_extra_args_support(inner)
  zero_anchor = _anchors.is_zero_anchor(anchor)

  def leaves_and_geometry(params):
    paths, leaves, treedef = _masks.leaves_with_paths(params)
    selected = _masks.selected_leaves(mask, params)
    stacked = _masks.resolve_flags(stacked_layers, params, 'stacked_layers')
    geometry = [
        _geometry(tuple(leaf.shape), st, row_axis, path, what) if sel else None
        for path, leaf, sel, st in zip(paths, leaves, selected, stacked)
    ]
    return leaves, treedef, geometry

  def init_fn(params):
    leaves, treedef, geometry = leaves_and_geometry(params)
    stored_anchor = _anchors.init_anchor(
        params, anchor, [g is not None for g in geometry], anchor_dtype, what)
    per_leaf = []
    for leaf, geo in zip(leaves, geometry):
      if geo is None:
        per_leaf.append((optax.MaskedNode(),) * 5)
      elif isinstance(leaf, jax.ShapeDtypeStruct):
        per_leaf.append(jax.eval_shape(lambda p, g=geo: _init_leaf(p, g), leaf))
      else:
        per_leaf.append(_init_leaf(leaf, geo))
    return _pack(jnp.zeros([], jnp.int32), inner.init(params), stored_anchor,
                 per_leaf, treedef)

  def update_fn(updates, state, params=None, **extra_args):
    _checks.check_params(params)
    param_leaves, treedef, geometry = leaves_and_geometry(params)
    inner_updates, inner_state = inner.update(
        updates, state.inner_state, params, **extra_args)
    anchor_leaves = _anchors.anchor_leaves(state.anchor, zero_anchor,
                                           len(param_leaves), params)
    prev_moves = _masks.leaves_aligned(state.prev_move, params)
    old_state = zip(state.gamma, state.gamma_mu, state.gamma_nu, prev_moves,
                    state.prev_inv_norm)
    new_updates, per_leaf = [], []
    for g, u, p, a, old, geo in zip(
        jax.tree.leaves(updates), jax.tree.leaves(inner_updates), param_leaves,
        anchor_leaves, old_state, geometry):
      if geo is None:
        new_updates.append(u)
        per_leaf.append(old)
        continue
      hyper = _hyperparameters(state, k, gamma_learning_rate, gamma_b1,
                               gamma_b2, gamma_eps, _compute_dtype(p))
      u, new = _project_leaf(g, u, p, a, old, hyper, geo)
      new_updates.append(u)
      per_leaf.append(new)
    new_state = _pack(optax.safe_increment(state.count), inner_state,
                      state.anchor, per_leaf, treedef)
    return treedef.unflatten(new_updates), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adamftp(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    k: optax.ScalarOrSchedule = 1.0,
    *,
    anchor: _anchors.AnchorSpec = 'params',
    mask: Optional[_masks.LeafFlags] = None,
    anchor_dtype: Optional[Any] = None,
    stacked_layers: Optional[_masks.LeafFlags] = None,
    row_axis: str = 'first',
    mu_dtype: Optional[Any] = None,
    nesterov: bool = False,
) -> optax.GradientTransformationExtraArgs:
  r"""AdamW with Fast Trainable Projection: the authors' ``AdamP``.

  ``optax.adamw`` wrapped by :func:`fast_trainable_projection`. The authors
  call it ``AdamP``; that name is taken by Heo et al.'s unrelated AdamP (ICLR
  2021), hence ``adamftp``, as :func:`adamspd`. Their ``weight_decay`` (0 by
  default) is AdamW's decoupled decay, applied to every tensor, also those
  that ``mask`` leaves out of FTP.

  Args:
    learning_rate: a float or a schedule.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: added to the denominator outside the square root.
    eps_root: added to the denominator inside the square root.
    weight_decay: AdamW's decoupled decay (scaled by the learning rate).
    k: FTP's damping of positive hypergradients, in [0, 1].
    anchor: ``'params'``, ``'zeros'`` or a pytree.
    mask: the leaves FTP acts on (all others get plain AdamW).
    anchor_dtype: dtype of the stored anchors.
    stacked_layers: leaves whose leading axis stacks separate layers.
    row_axis: ``'first'`` or ``'last'`` (Flax kernels' output units): the
      axis of a layer with one norm per entry.
    mu_dtype: dtype of Adam's first moment.
    nesterov: use Nesterov momentum in Adam.

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is :class:`FTPState`.

  Examples:
    >>> import jax.numpy as jnp, optax, spd_optax
    >>> params = {'w': jnp.ones((2, 2)), 'b': jnp.zeros(2)}
    >>> opt = spd_optax.adamftp(1e-2, k=1.0)
    >>> state = opt.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> for _ in range(3):
    ...   updates, state = opt.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    ...   print(f"{params['w'][0, 0]:.4f}, gamma {state.gamma[1]:.4f}")
    1.0000, gamma 0.0000
    0.9963, gamma 0.0074
    0.9920, gamma 0.0160

  References:
    Tian, Dai, Ma, Huang, Kira, NeurIPS 2023; Loshchilov and Hutter, AdamW,
    ICLR 2019.
  """
  return fast_trainable_projection(
      optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                  mu_dtype=mu_dtype, weight_decay=weight_decay,
                  nesterov=nesterov),
      k, anchor=anchor, mask=mask, anchor_dtype=anchor_dtype,
      stacked_layers=stacked_layers, row_axis=row_axis,
  )


def _find_ftp_states(opt_state) -> list[FTPState]:
  is_ftp = lambda s: isinstance(s, FTPState)
  return [s for s in jax.tree.leaves(opt_state, is_leaf=is_ftp) if is_ftp(s)]


def ftp_diagnostics_summary(
    opt_state: optax.OptState, mask: Optional[_masks.LeafFlags] = None
) -> dict[str, jax.Array]:
  r"""Scalars ready to log: how much of its move FTP kept, per row.

  Read from the state (:math:`\gamma_t` and :math:`1/n_{t,i}` of the last
  step), in the form of :func:`spd_optax.diagnostics_summary`.

  Args:
    opt_state: an optimizer state holding one or more :class:`FTPState`.
    mask: the leaves to count (all that FTP acts on by default), in the forms
      of ``mask``, e.g. ``spd_optax.exclude_paths(r'^head')``.

  Returns:
    ``{'ftp/gamma_over_norm', 'ftp/at_radius_fraction'}``: the mean over rows
    of :math:`\min(\gamma_t / n_{t,i}, 1)` (the share of its proposed move
    each row kept at the last step), and the fraction of rows that ended on
    the radius (:math:`\gamma_t < n_{t,i}`). Both are 0 before the first
    step, and when ``mask`` leaves out every leaf FTP acts on.

  Raises:
    ValueError: if ``opt_state`` holds no :class:`FTPState`.

  Examples:
    >>> import jax.numpy as jnp, spd_optax
    >>> opt = spd_optax.adamftp(1e-3)
    >>> state = opt.init({'w': jnp.zeros((3, 2))})
    >>> sorted(spd_optax.ftp_diagnostics_summary(state))
    ['ftp/at_radius_fraction', 'ftp/gamma_over_norm']
  """
  states = _find_ftp_states(opt_state)
  if not states:
    raise ValueError('ftp_diagnostics_summary: the optimizer state holds no'
                     ' FTP.')
  kept, at_radius = [jnp.zeros([0])], [jnp.zeros([0], bool)]
  for s in states:
    leaves, treedef = jax.tree.flatten(s.prev_move,
                                       is_leaf=_masks.is_masked_node)
    # gamma and 1 / n hold one entry per leaf of the params FTP was given,
    # prev_move also a MaskedNode where optax.partition (or masked) gave it
    # none: FTP's own leaves come in the same order in both.
    own = iter([(g, inv) for g, inv in zip(s.gamma, s.prev_inv_norm)
                if not _masks.is_masked_node(g)])
    ratios = [
        x if _masks.is_masked_node(x)
        else (lambda g, inv: _expand(g, inv.ndim) * inv)(*next(own))
        for x in leaves
    ]
    counted = _diagnostics._counted_leaves(treedef.unflatten(ratios), mask)  # pylint: disable=protected-access
    kept += [jnp.ravel(jnp.minimum(r, 1)) for r in counted]
    at_radius += [jnp.ravel((r < 1) & (r > 0)) for r in counted]
  kept, at_radius = jnp.concatenate(kept), jnp.concatenate(at_radius)
  num_rows = jnp.maximum(kept.size, 1)  # 0 / 1 when no row is counted.
  return {
      'ftp/gamma_over_norm': (jnp.sum(kept) / num_rows).astype(jnp.float32),
      'ftp/at_radius_fraction': (jnp.sum(at_radius) / num_rows).astype(
          jnp.float32),
  }
