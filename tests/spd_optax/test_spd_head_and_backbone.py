"""Adam-SPD on a pre-trained backbone, AdamW on a new head, in one optimizer.

The recipe of the docs' quickstart and the README: ``optax.partition`` with
:func:`spd_optax.adamspd` for the backbone and ``optax.adamw`` (with its own
decay) for the head. Each part must compute what its optimizer computes on
that part alone, with ``set_anchor`` and the diagnostics reaching SPD's state
inside the partition.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spd_optax


def _labels(params):
  return {part: jax.tree.map(lambda _, part=part: part, subtree)
          for part, subtree in params.items()}


def _partitioned():
  return optax.partition(
      {'backbone': spd_optax.adamspd(3e-2, weight_decay=1.0),
       'head': optax.adamw(3e-2, weight_decay=0.1)},
      _labels)


def _params(seed, head='head'):
  rng = np.random.default_rng(seed)
  shapes = {'backbone': {'w': (6, 5), 'b': (5,)}, head: {'w': (5, 3)}}
  return jax.tree.map(
      lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
      is_leaf=lambda s: isinstance(s, tuple))


def _grads(params, t):
  """Noisy pulls back towards 0, so that SPD fires on some steps."""
  rng = np.random.default_rng(100 + t)
  return jax.tree.map(
      lambda p: p + jnp.asarray(2 * rng.normal(size=p.shape), jnp.float32),
      params)


def test_each_part_gets_what_its_optimizer_gives_it_alone():
  random_init, loaded = _params(0), _params(1)
  opt = _partitioned()
  # The loop's order: build the optimizer, then load the weights.
  state = spd_optax.set_anchor(opt.init(random_init), loaded)
  alone = {'backbone': spd_optax.adamspd(3e-2, weight_decay=1.0),
           'head': optax.adamw(3e-2, weight_decay=0.1)}
  alone_states = {k: tx.init(loaded[k]) for k, tx in alone.items()}
  params, alone_params = loaded, dict(loaded)
  for t in range(6):
    grads = _grads(params, t)
    updates, state = jax.jit(opt.update)(grads, state, params)
    for k, tx in alone.items():
      u, alone_states[k] = jax.jit(tx.update)(
          grads[k], alone_states[k], alone_params[k])
      # The same operations on the same numbers: equal bit for bit.
      jax.tree.map(np.testing.assert_array_equal, updates[k], u)
      alone_params[k] = optax.apply_updates(alone_params[k], u)
    params = optax.apply_updates(params, updates)

  diagnostics = spd_optax.get_diagnostics(state)
  backbone = spd_optax.get_diagnostics(alone_states['backbone'])
  jax.tree.map(np.testing.assert_array_equal, diagnostics.num_projected[
      'backbone'], backbone.num_projected)
  assert sum(int(n) for n in jax.tree.leaves(backbone.num_projected)) > 0
  assert isinstance(diagnostics.projected['head']['w'], optax.MaskedNode)
  # The head's AdamW decays: without it the head ends elsewhere.
  assert not np.allclose(params['head']['w'], _no_decay_head(loaded),
                         atol=1e-4)


def _no_decay_head(loaded):
  tx = optax.adam(3e-2)
  params = loaded
  state = tx.init(params['head'])
  for t in range(6):
    u, state = tx.update(_grads(params, t)['head'], state, params['head'])
    params = dict(params, head=optax.apply_updates(params['head'], u))
  return params['head']['w']


_BACKBONE = {
    'adamspd': lambda: spd_optax.adamspd(3e-2, weight_decay=1.0),
    'adaml2sp': lambda: spd_optax.adaml2sp(3e-2, weight_decay=1.0),
    'adamftp': lambda: spd_optax.adamftp(3e-2, k=1.0),
}


@pytest.mark.parametrize('method', sorted(_BACKBONE))
def test_a_head_before_the_backbone_in_tree_order(method):
  """Inside ``optax.partition`` the backbone's params hold ``MaskedNode``
  where the other part's leaves are; a part that comes first in the tree's
  order (``aux_head`` < ``backbone``) must not shift the anchors or the
  projection counts against the params (segmentation's auxiliary head)."""
  backbone_tx = _BACKBONE[method]
  opt = optax.partition({'backbone': backbone_tx(),
                         'aux_head': optax.adamw(3e-2, weight_decay=0.1)},
                        _labels)
  loaded = _params(1, head='aux_head')
  state = opt.init(loaded)
  alone_tx = backbone_tx()
  alone_state, alone = alone_tx.init(loaded['backbone']), loaded['backbone']
  params = loaded
  for t in range(6):
    grads = _grads(params, t)
    updates, state = jax.jit(opt.update)(grads, state, params)
    u, alone_state = jax.jit(alone_tx.update)(grads['backbone'], alone_state,
                                              alone)
    jax.tree.map(np.testing.assert_array_equal, updates['backbone'], u)
    params = optax.apply_updates(params, updates)
    alone = optax.apply_updates(alone, u)
  summary = {'adamspd': spd_optax.diagnostics_summary,
             'adamftp': spd_optax.ftp_diagnostics_summary}.get(method)
  if summary is not None:  # The logged numbers: those of the backbone alone.
    jax.tree.map(np.testing.assert_allclose, summary(state),
                 summary(alone_state))
  if method == 'adamspd':
    counts = spd_optax.get_diagnostics(state).num_projected
    jax.tree.map(np.testing.assert_array_equal, counts['backbone'],
                 spd_optax.get_diagnostics(alone_state).num_projected)
    assert sum(int(n) for n in jax.tree.leaves(counts['backbone'])) > 0
