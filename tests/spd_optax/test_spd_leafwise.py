"""Running the inner optimizer leaf by leaf (adamspd), and refusing it elsewhere.

adamspd's leaf-by-leaf path must compute what the whole-tree path computes
and (its reason to exist) keep XLA:CPU's temporaries to about one leaf instead
of the whole model. For any other inner optimizer ``leafwise=True`` is refused:
leaf by leaf, a transformation that couples leaves computes something else.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spd_optax
from spd_optax import _leafwise
from spd_optax import _spd

def _problem(seed=0):
  """Noisy quadratic pulling every leaf away from and back to its anchor."""
  rng = np.random.default_rng(seed)
  shapes = {'w': (6, 5), 'b': (5,), 'stack': (3, 4, 2), 'scale': ()}
  params = {k: jnp.asarray(rng.normal(size=s), jnp.float32)
            for k, s in shapes.items()}
  targets = {k: params[k] + 0.1 * jnp.asarray(rng.normal(size=s), jnp.float32)
             for k, s in shapes.items()}

  def grads(p, t):
    noise = np.random.default_rng(100 + t)
    return {k: p[k] - targets[k]
            + jnp.asarray(noise.normal(size=shapes[k]) * 2.0, jnp.float32)
            for k in shapes}
  return params, grads


def _run(opt, steps=40):
  params, grads = _problem()
  state = opt.init(params)
  update = jax.jit(opt.update)
  for t in range(steps):
    updates, state = update(grads(params, t), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_adamspd_equals_wrapped_adam_and_runs_without_the_chain(monkeypatch):
  """adamspd (Adam leaf by leaf, lr applied in the projection) == the wrapper.

  Also with the CPU-only chaining switched off, the path GPUs and TPUs take.
  """
  reference, _ = _run(spd_optax.selective_projection_decay(
      optax.adam(3e-2), 1.0))
  chained, _ = _run(spd_optax.adamspd(3e-2, weight_decay=1.0))
  monkeypatch.setattr(_leafwise, 'sequencing_enabled', lambda: False)
  unchained, _ = _run(spd_optax.adamspd(3e-2, weight_decay=1.0))
  for k in reference:
    np.testing.assert_allclose(chained[k], reference[k], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(unchained[k], reference[k], rtol=1e-5,
                               atol=1e-6)


def _mix_leaves():
  """A transformation of one's own that couples leaves through no state: every
  leaf's update is scaled by the mean |g| over the whole tree."""

  def update(updates, state, params=None):
    del params
    mean = sum(jnp.sum(jnp.abs(u)) for u in jax.tree.leaves(updates)) / sum(
        u.size for u in jax.tree.leaves(updates))
    return jax.tree.map(lambda u: -0.1 * u / mean, updates), state

  return optax.GradientTransformation(lambda p: optax.EmptyState(), update)


COUPLED = {
    'clip_sgd_momentum': lambda: optax.chain(
        optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9)),
    'mix_leaves': _mix_leaves,
    'adam': lambda: optax.adam(0.1),  # Leafwise itself; not checkable either.
}


def _growing_grads(t):
  """Gradients whose sizes differ by leaf and change with the step, so that
  global-norm clipping clips, by a different factor at every step."""
  return {'a': jnp.full(4, 10.0 * (t + 1)), 'b': jnp.full(4, 0.1 / (t + 1))}


@pytest.mark.parametrize('name', sorted(COUPLED))
@pytest.mark.parametrize('factory', [
    spd_optax.selective_projection_decay, spd_optax.projection_decay])
def test_leafwise_true_is_refused_naming_the_cause(name, factory):
  with pytest.raises(ValueError, match=(
      r'leafwise=True.*one leaf at a time.*global-norm clipping.*adamspd')):
    factory(COUPLED[name](), weight_decay=0.0, leafwise=True)


