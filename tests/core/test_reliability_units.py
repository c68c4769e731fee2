"""Faults of issue 12 that need no killed process: each checked in-process.

Damaged array data, NaNs on their way to a checkpoint, a torn metrics line, a
held or stale workdir lock, nonsense config values, damaged or non-finite
pre-trained files, an empty split, an evaluation that crashes, a full disk.
The runs that need a real signal are in ``test_reliability.py``.
"""

import errno
import glob
import json
import logging
import os
import socket

import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from train.core import checkpoints
from train.vision import checks
from train.vision import evaluation
from train.vision import finetune
from train.vision import input_pipeline
from train.core import metrics
from train.core import workdir_lock


def _flip_one_bit_inside(step_dir, data: np.ndarray) -> str:
  """Flips a bit in the middle of ``data``'s bytes where they lie on disk."""
  needle = data.tobytes()[1000:1064]
  for path in glob.glob(os.path.join(step_dir, '**', '*'), recursive=True):
    if not os.path.isfile(path):
      continue
    with open(path, 'rb') as f:
      blob = f.read()
    at = blob.find(needle)
    if at >= 0:
      with open(path, 'r+b') as f:
        f.seek(at + 30)
        f.write(bytes([blob[at + 30] ^ 0x10]))  # Same size, one bit.
      return path
  raise AssertionError('array bytes not found on disk')


def test_a_flipped_bit_in_array_data_is_detected_and_set_aside(tmp_path,
                                                               caplog):
  # Random bits do not compress: Orbax's zstd stores them verbatim, so the
  # flipped bit is read back as a changed number, not as a decoding error.
  rng = np.random.default_rng(0)
  older, newer = ({'w': jnp.asarray(rng.integers(-2**31, 2**31, 4096,
                                                 dtype=np.int32))}
                  for _ in range(2))
  ckpt = checkpoints.Checkpointer(str(tmp_path))
  ckpt.save(3, older, older, {'step': 3})
  ckpt.save(6, newer, newer, {'step': 6})
  ckpt.close()
  _flip_one_bit_inside(str(tmp_path / '6' / 'model'), np.asarray(newer['w']))
  ckpt = checkpoints.Checkpointer(str(tmp_path))
  step, model, _, meta = ckpt.restore_latest(newer, newer)
  ckpt.close()
  assert (step, meta) == (3, {'step': 3})
  np.testing.assert_array_equal(model['w'], older['w'])
  assert "do not match the checksums saved with them" in caplog.text
  assert "['model']['w']" in caplog.text
  assert 'Checkpoint step 6' in caplog.text
  assert len(glob.glob(str(tmp_path / 'damaged_step_6_*'))) == 1


def test_no_checkpoint_is_written_with_a_nonfinite_leaf(tmp_path):
  good = {'w': jnp.ones(3)}
  bad = {'mu': {'w': jnp.array([0.0, jnp.inf, 1.0])}, 'count': jnp.int32(2)}
  ckpt = checkpoints.Checkpointer(str(tmp_path))
  with pytest.raises(FloatingPointError,
                     match=r"\['optimizer'\]\['mu'\]\['w'\]"):
    ckpt.save(3, good, bad, {'step': 3})
  assert ckpt.all_steps() == []
  ckpt.close()
  assert not glob.glob(str(tmp_path / '3*'))


def test_a_torn_metrics_line_is_removed_before_appending(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path), tensorboard=False)
  writer.write(2, {'train/loss': 2.0})
  writer.write(4, {'train/loss': 1.5})
  with open(writer.path, 'a') as f:
    f.write('{"step": 6, "train/lo')  # A kill during the write.
  writer.truncate_after(4)  # What a resumed run does first.
  writer.write(6, {'train/loss': 1.0})
  with open(writer.path) as f:
    lines = f.read().splitlines()
  assert [json.loads(line)['step'] for line in lines] == [2, 4, 6]


def test_a_held_workdir_is_refused_naming_the_holder(tmp_path):
  with workdir_lock.WorkdirLock(str(tmp_path)):
    with pytest.raises(workdir_lock.WorkdirInUseError) as e:
      workdir_lock.WorkdirLock(str(tmp_path)).__enter__()
  message = str(e.value)
  assert f'host {socket.gethostname()}, pid {os.getpid()}, since ' in message
  assert str(tmp_path) in message


