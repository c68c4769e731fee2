"""FTP against the float64 NumPy reference of tests/ftp_reference.py, and its
own behaviour: the first step, rows, masks, k, inject_hyperparams, anchors.

optax's checklist for contributed optimizers runs over FTP in
tests/spd_optax/test_spd_optax_citizenship.py (its FACTORIES), and on a mesh below.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spd_optax
from tests import ftp_reference
from tests.multidevice import run_with_devices
from tests.spd_optax.test_spd_exactness import x64  # pylint: disable=unused-import
from tests.spd_optax.test_spd_sharding import COMMON

STEPS = 100
LR = 0.05
NUM_LAYERS = 3
# name -> shape of one tensor; 'blocks' is stacked NUM_LAYERS deep and 'head'
# is left out of FTP.
SHAPES = {'w': (6, 5), 'b': (5,), 'scale': (), 'conv': (3, 2, 2, 2),
          'blocks': (4, 5), 'head': (5, 2)}
MASK = {k: k != 'head' for k in SHAPES}
STACKED = {k: k == 'blocks' for k in SHAPES}


def _tensor_names():
  """The reference's tensors: each stacked layer apart."""
  return [f'blocks{i}' for i in range(NUM_LAYERS)] + [
      k for k in SHAPES if k != 'blocks']


def _shape(name):
  return SHAPES['blocks' if name.startswith('blocks') else name]


def _noisy_quadratic(seed=0, noise=3.0):
  """Targets away from the start, noisy gradients: rows both on the radius
  and inside it, and hypergradients of both signs."""
  rng = np.random.default_rng(seed)
  names = _tensor_names()
  theta0 = {k: rng.normal(size=_shape(k)) for k in names}
  target = {k: theta0[k] + 0.5 + rng.normal(size=_shape(k)) for k in names}
  noises = [{k: noise * rng.normal(size=_shape(k)) for k in names}
            for _ in range(STEPS)]

  def grad_fn(theta, step):
    return {k: 2 * (theta[k] - target[k]) + noises[step][k] for k in theta}

  return theta0, grad_fn


def _to_tree(tensors, dtype=jnp.float64):
  """The reference's tensors as the library's params (layers stacked)."""
  tree = {k: tensors[k] for k in SHAPES if k != 'blocks'}
  tree['blocks'] = np.stack([tensors[f'blocks{i}'] for i in range(NUM_LAYERS)])
  return {k: jnp.asarray(x, dtype) for k, x in tree.items()}


def _to_tensors(tree):
  tensors = {k: np.asarray(x) for k, x in tree.items() if k != 'blocks'}
  tensors |= {f'blocks{i}': np.asarray(tree['blocks'][i])
              for i in range(NUM_LAYERS)}
  return tensors


def _run_library(opt, theta0, grad_fn):
  params = _to_tree(theta0)
  state = opt.init(params)
  step = jax.jit(opt.update)
  gammas = []
  for t in range(STEPS):
    grads = _to_tree(grad_fn(_to_tensors(params), t))
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
    gamma = dict(zip(sorted(SHAPES), state.gamma))  # Leaves in key order.
    gammas.append({**{k: float(g) for k, g in gamma.items()
                      if k not in ('blocks', 'head')},
                   **{f'blocks{i}': float(gamma['blocks'][i])
                      for i in range(NUM_LAYERS)}})
  return _to_tensors(params), gammas, state


def _max_errors(params, gammas, expected, expected_gammas):
  param_error = max(float(np.max(np.abs(params[k] - expected[k])))
                    for k in expected)
  gamma_error = max(abs(g[k] - e[k])
                    for g, e in zip(gammas, expected_gammas) for k in e)
  return param_error, gamma_error


@pytest.mark.parametrize('form', ['adamftp', 'wrapped'])
@pytest.mark.parametrize('k', [1.0, 0.5])
def test_matches_float64_reference(x64, form, k):
  theta0, grad_fn = _noisy_quadratic()
  expected, expected_gammas = ftp_reference.run_adamftp(
      theta0, theta0, grad_fn, STEPS, lr=LR, k=k, wd=0.1, exclude=('head',))
  kwargs = dict(mask=MASK, stacked_layers=STACKED)
  if form == 'adamftp':
    opt = spd_optax.adamftp(LR, weight_decay=0.1, k=k, **kwargs)
  else:
    opt = spd_optax.fast_trainable_projection(
        optax.adamw(LR, weight_decay=0.1), k, **kwargs)
  params, gammas, state = _run_library(opt, theta0, grad_fn)

  param_error, gamma_error = _max_errors(params, gammas, expected,
                                         expected_gammas)
  print(f'k={k} {form}: max |theta - ref| {param_error:.2e},'
        f' max |gamma - ref| {gamma_error:.2e}')
  assert param_error < 1e-12 and gamma_error < 1e-12
  # Both regimes were exercised: rows on the radius and inside it.
  at_radius = float(spd_optax.ftp_diagnostics_summary(state)[
      'ftp/at_radius_fraction'])
  assert 0 < at_radius < 1, at_radius
  # k mattered: the other k gives other weights.
  other, _ = ftp_reference.run_adamftp(
      theta0, theta0, grad_fn, STEPS, lr=LR, k=1.5 - k, wd=0.1,
      exclude=('head',))
  assert max(np.max(np.abs(other[n] - expected[n])) for n in other) > 1e-3


