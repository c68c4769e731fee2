"""Our ViT/CLIP with imported weights computes what PyTorch computes.

References are ``transformers`` models built from small configs with random
weights (nothing downloaded), saved as safetensors the way the Hub serves
them, then loaded by ``train.vision.pretrained``.
"""

import copy
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train.vision import vit
from train.vision import pretrained

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

SMALL = dict(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=4)


def _images(n=3, size=32, seed=0):
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(
      np.float32)


def _torch_out(model, images):
  with torch.no_grad():
    return model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)))


def _randomize(model, seed=0):
  """HF inits LayerNorms to (1, 0) and some params to 0: perturb them all."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model


@pytest.fixture(scope='module')
def hf_vit(tmp_path_factory):
  config = transformers.ViTConfig(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=64, image_size=32, patch_size=4, num_labels=10,
      hidden_act='gelu')
  model = _randomize(transformers.ViTForImageClassification(config).eval())
  path = str(tmp_path_factory.mktemp('hf_vit'))
  model.save_pretrained(path, safe_serialization=True)
  return model, path


def test_hf_vit_logits_match_pytorch(hf_vit):
  torch_model, path = hf_vit
  ours = vit.VisionTransformer(**SMALL, num_classes=10, image_size=32,
                                  layer_norm_eps=1e-12, rngs=nnx.Rngs(0))
  report = pretrained.load_pretrained(ours, path)
  assert report['kept'] == [] and report['loaded'] == 40
  images = _images()
  expected = _torch_out(torch_model, images).logits.numpy()
  np.testing.assert_allclose(ours(jnp.asarray(images)), expected, atol=1e-4,
                             rtol=1e-4)
  report = pretrained.load_pretrained(ours, path, dont_load=('head',))
  assert report['unused'] == []  # The classifier is a kept (new) head.


def test_hf_vit_model_without_head_and_new_head_kept_fresh(hf_vit, tmp_path):
  torch_model, _ = hf_vit
  base = torch_model.vit  # A ViTModel: names without the 'vit.' prefix.
  base.save_pretrained(str(tmp_path), safe_serialization=True)
  ours = vit.VisionTransformer(**SMALL, num_classes=7, image_size=32,
                                  layer_norm_eps=1e-12, rngs=nnx.Rngs(0))
  head_before = np.asarray(ours.head.kernel[...])
  report = pretrained.load_pretrained(ours, str(tmp_path), dont_load=('head',))
  assert report['kept'] == ['head/bias', 'head/kernel']
  assert report['unused'] == []
  np.testing.assert_array_equal(ours.head.kernel[...], head_before)
  images = _images()
  hidden = _torch_out(base, images).last_hidden_state[:, 0]
  # Our pre-head feature is the final LayerNorm of the class token.
  np.testing.assert_allclose(ours.features(jnp.asarray(images)),
                             hidden.numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('with_projection', [True, False])
def test_hf_clip_features_match_pytorch(tmp_path, with_projection):
  config = transformers.CLIPVisionConfig(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
      intermediate_size=64, image_size=32, patch_size=4, projection_dim=16,
      hidden_act='quick_gelu')
  cls = (transformers.CLIPVisionModelWithProjection if with_projection
         else transformers.CLIPVisionModel)
  torch_model = _randomize(cls(config).eval(), seed=1)
  torch_model.save_pretrained(str(tmp_path), safe_serialization=True)
  ours = vit.VisionTransformer(
      **SMALL, variant='clip', projection_dim=16 if with_projection else 0,
      num_classes=0, image_size=32, rngs=nnx.Rngs(0))
  pretrained.load_pretrained(ours, str(tmp_path))
  images = _images(seed=2)
  out = _torch_out(torch_model, images)
  expected = out.image_embeds if with_projection else out.pooler_output
  np.testing.assert_allclose(ours(jnp.asarray(images)), expected.numpy(),
                             atol=1e-4, rtol=1e-4)


def test_npz_round_trips_with_original_vit_names(tmp_path):
  model = vit.VisionTransformer(**SMALL, num_classes=10, image_size=32,
                                   rngs=nnx.Rngs(0))
  # A head of zeros would hide a mix-up: give it values.
  model.head.kernel[...] = jax.random.normal(jax.random.key(1), (32, 10))
  path = str(tmp_path / 'vit.npz')
  pretrained.save_npz(model, path)
  names = set(np.load(path).files)
  assert 'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel' in names
  assert np.load(path)[
      'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel'
  ].shape == (32, 2, 16)
  assert 'Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel' in names
  assert 'Transformer/posembed_input/pos_embedding' in names
  fresh = vit.VisionTransformer(**SMALL, num_classes=10, image_size=32,
                                   rngs=nnx.Rngs(5))
  pretrained.load_pretrained(fresh, path)
  images = jnp.asarray(_images())
  np.testing.assert_array_equal(fresh(images), model(images))


def test_big_vision_scanned_npz_loads(tmp_path):
  model = vit.VisionTransformer(**SMALL, num_classes=10, image_size=32,
                                   rngs=nnx.Rngs(0))
  path = str(tmp_path / 'vit.npz')
  pretrained.save_npz(model, path)
  flat = dict(np.load(path))
  scanned = {}
  for k, v in flat.items():  # Stack the blocks as big_vision's scan does.
    if k.startswith('Transformer/encoderblock_0/'):
      rest = k.removeprefix('Transformer/encoderblock_0/')
      scanned['Transformer/encoderblock/' + rest] = np.stack(
          [flat[f'Transformer/encoderblock_{i}/' + rest] for i in range(2)])
    elif not k.startswith('Transformer/encoderblock_'):
      scanned['params/' + k] = v
  np.savez(tmp_path / 'scanned.npz', **scanned)
  fresh = vit.VisionTransformer(**SMALL, num_classes=10, image_size=32,
                                   rngs=nnx.Rngs(5))
  report = pretrained.load_pretrained(fresh, str(tmp_path / 'scanned.npz'))
  assert report['unused'] == [] and report['loaded'] == 40
  images = jnp.asarray(_images())
  np.testing.assert_array_equal(fresh(images), model(images))


def test_position_embeddings_resampled_for_a_new_resolution(tmp_path):
  model = vit.VisionTransformer(**SMALL, num_classes=10, image_size=32,
                                   rngs=nnx.Rngs(0))
  path = str(tmp_path / 'vit.npz')
  pretrained.save_npz(model, path)
  bigger = vit.VisionTransformer(**SMALL, num_classes=10, image_size=48,
                                    rngs=nnx.Rngs(1))
  pretrained.load_pretrained(bigger, path)
  old = np.asarray(model.pos_embedding[...])
  new = np.asarray(bigger.pos_embedding[...])
  assert new.shape == (1, 1 + 12 * 12, 32)
  np.testing.assert_array_equal(new[:, 0], old[:, 0])  # Class token kept.
  # Bilinear resampling keeps the mean of a smooth grid's values.
  np.testing.assert_allclose(new[:, 1:].mean(), old[:, 1:].mean(), atol=5e-3)
  assert np.isfinite(np.asarray(bigger(jnp.asarray(_images(size=48))))).all()


def test_mismatch_names_the_leaf_and_both_shapes(tmp_path):
  model = vit.VisionTransformer(**SMALL, num_classes=10, image_size=32,
                                   rngs=nnx.Rngs(0))
  path = str(tmp_path / 'vit.npz')
  pretrained.save_npz(model, path)
  wider = vit.VisionTransformer(**dict(SMALL, mlp_dim=96), num_classes=10,
                                   image_size=32, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"MlpBlock_3/Dense_0/bias' has shape"
                     r" \(64,\) but our leaf 'blocks/0/mlp/fc1/bias' has shape"
                     r" \(96,\)"):
    pretrained.load_pretrained(wider, path)
  deeper = vit.VisionTransformer(**dict(SMALL, depth=3), num_classes=10,
                                    image_size=32, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"'blocks/2/.*' .*has no tensor"):
    pretrained.load_pretrained(deeper, path)
  with pytest.raises(FileNotFoundError, match='missing.npz'):
    pretrained.load_pretrained(model, str(tmp_path / 'missing.npz'))
  os.makedirs(tmp_path / 'empty')
  with pytest.raises(ValueError, match='no \\*.safetensors'):
    pretrained.load_pretrained(model, str(tmp_path / 'empty'))


def test_lora_adapters_start_as_the_identity_and_are_lora_params():
  plain = vit.VisionTransformer(**SMALL, num_classes=10, image_size=32,
                                   rngs=nnx.Rngs(0))
  lora = vit.VisionTransformer(**SMALL, num_classes=10, image_size=32,
                                  lora_rank=4, lora_alpha=8.0,
                                  rngs=nnx.Rngs(0))
  nnx.update(lora, nnx.state(plain))  # The same base weights.
  images = jnp.asarray(_images())
  np.testing.assert_allclose(lora.features(images), plain.features(images),
                             atol=1e-6)
  lora_leaves = jax.tree.leaves(nnx.state(lora, nnx.LoRAParam))
  assert len(lora_leaves) == 2 * 2 * 6  # (a, b) x depth x 6 projections.
  # Training only the adapters changes the output once B moves.
  lora.blocks[0].mlp.fc1.lora.lora_b[...] = jnp.ones_like(
      lora.blocks[0].mlp.fc1.lora.lora_b[...])
  assert not np.allclose(lora.features(images), plain.features(images),
                         atol=1e-3)


def test_drop_path_is_identity_at_eval_and_random_in_training():
  model = vit.VisionTransformer(**SMALL, num_classes=10, image_size=32,
                                   drop_path_rate=0.5, rngs=nnx.Rngs(0))
  model.head.kernel[...] = jnp.ones_like(model.head.kernel[...])
  images = jnp.asarray(_images(n=8))
  eval_out = model(images)
  np.testing.assert_array_equal(model(images, train=False), eval_out)
  a = model(images, train=True, dropout_key=jax.random.key(0))
  b = model(images, train=True, dropout_key=jax.random.key(1))
  assert not np.allclose(a, eval_out) and not np.allclose(a, b)


def test_unknown_model_name_is_refused():
  with pytest.raises(ValueError, match="Unknown model 'b/15'"):
    vit.get_model_kwargs('b/15')


def _float64_vit(**kwargs):
  return vit.VisionTransformer(**SMALL, image_size=32, layer_norm_eps=1e-12,
                                  param_dtype=jnp.float64, rngs=nnx.Rngs(0),
                                  **kwargs)


def test_float64_model_matches_pytorch_in_float64(hf_vit):
  """param_dtype=float64: every param and the logits are float64, and they
  match transformers' ViT run in float64 on the same weights to 1e-12
  (measured 3e-16; a float32 model misses by 1e-7, and a float64 one with
  jax.nn.dot_product_attention's float32 softmax by 5e-9)."""
  torch_model, path = hf_vit
  reference = copy.deepcopy(torch_model).double()
  images = _images().astype(np.float64)
  expected = _torch_out(reference, images).logits.numpy()
  assert expected.dtype == np.float64
  with jax.enable_x64(True):
    ours = _float64_vit(num_classes=10)
    pretrained.load_pretrained(ours, path)
    dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(ours, nnx.Param))}
    logits = np.asarray(ours(jnp.asarray(images)))
  assert dtypes == {np.dtype(np.float64)}
  assert logits.dtype == np.float64
  np.testing.assert_allclose(logits, expected, rtol=1e-10, atol=1e-12)


