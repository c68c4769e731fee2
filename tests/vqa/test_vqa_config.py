"""configs/vqa.py: the paper's setting, its variants, and bad values refused
by name (train.vqa.checks); the schedule's warmup from and decay to 1e-4."""

import numpy as np
import pytest

from configs import vqa
from train.core import optimizers
from train.vqa import checks


def test_paper_setting():
  config = vqa.get_config('paligemma_3b,spd')
  assert config.model.lora.rank == 8
  assert tuple(config.model.lora.targets) == ('q_proj', 'k_proj', 'v_proj',
                                              'o_proj')
  assert config.optimizer.name == 'spd'
  assert config.optimizer.weight_decay == 1e-4
  assert (config.batch_size, config.micro_batch_size) == (32, 16)
  # 10 epochs of the rows left after the held-out part, 32 rows a step.
  assert config.num_train_steps == int(np.ceil(10 * (443_757 - 5_000) / 32))
  assert vqa.get_config('paligemma_3b').optimizer.name == 'adamw'
  wise = vqa.get_config('paligemma_3b,wise_ft')
  assert wise.optimizer.name == 'adamw'
  assert tuple(wise.wise_ft.alphas) == (0.0, 0.25, 0.5, 0.75, 1.0)
  assert vqa.get_config('gemma3_4b,l2sp').optimizer.name == 'l2sp'
  smoke = vqa.get_config('smoke')
  assert smoke.smoke.enabled and smoke.optimizer.name == 'spd'
  assert checks.problems(smoke, num_devices=1) == []
  with pytest.raises(ValueError, match='MODEL in'):
    vqa.get_config('paligemma_3b,sgd')


def test_schedule_warms_up_from_and_decays_to_1e_4():
  config = vqa.get_config('paligemma_3b,spd')
  lr = optimizers.learning_rate_schedule(config)
  total = config.num_train_steps
  np.testing.assert_allclose(
      [float(lr(s)) for s in (0, 500, 1000, total)],
      [1e-4, 1e-4 + 0.5 * (1e-3 - 1e-4), 1e-3, 1e-4], rtol=1e-5)
  # Halfway through the cosine: the mean of the peak and the end.
  np.testing.assert_allclose(float(lr(1000 + (total - 1000) // 2)),
                             (1e-3 + 1e-4) / 2, rtol=1e-4)


@pytest.mark.parametrize('key, value, message', [
    ('num_train_steps', -1, 'config.num_train_steps=-1: must be >= 0'),
    ('model.lora.rank', 0, 'config.model.lora.rank=0: must be > 0'),
    ('model.lora.targets', ('q_proj', 'w_proj'), 'config.model.lora.targets'),
    ('data.prompt', 'answer en', "must be a string holding '{question}'"),
    ('data.near_ood', ('vqa_cp', 'gqa'), 'config.data.near_ood'),
    ('data.far_ood', ('okvqa', 'okvqa'), 'config.data.far_ood'),
    ('wise_ft.alphas', (0.0, 1.5), 'config.wise_ft.alphas=(0.0, 1.5)'),
    ('optimizer.end_fraction', 2.0, 'config.optimizer.end_fraction=2.0'),
    ('optimizer.name', 'sgd', "config.optimizer.name='sgd'"),
    ('micro_batch_size', 3, 'config.micro_batch_size=3: must divide'),
    ('data.val_size', 48, 'config.data.val_size=48: must be below'),
])
def test_bad_values_refused_by_name(key, value, message):
  config = vqa.get_config('smoke')
  section, _, field = key.rpartition('.')
  node = config
  for part in section.split('.') if section else ():
    node = node[part]
  node[field] = value
  with pytest.raises(ValueError, match='Invalid config') as e:
    checks.check(config, num_devices=1)
  assert message in str(e.value)


def test_real_runs_need_model_and_data():
  found = checks.problems(vqa.get_config('paligemma_3b'), num_devices=8)
  assert any(p.startswith("config.model.path=''") for p in found)
  assert any(p.startswith("config.data.dir=''") for p in found)
  config = vqa.get_config('smoke')
  assert checks.problems(config, num_devices=4) == [
      'config.micro_batch_size=2: must be a multiple of the 4 batch shards'
      ' (devices / mesh.tp)']