@pytest.mark.parametrize('name', ['clip_sgd_momentum', 'mix_leaves'])
def test_the_per_leaf_path_would_change_the_maths(name):
  """Why it is refused: run leaf by leaf (the path adamspd takes for its own
  Adam), a coupling inner optimizer gives other updates than on the whole
  tree, while leafwise=False equals the inner optimizer alone at lambda = 0,
  step after step, as the gradients change size."""
  make = lambda per_leaf: _spd._anchored_projection(  # pylint: disable=protected-access
      COUPLED[name](), 0.0, anchor='params', mask=None, anchor_dtype=None,
      stacked_layers=None, selective=True, what='test', per_leaf_inner=per_leaf)
  params = {'a': jnp.ones(4), 'b': jnp.ones(4)}
  alone = COUPLED[name]()
  spd, per_leaf = make(False), make(True)
  states = [opt.init(params) for opt in (alone, spd, per_leaf)]
  for t in range(4):
    out = [jax.jit(opt.update)(_growing_grads(t), s, params)
           for opt, s in zip((alone, spd, per_leaf), states)]
    (u_alone, _), (u_spd, _), (u_leaf, _) = out
    states = [s for _, s in out]
    for k in params:
      np.testing.assert_array_equal(u_spd[k], u_alone[k])
    assert not np.allclose(u_leaf['b'], u_alone['b'], rtol=0.1)


def test_split_state_refuses_a_state_it_cannot_split():
  params = {'w': jnp.ones((4, 3)), 'b': jnp.ones(3)}
  masked_adam = optax.masked(optax.adam(1e-2), {'w': True, 'b': False})
  with pytest.raises(ValueError, match=r"one leaf at a time"):
    _leafwise.split_state(masked_adam.init(params), params)


def _compiled_temp_bytes(opt, params):
  state = opt.init(params)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  compiled = step.lower(params, state, params).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='XLA:CPU schedule')
def test_adamspd_keeps_temporaries_to_about_one_leaf():
  """The memory target: no params-sized temporaries beyond the inner's.

  Twelve leaves of 1 MiB: leaf by leaf, XLA keeps about two leaves of
  temporaries; wrapping the whole-tree Adam it keeps about one per leaf.
  """
  params = {f'layer{i}': jnp.ones((256, 1024)) for i in range(12)}
  leaf_bytes = 256 * 1024 * 4
  leafwise = _compiled_temp_bytes(spd_optax.adamspd(1e-3), params)
  whole = _compiled_temp_bytes(
      spd_optax.selective_projection_decay(optax.adam(1e-3)), params)
  assert leafwise <= 3 * leaf_bytes, leafwise / leaf_bytes
  assert whole >= 12 * leaf_bytes, whole / leaf_bytes


def test_clipping_before_adamspd_equals_clipping_inside():
  """chain(clip, adamspd) == SPD(chain(clip, adam)), as train/ relies on.

  Clipping scales the gradient by a positive factor, which keeps the sign of
  SPD's test <g, theta - theta0>; the gradients here are clipped every step.
  """
  inside, s_inside = _run(spd_optax.selective_projection_decay(
      optax.chain(optax.clip_by_global_norm(0.5), optax.adam(3e-2)), 1.0))
  before, s_before = _run(optax.chain(
      optax.clip_by_global_norm(0.5), spd_optax.adamspd(3e-2, weight_decay=1.0)))
  fired = spd_optax.get_diagnostics(s_inside).num_projected
  assert int(fired['w']) > 0
  np.testing.assert_array_equal(
      spd_optax.get_diagnostics(s_before).num_projected['w'], fired['w'])
  for k in inside:
    np.testing.assert_allclose(before[k], inside[k], rtol=1e-5, atol=1e-6)


def test_a_nonfinite_leaf_does_not_leak_through_the_chain():
  """The chain's zero is exact even when the previous leaf is NaN."""
  shape = (512, 512)  # Big enough to be chained on CPU.
  assert _leafwise.worth_chaining(jnp.zeros(shape))
  params = {'a': jnp.ones(shape), 'b': jnp.full(shape, 2.0)}
  opt = spd_optax.adamspd(1e-2)
  state = opt.init(params)
  grads = {'a': jnp.full(shape, jnp.nan), 'b': jnp.full(shape, 0.5)}
  updates, _ = jax.jit(opt.update)(grads, state, params)
  clean, _ = jax.jit(opt.update)(dict(grads, a=jnp.ones(shape)), state, params)
  assert np.isnan(updates['a']).all()
  np.testing.assert_array_equal(updates['b'], clean['b'])