def test_zero_anchor_matches_float64_reference(x64):
  theta0, grad_fn = _noisy_quadratic(seed=1)
  zeros = {k: np.zeros_like(x) for k, x in theta0.items()}
  expected, expected_gammas = ftp_reference.run_adamftp(
      theta0, zeros, grad_fn, STEPS, lr=LR, k=1.0, exclude=('head',))
  opt = spd_optax.adamftp(LR, anchor='zeros', mask=MASK,
                          stacked_layers=STACKED)
  params, gammas, state = _run_library(opt, theta0, grad_fn)
  assert isinstance(state.anchor, optax.EmptyState)
  errors = _max_errors(params, gammas, expected, expected_gammas)
  assert max(errors) < 1e-12, errors


def test_first_step_stays_at_the_anchor_and_moments_start_at_zero(x64):
  """The file's first step: gamma = 1e-8, gamma's moments untouched, while
  the inner optimizer's moments take their first step."""
  params = {'w': jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)}
  opt = spd_optax.adamftp(0.1)
  state = opt.init(params)
  grads = {'w': jnp.ones((2, 3))}
  updates, state = opt.update(grads, state, params)
  # Each row moved by an L1 distance of 1e-8 * n / (n + 1e-8), n = 0.3.
  np.testing.assert_allclose(jnp.sum(jnp.abs(updates['w']), axis=1), 1e-8,
                             rtol=1e-6)
  assert float(state.gamma[0]) == 1e-8
  assert float(state.gamma_mu[0]) == float(state.gamma_nu[0]) == 0.0
  adam = state.inner_state[0]
  np.testing.assert_allclose(adam.mu['w'], 0.1 * grads['w'])
  # c_1 is the whole AdamW step, stored with its inverse row norms.
  np.testing.assert_allclose(state.prev_move['w'], -0.1 * jnp.ones((2, 3)),
                             rtol=1e-7)
  np.testing.assert_allclose(state.prev_inv_norm[0], 1 / (0.3 + 1e-8),
                             rtol=1e-7)
  # Step 2: gamma's Adam runs with the bias corrections of step 2.
  _, state = opt.update(grads, state, optax.apply_updates(params, updates))
  h = 2 * 3 * -0.1 / (0.3 + 1e-8)
  m_hat, v_hat = 0.1 * h / (1 - 0.9**2), 1e-3 * h * h / (1 - 0.999**2)
  np.testing.assert_allclose(
      float(state.gamma[0]), 1e-8 - 1e-2 * m_hat / (np.sqrt(v_hat) + 1e-8),
      rtol=1e-7)


def test_last_row_axis_equals_first_on_the_transpose():
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  last = spd_optax.adamftp(0.05, row_axis='last')
  first = spd_optax.adamftp(0.05)
  sl, sf = last.init(w), first.init(w.T)
  pl, pf = w, w.T
  for _ in range(10):
    g = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32) + pl - 1
    ul, sl = last.update(g, sl, pl)
    uf, sf = first.update(g.T, sf, pf)
    pl, pf = optax.apply_updates(pl, ul), optax.apply_updates(pf, uf)
  np.testing.assert_allclose(pl, pf.T, rtol=1e-6, atol=1e-7)
  assert sl.prev_inv_norm[0].shape == (1, 3)


def test_masked_head_gets_the_inner_update_and_stores_nothing():
  params = {'w': jnp.ones((3, 3)), 'head': jnp.ones(3)}
  opt = spd_optax.fast_trainable_projection(
      optax.adam(0.1), mask={'w': True, 'head': False})
  ref = optax.adam(0.1)
  state, ref_state = opt.init(params), ref.init(params)
  for field in (state.anchor['head'], state.prev_move['head'],
                state.gamma[0], state.prev_inv_norm[0]):
    assert isinstance(field, optax.MaskedNode)
  p = params
  for sign in [1.0, -1.0, 1.0]:
    g = jax.tree.map(lambda x: sign * jnp.ones_like(x), p)
    u, state = opt.update(g, state, p)
    ru, ref_state = ref.update(g, ref_state, p)
    np.testing.assert_array_equal(u['head'], ru['head'])
    p = optax.apply_updates(p, u)


