"""The recipe's model set-up from a Hugging Face folder: a Swin backbone
under a new UperNet head sized by the config, the head left fresh and named;
the loaded backbone is what the optimizer anchors at."""

import json
import os

import jax
import numpy as np
import safetensors.numpy

from configs import segmentation as seg_configs
from tests.segmentation import seg_helpers
from train.core import optimizers
from train.segmentation import loop
from train.segmentation import steps


def test_backbone_folder_under_a_new_head(tmp_path):
  folder = seg_helpers.save(seg_helpers.swin_model('model', seed=3),
                            str(tmp_path / 'swin'))
  config = seg_configs.get_config('spd')
  config.model.path = folder
  config.data.num_classes = 5
  config.model.decode_channels = 24
  config.model.auxiliary_channels = 8
  model, report = loop.make_model(config, seed=0)
  assert model.config.hidden_size == 24 and model.config.num_labels == 5
  assert model.config.backbone.drop_path_rate == 0.3  # mmseg's, not HF's.
  # A SwinModel folder has no per-stage output norms (SwinBackbone's): they
  # start fresh with the head, and are named.
  assert report['fresh'] and all(
      not k.startswith('backbone') or k.startswith(
          'backbone.hidden_states_norms') for k in report['fresh'])
  assert any(k.startswith('decode_head') for k in report['fresh'])
  # The anchor SPD keeps is the loaded backbone.
  _, params, _, _ = steps.split(model)
  tx = optimizers.make_backbone_and_head_optimizer(config)
  state = steps.initial_opt_state(tx, params)
  with open(os.path.join(folder, 'config.json')) as f:
    assert json.load(f)['model_type'] == 'swin'
  tensors = safetensors.numpy.load_file(os.path.join(folder,
                                                     'model.safetensors'))
  hf = tensors['embeddings.patch_embeddings.projection.weight']  # OIHW
  ours = params['backbone']['embeddings']['patch_embeddings']['projection'][
      'kernel']  # HWIO
  np.testing.assert_array_equal(ours, hf.transpose(2, 3, 1, 0))
  anchors = [x for x in jax.tree.leaves(state) if getattr(x, 'shape', None)
             == ours.shape]
  assert any(np.array_equal(a, ours) for a in anchors)
