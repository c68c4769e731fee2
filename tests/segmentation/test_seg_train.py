"""The segmentation train step, the config checks and the evaluation.

A few SPD steps of the real train step (tiny Swin + UperNet, BatchNorm on
batch statistics, drop path) move the backbone as the float64 reference
does, given the gradients the optimizer received, while the decoder gets
plain AdamW; a linear probe leaves the backbone bit for bit.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import spd_optax
from configs import segmentation as seg_configs
from tests import reference
from train.core import optimizers
from train.segmentation import checks
from train.segmentation import evaluate
from train.segmentation import loop
from train.segmentation import smoke
from train.segmentation import steps


def _capturing(tx):
  """``tx`` after a link that keeps the gradients it is given in its state."""
  keep = optax.GradientTransformation(
      lambda params: jax.tree.map(jnp.zeros_like, params),
      lambda updates, state, params=None: (updates, updates))
  return optax.chain(keep, tx)


def _config(name, **opt):
  config = seg_configs.get_config('smoke')
  config.optimizer.name = name
  config.optimizer.update(opt)
  config.num_train_steps = 5
  config.optimizer.warmup_steps = 0
  return config


def _batches(num, seed=0):
  rng = np.random.default_rng(seed)
  for _ in range(num):
    label = rng.integers(0, 11, (2, 32, 32)).astype(np.uint8)
    label[:, :4] = 255  # Some ignored pixels.
    yield {'image': rng.integers(0, 256, (2, 32, 32, 3)).astype(np.uint8),
           'label': label}


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(x, np.float64)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _run(config, frozen=False):
  model, _ = loop.make_model(config, seed=0)
  graphdef, params, stats, rest = steps.split(model)
  tx = _capturing(optimizers.make_backbone_and_head_optimizer(
      config, frozen_backbone=frozen))
  opt_state = steps.initial_opt_state(tx, params)
  step = steps.make_train_step(graphdef, tx, aux_weight=0.4, spd=not frozen)
  start = _flat(params)
  grads, fired, outs = [], [], []
  for i, batch in enumerate(_batches(config.num_train_steps)):
    params, stats, opt_state, out = step(params, stats, opt_state, rest,
                                         batch, jax.random.key(i))
    grads.append(_flat(opt_state[0]))
    outs.append(jax.device_get(out))
    if not frozen:
      fired.append(_flat(jax.tree.map(
          lambda d: d.projected, spd_optax.get_diagnostics(opt_state),
          is_leaf=lambda x: isinstance(x, spd_optax.ProjectionDiagnostics))))
  return start, _flat(params), grads, fired, outs


def _lr(config, t):
  return config.optimizer.learning_rate * (1 - t / config.num_train_steps)


def test_spd_on_the_backbone_adamw_on_the_decoder_equal_the_reference():
  config = _config('spd', learning_rate=1e-2, weight_decay=1.0,
                   head_weight_decay=0.1)
  start, ours, grads, fired, outs = _run(config)
  opt = config.optimizer
  theta = dict(start)
  m = {k: np.zeros_like(v) for k, v in theta.items()}
  v = {k: np.zeros_like(x) for k, x in theta.items()}
  history = []
  for t in range(config.num_train_steps):
    lr, row = _lr(config, t), {}
    for k in theta:
      u, m[k], v[k] = reference.adam_update(grads[t][k], m[k], v[k], t + 1,
                                            lr, opt.b1, opt.b2, opt.eps)
      if k.startswith("['backbone']"):
        theta[k], row[k], _ = reference.spd_project(
            grads[t][k], theta[k], theta[k] + u, start[k], opt.weight_decay)
      else:  # AdamW's decoupled decay on the new decoder, not its norms.
        decays = not any(re.search(p, k) for p in opt.no_decay)
        decay = opt.head_weight_decay * decays
        theta[k] = theta[k] + u - lr * decay * theta[k]
    history.append(row)
  for k in ours:  # float32 steps against float64.
    scale = max(np.abs(theta[k]).max(), 1e-3)
    assert np.abs(ours[k] - theta[k]).max() < 2e-5 * scale, k
  got = [{k: bool(x) for k, x in f.items() if k.startswith("['backbone']")}
         for f in fired]
  assert got == history
  assert 0 < sum(map(sum, (h.values() for h in history)))  # SPD fired.
  assert not any(x for f in fired for k, x in f.items()
                 if not k.startswith("['backbone']"))
  assert all(np.isfinite(o['train/loss']) for o in outs)
  assert 'train/spd_projected_fraction' in outs[0]


@pytest.mark.slow  # A second compilation of the train step (~40 s).
def test_linear_probe_trains_the_decoder_only():
  config = _config('adamw')
  start, ours, _, _, _ = _run(config, frozen=True)
  moved = [k for k in ours if not np.array_equal(ours[k], start[k])]
  assert moved and all(not k.startswith("['backbone']") for k in moved)
  assert any(k.startswith("['decode_head']") for k in moved)


def test_loss_is_mmsegs_mean_over_all_pixels():
  logits = jnp.array([[[[2.0, 0.0], [0.0, 0.0]]]])  # [1, 1, 2, 2]
  labels = jnp.array([[[0, 255]]])
  ce = -np.log(np.exp(2) / (np.exp(2) + 1))
  assert float(steps.pixel_loss(logits, labels)) == pytest.approx(ce / 2)


def test_bad_configs_are_refused_by_key():
  config = seg_configs.get_config('spd')
  config.data.num_classes = 300
  config.corruptions.names = ('fog', 'snow')
  config.data.slide_stride = 600
  config.train_mode = 'probe'
  config.corruptions.severities = ()  # The table would hold NaN means.
  config.optimizer.no_decay = ('norm', '(')  # Not a regular expression.
  with pytest.raises(ValueError) as e:
    checks.check(config, num_devices=1)
  message = str(e.value)
  for key in ('data.num_classes=300', 'corruptions.names', 'model.path',
              'data.dir', 'data.slide_stride=600', "train_mode='probe'",
              'corruptions.severities=()', 'optimizer.no_decay'):
    assert key in message, key
  checks.check(seg_configs.get_config('smoke'), num_devices=1)
  with pytest.raises(ValueError, match='smoke'):
    seg_configs.get_config('nope')


def test_slide_windows_average_overlaps():
  seen = []

  def forward(x):
    seen.append(x.shape[1:3])
    return np.ones(x.shape[:3] + (2,), np.float32) * len(seen)

  out = evaluate.slide_logits(forward, np.zeros((5, 7, 3), np.uint8), 4, 3,
                              2)
  # Windows: rows (0,4),(1,5); columns (0,4),(3,7): four calls, 1..4.
  assert seen == [(4, 4)] * 4
  assert out[0, 0, 0, 0] == 1.0  # Only the first window.
  assert out[0, 4, 6, 0] == 4.0  # Only the last.
  assert out[0, 2, 3, 0] == pytest.approx((1 + 2 + 3 + 4) / 4)


@pytest.mark.slow  # Compiles the evaluation (~25 s).
def test_slide_with_one_window_equals_whole_image(tmp_path):
  """Whole-image and sliding-window evaluation of the same model agree
  where one window covers the image; every labelled pixel is counted."""
  smoke.write(str(tmp_path), num_train=1, num_val=2)
  config = seg_configs.get_config('smoke')
  model, _ = loop.make_model(config, seed=0)
  graphdef, params, stats, rest = steps.split(model)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  ev = evaluate.Evaluator(graphdef, config, str(tmp_path),
                          ['val_00000', 'val_00001'], mesh)
  whole = ev.confusion(params, stats, rest)
  config.data.eval_mode = 'slide'
  config.data.slide_crop = config.data.slide_stride = 48
  np.testing.assert_array_equal(ev.confusion(params, stats, rest), whole)
  assert whole.sum() == 2 * 48 * 48  # No pixel of the scenes is ignored.


@pytest.mark.parametrize('variant', seg_configs.VARIANTS)
def test_every_variant_is_a_valid_config(variant):
  config = seg_configs.get_config(variant)
  config.model.path, config.data.dir = '/w', '/d'
  checks.check(config, num_devices=1)
  frozen = config.train_mode == 'linear_probe'
  assert frozen == (variant == 'linear_probe')
  if variant not in ('linear_probe', 'smoke'):
    assert config.optimizer.name == variant
