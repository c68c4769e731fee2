"""spd_optax with flax's nnx.Optimizer, bad input, and random trees."""

import functools

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spd_optax
from tests import reference

nnx = pytest.importorskip('flax.nnx')


class MLP(nnx.Module):

  def __init__(self, rngs):
    self.body = nnx.Linear(4, 8, rngs=rngs)
    self.head = nnx.Linear(8, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(jax.nn.relu(self.body(x)))


def _loss(model, x, y):
  return jnp.mean(jnp.square(model(x) - y))


def test_nnx_optimizer_with_donating_step_and_head_mask():
  model = MLP(nnx.Rngs(0))
  pretrained = jax.tree.map(np.array, nnx.as_pure(nnx.state(model, nnx.Param)))
  mask = nnx.as_pure(jax.tree.map(lambda _: True, nnx.state(model, nnx.Param)))
  mask['head'] = jax.tree.map(lambda _: False, mask['head'])
  tx = spd_optax.adamspd(0.05, weight_decay=1.0, mask=mask)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @functools.partial(nnx.jit, donate_argnames=('model', 'optimizer'))
  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(_loss)(model, x, y)
    optimizer.update(model, grads)
    return loss

  rng = np.random.default_rng(0)
  for _ in range(20):
    x = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(16, 2)), jnp.float32)
    loss = train_step(model, optimizer, x, y)
  assert np.isfinite(float(loss))
  state = nnx.as_pure(optimizer.opt_state)
  # The anchor is the weights at construction, and the head stores none.
  np.testing.assert_array_equal(
      state.anchor['body']['kernel'], pretrained['body']['kernel'])
  assert isinstance(state.anchor['head']['kernel'], optax.MaskedNode)
  summary = spd_optax.diagnostics_summary(state)
  assert 0.0 <= float(summary['spd/fire_rate']) <= 1.0
  assert float(summary['spd/deviation_norm']) > 0


def test_nnx_set_anchor_after_loading_weights():
  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, spd_optax.adamspd(1e-3), wrt=nnx.Param)
  # "Load" pre-trained weights after the optimizer was built.
  loaded = jax.tree.map(lambda p: p + 1.0, nnx.as_pure(nnx.state(model, nnx.Param)))
  nnx.update(model, loaded)
  new_state = spd_optax.set_anchor(nnx.as_pure(optimizer.opt_state), loaded)
  nnx.update(optimizer.opt_state, nnx.state(new_state))
  anchor = nnx.as_pure(optimizer.opt_state).anchor
  np.testing.assert_array_equal(anchor['body']['kernel'],
                                loaded['body']['kernel'])