@pytest.mark.parametrize('kwargs, message', [
    (dict(k=1.5), 'k must be in'),
    (dict(k=-0.1), 'k must be in'),
    (dict(row_axis=0), 'row_axis'),
    (dict(anchor='pretrained'), 'unknown anchor'),
])
def test_bad_arguments_are_refused(kwargs, message):
  with pytest.raises(ValueError, match=message):
    spd_optax.adamftp(1e-3, **kwargs)


def test_update_needs_params_and_stacked_scalars_are_refused():
  opt = spd_optax.adamftp(1e-3)
  state = opt.init(jnp.ones(3))
  with pytest.raises(ValueError, match='current value of parameters'):
    opt.update(jnp.ones(3), state)
  with pytest.raises(ValueError, match='cannot be stacked'):
    spd_optax.adamftp(1e-3, stacked_layers=True).init(jnp.ones(()))


def test_inject_hyperparams_equal_updates_and_k_can_change():
  params = [-jnp.ones((2, 3)), jnp.ones((2, 5, 2))]
  grads = [jnp.ones((2, 3)), -jnp.ones((2, 5, 2))]
  kwargs = dict(learning_rate=0.1, weight_decay=0.01, k=0.5)
  opt = spd_optax.adamftp(**kwargs)
  injected = optax.inject_hyperparams(spd_optax.adamftp)(**kwargs)
  s1, s2 = jax.jit(opt.init)(params), jax.jit(injected.init)(params)
  p1 = p2 = params
  for _ in range(4):
    u1, s1 = jax.jit(opt.update)(grads, s1, p1)
    u2, s2 = jax.jit(injected.update)(grads, s2, p2)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5,
                                   atol=1e-7), u2, u1)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    grads = [-g for g in grads]  # Positive hypergradients: k matters.
  # k = 0 set in the injected state is k = 0 built in, and k mattered.
  gammas = {}
  for k in (0.0, 1.0):
    built = spd_optax.adamftp(learning_rate=0.1, weight_decay=0.01, k=k)
    s3, s4 = built.init(params), injected.init(params)
    s4.hyperparams['k'] = jnp.asarray(k)
    p3 = p4 = params
    for sign in (1.0, 1.0, 1.0, -1.0, -1.0):  # gamma grows, then shrinks.
      g = [sign * x for x in grads]
      u3, s3 = built.update(g, s3, p3)
      u4, s4 = injected.update(g, s4, p4)
      p3, p4 = optax.apply_updates(p3, u3), optax.apply_updates(p4, u4)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5,
                                   atol=1e-7), s4.inner_state.gamma, s3.gamma)
    gammas[k] = s3.gamma
  assert not np.allclose(gammas[0.0][0], gammas[1.0][0])


def test_k_schedule_equals_constant():
  params = jnp.array([[1.0, -2.0], [0.5, 3.0]])
  a = spd_optax.adamftp(0.1, k=optax.constant_schedule(0.3))
  b = spd_optax.adamftp(0.1, k=0.3)
  sa, sb = a.init(params), b.init(params)
  pa = pb = params
  for t in range(8):
    g = (-1.0) ** t * (params + 1)
    ua, sa = a.update(g, sa, pa)
    ub, sb = b.update(g, sb, pb)
    pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
  np.testing.assert_array_equal(pa, pb)


def test_set_anchor_tree_map_params_and_donation():
  params = {'w': jnp.zeros((2, 3)), 'head': jnp.zeros(2)}
  opt = optax.MultiSteps(optax.inject_hyperparams(
      spd_optax.adamftp, static_args=('mask',))(
          1e-2, mask={'w': True, 'head': False}), every_k_schedule=2)
  state = opt.init(params)
  loaded = {'w': jnp.full((2, 3), 5.0), 'head': jnp.ones(2)}
  state = jax.jit(spd_optax.set_anchor)(state, loaded)
  ftp_state = state.inner_opt_state.inner_state
  np.testing.assert_array_equal(ftp_state.anchor['w'], loaded['w'])
  assert isinstance(ftp_state.anchor['head'], optax.MaskedNode)
  # map_params maps the params-shaped trees, never the per-tensor numbers.
  plain = spd_optax.adamftp(0.1)
  plain_state = plain.init(loaded)
  doubled = optax.tree.map_params(plain, lambda v: 2 * v, plain_state)
  np.testing.assert_array_equal(doubled.anchor['w'], 2 * loaded['w'])
  assert doubled.gamma == plain_state.gamma

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state):
    updates, state = plain.update(jax.tree.map(jnp.ones_like, params), state,
                                  params)
    return optax.apply_updates(params, updates), state

  for init in (plain.init, jax.jit(plain.init)):
    # Fails if the state aliases the params or holds one buffer twice.
    p, s = step(jax.tree.map(jnp.copy, loaded), init(loaded))
    p, s = step(p, s)
  np.testing.assert_array_equal(s.anchor['w'], jnp.full((2, 3), 5.0))


