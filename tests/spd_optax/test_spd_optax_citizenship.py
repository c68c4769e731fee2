"""spd_optax as optax tests its own contributed optimizers.

Mirrors the checklist of optax/contrib/_common_test.py: extra kwargs without
recompiling, convergence, inject_hyperparams, schedules, dtypes, MultiSteps,
lax.cond stability, tree_map_params, abstract init, masks and friends.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spd_optax
from tests import reference

# Every public factory, built on one inner optimizer, with kwargs.
FACTORIES = {
    'adamspd': lambda lr: spd_optax.adamspd(lr, weight_decay=1.0),
    'adamspd_zeros': lambda lr: spd_optax.adamspd(
        lr, weight_decay=0.5, anchor='zeros'),
    'spd_sgd_momentum': lambda lr: spd_optax.selective_projection_decay(
        optax.sgd(lr, momentum=0.9), 1.0),
    'spd_adamw': lambda lr: spd_optax.selective_projection_decay(
        optax.adamw(lr, weight_decay=1e-4), 1.0),
    'projection_decay': lambda lr: spd_optax.projection_decay(
        optax.adam(lr), 0.1),
    'adaml2sp': lambda lr: spd_optax.adaml2sp(lr, weight_decay=1e-3),
    'adamftp': lambda lr: spd_optax.adamftp(lr, weight_decay=1e-4, k=0.5),
    'ftp_sgd_momentum': lambda lr: spd_optax.fast_trainable_projection(
        optax.sgd(lr, momentum=0.9), k=1.0),
}


def parabola(dtype):
  init = jnp.array([-1.0, 10.0, 1.0], dtype)
  final = jnp.array([1.0, -1.0, 1.0], dtype)
  return init, final, lambda p: jnp.sum(jnp.square(p - final))


def rosenbrock(dtype):
  init = jnp.array([0.0, 0.0], dtype)
  final = jnp.array([1.0, 1.0], dtype)
  return init, final, lambda p: (
      jnp.square(1.0 - p[0]) + 100.0 * jnp.square(p[1] - p[0] ** 2))


def mixed(dtype):
  init = (jnp.zeros(3, dtype), jnp.zeros((2, 2), dtype))
  final = (jnp.array([1.0, -1.0, 2.0], dtype),
           jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype))
  return init, final, lambda p: sum(
      jnp.sum(jnp.square(a - b)) for a, b in zip(p, final))


@pytest.mark.parametrize('name', sorted(FACTORIES))
def test_extra_args_and_no_recompilation(name):
  opt = FACTORIES[name](1e-3)
  params, _, loss = rosenbrock(jnp.float32)

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = opt.update(
        grads, state, params, unexpected_extra_args_your_optimizer_doesnt_expect=1)
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  params, state = step(params, state)
  params, state = step(params, state)
  compiled = step._cache_size()  # pylint: disable=protected-access
  params, state = step(params, state)
  assert step._cache_size() == compiled  # pylint: disable=protected-access


@pytest.mark.parametrize('name', ['adamspd', 'spd_sgd_momentum', 'adaml2sp',
                                  'adamspd_zeros', 'adamftp'])
@pytest.mark.parametrize('target', [parabola, rosenbrock, mixed])
def test_converges(name, target):
  # The anchor is the start: SPD must still let consistent progress through.
  lr = 1e-2 if name != 'spd_sgd_momentum' else 1e-3
  opt = FACTORIES[name](lr)
  params, final, loss = target(jnp.float32)
  state = opt.init(params)
  state = optax.tree.map_params(opt, lambda v: v, state)

  def body(carry, _):
    params, state = carry
    updates, state = opt.update(jax.grad(loss)(params), state, params)
    return (optax.apply_updates(params, updates), state), None

  (params, state), _ = jax.lax.scan(body, (params, state), length=20_000)
  jax.tree.map(
      functools.partial(np.testing.assert_allclose, rtol=3e-2, atol=3e-2),
      params, final)


@pytest.mark.parametrize('anchor', ['params', 'zeros'])
def test_inject_hyperparams_equal_updates_and_state(anchor):
  params = [-jnp.ones((2, 3)), jnp.ones((2, 5, 2))]
  grads = [jnp.ones((2, 3)), -jnp.ones((2, 5, 2))]
  # Two steps so the projection condition is exercised (step 1 sits on the
  # anchor for anchor='params').
  kwargs = dict(learning_rate=0.1, weight_decay=0.7, anchor=anchor)
  opt = spd_optax.adamspd(**kwargs)
  injected = optax.inject_hyperparams(spd_optax.adamspd)(**kwargs)
  s1, s2 = jax.jit(opt.init)(params), jax.jit(injected.init)(params)
  p1 = p2 = params
  for _ in range(3):
    u1, s1 = jax.jit(opt.update)(grads, s1, p1)
    u2, s2 = jax.jit(injected.update)(grads, s2, p2)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5), u2, u1)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
    grads = [-g for g in grads]  # Flip: makes SPD fire.
  jax.tree.map(
      functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5),
      s2.inner_state, s1)
  assert float(spd_optax.diagnostics_summary(s1)['spd/fire_rate']) > 0


def test_inject_hyperparams_can_change_weight_decay():
  params = jnp.ones(4)
  opt = optax.inject_hyperparams(spd_optax.adamspd)(
      learning_rate=0.1, weight_decay=1.0)
  state = opt.init(params)
  state.hyperparams['weight_decay'] = jnp.asarray(0.0)
  p = params
  ref = optax.inject_hyperparams(optax.adam)(0.1)
  rs = ref.init(params)
  for g in [jnp.ones(4), -jnp.ones(4), jnp.ones(4)]:
    u, state = opt.update(g, state, p)
    ru, rs = ref.update(g, rs, p)
    np.testing.assert_allclose(u, ru, rtol=1e-6)
    p = optax.apply_updates(p, u)
  # It did fire: lambda = 0 from the injected state is what made it a no-op.
  assert int(state.inner_state.diagnostics.num_projected) >= 1


def test_callable_mask_under_inject_hyperparams_needs_static_args():
  mask = lambda p: {'w': True, 'head': False}
  params = {'w': jnp.ones(2), 'head': jnp.ones(2)}
  opt = optax.inject_hyperparams(
      spd_optax.adamspd, static_args=('mask',))(1e-2, mask=mask)
  state = opt.init(params)
  _, state = opt.update(params, state, params)
  assert isinstance(state.inner_state.anchor['head'], optax.MaskedNode)


@pytest.mark.parametrize('name', sorted(FACTORIES))
def test_schedules_equal_constants(name):
  del name  # The schedule path is shared; check the two schedulable args.
  params, _, loss = parabola(jnp.float32)
  a = spd_optax.adamspd(optax.constant_schedule(1e-2),
                        weight_decay=optax.constant_schedule(0.8))
  b = spd_optax.adamspd(1e-2, weight_decay=0.8)
  sa, sb = a.init(params), b.init(params)
  pa = pb = params
  for _ in range(10):
    ua, sa = a.update(jax.grad(loss)(pa), sa, pa)
    ub, sb = b.update(jax.grad(loss)(pb), sb, pb)
    pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
  np.testing.assert_allclose(pa, pb, rtol=1e-6)


def test_weight_decay_schedule_is_evaluated_per_step():
  """A schedule that is 0 after step 0 must equal lambda = 0 from then on."""
  seen = []

  def schedule(count):
    seen.append(count)
    return jnp.where(count < 1, 1.0, 0.0)

  params = jnp.ones(3)
  a = spd_optax.adamspd(0.1, weight_decay=schedule)
  b = spd_optax.adamspd(0.1, weight_decay=0.0)
  sa, sb = a.init(params), b.init(params)
  pa = pb = params
  for g in [jnp.ones(3), -jnp.ones(3), jnp.ones(3), -jnp.ones(3)]:
    ua, sa = a.update(g, sa, pa)
    ub, sb = b.update(g, sb, pb)
    pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
  np.testing.assert_array_equal(pa, pb)
  assert len(seen) == 4


@pytest.mark.parametrize('name', sorted(FACTORIES))
@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
def test_updates_keep_param_dtype(name, dtype):
  opt = FACTORIES[name](1e-3)
  params = jnp.array([1.0, 2.0], dtype)
  state = jax.jit(opt.init)(params)
  for g in [2 * params, -2 * params]:
    updates, state = jax.jit(opt.update)(g, state, params)
    assert updates.dtype == params.dtype
    params = optax.apply_updates(params, updates)
    assert params.dtype == jnp.dtype(dtype)


# The factories that tests/reference.py computes independently: Adam inside,
# with the factory's lambda, anchor and selection rule.
REFERENCE = {
    'adamspd': dict(lam=1.0, anchor='params', selective=True),
    'adamspd_zeros': dict(lam=0.5, anchor='zeros', selective=True),
    'projection_decay': dict(lam=0.1, anchor='params', selective=False),
}


@pytest.mark.parametrize('name', sorted(FACTORIES))
@pytest.mark.parametrize('dtype', ['bfloat16', 'float32'])
def test_multisteps_emits_the_update_of_the_mean_gradient(name, dtype):
  """Every k-th step emits what the optimizer gives for the mean gradient.

  Two rounds of k = 4 mini-steps whose mean gradients point opposite ways,
  the second weaker so that momentum still moves away from the anchor: SPD
  projects at the second emitting step, with r_t > 0 (the first sits on the
  anchor). Each emitted update is checked against the plain optimizer fed the
  mean gradient and, for the Adam-based SPD factories in float32, against the
  float64 NumPy reference of tests/reference.py.
  """
  k, lr = 4, 0.1
  opt = optax.MultiSteps(FACTORIES[name](lr), every_k_schedule=k)
  plain = FACTORIES[name](lr)
  params = jnp.array([1.0, 2.0, -1.5], dtype)
  # Mini-batch gradients that differ; the mean of each round has one sign.
  rounds = [
      [jnp.array(s * np.array([w, 2 * w, -w]), dtype)
       for w in (0.5, 3.0, -1.0, 1.5)]
      for s in (1.0, -0.5)
  ]
  state, plain_state = jax.jit(opt.init)(params), plain.init(params)
  update, plain_update = jax.jit(opt.update), jax.jit(plain.update)
  p = plain_p = params
  emitted, expected = [], []
  for grads in rounds:
    for i, g in enumerate(grads):
      u, state = update(g, state, p)
      if i < k - 1:
        np.testing.assert_array_equal(u, jnp.zeros_like(params))
      p = optax.apply_updates(p, u)
    emitted.append(u)
    mean = jnp.mean(jnp.stack([g.astype(jnp.float32) for g in grads]), 0)
    pu, plain_state = plain_update(mean.astype(dtype), plain_state, plain_p)
    plain_p = optax.apply_updates(plain_p, pu)
    expected.append(pu)
  assert emitted[1].dtype == jnp.dtype(dtype)
  tol = {'bfloat16': 1e-2, 'float32': 1e-6}[dtype]
  for u, pu in zip(emitted, expected):
    np.testing.assert_allclose(np.asarray(u, np.float32),
                               np.asarray(pu, np.float32), rtol=tol, atol=tol)
  if name in ('adamspd', 'spd_sgd_momentum', 'spd_adamw'):
    # The second emitting step projected, by a ratio r_t > 0.
    diagnostics = state.inner_opt_state.diagnostics
    assert bool(diagnostics.projected) and float(diagnostics.ratio) > 0.1
  if name in REFERENCE and dtype == 'float32':
    ref = REFERENCE[name]
    theta0 = {'w': np.asarray(params, np.float64)}
    anchor = theta0 if ref['anchor'] == 'params' else {'w': np.zeros(3)}
    means = [np.mean([np.asarray(g, np.float64) for g in grads], 0)
             for grads in rounds]
    theta, fired = reference.run_adamspd(
        theta0, anchor, lambda theta, t: {'w': means[t]}, len(rounds), lr=lr,
        lam=ref['lam'], selective=ref['selective'])
    assert any(f['w'] for f in fired)  # The reference projects.
    np.testing.assert_allclose(np.asarray(p, np.float64), theta['w'],
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('name', sorted(FACTORIES))
@pytest.mark.parametrize('dtype', ['float16', 'bfloat16', 'float32'])
def test_state_dtype_stable_under_cond(name, dtype):
  opt = FACTORIES[name](1e-3)
  params, _, loss = parabola(jnp.dtype(dtype))

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params)
    cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
    updates, state = jax.lax.cond(
        cond, lambda: opt.update(grads, state, params),
        lambda: (params, state))
    return optax.apply_updates(params, updates), state

  state = opt.init(params)
  for _ in range(2):
    params, new_state = step(params, state)
    assert params.dtype == jnp.dtype(dtype)
    state = new_state


def _only_masked_nodes(tree):
  """Whether ``tree`` stores nothing: a MaskedNode, or a tree of them."""
  is_masked = lambda x: isinstance(x, optax.MaskedNode)
  return all(map(is_masked, jax.tree.leaves(tree, is_leaf=is_masked)))


@pytest.mark.parametrize('masked_by', ['partition', 'mask'])
def test_chain_with_clipping_and_a_head_left_out(masked_by):
  """SPD around clip + Adam on the backbone; the head left out of SPD.

  Left out by ``optax.partition`` (the head gets plain Adam) or by SPD's own
  ``mask=`` (the head gets the clipped Adam update), the head's update is
  exactly that inner update and SPD stores no anchor for it; the backbone's
  update is the float64 reference projection of the inner update, and is
  projected (with r_t > 0) when the gradient turns.
  """
  params = {'backbone': {'w': jnp.linspace(-1.0, 1.0, 9).reshape(3, 3)},
            'head': {'w': jnp.array([0.5, -1.0, 2.0])}}
  spd_inner = lambda: optax.chain(optax.clip_by_global_norm(1.0),
                                  optax.adam(1e-2))
  if masked_by == 'partition':
    opt = optax.partition(
        {'spd': spd_optax.selective_projection_decay(spd_inner(), 1.0),
         'plain': optax.adam(1e-1)},
        {'backbone': 'spd', 'head': 'plain'})
    # What SPD wraps sees the backbone alone; the head sees plain Adam.
    inners = {'backbone': spd_inner(), 'head': optax.adam(1e-1)}
  else:
    opt = spd_optax.selective_projection_decay(
        spd_inner(), 1.0, mask={'backbone': True, 'head': False})
    inners = {'both': spd_inner()}  # Clipped by the norm of the whole tree.
  inner_states = {k: tx.init(params if k == 'both' else {k: params[k]})
                  for k, tx in inners.items()}
  state = opt.init(params)
  spd_state = lambda state: (state.inner_states['spd'].inner_state
                             if masked_by == 'partition' else state)
  # optax.partition hands SPD the head as one MaskedNode; SPD's mask= keeps
  # the head's structure, with a MaskedNode per leaf.
  anchor = spd_state(state).anchor
  assert _only_masked_nodes(anchor['head'])
  np.testing.assert_array_equal(anchor['backbone']['w'],
                                params['backbone']['w'])
  # Eager, so that the inner optimizer runs the same operations here as on
  # its own and "exactly" is bitwise (two jitted programs may fuse and round
  # differently).
  ratios = []  # r_t of the backbone at the steps where it was projected.
  # Three steps away from the anchor, then a gradient that turns back while
  # Adam's momentum still moves away: projected with r_t > 0.
  for sign in [1.0, 1.0, 1.0, -0.5]:
    grads = jax.tree.map(lambda p: sign * (10 * p + 1), params)
    updates, state = opt.update(grads, state, params)
    inner_updates = {}
    for k, tx in inners.items():
      tree = lambda t: t if k == 'both' else {k: t[k]}
      u, inner_states[k] = tx.update(tree(grads), inner_states[k],
                                     tree(params))
      inner_updates.update(u)
    # Left out: exactly the inner update.
    np.testing.assert_array_equal(updates['head']['w'],
                                  inner_updates['head']['w'])
    # Selected: the reference projection of the inner update.
    g, theta, u = (np.asarray(t['backbone']['w'], np.float64)
                   for t in (grads, params, inner_updates))
    expected, fired, ratio = reference.spd_project(
        g, theta, theta + u, np.asarray(anchor['backbone']['w'], np.float64),
        1.0)
    np.testing.assert_allclose(theta + np.asarray(updates['backbone']['w']),
                               expected, rtol=1e-6, atol=1e-6)
    diagnostics = spd_state(state).diagnostics
    assert bool(diagnostics.projected['backbone']['w']) == fired
    assert _only_masked_nodes(diagnostics.projected['head'])
    if fired:
      ratios.append(ratio)
    params = optax.apply_updates(params, updates)
  assert ratios and min(ratios) > 0.1, ratios
  assert _only_masked_nodes(spd_state(state).anchor['head'])


def test_mask_leaves_other_leaves_untouched_and_unstored():
  params = {'w': jnp.ones((4, 4)), 'head': jnp.ones(4)}
  mask = {'w': True, 'head': False}
  opt = spd_optax.adamspd(0.1, weight_decay=1.0, mask=mask)
  ref = optax.adam(0.1)
  state, rstate = opt.init(params), ref.init(params)
  assert isinstance(state.anchor['head'], optax.MaskedNode)
  p = params
  for sign in [1.0, -1.0, -1.0, 1.0]:
    g = jax.tree.map(lambda x: sign * jnp.ones_like(x), p)
    u, state = opt.update(g, state, p)
    ru, rstate = ref.update(g, rstate, p)
    # Plain Adam, to a float32 ulp (adamspd runs Adam leaf by leaf, which XLA
    # may round differently from the whole tree).
    np.testing.assert_allclose(u['head'], ru['head'], rtol=2e-7, atol=0)
    p = optax.apply_updates(p, u)
  assert int(state.diagnostics.num_projected['w']) > 0


def test_callable_and_prefix_masks():
  params = {'enc': {'a': jnp.ones(2), 'b': jnp.ones(3)}, 'head': jnp.ones(2)}
  prefix = spd_optax.adamspd(0.1, mask={'enc': True, 'head': False})
  fn = spd_optax.adamspd(0.1, mask=lambda p: jax.tree_util.tree_map_with_path(
      lambda path, _: 'head' not in jax.tree_util.keystr(path), p))
  for opt in (prefix, fn):
    state = opt.init(params)
    assert isinstance(state.anchor['head'], optax.MaskedNode)
    assert state.anchor['enc']['b'].shape == (3,)


def test_tree_map_params_maps_anchor():
  params = {'w': jnp.ones(3)}
  opt = spd_optax.adamspd(0.1)
  state = opt.init(params)
  doubled = optax.tree.map_params(opt, lambda v: 2 * v, state)
  np.testing.assert_array_equal(doubled.anchor['w'], 2 * jnp.ones(3))


def test_abstract_init():
  params = {'w': jax.ShapeDtypeStruct((4, 3), jnp.float32),
            'b': jax.ShapeDtypeStruct((3,), jnp.bfloat16)}
  opt = spd_optax.adamspd(0.1, anchor_dtype=jnp.bfloat16)
  abstract = jax.eval_shape(opt.init, params)
  assert abstract.anchor['w'].shape == (4, 3)
  assert abstract.anchor['w'].dtype == jnp.bfloat16
  direct = opt.init(params)  # ShapeDtypeStruct leaves are skipped, not read.
  assert isinstance(direct.anchor['w'], jax.ShapeDtypeStruct)


def test_anchor_is_a_copy_and_donation_works():
  params = {'w': jnp.arange(6.0).reshape(2, 3)}
  opt = spd_optax.adamspd(0.1)
  state = jax.jit(opt.init)(params)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state):
    updates, state = opt.update(jax.tree.map(jnp.ones_like, params), state,
                                params)
    return optax.apply_updates(params, updates), state

  params, state = step(params, state)  # Would fail if the anchor aliased.
  params, state = step(params, state)
  np.testing.assert_array_equal(state.anchor['w'], np.arange(6.0).reshape(2, 3))


def test_set_anchor_through_nested_state():
  params = {'w': jnp.zeros(3), 'head': jnp.zeros(2)}
  opt = optax.MultiSteps(optax.inject_hyperparams(spd_optax.adamspd)(
      1e-2, mask={'w': True, 'head': False}), every_k_schedule=2)
  state = opt.init(params)
  loaded = {'w': jnp.full(3, 5.0), 'head': jnp.ones(2)}
  state = jax.jit(spd_optax.set_anchor)(state, loaded)
  spd_state = state.inner_opt_state.inner_state
  np.testing.assert_array_equal(spd_state.anchor['w'], jnp.full(3, 5.0))
  assert isinstance(spd_state.anchor['head'], optax.MaskedNode)
  # It also reaches L2-SP inside a chain.
  l2 = spd_optax.adaml2sp(1e-2)
  l2_state = spd_optax.set_anchor(l2.init(params), loaded)
  np.testing.assert_array_equal(l2_state[0].anchor['head'], jnp.ones(2))


def test_anchor_dtype_bf16_halves_memory_and_keeps_update_dtype():
  params = {'w': jnp.ones((8, 8), jnp.float32)}
  opt = spd_optax.adamspd(0.1, anchor_dtype=jnp.bfloat16)
  state = opt.init(params)
  assert state.anchor['w'].dtype == jnp.bfloat16
  assert state.anchor['w'].nbytes == params['w'].nbytes // 2
  u, state = opt.update({'w': jnp.ones((8, 8))}, state, params)
  assert u['w'].dtype == jnp.float32


def test_stacked_layers_equal_separate_leaves():
  rng = np.random.default_rng(0)
  layers = [jnp.asarray(rng.normal(size=(3, 4)), jnp.float32) for _ in range(4)]
  stacked = {'blocks': jnp.stack(layers)}
  separate = {f'blocks{i}': x for i, x in enumerate(layers)}
  opt_st = spd_optax.adamspd(0.05, stacked_layers=True)
  opt_sep = spd_optax.adamspd(0.05)
  s_st, s_sep = opt_st.init(stacked), opt_sep.init(separate)
  p_st, p_sep = stacked, separate
  for t in range(20):
    noise = [jnp.asarray(rng.normal(size=(3, 4)), jnp.float32) for _ in layers]
    g_sep = {f'blocks{i}': p_sep[f'blocks{i}'] - 1 + 3 * noise[i]
             for i in range(4)}
    g_st = {'blocks': jnp.stack([g_sep[f'blocks{i}'] for i in range(4)])}
    u_st, s_st = opt_st.update(g_st, s_st, p_st)
    u_sep, s_sep = opt_sep.update(g_sep, s_sep, p_sep)
    p_st, p_sep = optax.apply_updates(p_st, u_st), optax.apply_updates(p_sep, u_sep)
  for i in range(4):
    np.testing.assert_allclose(p_st['blocks'][i], p_sep[f'blocks{i}'],
                               rtol=1e-5, atol=1e-6)
  fired = np.asarray(s_st.diagnostics.num_projected['blocks'])
  assert fired.shape == (4,)
  np.testing.assert_array_equal(
      fired, [int(s_sep.diagnostics.num_projected[f'blocks{i}']) for i in range(4)])
  assert fired.sum() > 0


def test_diagnostics_summary_values():
  params = {'a': jnp.zeros(2), 'b': jnp.zeros(2)}
  opt = spd_optax.projection_decay(optax.sgd(1.0), 1.0, mask={'a': True, 'b': True})
  state = opt.init(params)
  u, state = opt.update({'a': -jnp.ones(2), 'b': -jnp.ones(2)}, state, params)
  summary = spd_optax.diagnostics_summary(state)
  assert float(summary['spd/projected_fraction']) == 1.0
  assert float(summary['spd/fire_rate']) == 1.0
  # From the anchor r = 1: projected back onto the anchor, deviation 0.
  assert float(summary['spd/deviation_norm']) == 0.0
  assert float(summary['spd/mean_ratio']) == 1.0
