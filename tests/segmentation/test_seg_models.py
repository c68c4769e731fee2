"""Swin + UperNet against ``transformers``, and the loader's checks.

The references are ``transformers``' own PyTorch models
(``UperNetForSemanticSegmentation`` with a Swin backbone, ``SwinBackbone``,
``SwinModel``, ``SwinForImageClassification``), tiny and random, saved as
safetensors and read by our loader (``seg_helpers``). 61 x 75 images pad at
the patch, at the windows and at patch merging; 64 x 64 ones nowhere. The
tolerance, 1e-4 in float32, is a few hundred float32 roundings of O(1)
activations through a dozen layers.
"""

import dataclasses
import json
import os
import shutil

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from tests.segmentation import seg_helpers
from train.segmentation import pretrained
from train.segmentation import swin
from train.segmentation import upernet

TOL = 1e-4
SIZES = [(61, 75), (64, 64)]
# The head of seg_helpers' UperNet, for backbone folders read under it.
HEAD = {k: v for k, v in seg_helpers.HEAD.items()
        if k != 'use_auxiliary_head'}


_BUILT = {}


def build(config: upernet.SegConfig) -> upernet.UperNet:
  """An ``UperNet(config)`` with random values drawn by NumPy.

  Eager initialisation compiles one XLA program per parameter shape (half
  a minute on this machine); the loader overwrites the values anyway, so the
  tests build the model abstractly and fill it on the host, once per config
  (``test_initialised_model_runs`` covers the real initialisation).
  """
  if config not in _BUILT:
    model = nnx.eval_shape(lambda: upernet.UperNet(config, rngs=nnx.Rngs(0)))
    state = nnx.state(model)
    rng = np.random.default_rng(0)
    for path, var in nnx.to_flat_state(state):
      shape, dtype = var.get_value().shape, var.get_value().dtype
      if isinstance(var, nnx.RngKey):
        var.set_value(jax.random.key(0))
      elif path[-1] in ('scale', 'var'):
        var.set_value(jnp.ones(shape, dtype))
      elif path[-1] in ('bias', 'mean', 'count'):
        var.set_value(jnp.zeros(shape, dtype))
      else:
        var.set_value(jnp.asarray(0.1 * rng.normal(size=shape), dtype))
    nnx.update(model, state)
    _BUILT[config] = model
  return nnx.clone(_BUILT[config])


def test_initialised_model_runs():
  """The real initialisation, traced as one program (``upernet.create``)."""
  config = upernet.SegConfig(
      num_labels=3, hidden_size=8, auxiliary_channels=8,
      backbone=swin.SwinConfig(embed_dim=8, depths=(1, 1, 1),
                               num_heads=(1, 1, 2), window_size=2))
  model = upernet.create(config, seed=0)
  kernel = np.asarray(model.backbone.encoder.layers[2].blocks[0].mlp.fc1
                      .kernel[...])
  assert kernel.shape == (32, 128) and 0.015 < kernel.std() < 0.025  # 0.02
  assert np.abs(kernel).max() <= 2 * 0.02 + 1e-6  # truncated at 2 sigma
  table = model.backbone.encoder.layers[2].blocks[0].attention
  assert table.relative_position_bias.relative_position_bias_table.shape == (
      9, 2)
  params = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
  assert all(np.all(np.isfinite(np.asarray(v.get_value())))
             for _, v in nnx.to_flat_state(params))
  assert model.auxiliary_head.classifier.kernel.shape == (1, 1, 8, 3)
  # The same keys as eager construction: one leaf drawn eagerly agrees.
  eager = swin.SwinConfig(embed_dim=8, depths=(1,), num_heads=(1,),
                          window_size=2)
  first = swin.Swin(eager, rngs=nnx.Rngs(0)).embeddings.patch_embeddings
  np.testing.assert_allclose(
      np.asarray(model.backbone.embeddings.patch_embeddings.projection
                 .kernel[...]),
      np.asarray(first.projection.kernel[...]), rtol=1e-5, atol=1e-7)
  assert int(model.dropout_rngs.count[...]) == 0


@nnx.jit(static_argnames='deterministic')
def _forward(model, images, deterministic=True, dropout_key=None):
  out = model(images, deterministic=deterministic, dropout_key=dropout_key)
  out['features'] = model.backbone(images)
  return out


@pytest.fixture(scope='module')
def whole(tmp_path_factory):
  """(torch UperNet, its folder, our model loaded from it, report)."""
  reference = seg_helpers.upernet(num_labels=5, seed=1)
  folder = seg_helpers.save(reference,
                            str(tmp_path_factory.mktemp('upernet')))
  model = build(pretrained.read_config(folder, num_labels=5))
  report = pretrained.load(folder, model)
  return reference, folder, model, report


