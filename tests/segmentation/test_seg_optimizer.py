"""The backbone-and-head optimizer against the float64 reference.

SPD (or its ablation, or L2-SP) acts on ``params['backbone']`` only; the new
decoder gets plain AdamW; a linear probe leaves the backbone where it is.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import spd_optax
from tests import reference
from train.core import optimizers


def _config(name, *, lr=3e-2, wd=1.0, head_wd=0.1, steps=6, no_decay=()):
  c = ml_collections.ConfigDict()
  c.num_train_steps = steps
  c.optimizer = dict(
      name=name, learning_rate=lr, weight_decay=wd, head_weight_decay=head_wd,
      warmup_steps=0, decay='cosine', b1=0.9, b2=0.999, eps=1e-8,
      grad_clip_norm=0.0, decay_head=True, anchor_dtype='',
      skip_nonfinite=False, max_nonfinite=5, no_decay=no_decay)
  return c


def _params(seed):
  rng = np.random.default_rng(seed)
  shapes = {'backbone': {'a': {'w': (6, 5)}, 'b': (5,), 'norm': (5,)},
            'decode_head': {'w': (5, 3), 'norm': (3,)},
            'auxiliary_head': {'b': (3,)}}
  return jax.tree.map(
      lambda s: jnp.asarray(rng.normal(size=s), jnp.float32), shapes,
      is_leaf=lambda s: isinstance(s, tuple))


def _grads(params, t):
  rng = np.random.default_rng(100 + t)
  return jax.tree.map(
      lambda p: p + jnp.asarray(2 * rng.normal(size=p.shape), jnp.float32),
      params)


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(x, np.float64)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _lr(config, t):
  """The cosine schedule, from its formula (no warmup)."""
  opt = config.optimizer
  return opt.learning_rate * 0.5 * (
      1 + np.cos(np.pi * t / config.num_train_steps))


def _run(config, frozen=False):
  tx = optimizers.make_backbone_and_head_optimizer(
      config, frozen_backbone=frozen)
  params = _params(0)
  state = tx.init(params)
  grads, fired = [], []
  for t in range(config.num_train_steps):
    g = _grads(params, t)
    grads.append(_flat(g))
    updates, state = jax.jit(tx.update)(g, state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    if config.optimizer.name in ('spd', 'projection'):
      fired.append(_flat(jax.tree.map(
          lambda d: d.projected, spd_optax.get_diagnostics(state),
          is_leaf=lambda x: isinstance(
              x, spd_optax.ProjectionDiagnostics))))
  return _flat(params), grads, fired


def _decays(opt, k):
  return not any(p in k for p in opt.get('no_decay', ()))


def _reference(config, grads, *, method):
  """float64: the backbone by ``method``, every other leaf AdamW."""
  opt = config.optimizer
  theta = _flat(_params(0))
  anchor = dict(theta)
  m = {k: np.zeros_like(v) for k, v in theta.items()}
  v = {k: np.zeros_like(x) for k, x in theta.items()}
  history = []
  for t in range(config.num_train_steps):
    lr = _lr(config, t)
    fired = {}
    for k in theta:
      g = grads[t][k]
      if not k.startswith("['backbone']"):  # AdamW, decoupled decay.
        u, m[k], v[k] = reference.adam_update(g, m[k], v[k], t + 1, lr,
                                              opt.b1, opt.b2, opt.eps)
        decay = opt.head_weight_decay * _decays(opt, k)
        theta[k] = theta[k] + u - lr * decay * theta[k]
      elif method == 'frozen':
        pass
      elif method == 'adamw':
        u, m[k], v[k] = reference.adam_update(g, m[k], v[k], t + 1, lr,
                                              opt.b1, opt.b2, opt.eps)
        decay = opt.weight_decay * _decays(opt, k)
        theta[k] = theta[k] + u - lr * decay * theta[k]
      elif method == 'l2sp':
        g = g + opt.weight_decay * (theta[k] - anchor[k])
        u, m[k], v[k] = reference.adam_update(g, m[k], v[k], t + 1, lr,
                                              opt.b1, opt.b2, opt.eps)
        theta[k] = theta[k] + u
      else:
        u, m[k], v[k] = reference.adam_update(g, m[k], v[k], t + 1, lr,
                                              opt.b1, opt.b2, opt.eps)
        theta[k], fired[k], _ = reference.spd_project(
            g, theta[k], theta[k] + u, anchor[k], opt.weight_decay,
            selective=method == 'spd')
    history.append(fired)
  return theta, history


def _close(ours, theirs):
  # float32 against float64 (as the LLM recipe's test: 2e-5 of the scale).
  for k in ours:
    assert np.abs(ours[k] - theirs[k]).max() < 2e-5 * np.abs(
        theirs[k]).max(), k


@pytest.mark.parametrize('name', ['spd', 'projection', 'l2sp'])
def test_backbone_method_and_decoder_adamw_equal_the_reference(name):
  config = _config(name, wd=1.0 if name != 'l2sp' else 0.5)
  ours, grads, fired = _run(config)
  theirs, history = _reference(config, grads, method=name)
  _close(ours, theirs)
  if name in ('spd', 'projection'):
    backbone = [{k: bool(v) for k, v in f.items()
                 if k.startswith("['backbone']")} for f in fired]
    assert backbone == history
    if name == 'spd':
      assert 0 < sum(map(sum, (h.values() for h in history))) < 12
    # The decoder is left out of the projection.
    assert not any(v for f in fired for k, v in f.items()
                   if not k.startswith("['backbone']"))


def test_adamw_leaves_norms_undecayed_as_mmseg():
  config = _config('adamw', wd=0.5, no_decay=('norm',))
  ours, grads, _ = _run(config)
  theirs, _ = _reference(config, grads, method='adamw')
  _close(ours, theirs)
  # With every leaf decayed, the run ends elsewhere; on the norms only.
  decayed, _, _ = _run(_config('adamw', wd=0.5))
  for k in ours:
    assert np.array_equal(ours[k], decayed[k]) == ('norm' not in k), k


def test_linear_probe_keeps_the_backbone_bit_for_bit():
  config = _config('adamw')
  ours, grads, _ = _run(config, frozen=True)
  start = _flat(_params(0))
  theirs, _ = _reference(config, grads, method='frozen')
  for k in ours:
    if k.startswith("['backbone']"):
      np.testing.assert_array_equal(ours[k], start[k])
  _close(ours, theirs)


def test_labels_split_on_the_top_level_key():
  labels = optimizers.top_level_labels()(_params(0))
  assert labels['backbone']['a']['w'] == 'backbone'
  assert labels['decode_head']['w'] == 'head'
  assert labels['auxiliary_head']['b'] == 'head'
  # No backbone (a renamed key): refused, not every leaf on plain AdamW.
  with pytest.raises(ValueError, match=r"'backbone'.*\['decode_head'\]"):
    optimizers.top_level_labels()({'encoder': {'w': 1.0},
                                   'decode_head': {'w': 2.0}})