def test_a_stale_lock_is_taken_over(tmp_path, caplog):
  # What a SIGKILLed run leaves: its record, but no process holding the lock.
  with open(tmp_path / 'lock', 'w') as f:
    json.dump({'host': 'node7', 'pid': 4242, 'since': '2026-01-01'}, f)
  with caplog.at_level(logging.WARNING):
    with workdir_lock.WorkdirLock(str(tmp_path)):
      with open(tmp_path / 'lock') as f:
        assert json.load(f)['pid'] == os.getpid()
  assert ('Took over the lock of a run that is no longer alive (host node7,'
          ' pid 4242, since 2026-01-01)') in caplog.text


NONSENSE = [
    # (key, value, what the message must say)
    ('optimizer.learning_rate', -1e-3, 'must be >= 0'),
    ('model.lora_rank', -4, 'must be >= 0'),
    ('keep_checkpoints', 0, 'must be >= 1'),
    ('checkpoint_every_steps', 0, 'must be > 0'),
    ('log_every_steps', 0, 'must be > 0'),
    ('eval_every_steps', -5, 'must be > 0'),
    ('num_train_steps', 0, 'must be > 0'),
    ('optimizer.warmup_steps', -1, 'must be >= 0'),
    ('optimizer.weight_decay', -0.5, 'must be >= 0'),
    ('optimizer.b2', 1.0, 'must be in [0, 1)'),
    ('optimizer.grad_clip_norm', float('nan'), 'must be >= 0'),
    ('dataset.augment.crop_scale', (0.9, 0.1),
     'must be (lo, hi) with 0 < lo <= hi <= 1'),
    ('dataset.crop_fraction', 1.5, 'must be in (0, 1]'),
    ('model.pool', 'max', "must be one of ('', 'cls', 'mean')"),
    ('batch_size', 0, 'must be > 0'),
    ('optimizer.name', 'sgd', 'must be one of'),
    ('train_mode', 'probe', 'must be one of'),
    ('lp_ft.probe_steps', -1, 'must be >= 0'),
    ('wise_ft.alphas', (0.0, 1.5), 'must be in [0, 1]'),
    ('model.param_dtype', 'float16', "must be one of ('float32', 'float64')"),
    ('model.head_init', 'zero', "must be one of ('', 'zeroshot')"),
    ('zeroshot.templates', ('a photo of a cat.',),
     'must be a non-empty tuple of strings, each with {}'),
]


@pytest.mark.parametrize('key,value,message', NONSENSE)
def test_nonsense_config_values_are_refused_naming_key_and_range(
    key, value, message):
  config = tiny.get_config()
  *parents, leaf = key.split('.')
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ValueError) as e:
    checks.check(config, num_devices=1)
  assert f'config.{key}={value!r}: {message}' in str(e.value)


@pytest.mark.parametrize('key', ['batch_size', 'eval_batch_size'])
def test_a_batch_the_devices_cannot_split_is_refused_by_key(key):
  config = tiny.get_config()
  config[key] = 36
  assert checks.problems(config, num_devices=8) == [
      f'config.{key}=36: must be a multiple of the 8 devices']
  assert checks.problems(config, num_devices=4) == []


def test_ftp_k_is_checked_in_the_unit_interval():
  config = tiny.get_config()
  config.optimizer.name = 'ftp'
  config.optimizer.weight_decay = 1.5  # Fine for SPD; FTP's k is in [0, 1].
  assert checks.problems(config, num_devices=1) == [
      "config.optimizer.weight_decay=1.5: with optimizer.name=ftp it is FTP's"
      ' k and must be in [0, 1]']
  config.optimizer.weight_decay = 0.5
  assert checks.problems(config, num_devices=1) == []


def test_every_shipped_config_passes_the_checks():
  from configs import demo, domainnet_clip, imagenet_clip, imagenet_clip_lora  # pylint: disable=g-import-not-at-top
  for module in (tiny, demo, domainnet_clip, imagenet_clip,
                 imagenet_clip_lora):
    assert checks.problems(module.get_config(), num_devices=8) == [], (
        module.__name__)


def _tiny_model_file(tmp_path, poison=None):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from train.vision import vit, pretrained  # pylint: disable=g-import-not-at-top
  model = vit.VisionTransformer(**vit.get_model_kwargs('mu/4'),
                                   num_classes=10, image_size=32,
                                   rngs=nnx.Rngs(0))
  if poison:
    leaf = model.blocks[0].mlp.fc1.kernel
    leaf.set_value(leaf.get_value().at[0, 0].set(poison))
  path = str(tmp_path / 'pre.npz')
  pretrained.save_npz(model, path)
  return model, path