def test_abstract_init_and_bf16_anchor():
  params = {'w': jax.ShapeDtypeStruct((4, 3), jnp.float32),
            'b': jax.ShapeDtypeStruct((3,), jnp.bfloat16)}
  opt = spd_optax.adamftp(0.1, anchor_dtype=jnp.bfloat16)
  abstract = jax.eval_shape(opt.init, params)
  assert abstract.anchor['w'].dtype == jnp.bfloat16
  assert abstract.prev_move['b'].dtype == jnp.bfloat16
  direct = opt.init(params)  # ShapeDtypeStruct leaves are skipped, not read.
  assert isinstance(direct.prev_move['w'], jax.ShapeDtypeStruct)
  assert direct.prev_inv_norm[1].shape == (4, 1)


def test_diagnostics_summary_values():
  params = {'w': jnp.zeros((2, 2)), 'head': jnp.zeros(2)}
  opt = spd_optax.adamftp(1.0, mask={'w': True, 'head': False})
  state = opt.init(params)
  summary = spd_optax.ftp_diagnostics_summary(state)
  assert float(summary['ftp/gamma_over_norm']) == 0.0  # Before any step.
  assert float(summary['ftp/at_radius_fraction']) == 0.0
  # gamma = 1 with row norms 2 (on the radius, half kept) and 0.5 (inside).
  state = state._replace(
      gamma=(optax.MaskedNode(), jnp.ones([])),
      prev_inv_norm=(optax.MaskedNode(), jnp.array([[0.5], [2.0]])))
  summary = spd_optax.ftp_diagnostics_summary(state)
  assert float(summary['ftp/at_radius_fraction']) == 0.5
  assert float(summary['ftp/gamma_over_norm']) == 0.75
  with pytest.raises(ValueError, match='holds no FTP'):
    spd_optax.ftp_diagnostics_summary(optax.adam(1.0).init(params))
  nothing = spd_optax.ftp_diagnostics_summary(
      state, mask={'w': False, 'head': True})
  assert all(float(v) == 0.0 for v in nothing.values())


@pytest.mark.slow
@pytest.mark.parametrize('axis_type', ['Auto', 'Explicit'])
def test_sharded_state_type_and_equality(axis_type):
  out = run_with_devices(COMMON + f"""
axis_type = jax.sharding.AxisType.{axis_type}
mesh = jax.make_mesh((2, 4), ('data', 'fsdp'), axis_types=(axis_type,) * 2)
with jax.set_mesh(mesh):
  params = make_params(mesh)
  opt = spd_optax.adamftp(0.05, weight_decay=0.1, k=0.5, row_axis='last')
  eager = opt.init(params)
  # Under an explicit mesh every entry's type carries its sharding. Under
  # Auto, as for optax's own moments, a jitted init places zeros as XLA likes
  # unless told: map_params gives the previous move (and Adam's moments) the
  # params' shardings, and the per-tensor numbers one replicated sharding.
  shardings = optax.tree.map_params(
      opt, lambda _, p: p.sharding, jax.eval_shape(opt.init, params), params,
      transform_non_params=lambda _: NamedSharding(mesh, P()))
  jitted = jax.jit(opt.init, out_shardings=(
      None if axis_type == jax.sharding.AxisType.Explicit else shardings))(
          params)
  for state in (eager, jitted):
    for k in params:
      for tree in (state.anchor, state.prev_move, state.inner_state[0].mu):
        assert tree[k].sharding.is_equivalent_to(
            params[k].sharding, params[k].ndim), (k, tree[k].sharding)
  p, state = run_steps(opt, jitted, params)
  state = spd_optax.set_anchor(state, params)
  for k in params:
    assert state.anchor[k].sharding.is_equivalent_to(
        params[k].sharding, params[k].ndim)

assert_equals_one_device(opt, params, p)
print('OK')
""")
  assert 'OK' in out
