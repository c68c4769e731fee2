"""The fine-tuning loop: real steps for every optimizer, on 1 and 8 devices."""

from flax import nnx
import jax
import numpy as np
import pytest

from configs import tiny
from train.vision import finetune
from train.vision import input_pipeline
from train.vision import mesh as mesh_lib
from train.vision import model_setup
from train.vision import train_modes
from tests import trainlib

CASES = [('adam', 0), ('adamw', 0), ('l2sp', 0), ('spd', 0), ('projection', 0),
         ('spd', 4), ('adamw', 4), ('ftp', 0), ('ftp', 4)]


@pytest.mark.parametrize('name,lora_rank', CASES)
def test_two_real_steps_move_what_each_optimizer_trains(
    digits_data_dir, name, lora_rank):
  config = tiny.get_config()
  config.dataset.data_dir = digits_data_dir
  config.optimizer.name = name
  config.optimizer.warmup_steps = 0  # Full learning rate from step 1.
  config.model.lora_rank = lora_rank
  if name == 'projection':  # lambda = 1 would pin every layer at its anchor.
    config.optimizer.weight_decay = 0.5
  if name == 'ftp':  # k = 0: radii that only grow, so every layer moves.
    config.optimizer.weight_decay = 0.0
  mesh = mesh_lib.make_mesh(config)
  batches = input_pipeline.train_batches(
      config.dataset, global_batch_size=config.batch_size, seed=0)
  with jax.set_mesh(mesh):
    model = model_setup.make_model(config, nnx.Rngs(0))
    mesh_lib.shard_module(model, mesh)
    before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model)))
    # The optimizer and what it trains, as the loop builds them.
    optimizer = nnx.Optimizer(model, train_modes.make_run_optimizer(config),
                              wrt=train_modes.trainable(config))
    # The head starts at zero, so the body first gets gradients at step 2;
    # FTP's radii start at 1e-8 and grow from step 3 on.
    for step in range(5 if name == 'ftp' else 2):
      out = finetune.train_step(model, optimizer,
                                mesh_lib.shard_batch(next(batches), mesh),
                                jax.random.key(step), None)
  assert np.isfinite(out['train/loss'])
  if name == 'spd':
    assert 0.0 <= out['train/spd_projected_fraction'] <= 1.0
  if name == 'ftp':
    assert 0.0 < out['train/ftp_gamma_over_norm'] <= 1.0
    assert 0.0 <= out['train/ftp_at_radius_fraction'] <= 1.0
  after = nnx.to_pure_dict(nnx.state(model))
  moved = {
      jax.tree_util.keystr(p): not np.array_equal(a, b)
      for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(before),
                           jax.tree.leaves(after))
  }
  if lora_rank:
    frozen = [p for p in moved if 'lora' not in p and 'head' not in p]
    assert frozen and not any(moved[p] for p in frozen)
    assert moved["['head']['kernel']"]
    assert any(moved[p] for p in moved if 'lora_b' in p)
  else:
    assert all(moved.values()), [p for p, m in moved.items() if not m]


@pytest.mark.slow
def test_eight_devices_with_fsdp_equal_one_device(digits_data_dir, tmp_path):
  one, eight = str(tmp_path / 'one'), str(tmp_path / 'eight')
  trainlib.run_train(one, digits_data_dir, num_devices=1)
  trainlib.run_train(eight, digits_data_dir, '--config.mesh.fsdp=2',
                     num_devices=8)
  model1, opt1, rows1 = trainlib.final_state(one)
  model8, opt8, rows8 = trainlib.final_state(eight)
  # Same math; only the order of the cross-device sums differs. The key
  # biases have an exactly-zero gradient (softmax ignores them), so they hold
  # Adam-normalised rounding noise (~1e-6) and SPD's choice for them is a
  # coin toss: they are left out.
  key_bias = "['key']['bias']"
  trainlib.assert_trees_equal(model1, model8, rtol=1e-5, atol=1e-6,
                              skip=key_bias)
  trainlib.assert_trees_equal(opt1, opt8, rtol=1e-4, atol=1e-6,
                              skip=key_bias)
  one_leaf = 1 / 38  # The key biases' share of SPD's leaf counts.
  trainlib.assert_rows_equal(rows1, rows8, rtol=1e-4, atol_for={
      'train/spd_fire_rate': one_leaf, 'train/spd_projected_fraction':
      2 * one_leaf, 'train/spd_mean_ratio': 0.01})


@pytest.mark.slow
def test_save_restore_continue_equals_never_stopping(digits_data_dir,
                                                     tmp_path):
  whole, split = str(tmp_path / 'whole'), str(tmp_path / 'split')
  trainlib.run_train(whole, digits_data_dir)
  # A time-limited job: stop after 4 steps (a checkpoint is saved on the
  # way out), then the same command again. SIGKILL is in test_reliability.py.
  trainlib.run_train(split, digits_data_dir, '--config.max_steps_per_run=4')
  assert trainlib.final_state(split)[2][-1]['step'] == 4
  trainlib.run_train(split, digits_data_dir)
  trainlib.assert_same_run(whole, split)