def test_pretrained_nonfinite_values_are_refused_naming_leaf_and_file(
    tmp_path):
  from train.vision import pretrained  # pylint: disable=g-import-not-at-top
  model, path = _tiny_model_file(tmp_path, poison=float('nan'))
  with pytest.raises(ValueError) as e:
    pretrained.load_pretrained(model, path, dont_load=('head',))
  assert path in str(e.value)
  assert "'blocks/0/mlp/fc1/kernel'" in str(e.value)
  assert 'NaN or inf' in str(e.value)


@pytest.mark.parametrize('suffix', ['.npz', '.safetensors'])
def test_a_truncated_pretrained_file_is_named(tmp_path, suffix):
  from train.vision import pretrained  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / f'pre{suffix}')
  tensors = {'w': np.arange(4096, dtype=np.float32)}
  if suffix == '.npz':
    np.savez(path, **tensors)
  else:
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    save_file(tensors, path)
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(ValueError) as e:
    pretrained.read_checkpoint(path)
  assert f'Cannot read pre-trained file {path!r}' in str(e.value)


def test_an_empty_split_is_reported_as_empty(digits_data_dir):
  config = tiny.get_config()
  config.dataset.data_dir = digits_data_dir
  config.dataset.ood.rotate.split = 'test[:0]'
  with pytest.raises(ValueError) as e:
    input_pipeline.check_available(config.dataset)
  assert ("Split 'test[:0]' of 'digits_domains/rotate' in data_dir"
          in str(e.value))
  assert 'is empty (0 examples)' in str(e.value)


def test_an_eval_crash_loses_no_training(digits_data_dir, tmp_path,
                                         monkeypatch):
  config = tiny.get_config()
  config.dataset.data_dir = digits_data_dir
  config.num_train_steps = 3  # Logged at 2 and 3, saved at 3.
  config.eval_every_steps = 2  # Evaluated at 2 (the crash) and 3.
  workdir = str(tmp_path / 'run')

  def crash(*args):
    raise RuntimeError('eval crashed')

  with monkeypatch.context() as m:
    m.setattr(evaluation, 'accuracies', crash)
    with pytest.raises(RuntimeError, match='eval crashed'):
      finetune.train_and_evaluate(config, workdir, print_summary=False)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  assert checkpoints.Checkpointer(ckpt_dir).all_steps() == [2]  # Saved.
  finetune.train_and_evaluate(config, workdir, print_summary=False)
  rows = metrics.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  # Step 2's evaluation, lost to the crash, is done when the run resumes.
  assert [(r['step'], 'eval/id_accuracy' in r) for r in rows] == [
      (2, False), (2, True), (3, False), (3, True)]


def test_disk_full_is_found_behind_tensorstores_wrapping():
  from train.core import checkpoints  # pylint: disable=g-import-not-at-top
  try:
    try:
      raise ValueError(
          'RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database:'
          ' Failed writing: "/ckpt/6.orbax-checkpoint-tmp/d/ab": Failed to'
          ' write 59853 bytes to file 14: No space left on device')
    except ValueError as inner:
      raise RuntimeError('save failed') from inner
  except RuntimeError as outer:
    found = checkpoints.disk_full_error(outer)
  assert found.errno == errno.ENOSPC
  assert found.filename == '/ckpt/6.orbax-checkpoint-tmp/d/ab'
  assert checkpoints.disk_full_error(RuntimeError('other')) is None


def test_a_failed_save_leaves_every_good_checkpoint(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path), keep=2)
  good = {'w': jnp.arange(4.0)}
  ckpt.save(3, good, good, {'step': 3})
  with pytest.raises(ValueError):  # Not an array: fails half-way.
    ckpt.save(6, {'w': object()}, good, {'step': 6})
  with pytest.raises(Exception, match='already exists'):
    ckpt.save(3, {'w': jnp.zeros(4)}, good, {'step': 3})  # No overwrite.
  assert ckpt.all_steps() == [3]
  step, model, _, meta = ckpt.restore_latest(good, good)
  assert step == 3 and meta == {'step': 3}
  np.testing.assert_array_equal(model['w'], good['w'])
  ckpt.close()