@pytest.mark.parametrize('size', SIZES, ids=lambda s: f'{s[0]}x{s[1]}')
def test_features_and_logits_equal_transformers(whole, size):
  reference, _, model, _ = whole
  images = seg_helpers.pixels(*size)
  ours = _forward(model, jnp.asarray(images))
  features = seg_helpers.torch_features(reference.backbone, images)
  assert len(ours['features']) == 4
  for i, (a, b) in enumerate(zip(ours['features'], features)):
    assert a.shape == b.shape, i
    np.testing.assert_allclose(np.asarray(a), b, atol=TOL, rtol=0,
                               err_msg=f'stage {i + 1}')
  expected = seg_helpers.torch_logits(reference, images)
  for key in ('logits', 'auxiliary_logits'):
    assert ours[key].shape == (2, *size, 5)
    np.testing.assert_allclose(np.asarray(ours[key]), expected[key],
                               atol=TOL, rtol=0, err_msg=key)


def test_whole_folder_loads_every_tensor(whole):
  reference, _, model, report = whole
  leaves = _leaves(model)
  assert report['kind'] == 'upernet'
  assert report['fresh'] == []
  assert sorted(report['loaded']) == sorted(leaves)
  # Every tensor transformers holds is either loaded or skipped by name.
  bn = [k for k in reference.state_dict() if k.endswith('num_batches_tracked')]
  skipped = [s.split(' ')[0] for s in report['skipped']]
  assert set(bn) <= set(skipped)
  assert 'backbone.swin.layernorm.weight' in skipped
  n_tensors = len(safetensors.numpy.load_file(
      os.path.join(whole[1], 'model.safetensors')))
  assert len(report['loaded']) + len(report['skipped']) == n_tensors
  # BatchNorm's running statistics are loaded, not left at 0 / 1.
  mean = model.decode_head.fpn_bottleneck.batch_norm.mean[...]
  np.testing.assert_array_equal(
      np.asarray(mean),
      reference.decode_head.fpn_bottleneck.batch_norm.running_mean.numpy())


def test_train_mode_equals_transformers_train_mode(whole):
  """BatchNorm on the batch's statistics (drop path 0 here), as torch's
  ``train()``; the running means move as torch's (momentum 0.1)."""
  import torch  # pylint: disable=g-import-not-at-top
  reference, folder, _, _ = whole
  model = build(pretrained.read_config(folder, num_labels=5))
  pretrained.load(folder, model)
  images = seg_helpers.pixels(61, 75, seed=3)
  ours = _forward(model, jnp.asarray(images), deterministic=False)
  train_ref = seg_helpers.upernet(num_labels=5, seed=1).train()
  with torch.no_grad():
    logits = train_ref(torch.from_numpy(images.transpose(0, 3, 1, 2))).logits
  np.testing.assert_allclose(np.asarray(ours['logits']),
                             logits.numpy().transpose(0, 2, 3, 1),
                             atol=TOL, rtol=0)
  np.testing.assert_allclose(
      np.asarray(model.decode_head.bottleneck.batch_norm.mean[...]),
      train_ref.decode_head.bottleneck.batch_norm.running_mean.numpy(),
      atol=1e-5, rtol=0)


def _leaves(model) -> dict[str, tuple[int, ...]]:
  """``{'a.b.0.kernel': shape}`` of the params and BatchNorm statistics."""
  state = nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat))
  return {'.'.join(map(str, path)): tuple(v.get_value().shape)
          for path, v in nnx.to_flat_state(state)}


def _layer_norm(x, eps=1e-5):
  x = x.astype(np.float64)
  mean = x.mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(x.var(-1, keepdims=True) + eps)


