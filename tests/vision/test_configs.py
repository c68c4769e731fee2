"""Every config loads, names a known model and optimizer, and runs its input."""

import glob
import importlib
import os

import pytest

from configs import common
from train.vision import vit
from train.core import optimizers

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The ViT recipe's configs: every one but the shared base and the other
# recipes' (each tested with its recipe).
OTHER_RECIPES = {'common', 'commonsense', 'demo', 'vqa', 'segmentation'}
TRAIN_CONFIGS = sorted(
    os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, 'configs',
                                                             '*.py'))
    if not os.path.basename(p).startswith('_')
    and os.path.basename(p)[:-3] not in OTHER_RECIPES)


def _keys(config, prefix=''):
  out = set()
  for k, v in config.items():
    if hasattr(v, 'items') and k != 'ood':
      out |= _keys(v, f'{prefix}{k}.')
    else:
      out.add(prefix + k)
  return out


@pytest.mark.parametrize('name', TRAIN_CONFIGS)
def test_config_is_complete_and_valid(name):
  module = importlib.import_module(f'configs.{name}')
  config = module.get_config()
  assert module.__doc__ and 'python -m train --config configs/' in module.__doc__
  assert _keys(config) == _keys(common.base_config())  # No typos, no gaps.
  vit.get_model_kwargs(config.model.name)
  assert config.optimizer.name in optimizers.METHODS
  assert config.dataset.num_classes == config.model.num_classes
  for ood in config.dataset.ood.values():
    assert set(ood) == {'name', 'split'}


def test_domainnet_refuses_an_unknown_domain():
  from configs import domainnet_clip  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match='domain must be one of'):
    domainnet_clip.get_config('cartoons')
  assert 'real' in domainnet_clip.get_config('sketch').dataset.ood
