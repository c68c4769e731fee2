"""What a run is (train.core.run_identity): content, not places; reuse or set aside."""

import json
import os
import shutil

import numpy as np
import pytest

from configs import tiny
from train.core import files
from train.core import run_identity
from train.vision import locations


def _config(data_dir, pretrained=''):
  config = tiny.get_config()
  config.dataset.data_dir = data_dir
  config.pretrained.path = pretrained
  return config


@pytest.fixture()
def weights_file(tmp_path):
  path = str(tmp_path / 'weights.npz')
  np.savez(path, w=np.arange(4.0))
  return path


def test_identity_is_what_the_paths_hold_not_where_they_are(
    digits_data_dir, weights_file, tmp_path):
  here = locations.identity(_config(digits_data_dir, weights_file))
  # The same data and weights elsewhere: the same identity.
  other_data = str(tmp_path / 'tfds_copy')
  shutil.copytree(digits_data_dir, other_data)
  other_weights = str(tmp_path / 'moved' / 'weights.npz')
  os.makedirs(os.path.dirname(other_weights))
  shutil.copy(weights_file, other_weights)
  there = locations.identity(_config(other_data, other_weights))
  assert there == here
  # The paths are gone from it; what they hold is there.
  described = here['dataset']['data_dir']
  assert set(described) == {'digits_domains/clean', 'digits_domains/rotate',
                            'digits_domains/invert'}
  assert described['digits_domains/clean']['splits']['test'] == 400
  assert here['pretrained']['path'] == {
      'weights.npz': run_identity.file_sha256(weights_file)}
  # Other weights (same name, same size): another identity, named by key.
  np.savez(other_weights, w=np.arange(4.0) + 1)
  changed = locations.identity(_config(other_data, other_weights))
  assert run_identity.differing_keys(here, changed) == [
      'pretrained.path.weights.npz']


def test_resumable_keys_do_not_count_and_others_are_named():
  a = {'seed': 0, 'mesh': {'fsdp': 1}, 'optimizer': {'name': 'spd'},
       'max_steps_per_run': 0}
  b = {'seed': 1, 'mesh': {'fsdp': 2}, 'optimizer': {'name': 'adamw'},
       'max_steps_per_run': 5, 'extra': True}
  assert run_identity.differing_keys(a, b) == ['extra', 'optimizer.name',
                                               'seed']


def _ident(seed=0):
  return {'seed': seed, 'optimizer': {'name': 'spd'}}


def test_a_matching_record_is_reused_with_its_payload(tmp_path):
  path, data = str(tmp_path / 'r.json'), str(tmp_path / 'd.bin')
  with open(data, 'wb') as f:
    f.write(b'numbers')
  run_identity.write_record(path, _ident(), data_files=[data], results=[1, 2])
  record = run_identity.reuse(path, _ident(), data_files=[data])
  assert record['results'] == [1, 2]
  assert sorted(os.listdir(tmp_path)) == ['d.bin', 'r.json']
  assert run_identity.reuse(str(tmp_path / 'absent.json'), _ident()) is None


@pytest.mark.parametrize('damage, kind, words', [
    ('truncate_record', 'damaged', 'not valid JSON'),
    ('flip_data', 'damaged', 'SHA-256 differs'),
    ('other_identity', 'stale', 'seed differ'),
    ('older_version', 'stale', 'older version'),
])
def test_a_damaged_or_stale_record_is_set_aside_named_and_not_used(
    tmp_path, caplog, damage, kind, words):
  run = tmp_path / 'run'
  os.makedirs(run)
  path, data = str(run / 'r.json'), str(run / 'd.bin')
  with open(data, 'wb') as f:
    f.write(b'numbers')
  run_identity.write_record(path, _ident(), data_files=[data], results=1)
  if damage == 'truncate_record':
    with open(path, 'r+') as f:
      f.truncate(10)
  elif damage == 'flip_data':
    with open(data, 'wb') as f:
      f.write(b'numbefs')  # Same size, one byte changed.
  elif damage == 'other_identity':
    run_identity.write_record(path, _ident(seed=1), data_files=[data])
  else:  # What an older version wrote: the config, no identity.
    with open(path, 'w') as f:
      json.dump({'config': _ident(), 'results': 1}, f)
  assert run_identity.reuse(path, _ident(), data_files=[data],
                            owner=[str(run)]) is None
  aside = [n for n in os.listdir(tmp_path) if n != 'run']
  assert len(aside) == 1 and aside[0].startswith(f'{kind}_run_'), aside
  assert not os.path.exists(run)  # Moved whole, nothing deleted:
  assert sorted(os.listdir(tmp_path / aside[0])) == ['d.bin', 'r.json']
  message = caplog.text
  assert path in message and words in message and aside[0] in message


def test_a_damaged_json_result_is_set_aside_and_read_as_absent(tmp_path,
                                                               caplog):
  path = str(tmp_path / 'wise_ft.json')
  with open(path, 'w') as f:
    f.write('{"0.5": ')
  assert run_identity.load_json(path) is None
  assert [n.startswith('damaged_wise_ft.json_') for n in os.listdir(tmp_path)
          ] == [True]
  assert path in caplog.text and 'not valid JSON' in caplog.text


def _claim(workdir, config):
  return run_identity.claim_workdir(workdir, config,
                                    ident=locations.identity(config))


def test_a_moved_workdir_is_claimed_and_another_config_refused(
    digits_data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  config = _config(digits_data_dir)
  _claim(workdir, config)
  moved, data = str(tmp_path / 'elsewhere'), str(tmp_path / 'data')
  shutil.copytree(workdir, moved)
  shutil.copytree(digits_data_dir, data)
  config.dataset.data_dir = data
  _claim(moved, config)  # Same content: resumes.
  with open(os.path.join(moved, 'config.json')) as f:
    assert json.load(f)['dataset']['data_dir'] == data  # Current paths.
  config.optimizer.learning_rate = 0.5
  with pytest.raises(ValueError, match=r"different config \(keys"
                     r" \['optimizer.learning_rate'\] differ"):
    _claim(moved, config)


def test_a_damaged_identity_is_refused_by_name_and_a_damaged_config_kept(
    digits_data_dir, tmp_path, caplog):
  workdir = str(tmp_path / 'run')
  config = _config(digits_data_dir)
  _claim(workdir, config)
  config_path = os.path.join(workdir, 'config.json')
  with open(config_path, 'w') as f:
    f.write('{')
  _claim(workdir, config)  # identity.json decides.
  assert any(n.startswith('damaged_config.json_') for n in os.listdir(workdir))
  assert config_path in caplog.text
  with open(config_path) as f:
    assert json.load(f)['seed'] == config.seed  # Written anew.
  id_path = os.path.join(workdir, 'identity.json')
  with open(id_path, 'w') as f:
    f.write('[')
  with pytest.raises(ValueError, match=f'{id_path} is damaged'):
    _claim(workdir, config)


def test_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path):
  path = str(tmp_path / 'a.json')
  with files.atomic_write(path) as f:
    f.write('old')
  with pytest.raises(RuntimeError):
    with files.atomic_write(path) as f:
      f.write('new, half')
      raise RuntimeError('disk full')
  with open(path) as f:
    assert f.read() == 'old'
  assert os.listdir(tmp_path) == ['a.json']
