"""The wheel people install: `spd_optax` only, and it works on its own.

Builds the wheel from a copy of the source tree (the recipe and benchmarks
included, as a user's checkout has them), lists its top-level packages,
installs it into a fresh virtualenv outside the repository and runs there the
README's quickstart and every doctest of the package. The virtualenv reaches
the dependencies already installed (jax, optax, numpy) through a ``.pth``
file added after the install, so nothing is downloaded; ``python -I`` keeps
the repository and the current directory off ``sys.path``.
"""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Run inside the fresh virtualenv: where spd_optax comes from, that train and
# configs are not importable, then every doctest of every module.
CHECK = r'''
import doctest, importlib, importlib.util, pkgutil, sys
import spd_optax
print('spd_optax from', spd_optax.__file__)
assert spd_optax.__file__.startswith(sys.prefix), spd_optax.__file__
for name in ('train', 'configs', 'benchmarks', 'tests'):
  assert importlib.util.find_spec(name) is None, name
attempted = 0
for info in pkgutil.iter_modules(spd_optax.__path__, 'spd_optax.'):
  result = doctest.testmod(importlib.import_module(info.name))
  assert result.failed == 0, info.name
  attempted += result.attempted
print('doctest examples passed:', attempted)
assert attempted > 20
'''


def _readme_quickstart() -> str:
  """The Python blocks of the README's quickstart section, as one script."""
  with open(os.path.join(REPO, 'README.md')) as f:
    readme = f.read()
  section = re.search(r'\n## Quickstart.*?(?=\n## )', readme, re.S).group(0)
  blocks = re.findall(r'```python\n(.*?)```', section, re.S)
  assert len(blocks) >= 2
  return '\n'.join(blocks)


def _build_wheel(tmp_path) -> str:
  source = tmp_path / 'src'
  shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
      '.git', '.venv*', 'runs', 'build', 'dist', '*.egg-info', '__pycache__',
      '_build', '.pytest_cache', '.hypothesis'))
  dist = tmp_path / 'dist'
  build = subprocess.run(
      [sys.executable, '-m', 'pip', 'wheel', '-v', '--no-deps',
       '--no-build-isolation', '--no-index', '-w', str(dist), str(source)],
      capture_output=True, text=True, check=False)
  assert build.returncode == 0, build.stdout + build.stderr
  # setuptools warns about deprecated metadata (e.g. a `license` table).
  assert 'deprecated' not in (build.stdout + build.stderr).lower(), (
      build.stdout + build.stderr)
  (wheel,) = dist.glob('spd_optax-*.whl')
  return str(wheel)


@pytest.mark.slow
def test_wheel_holds_the_library_only_and_works_outside_the_repo(tmp_path):
  wheel = _build_wheel(tmp_path)
  with zipfile.ZipFile(wheel) as z:
    names = z.namelist()
  top_level = {n.split('/')[0] for n in names}
  assert {t for t in top_level if not t.endswith('.dist-info')} == {
      'spd_optax'}, sorted(names)
  modules = {n for n in names if n.startswith('spd_optax/')}
  assert modules == {
      f'spd_optax/{f}' for f in os.listdir(os.path.join(REPO, 'spd_optax'))
      if f.endswith('.py')}

  venv = tmp_path / 'venv'
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)],
                 check=True)
  python = str(venv / 'bin' / 'python')
  install = subprocess.run(
      [sys.executable, '-m', 'pip', '--python', python, 'install', '-q',
       '--no-deps', '--no-index', wheel],
      capture_output=True, text=True, check=False)
  assert install.returncode == 0, install.stdout + install.stderr
  site = subprocess.run(
      [python, '-I', '-c', 'import sysconfig; print(sysconfig.get_paths()'
       '["purelib"])'], capture_output=True, text=True, check=True
  ).stdout.strip()
  installed = {n for n in os.listdir(site) if not n.startswith(('_', '.'))}
  assert installed == {'spd_optax', 'spd_optax-0.1.0.dist-info'}, installed
  # Only now (so that pip could not see and touch it), the dependencies.
  outer = {sysconfig.get_paths()[k] for k in ('purelib', 'platlib')}
  with open(os.path.join(site, 'deps.pth'), 'w') as f:
    f.write('\n'.join(sorted(outer)) + '\n')

  run_dir = tmp_path / 'elsewhere'
  run_dir.mkdir()
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(('PYTHON', 'VIRTUAL_ENV'))}
  for what, script in (('checks and doctests', CHECK),
                       ('README quickstart', _readme_quickstart())):
    result = subprocess.run([python, '-I', '-c', script], cwd=run_dir,
                            env=env, capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, (what, result.stdout, result.stderr)
    if what == 'README quickstart':
      assert 'spd/projected_fraction' in result.stdout
