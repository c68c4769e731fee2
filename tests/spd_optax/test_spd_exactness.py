"""spd_optax against the float64 NumPy reference of tests/reference.py."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spd_optax
from tests import reference

STEPS = 150
SHAPES = {'w': (6, 5), 'b': (5,), 'scale': ()}


@pytest.fixture
def x64():
  previous = jax.config.read('jax_enable_x64')
  jax.config.update('jax_enable_x64', True)
  yield
  jax.config.update('jax_enable_x64', previous)


def _noisy_quadratic(seed=0, noise=3.0):
  """A quadratic whose minimiser lies away from the start, with noisy grads.

  The noise makes the gradient disagree with the accumulated deviation on many
  steps, so the projection really fires.
  """
  rng = np.random.default_rng(seed)
  theta0 = {k: rng.normal(size=s) for k, s in SHAPES.items()}
  target = {k: theta0[k] + 0.5 + rng.normal(size=s) for k, s in SHAPES.items()}
  noises = [
      {k: noise * rng.normal(size=s) for k, s in SHAPES.items()}
      for _ in range(STEPS)
  ]

  def grad_fn(theta, step):
    return {k: 2 * (theta[k] - target[k]) + noises[step][k] for k in theta}

  return theta0, grad_fn


def _run_library(opt, theta0, grad_fn):
  params = {k: jnp.asarray(x, jnp.float64) for k, x in theta0.items()}
  state = opt.init(params)
  step = jax.jit(opt.update)
  fired = []
  for t in range(STEPS):
    grads = grad_fn({k: np.asarray(x) for k, x in params.items()}, t)
    grads = {k: jnp.asarray(x, jnp.float64) for k, x in grads.items()}
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
    fired.append({k: bool(x) for k, x in
                  spd_optax.get_diagnostics(state).projected.items()})
  return params, fired, state


@pytest.mark.parametrize('anchor', ['params', 'zeros'])
@pytest.mark.parametrize('wrapped', [False, True])
@pytest.mark.parametrize('lam', [1.0, 0.3])
def test_matches_float64_reference(x64, anchor, wrapped, lam):
  theta0, grad_fn = _noisy_quadratic()
  anchor_tree = (theta0 if anchor == 'params'
                 else {k: np.zeros_like(x) for k, x in theta0.items()})
  expected, expected_fired = reference.run_adamspd(
      theta0, anchor_tree, grad_fn, STEPS, lr=0.05, lam=lam)
  if wrapped:
    opt = spd_optax.selective_projection_decay(
        optax.adam(0.05), lam, anchor=anchor)
  else:
    opt = spd_optax.adamspd(0.05, weight_decay=lam, anchor=anchor)
  params, fired, _ = _run_library(opt, theta0, grad_fn)

  for k in SHAPES:
    np.testing.assert_allclose(np.asarray(params[k]), expected[k], rtol=1e-9,
                               atol=1e-9, err_msg=k)
  assert fired == expected_fired
  num_fired = sum(sum(f.values()) for f in expected_fired)
  # The projection must really fire, on a good share of the steps.
  assert num_fired > 0.1 * STEPS * len(SHAPES), num_fired


def test_non_selective_matches_reference(x64):
  theta0, grad_fn = _noisy_quadratic(seed=1)
  expected, _ = reference.run_adamspd(
      theta0, theta0, grad_fn, STEPS, lr=0.05, lam=0.3, selective=False)
  opt = spd_optax.projection_decay(optax.adam(0.05), 0.3)
  params, fired, _ = _run_library(opt, theta0, grad_fn)
  for k in SHAPES:
    np.testing.assert_allclose(np.asarray(params[k]), expected[k], rtol=1e-9,
                               atol=1e-9)
  assert all(all(f.values()) for f in fired)


@pytest.mark.parametrize('anchor', ['params', 'zeros'])
def test_adaml2sp_matches_float64_reference(x64, anchor):
  theta0, grad_fn = _noisy_quadratic(seed=3)
  anchor_tree = (theta0 if anchor == 'params'
                 else {k: np.zeros_like(x) for k, x in theta0.items()})
  expected = reference.run_adaml2sp(
      theta0, anchor_tree, grad_fn, STEPS, lr=0.05, lam=0.5)
  params = {k: jnp.asarray(x, jnp.float64) for k, x in theta0.items()}
  opt = spd_optax.adaml2sp(0.05, weight_decay=0.5, anchor=anchor)
  state, step = opt.init(params), jax.jit(opt.update)
  for t in range(STEPS):
    grads = grad_fn({k: np.asarray(x) for k, x in params.items()}, t)
    updates, state = step(jax.tree.map(jnp.asarray, grads), state, params)
    params = optax.apply_updates(params, updates)
  for k in SHAPES:
    np.testing.assert_allclose(np.asarray(params[k]), expected[k], rtol=1e-9,
                               atol=1e-9, err_msg=k)
  # The penalty matters here: plain Adam ends elsewhere.
  plain = reference.run_adaml2sp(
      theta0, anchor_tree, grad_fn, STEPS, lr=0.05, lam=0.0)
  assert not np.allclose(plain['w'], expected['w'], atol=1e-3)


@pytest.mark.parametrize('leafwise', [False, True],
                         ids=['wrapper', 'adamspd'])
def test_weight_decay_zero_equals_inner(leafwise):
  """lambda = 0 leaves the inner optimizer's update untouched.

  Wrapping the whole-tree Adam, the jitted updates are bitwise equal. Run leaf
  by leaf (adamspd), XLA may reassociate Adam's divisions differently for a
  lone leaf than inside the whole tree, so there they agree to a few float32
  ulps.
  """
  theta0, grad_fn = _noisy_quadratic()
  params = {k: jnp.asarray(x, jnp.float32) for k, x in theta0.items()}
  if leafwise:
    spd = spd_optax.adamspd(0.05, weight_decay=0.0)
  else:
    spd = spd_optax.selective_projection_decay(optax.adam(0.05), 0.0)
  adam = optax.adam(0.05)
  s_spd, s_adam = spd.init(params), adam.init(params)
  p_spd = p_adam = params
  for t in range(30):
    g = {k: jnp.asarray(x, jnp.float32) for k, x in grad_fn(
        {k: np.asarray(x) for k, x in p_spd.items()}, t).items()}
    u_spd, s_spd = jax.jit(spd.update)(g, s_spd, p_spd)
    u_adam, s_adam = jax.jit(adam.update)(g, s_adam, p_adam)
    for k in SHAPES:
      if leafwise:
        np.testing.assert_allclose(np.asarray(u_spd[k]),
                                   np.asarray(u_adam[k]), rtol=1e-6, atol=0)
      else:
        np.testing.assert_array_equal(np.asarray(u_spd[k]),
                                      np.asarray(u_adam[k]))
    p_spd = optax.apply_updates(p_spd, u_spd)
    p_adam = optax.apply_updates(p_adam, u_adam)
  assert int(s_spd.count) == int(s_adam[0].count) == 30


def test_lambda_one_never_grows_deviation_of_projected_leaf(x64):
  theta0, grad_fn = _noisy_quadratic(seed=2)
  opt = spd_optax.adamspd(0.05, weight_decay=1.0)
  params = {k: jnp.asarray(x) for k, x in theta0.items()}
  state = opt.init(params)
  checked = 0
  for t in range(STEPS):
    grads = {k: jnp.asarray(x) for k, x in grad_fn(
        {k: np.asarray(x) for k, x in params.items()}, t).items()}
    updates, state = opt.update(grads, state, params)
    new_params = optax.apply_updates(params, updates)
    for k, fired in spd_optax.get_diagnostics(state).projected.items():
      before = np.linalg.norm(np.asarray(params[k]) - theta0[k])
      after = np.linalg.norm(np.asarray(new_params[k]) - theta0[k])
      if fired:
        checked += 1
        assert after <= before * (1 + 1e-12) + 1e-12, (k, t, before, after)
    params = new_params
  assert checked > 20


def test_consistent_progress_never_projects():
  """A gradient always pointing away from the anchor: SPD == lambda 0."""
  params = {'w': jnp.zeros((3, 4)), 'b': jnp.ones(4)}
  direction = {'w': -jnp.ones((3, 4)), 'b': -jnp.full(4, 0.5)}
  spd = spd_optax.adamspd(0.1, weight_decay=1.0)
  plain = spd_optax.adamspd(0.1, weight_decay=0.0)
  s1, s2 = spd.init(params), plain.init(params)
  p1 = p2 = params
  for _ in range(50):
    u1, s1 = spd.update(direction, s1, p1)
    u2, s2 = plain.update(direction, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  jax.tree.map(np.testing.assert_array_equal, p1, p2)
  summary = spd_optax.diagnostics_summary(s1)
  assert float(summary['spd/fire_rate']) == 0.0
  # And it did move far from the anchor: nothing pinned it.
  assert float(summary['spd/deviation_norm']) > 1.0


def test_first_step_never_projects_and_zero_deviation_gives_zero_ratio():
  params = jnp.ones(3)
  opt = spd_optax.adamspd(0.1)
  state = opt.init(params)
  updates, state = opt.update(jnp.ones(3), state, params)
  assert not bool(state.diagnostics.projected)
  # An update that lands exactly on the anchor: ||p - theta0|| = 0.
  opt = spd_optax.projection_decay(optax.sgd(1.0), 1.0)
  state = opt.init(params)
  updates, state = opt.update(jnp.zeros(3), state, params + 1.0)
  # theta - theta0 = 1, update = 0 -> no NaN, ratio 0 where norm is 0 below.
  updates, state = opt.update(jnp.ones(3), state, params + 1.0)
  assert np.all(np.isfinite(np.asarray(updates)))
  assert float(state.diagnostics.ratio) == 0.0
