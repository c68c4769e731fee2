"""The newcomer's path: README's two commands, one lock, CI running the same.

The README's set-up is two command lines that install through
``requirements.lock``; ``.ci/run`` must run the test line as written, the lock
must hold every dependency ``pyproject.toml`` asks for at a version it admits,
and the environment the tests run in must be the locked one (what a fresh
install gives), down to the last transitive dependency.
"""

import ast
import importlib.metadata
import os
import re
import sys
import tomllib

from packaging import requirements
from packaging import utils
from packaging import version as version_lib
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXTRAS = ('train', 'test', 'docs', 'llm', 'vqa')


def _read(name: str) -> str:
  with open(os.path.join(REPO, name)) as f:
    return f.read()


def _setup_commands() -> list[str]:
  """The command lines of README's 'Set-up: the two commands' block."""
  section = _read('README.md').split('## Set-up: the two commands', 1)[1]
  block = re.search(r'```bash\n(.*?)```', section, re.S).group(1)
  return [line for line in block.splitlines() if line.strip()]


def _pyproject_requirements() -> dict[str, list[requirements.Requirement]]:
  """The library's dependencies (under '') and each extra's."""
  project = tomllib.loads(_read('pyproject.toml'))['project']
  groups = {'': project['dependencies'], **project['optional-dependencies']}
  return {group: [requirements.Requirement(r) for r in reqs]
          for group, reqs in groups.items()}


def _lock() -> dict[str, list[requirements.Requirement]]:
  """requirements.lock's pins by normalized name (several: one per marker)."""
  pins = {}
  for line in _read('requirements.lock').splitlines():
    if line and not line[0].isspace() and not line.startswith('#'):
      req = requirements.Requirement(line)
      pins.setdefault(utils.canonicalize_name(req.name), []).append(req)
  return pins


def _locked_version(pins, name: str) -> version_lib.Version | None:
  """The version the lock gives ``name`` on this machine (None: not locked)."""
  for req in pins.get(utils.canonicalize_name(name), []):
    if req.marker is None or req.marker.evaluate():
      (spec,) = req.specifier
      assert spec.operator == '==', f'requirements.lock: {req} is not a pin'
      return version_lib.Version(spec.version)
  return None


def test_the_readme_has_two_setup_commands_through_the_lock():
  demo, tests = _setup_commands()
  for line in (demo, tests):
    assert line.startswith('test -d .venv || python3 -m venv .venv && ')
    assert '-c requirements.lock' in line, line
  assert demo.endswith('.venv/bin/python -m train.demo'), demo
  assert '".[train,test,docs,llm]"' in tests, tests  # Every test's needs.
  assert tests.endswith('.venv/bin/python -m pytest -n 2 -q'), tests


def test_ci_runs_the_readme_test_command_as_written():
  _, tests = _setup_commands()
  ci = _read('.ci/run').splitlines()
  # As the whole line, or in a subshell (so that `set -e` sees its status).
  assert tests in ci or f'( {tests} )' in ci, (
      f'.ci/run does not run README\'s test command as written:\n{tests}')
  assert 'set -euo pipefail' in ci


def test_every_dependency_in_pyproject_is_locked_at_a_version_it_admits():
  pins = _lock()
  for group, reqs in _pyproject_requirements().items():
    for req in reqs:
      locked = pins.get(utils.canonicalize_name(req.name))
      assert locked, (f'pyproject.toml [{group or "dependencies"}] asks for'
                      f' {req} but requirements.lock has no {req.name}:'
                      ' refresh the lock (README, One lock)')
      for pin in locked:
        (spec,) = pin.specifier
        assert req.specifier.contains(spec.version, prereleases=True), (
            f'pyproject.toml [{group or "dependencies"}] asks for {req}, but'
            f' requirements.lock pins {pin}: refresh the lock')


def test_the_extras_agree_with_each_other():
  seen = {}
  for group, reqs in _pyproject_requirements().items():
    for req in reqs:
      name = utils.canonicalize_name(req.name)
      if name in seen:
        assert seen[name][1] == req.specifier, (
            f'{req.name} is {seen[name][1] or "open"} in [{seen[name][0]}] but'
            f' {req.specifier or "open"} in [{group}]')
      seen[name] = (group or 'dependencies', req.specifier)