@pytest.mark.parametrize('make, match', [
    (lambda: spd_optax.adamspd(1e-3, weight_decay=-1.0), 'weight_decay'),
    (lambda: spd_optax.adamspd(1e-3, anchor='pretrained'), 'unknown anchor'),
    (lambda: spd_optax.l2sp(-0.1), 'weight_decay'),
])
def test_bad_hyperparameters(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_update_without_params():
  opt = spd_optax.adamspd(1e-3)
  state = opt.init({'w': jnp.ones(2)})
  with pytest.raises(ValueError, match='params'):
    opt.update({'w': jnp.ones(2)}, state)


def test_explicit_anchor_errors_name_the_leaf():
  params = {'enc': {'w': jnp.ones((2, 3))}, 'b': jnp.ones(3)}
  bad_shape = {'enc': {'w': jnp.ones((3, 2))}, 'b': jnp.ones(3)}
  with pytest.raises(ValueError, match=r"\['enc'\]\['w'\].*\(3, 2\).*\(2, 3\)"):
    spd_optax.adamspd(1e-3, anchor=bad_shape).init(params)
  bad_dtype = {'enc': {'w': jnp.ones((2, 3), jnp.bfloat16)}, 'b': jnp.ones(3)}
  with pytest.raises(ValueError, match=r"\['enc'\]\['w'\].*bfloat16"):
    spd_optax.adamspd(1e-3, anchor=bad_dtype).init(params)
  missing = {'enc': {'w': jnp.ones((2, 3))}}
  with pytest.raises(ValueError, match=r"does not match the params.*\['b'\]"):
    spd_optax.adamspd(1e-3, anchor=missing).init(params)
  # With anchor_dtype the bf16 anchor is accepted and stored in bf16.
  state = spd_optax.adamspd(1e-3, anchor=bad_dtype,
                            anchor_dtype=jnp.bfloat16).init(params)
  assert state.anchor['enc']['w'].dtype == jnp.bfloat16


def test_other_bad_input_is_named():
  params = {'w': jnp.ones(3), 'step': jnp.zeros((), jnp.int32)}
  with pytest.raises(ValueError, match=r"\['step'\].*int32"):
    spd_optax.adamspd(1e-3).init(params)
  # Masked out, the integer leaf is fine.
  spd_optax.adamspd(1e-3, mask={'w': True, 'step': False}).init(params)
  with pytest.raises(ValueError, match='mask'):
    spd_optax.adamspd(1e-3, mask={'x': True}).init({'w': jnp.ones(3)})
  with pytest.raises(ValueError, match=r"\['s'\].*scalar"):
    spd_optax.adamspd(1e-3, stacked_layers=True).init({'s': jnp.ones(())})
  state = spd_optax.adamspd(1e-3).init({'w': jnp.ones(3)})
  with pytest.raises(ValueError, match=r"\['w'\].*\(4,\).*\(3,\)"):
    spd_optax.set_anchor(state, {'w': jnp.ones(4)})
  with pytest.raises(ValueError, match='zeros'):
    spd_optax.set_anchor(
        spd_optax.adamspd(1e-3, anchor='zeros').init({'w': jnp.ones(3)}),
        {'w': jnp.ones(3)})
  with pytest.raises(ValueError, match='no SPDState'):
    spd_optax.set_anchor(optax.adam(1e-3).init({'w': jnp.ones(3)}),
                         {'w': jnp.ones(3)})


_shapes = st.lists(
    st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple),
    min_size=1, max_size=4)


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(
    shapes=_shapes,
    dtype=st.sampled_from(['float32', 'bfloat16', 'float16']),
    anchor=st.sampled_from(['params', 'zeros']),
    lam=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_random_trees_match_reference(shapes, dtype, anchor, lam, seed):
  """Any tree, shape and dtype: the float64 reference, up to the dtype."""
  rng = np.random.default_rng(seed)
  names = [f'leaf{i}' for i in range(len(shapes))]
  theta = {n: rng.normal(size=s).astype(dtype) for n, s in zip(names, shapes)}
  moves = {n: rng.normal(size=s).astype(dtype) for n, s in zip(names, shapes)}
  grads = {n: rng.normal(size=s).astype(dtype) for n, s in zip(names, shapes)}
  # Start away from the anchor, so the condition can go either way.
  theta0 = {n: theta[n] for n in names}
  params = {n: (theta[n].astype(np.float32) + moves[n]).astype(dtype)
            for n in names}
  opt = spd_optax.projection_decay(optax.sgd(0.1), lam, anchor=anchor) \
      if seed % 2 else spd_optax.selective_projection_decay(
          optax.sgd(0.1), lam, anchor=anchor)
  state = opt.init(jax.tree.map(jnp.asarray, theta0))
  if anchor == 'params':
    anchor_tree = {n: theta0[n].astype(np.float64) for n in names}
  else:
    anchor_tree = {n: np.zeros(theta0[n].shape) for n in names}
  updates, state = jax.jit(opt.update)(
      jax.tree.map(jnp.asarray, grads), state, jax.tree.map(jnp.asarray, params))
  tol = {'float32': 1e-5, 'bfloat16': 2e-2, 'float16': 2e-3}[dtype]
  for n in names:
    assert updates[n].dtype == jnp.dtype(dtype)
    g = grads[n].astype(np.float64)
    p = params[n].astype(np.float64)
    u = (-0.1 * grads[n].astype(np.float32)).astype(dtype).astype(np.float64)
    expected, _, _ = reference.spd_project(
        g, p, p + u, anchor_tree[n], lam, selective=not seed % 2)
    scale = 1 + np.max(np.abs(p), initial=0)
    np.testing.assert_allclose(
        p + np.asarray(updates[n], np.float64), expected, atol=tol * scale,
        err_msg=n)
    assert np.all(np.isfinite(np.asarray(updates[n], np.float32)))
