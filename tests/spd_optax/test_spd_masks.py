"""Leaving leaves out of SPD or out of its diagnostics by path.

The attention key bias has an exactly zero true gradient (softmax ignores a
shift that is the same for every key), so SPD's decision on it is a coin toss;
``exclude_paths(KEY_BIAS_PATTERN)`` leaves it out in one line.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spd_optax


def _params():
  return {'attn': {'key': {'bias': jnp.zeros(4), 'kernel': jnp.zeros((4, 4))},
                   'query': {'bias': jnp.zeros(4)}}}


def test_key_bias_pattern_names_the_key_bias_of_the_common_layouts():
  names = {
      'blocks/0/attn/key/bias': True,  # This project's ViT, big_vision.
      'encoder/layer/3/attention/attention/key/bias': True,  # HF ViT.
      'vision_model/encoder/layers/0/self_attn/k_proj/bias': True,  # HF CLIP.
      'blocks/0/attn/key/kernel': False,
      'blocks/0/attn/query/bias': False,
      'blocks/0/monkey/bias': False,
  }
  tree = {name: jnp.zeros(1) for name in names}
  mask = spd_optax.exclude_paths(spd_optax.KEY_BIAS_PATTERN)
  # A flat dict's path is its key, so the path name is the string itself.
  assert mask(tree) == {name: not is_key for name, is_key in names.items()}


def _two_steps(opt):
  """Step 1 moves every leaf away; step 2 pulls only the key bias back.

  At step 2, c_t = -<g, theta - theta0> is negative for the key bias alone
  (its gradient points along its deviation), so SPD projects it and not the
  other two leaves.
  """
  params = _params()
  state = opt.init(params)
  for sign in ({'bias': 1.0, 'kernel': 1.0, 'q': 1.0},
               {'bias': -1.0, 'kernel': 1.0, 'q': 1.0}):
    grads = {'attn': {'key': {'bias': sign['bias'] * jnp.ones(4),
                              'kernel': sign['kernel'] * jnp.ones((4, 4))},
                      'query': {'bias': sign['q'] * jnp.ones(4)}}}
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_diagnostics_leave_out_the_masked_leaves():
  opt = spd_optax.selective_projection_decay(optax.sgd(0.1), 0.5)
  params, state = _two_steps(opt)
  without = spd_optax.exclude_paths(spd_optax.KEY_BIAS_PATTERN)
  # All three leaves count: the key bias alone was projected.
  assert float(spd_optax.projected_fraction(state)) == pytest.approx(1 / 3)
  assert float(spd_optax.projected_fraction(state, without)) == 0.0
  summary = spd_optax.diagnostics_summary(state, mask=without)
  assert float(summary['spd/projected_fraction']) == 0.0
  assert float(summary['spd/fire_rate']) == 0.0
  # ||theta - theta0|| over the two kept leaves, from the params themselves.
  kept = [params['attn']['key']['kernel'], params['attn']['query']['bias']]
  expected = np.sqrt(sum(np.sum(np.square(np.asarray(x))) for x in kept))
  np.testing.assert_allclose(summary['spd/deviation_norm'], expected,
                             rtol=1e-6)
  full = spd_optax.diagnostics_summary(state)
  assert float(full['spd/fire_rate']) == pytest.approx(1 / 6)  # 1 of 3x2.
  # A pytree of bools works as well as the callable.
  as_tree = {'attn': {'key': {'bias': False, 'kernel': True},
                      'query': True}}
  assert float(spd_optax.projected_fraction(state, as_tree)) == 0.0


def test_key_biases_left_out_of_spd_get_the_inner_update():
  mask = spd_optax.exclude_paths(spd_optax.KEY_BIAS_PATTERN)
  opt = spd_optax.selective_projection_decay(optax.sgd(0.1), 0.5, mask=mask)
  params, state = _two_steps(opt)
  # Plain SGD on the key bias: +1 then -1, back to 0; no anchor stored.
  np.testing.assert_array_equal(params['attn']['key']['bias'], np.zeros(4))
  assert isinstance(state.anchor['attn']['key']['bias'], optax.MaskedNode)
  assert float(spd_optax.projected_fraction(state)) == 0.0
  # Without the mask SPD projects it at step 2, and it ends off the SGD path.
  _, unmasked = _two_steps(
      spd_optax.selective_projection_decay(optax.sgd(0.1), 0.5))
  assert bool(spd_optax.get_diagnostics(unmasked).projected['attn']['key'][
      'bias'])


def test_exclude_paths_reads_through_nnx_variables():
  """The mask names an nnx state's leaves by their module path."""
  from flax import nnx  # pylint: disable=g-import-not-at-top

  class Attn(nnx.Module):

    def __init__(self, rngs):
      self.key = nnx.Linear(4, 4, rngs=rngs)
      self.query = nnx.Linear(4, 4, rngs=rngs)

  model = Attn(nnx.Rngs(0))
  opt = spd_optax.adamspd(
      1e-3, mask=spd_optax.exclude_paths(spd_optax.KEY_BIAS_PATTERN))
  optimizer = nnx.Optimizer(model, opt, wrt=nnx.Param)
  anchor = nnx.as_pure(optimizer.opt_state).anchor
  assert isinstance(anchor['key']['bias'], optax.MaskedNode)
  assert anchor['key']['kernel'].shape == (4, 4)
  assert anchor['query']['bias'].shape == (4,)
  grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
  optimizer.update(model, grads)
  assert float(spd_optax.projected_fraction(
      nnx.as_pure(optimizer.opt_state))) == 0.0