def test_the_readme_refreshes_the_lock_with_the_command_that_wrote_it():
  header = _read('requirements.lock').splitlines()[1]
  written_by = header.lstrip('# ').strip()
  assert written_by.startswith('uv pip compile pyproject.toml'), header
  assert f'pip install uv && {written_by}\n' in _read('README.md')


def _closure(roots):
  """Installed distributions that ``roots`` need here, transitively."""
  needed, todo = {}, list(roots)
  while todo:
    req, extras = todo.pop()
    environment = [{'extra': e} for e in extras] or [{'extra': ''}]
    if req.marker is not None and not any(
        req.marker.evaluate(env) for env in environment):
      continue
    name = utils.canonicalize_name(req.name)
    if name in needed and req.extras <= needed[name][1]:
      continue
    extras_here = req.extras | (needed[name][1] if name in needed else set())
    try:
      dist = importlib.metadata.distribution(req.name)
    except importlib.metadata.PackageNotFoundError:
      pytest.fail(f'{req.name} is needed (by {req}) but not installed')
    needed[name] = (dist.version, extras_here)
    for sub in dist.requires or ():
      todo.append((requirements.Requirement(sub), extras_here))
  return needed


def test_the_environment_is_the_locked_one():
  """What a fresh ``pip install -c requirements.lock`` gives: every package
  the project needs here, transitively, at its locked version."""
  roots = [(req, set()) for reqs in _pyproject_requirements().values()
           for req in reqs]
  pins = _lock()
  wrong = []
  for name, (installed, _) in sorted(_closure(roots).items()):
    locked = _locked_version(pins, name)
    # A local build (torch's '+cpu') is the locked release.
    if locked is None or version_lib.Version(installed).public != str(locked):
      wrong.append(f'{name} {installed} (locked: {locked})')
  assert not wrong, ('installed, not as requirements.lock says (install with'
                     ' README\'s command):\n' + '\n'.join(wrong))



def _imported_distributions(paths) -> dict[str, set[str]]:
  """Distributions the modules under ``paths`` import (anywhere in them), by
  the file that imports them; the standard library and our own left out."""
  own = {'spd_optax', 'train', 'configs', 'tests', 'benchmarks'}
  by_module = importlib.metadata.packages_distributions()
  found = {}
  for path in paths:
    for root, _, files in os.walk(os.path.join(REPO, path)):
      for name in (f for f in files if f.endswith('.py')):
        file = os.path.join(root, name)
        with open(file) as f:
          tree = ast.parse(f.read())
        for node in ast.walk(tree):
          if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
          elif isinstance(node, ast.ImportFrom) and not node.level:
            modules = [node.module]
          else:
            continue
          for module in (m.split('.')[0] for m in modules):
            if module in own or module in sys.stdlib_module_names:
              continue
            for dist in by_module.get(module, [module]):
              found.setdefault(utils.canonicalize_name(dist), set()).add(
                  os.path.relpath(file, REPO))
  return found


@pytest.mark.parametrize('extras, paths', [
    (('train',), ('train', 'configs')),  # The ViT recipe and the demo.
    (('train', 'llm'), ('train/llm', 'train/language',
                         'configs/commonsense.py')),
    (('train', 'vqa'), ('train/vqa', 'train/language', 'configs/vqa.py')),
    (('train',), ('train/segmentation', 'configs/segmentation.py')),
])
def test_each_recipe_imports_only_what_its_extras_install(extras, paths):
  """The README's demo command installs the ``train`` extra alone: a module
  of the recipe that imports a package only the tests' extras bring fails
  there and nowhere else."""
  groups = _pyproject_requirements()
  roots = [(req, set()) for group in ('',) + extras for req in groups[group]]
  installed = set(_closure(roots))
  if paths[0] == 'train':  # The vision recipe: train/ but the language ones.
    imported = {d: {f for f in files if not f.startswith(
                        ('train/llm/', 'train/language/', 'train/vqa/'))
                    and f not in ('configs/commonsense.py', 'configs/vqa.py')}
                for d, files in _imported_distributions(paths).items()}
  else:
    imported = _imported_distributions(paths)
  missing = {d: sorted(f) for d, f in imported.items()
             if f and d not in installed}
  assert not missing, (f'imported but not installed by the extras {extras}'
                       f' (pyproject.toml): {missing}')
