"""Shared pytest fixtures (the repository is importable by pyproject.toml's
``pythonpath``)."""

import pytest


@pytest.fixture(scope='session')
def digits_data_dir(tmp_path_factory):
  """The digits_domains sets the tiny config reads, built once per worker."""
  from train.demo import digits_domains  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp('tfds'))
  digits_domains.build(path, configs=('clean', 'rotate', 'invert'))
  return path
