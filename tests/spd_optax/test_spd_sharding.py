"""SPD on an 8-device (2 x 4) mesh of fake CPU devices."""

import pytest

from tests.multidevice import run_with_devices

COMMON = """
import jax, jax.numpy as jnp, numpy as np, optax, spd_optax
from jax.sharding import NamedSharding, PartitionSpec as P
assert jax.device_count() == 8, jax.devices()

def make_params(mesh):
  rng = np.random.default_rng(0)
  specs = {'w': P('data', 'fsdp'), 'b': P('fsdp'), 's': P()}
  shapes = {'w': (8, 16), 'b': (16,), 's': ()}
  return {k: jax.device_put(jnp.asarray(rng.normal(size=shapes[k]), jnp.float32),
                            NamedSharding(mesh, specs[k])) for k in shapes}

def grads_at(t, params):
  rng = np.random.default_rng(100 + t)
  return jax.tree.map(lambda p: p - 1.0 + 2.0 * jnp.asarray(
      rng.normal(size=p.shape), p.dtype).reshape(p.shape), params)

def sharding_tree(tree):
  return jax.tree.map(lambda x: x.sharding, tree)

def run_steps(opt, state, params, steps=12):
  # `steps` jitted updates on the mesh: the state's types (shardings
  # included) and the params' shardings unchanged. Returns (params, state).
  step = jax.jit(lambda g, s, p: opt.update(g, s, p))
  before, p = jax.tree.map(jax.typeof, state), params
  for t in range(steps):
    updates, state = step(grads_at(t, p), state, p)
    p = optax.apply_updates(p, updates)
  after = jax.tree.map(jax.typeof, state)
  assert before == after, (before, after)
  for k in params:
    assert p[k].sharding.is_equivalent_to(params[k].sharding, params[k].ndim)
  return p, state

def assert_equals_one_device(opt, params, p, steps=12):
  # The same `steps` on one device end where the mesh's run ended (p).
  single = jax.devices()[0]
  p1 = jax.tree.map(lambda x: jax.device_put(np.asarray(x), single), params)
  s1 = opt.init(p1)
  for t in range(steps):
    u, s1 = jax.jit(opt.update)(grads_at(t, p1), s1, p1)
    p1 = optax.apply_updates(p1, u)
  for k in params:
    np.testing.assert_allclose(np.asarray(p[k]), np.asarray(p1[k]),
                               rtol=1e-5, atol=1e-6)
"""


@pytest.mark.slow
@pytest.mark.parametrize('axis_type', ['Auto', 'Explicit'])
def test_anchor_sharding_state_type_and_equality(axis_type):
  out = run_with_devices(COMMON + f"""
axis_type = jax.sharding.AxisType.{axis_type}
mesh = jax.make_mesh((2, 4), ('data', 'fsdp'), axis_types=(axis_type,) * 2)
with jax.set_mesh(mesh):
  params = make_params(mesh)
  opt = spd_optax.adamspd(0.05, weight_decay=1.0, anchor_dtype=None)
  eager = opt.init(params)
  jitted = jax.jit(opt.init)(params)
  for state in (eager, jitted):
    for k in params:
      assert state.anchor[k].sharding.is_equivalent_to(
          params[k].sharding, params[k].ndim), (k, state.anchor[k].sharding)
  p, state = run_steps(opt, jitted, params)

assert_equals_one_device(opt, params, p)
fired = int(sum(np.sum(x) for x in jax.tree.leaves(state.diagnostics.num_projected)))
assert fired > 0, fired
print('OK fired', fired)
""")
  assert 'OK fired' in out


@pytest.mark.slow
def test_set_anchor_keeps_sharding_and_bf16_anchor():
  out = run_with_devices(COMMON + """
mesh = jax.make_mesh((2, 4), ('data', 'fsdp'))
params = make_params(mesh)
opt = spd_optax.adamspd(0.05, anchor_dtype=jnp.bfloat16)
state = opt.init(jax.tree.map(jnp.zeros_like, params))
state = spd_optax.set_anchor(state, params)
for k in params:
  assert state.anchor[k].dtype == jnp.bfloat16
  assert state.anchor[k].sharding.is_equivalent_to(params[k].sharding,
                                                   params[k].ndim)
  np.testing.assert_allclose(np.asarray(state.anchor[k], np.float32),
                             np.asarray(params[k]), rtol=1e-2)
print('OK')
""")
  assert 'OK' in out