@pytest.mark.parametrize('kind', ['model', 'classification', 'backbone'])
def test_backbone_folder_loads_under_a_fresh_head(tmp_path, kind):
  import torch  # pylint: disable=g-import-not-at-top
  reference = seg_helpers.swin_model(kind, seed=2)
  folder = seg_helpers.save(reference, str(tmp_path))
  config = pretrained.read_config(folder, num_labels=5, **HEAD)
  model = build(config)
  fresh_head = np.asarray(model.decode_head.classifier.kernel[...]).copy()
  report = pretrained.load(folder, model)
  assert report['kind'] == 'swin backbone'
  leaves = _leaves(model)
  heads = {k for k in leaves if k.startswith(('decode_head.',
                                               'auxiliary_head.'))}
  norms = {k for k in leaves if k.startswith('backbone.hidden_states_norms')}
  expected_fresh = heads | (set() if kind == 'backbone' else norms)
  assert set(report['fresh']) == expected_fresh
  assert set(report['loaded']) == set(leaves) - expected_fresh
  np.testing.assert_array_equal(
      np.asarray(model.decode_head.classifier.kernel[...]), fresh_head)
  skipped = ' '.join(report['skipped'])
  if kind == 'classification':
    assert 'classifier.weight' in skipped and 'classifier.bias' in skipped
  if kind != 'backbone':
    assert 'layernorm.weight' in skipped
  # The backbone computes what transformers' does: its stage outputs,
  # through the stage norms (fresh: scale 1, bias 0, for two kinds).
  images = seg_helpers.pixels(61, 75, seed=4)
  ours = _forward(model, jnp.asarray(images))['features']
  swin_model = reference if kind == 'model' else reference.swin
  with torch.no_grad():
    states = swin_model(
        torch.from_numpy(images.transpose(0, 3, 1, 2)), always_partition=True,
        output_hidden_states=True,
        output_hidden_states_before_downsampling=True).reshaped_hidden_states
  for i, state in enumerate(states[1:]):
    state = state.numpy().transpose(0, 2, 3, 1)
    if kind == 'backbone':
      norm = reference.hidden_states_norms[f'stage{i + 1}']
      expected = (_layer_norm(state) * norm.weight.detach().numpy()
                  + norm.bias.detach().numpy())
    else:
      expected = _layer_norm(state)
    np.testing.assert_allclose(np.asarray(ours[i]), expected, atol=TOL,
                               rtol=0, err_msg=f'stage {i + 1}')


def test_config_round_trips_through_transformers(tmp_path):
  """``to_hf`` builds the same model in ``transformers`` and ``from_hf``
  reads it back; the folder it saves loads 1:1 into ``UperNet(config)``."""
  import transformers  # pylint: disable=g-import-not-at-top
  config = upernet.SegConfig.tiny(num_labels=4)
  assert upernet.SegConfig.from_hf(config.to_hf(), where='x') == config
  hf = transformers.UperNetConfig(**config.to_hf())
  reference = transformers.UperNetForSemanticSegmentation(hf)
  reference.save_pretrained(str(tmp_path))
  assert pretrained.read_config(str(tmp_path), num_labels=4) == config
  model = build(config)
  report = pretrained.load(str(tmp_path), model)
  assert report['fresh'] == [] and report['loaded']


@pytest.mark.parametrize('size', ['tiny', 'small', 'base', 'large'])
def test_swin_sizes(size):
  config = swin.SwinConfig.of_size(size)
  assert config.channels[-1] == 8 * config.embed_dim
  assert len(config.depths) == 4 and config.window_size == 7


def test_drop_path_zeroes_whole_examples_and_keeps_the_mean():
  x = jnp.ones((4000, 3, 2))
  y = np.asarray(swin.drop_path(x, 0.25, jax.random.key(0)))
  per_example = y.reshape(4000, -1)
  assert np.all(per_example == per_example[:, :1])  # whole examples
  np.testing.assert_allclose(np.unique(y), [0.0, 1.0 / 0.75], rtol=1e-6)
  assert abs(y.mean() - 1.0) < 0.05  # E[y] = x
  assert swin.drop_path(x, 0.25, None) is x  # deterministic: identity


def test_drop_path_in_training_depends_on_the_key():
  config = upernet.SegConfig.tiny(num_labels=4)
  model = build(config).backbone
  assert config.backbone.drop_path_rate > 0
  images = jnp.asarray(seg_helpers.pixels(16, 16, batch=8))

  @nnx.jit
  def features(model, key):
    return model(images, deterministic=False, dropout_key=key)[-1]

  a, b = features(model, jax.random.key(1)), features(model, jax.random.key(2))
  again = features(model, jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(again))
  assert not np.allclose(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match='dropout_key'):
    model(images, deterministic=False)


# -- Refusals ------------------------------------------------------------------


def _copy(folder, tmp_path, edit) -> str:
  """A copy of ``folder`` whose tensors ``edit`` changed."""
  out = str(tmp_path / 'edited')
  shutil.copytree(folder, out)
  path = os.path.join(out, 'model.safetensors')
  tensors = safetensors.numpy.load_file(path)
  edit(tensors)
  safetensors.numpy.save_file(tensors, path, metadata={'format': 'pt'})
  return out


def _model(folder, **overrides):
  config = pretrained.read_config(folder, num_labels=5)
  return build(dataclasses.replace(config, **overrides))


