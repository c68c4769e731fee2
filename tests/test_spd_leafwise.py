"""Running the inner optimizer leaf by leaf (``leafwise=True``, adamspd).

The leafwise path must compute what the whole-tree path computes, refuse
optimizer states it cannot split, and (its reason to exist) keep XLA:CPU's
temporaries to about one leaf instead of the whole model.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spd_optax
from spd_optax import _leafwise

INNERS = {
    'adamw': lambda: optax.adamw(3e-2, weight_decay=0.1),
    'sgd_momentum': lambda: optax.sgd(3e-2, momentum=0.9),
    'lion': lambda: optax.lion(3e-3),
    'rmsprop': lambda: optax.rmsprop(1e-2),
    # Factored second moments are per leaf too ('w' is factored here).
    'adafactor': lambda: optax.adafactor(1e-2, min_dim_size_to_factor=4),
}


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


@pytest.mark.parametrize('name', sorted(INNERS))
def test_leafwise_equals_whole_tree(name):
  make = lambda leafwise: spd_optax.selective_projection_decay(
      INNERS[name](), 1.0, mask={'w': True, 'b': True, 'stack': True,
                                 'scale': False},
      stacked_layers={'w': False, 'b': False, 'stack': True, 'scale': False},
      leafwise=leafwise)
  p_tree, s_tree = _run(make(False))
  p_leaf, s_leaf = _run(make(True))
  for k in p_tree:
    np.testing.assert_allclose(p_leaf[k], p_tree[k], rtol=1e-5, atol=1e-6,
                               err_msg=k)
  fired_tree = spd_optax.get_diagnostics(s_tree).num_projected
  fired_leaf = spd_optax.get_diagnostics(s_leaf).num_projected
  assert int(fired_tree['w']) > 0  # The projection really fires here.
  for k in ('w', 'b', 'stack'):
    np.testing.assert_array_equal(fired_leaf[k], fired_tree[k])
  # Same state structure either way (checkpoints are interchangeable).
  assert jax.tree.structure(s_leaf) == jax.tree.structure(s_tree)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
      s_leaf.inner_state, s_tree.inner_state)


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


def test_leafwise_refuses_states_it_cannot_split():
  params = {'w': jnp.ones((4, 3)), 'b': jnp.ones(3)}
  masked_adam = optax.masked(optax.adam(1e-2), {'w': True, 'b': False})
  opt = spd_optax.selective_projection_decay(masked_adam, 1.0, leafwise=True)
  state = opt.init(params)
  with pytest.raises(ValueError, match=r"leafwise=True.*\.mu\['w'\]"):
    opt.update(params, state, params)


@pytest.mark.parametrize('key', [0, jax.random.key(0)], ids=['int', 'key'])
def test_leafwise_refuses_a_shared_random_key(key):
  """optax.noisy_sgd keeps one key for the tree: split by leaf, every leaf
  would draw the same noise. Refused, naming the state entry; the whole-tree
  path still runs and draws different noise per leaf."""
  params = {'a': jnp.ones(3), 'b': jnp.ones(3)}
  opt = spd_optax.selective_projection_decay(
      optax.noisy_sgd(0.1, key=key), 1.0, leafwise=True)
  state = opt.init(params)
  with pytest.raises(ValueError, match=r'leafwise=True.*\[0\]\.rng_key'):
    opt.update(params, state, params)
  whole = spd_optax.selective_projection_decay(
      optax.noisy_sgd(0.1, key=key), 1.0)
  updates, _ = whole.update(params, whole.init(params), params)
  assert not np.allclose(updates['a'], updates['b'])


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