def test_float64_params_without_x64_are_refused():
  with pytest.raises(ValueError, match='param_dtype=float64.*jax_enable_x64'):
    _float64_vit(num_classes=10)


def test_attention_key_bias_has_a_zero_gradient():
  """What spd_optax.KEY_BIAS_PATTERN is for: in float64 the loss's gradient
  w.r.t. every attention key bias is zero to rounding, while the query bias's
  is not; and the pattern names exactly those leaves of our ViT."""
  import spd_optax  # pylint: disable=g-import-not-at-top
  with jax.enable_x64(True):
    model = _float64_vit(num_classes=10)
    rng = np.random.default_rng(0)
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(
        lambda x: x + 0.1 * rng.normal(size=x.shape), state))
    images = jnp.asarray(_images().astype(np.float64))
    grads = nnx.grad(lambda m: jnp.sum(m(images) ** 2))(model)
    for block in grads['blocks'].values():
      key_bias = np.abs(np.asarray(block['attn']['key']['bias'][...])).max()
      query_bias = np.abs(np.asarray(block['attn']['query']['bias'][...])).max()
      assert query_bias > 1e-3 and key_bias < 1e-12 * query_bias
    mask = spd_optax.exclude_paths(spd_optax.KEY_BIAS_PATTERN)(state)
    left_out = sorted(
        jax.tree_util.keystr(p)
        for p, keep in jax.tree_util.tree_flatten_with_path(mask)[0]
        if not keep)
  assert left_out == [f"['blocks'][{i}]['attn']['key']['bias'].value"
                      for i in range(SMALL['depth'])]