def test_missing_folder_and_files_are_named(tmp_path, whole):
  missing = str(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='nowhere'):
    pretrained.load(missing, whole[2])
  with pytest.raises(FileNotFoundError, match='config.json'):
    pretrained.read_config(str(tmp_path), num_labels=5)
  (tmp_path / 'config.json').write_text('{}')
  with pytest.raises(FileNotFoundError, match=r'No \*\.safetensors'):
    pretrained.load(str(tmp_path), whole[2])


def test_shape_mismatch_names_file_tensor_leaf_and_shapes(whole):
  folder = whole[1]
  model = _model(folder, num_labels=4)
  with pytest.raises(ValueError) as e:
    pretrained.load(folder, model)
  message = str(e.value)
  assert "'decode_head.classifier.weight'" in message
  assert 'model.safetensors' in message
  assert "'decode_head.classifier.kernel'" in message
  assert '(5, 32, 1, 1)' in message and '(1, 1, 32, 4)' in message


def test_non_finite_tensor_is_refused_by_name(whole, tmp_path):
  name = 'backbone.encoder.layers.1.blocks.0.intermediate.dense.weight'

  def poison(tensors):
    tensors[name][0, 0] = np.nan
  folder = _copy(whole[1], tmp_path, poison)
  with pytest.raises(ValueError, match=f"{name}.*model.safetensors.*NaN"):
    pretrained.load(folder, _model(folder))


def test_unknown_and_missing_tensors_are_named(whole, tmp_path):
  def extra(tensors):
    tensors['decode_head.extra.weight'] = np.zeros(3, np.float32)
    del tensors['decode_head.fpn_convs.1.conv.weight']
  folder = _copy(whole[1], tmp_path, extra)
  with pytest.raises(ValueError) as e:
    pretrained.load(folder, _model(folder))
  assert "'decode_head.extra.weight'" in str(e.value)
  assert 'decode_head.fpn_convs.1.conv.kernel' in str(e.value)


@pytest.mark.parametrize('key,value,named', [
    ('model_type', 'resnet', 'backbone_config.model_type'),
    ('use_absolute_embeddings', True, 'use_absolute_embeddings'),
    ('hidden_act', 'relu', 'hidden_act'),
    ('hidden_dropout_prob', 0.1, 'hidden_dropout_prob'),
    ('out_features', ['stage2', 'stage3', 'stage4'], 'out_features'),
])
def test_unsupported_config_is_refused_naming_the_key(key, value, named):
  hf = upernet.SegConfig.tiny(num_labels=3).to_hf()
  hf['backbone_config'][key] = value
  with pytest.raises(ValueError, match=named):
    upernet.SegConfig.from_hf(hf, where='config.json')


def test_label_count_mismatch_is_refused(whole):
  with pytest.raises(ValueError, match='5 labels'):
    pretrained.read_config(whole[1], num_labels=7)


def test_config_json_of_an_unknown_model_is_refused(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'vit'}))
  with pytest.raises(ValueError, match="model_type='vit'"):
    pretrained.read_config(str(tmp_path), num_labels=3)


@pytest.mark.slow
def test_swin_tiny_upernet_folder_fits_the_real_size(tmp_path):
  """The published setting's shapes: ``transformers``' UperNet on a Swin-T
  (``microsoft/swin-tiny-patch4-window7-224``'s config, 150 labels as
  ``openmmlab/upernet-swin-tiny``) saved and planned against our abstract
  model: every tensor has a leaf of its shape (nothing is read: 240 MB)."""
  import transformers  # pylint: disable=g-import-not-at-top
  backbone = transformers.SwinConfig(
      embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
      window_size=7, out_features=['stage1', 'stage2', 'stage3', 'stage4'])
  reference = transformers.UperNetForSemanticSegmentation(
      transformers.UperNetConfig(backbone_config=backbone, num_labels=150))
  reference.save_pretrained(str(tmp_path))
  config = pretrained.read_config(str(tmp_path), num_labels=150)
  assert config.backbone == swin.SwinConfig.of_size('tiny')
  model = nnx.eval_shape(lambda: upernet.UperNet(config, rngs=nnx.Rngs(0)))
  leaves = _leaves(model)
  report = pretrained.plan_load(str(tmp_path), model)
  assert report['fresh'] == [] and len(report['loaded']) == len(leaves)
  ours = sum(int(np.prod(shape)) for k, shape in leaves.items()
             if not k.endswith(('.mean', '.var')))
  theirs = sum(p.numel() for n, p in reference.named_parameters()
               if not n.startswith('backbone.swin.layernorm'))
  assert ours == theirs
