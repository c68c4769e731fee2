"""The house's layout, read from the source (AST): no import circles, short
functions, names that are unique, flags and imports at the top.

Every ``import`` and ``from ... import`` counts, at module level or inside a
function (a function-level import is a circle put off, not removed).
``from pkg import _x`` is an edge to ``pkg._x`` when that is a module and to
``pkg`` (its ``__init__``) otherwise; ``from pkg._x import y`` and
``import pkg._x`` are edges to ``pkg._x``; relative imports are resolved
against the importing module. Importing a submodule is not counted as an edge
to the parent packages' ``__init__`` (Python runs it first for any submodule;
an ``__init__`` that imports its submodules is the norm).
"""

import ast
import os
import subprocess
import sys
from typing import Optional

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The packages checked; another one is one more entry.
PACKAGES = ['spd_optax', 'train']


def _modules(package_dir: str, package_name: str) -> dict[str, tuple[str, bool]]:
  """Dotted module name -> (file, whether it is a package's __init__)."""
  modules = {}
  for root, dirs, files in os.walk(package_dir):
    dirs[:] = sorted(d for d in dirs
                     if os.path.exists(os.path.join(root, d, '__init__.py')))
    rel = os.path.relpath(root, package_dir)
    prefix = package_name if rel == '.' else '.'.join(
        [package_name] + rel.split(os.sep))
    for f in sorted(files):
      if not f.endswith('.py'):
        continue
      path = os.path.join(root, f)
      if f == '__init__.py':
        modules[prefix] = (path, True)
      else:
        modules[f'{prefix}.{f[:-3]}'] = (path, False)
  return modules


def _known_prefix(name: str, modules) -> Optional[str]:
  """The longest prefix of the dotted ``name`` that is one of ``modules``."""
  parts = name.split('.')
  for end in range(len(parts), 0, -1):
    candidate = '.'.join(parts[:end])
    if candidate in modules:
      return candidate
  return None


def _imported(node: ast.AST, module: str, is_package: bool,
              modules) -> list[str]:
  """The modules of the package that one import statement imports."""
  if isinstance(node, ast.Import):
    targets = [alias.name for alias in node.names]
  else:
    base = node.module or ''
    if node.level:  # Relative: from the importing module's package upwards.
      package = module if is_package else module.rpartition('.')[0]
      for _ in range(node.level - 1):
        package = package.rpartition('.')[0]
      base = f'{package}.{base}' if base else package
    # `from base import name`: the submodule base.name where there is one.
    targets = [f'{base}.{alias.name}' for alias in node.names] or [base]
  found = []
  for target in targets:
    known = _known_prefix(target, modules)
    if known is not None:
      found.append(known)
  return found


def import_graph(package_dir: str, package_name: str) -> dict[str, set[str]]:
  """Module -> the modules of the same package it imports, anywhere in it.

  Args:
    package_dir: the package's folder (holding its ``__init__.py``).
    package_name: its dotted name, e.g. ``'spd_optax'``.

  Returns:
    Every module of the package (subpackages included) mapped to the set of
    the package's modules it imports, itself left out.
  """
  modules = _modules(package_dir, package_name)
  graph = {}
  for module, (path, is_package) in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read(), filename=path)
    edges = set()
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        edges.update(_imported(node, module, is_package, modules))
    edges.discard(module)
    graph[module] = edges
  return graph


def find_cycle(graph: dict[str, set[str]]) -> Optional[list[str]]:
  """One import circle as ``[a, b, ..., a]``, or None when there is none."""
  done, on_path, path = set(), set(), []

  def visit(node):
    path.append(node)
    on_path.add(node)
    for succ in sorted(graph.get(node, ())):
      if succ in on_path:
        return path[path.index(succ):] + [succ]
      if succ not in done:
        cycle = visit(succ)
        if cycle:
          return cycle
    on_path.discard(path.pop())
    done.add(node)
    return None

  for node in sorted(graph):
    if node not in done:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


@pytest.mark.parametrize('package', PACKAGES)
def test_no_import_cycle(package):
  graph = import_graph(os.path.join(REPO, package), package)
  assert len(graph) > 1 and any(graph.values()), graph  # It read the package.
  cycle = find_cycle(graph)
  assert cycle is None, 'import circle: ' + ' -> '.join(cycle)


def _write_package(root, files):
  for name, source in files.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
  return str(root)


@pytest.mark.parametrize('files, cycle', [
    ({'_a.py': 'from pkg import _b\n', '_b.py': 'import os\n'}, None),
    # Module level, the two spellings of an absolute import.
    ({'_a.py': 'from pkg import _b\n', '_b.py': 'from pkg._a import f\n'},
     ['pkg._a', 'pkg._b', 'pkg._a']),
    # Inside a function, and `import pkg._x as x`.
    ({'_a.py': 'import pkg._b as b\n',
      '_b.py': 'def f():\n  from pkg import _a\n  return _a\n'},
     ['pkg._a', 'pkg._b', 'pkg._a']),
    # Relative imports, from a subpackage up to the top.
    ({'sub/__init__.py': '', 'sub/_c.py': 'from .. import _b\n',
      '_a.py': 'from .sub import _c\n', '_b.py': ''}, None),
    ({'sub/__init__.py': '', 'sub/_c.py': 'from .._a import f\n',
      '_a.py': 'from .sub._c import g\n'},
     ['pkg._a', 'pkg.sub._c', 'pkg._a']),
    # A name that __init__ defines, from a module that __init__ imports.
    ({'__init__.py': 'from pkg._a import f\nVERSION = 1\n',
      '_a.py': 'from pkg import VERSION\n'},
     ['pkg', 'pkg._a', 'pkg']),
])
def test_import_graph_and_find_cycle(tmp_path, files, cycle):
  files = {'__init__.py': '', **files}
  package_dir = _write_package(tmp_path / 'pkg', files)
  assert find_cycle(import_graph(package_dir, 'pkg')) == cycle


# -- train/: functions of one screen, one name each, flags and imports on top --

MAX_FUNCTION_LINES = 80
FIRST_PARTY = ('train', 'spd_optax', 'configs')


def _train_sources():
  modules = _modules(os.path.join(REPO, 'train'), 'train')
  for module, (path, _) in sorted(modules.items()):
    with open(path) as f:
      yield module, ast.parse(f.read(), filename=path)


def _functions(tree):
  return [n for n in ast.walk(tree)
          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_function_in_train_is_over_80_lines():
  long = [f'{module}.{fn.name}: {fn.end_lineno - fn.lineno + 1} lines'
          for module, tree in _train_sources() for fn in _functions(tree)
          if fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES]
  assert not long, long


def test_no_two_public_functions_of_a_recipe_share_a_name():
  """Within one recipe: ``train`` (the ViT's) and ``train.llm`` apart, as
  the LLM recipe mirrors the ViT's entry points (``train_and_evaluate``,
  ``make_mesh``, ``check``) on purpose, as Flax's examples each do."""
  seen = {}
  for module, tree in _train_sources():
    recipe = module.rsplit('.', 1)[0]
    for node in tree.body:  # Module level: the public API of each module.
      if isinstance(node, ast.FunctionDef) and not node.name.startswith('_'):
        seen.setdefault((recipe, node.name), []).append(module)
  # Every command line's absl entry point is `main`, as absl expects.
  shared = {n: m for n, m in seen.items() if len(m) > 1 and n[1] != 'main'}
  assert not shared, shared


def _is_flag_definition(call: ast.Call) -> bool:
  f = call.func
  return isinstance(f, ast.Attribute) and f.attr.startswith('DEFINE_')


def test_flags_are_defined_at_module_top_level_and_first_party_imports_too():
  misplaced = []
  for module, tree in _train_sources():
    top = set(map(id, tree.body))
    top |= {id(n.value) for n in tree.body if isinstance(n, ast.Expr)}
    for fn in _functions(tree):
      for node in ast.walk(fn):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
          names = ([a.name for a in node.names]
                   if isinstance(node, ast.Import) else [node.module or ''])
          if any(n.split('.')[0] in FIRST_PARTY for n in names):
            misplaced.append(f'{module}.{fn.name}: import of {names}')
    for node in ast.walk(tree):
      if isinstance(node, ast.Call) and _is_flag_definition(node) and (
          id(node) not in top):
        misplaced.append(f'{module}: a flag defined below the top level'
                         f' (line {node.lineno})')
  assert not misplaced, misplaced


# -- A folder per recipe, shared blocks under them ------------------------------

# Who may import whom inside train/: a recipe imports the shared folders
# (core; language for the language recipes) and spd_optax, never another
# recipe. The demo is the ViT recipe applied to the digits (each of its runs
# is a `python -m train` run), so it stands on vision; nothing stands on it.
ALLOWED = {
    'train.core': {'train.core'},
    'train.language': {'train.core', 'train.language'},
    'train.vision': {'train.core', 'train.vision'},
    'train.demo': {'train.core', 'train.vision', 'train.demo'},
    'train.llm': {'train.core', 'train.language', 'train.llm'},
    'train.vqa': {'train.core', 'train.language', 'train.vqa'},
    'train.segmentation': {'train.core', 'train.segmentation'},
    'train.__main__': {'train.core', 'train.vision'},
}


def _area(module: str) -> str:
  parts = module.split('.')
  return '.'.join(parts[:2]) if len(parts) > 1 else module


def test_each_recipe_imports_only_core_and_the_shared_blocks():
  graph = import_graph(os.path.join(REPO, 'train'), 'train')
  wrong = []
  for module, imported in sorted(graph.items()):
    if module == 'train':
      continue
    area = _area(module)
    assert area in ALLOWED, f'{module}: a new folder? add it to ALLOWED'
    wrong += [f'{module} imports {i}' for i in sorted(imported)
              if _area(i) not in ALLOWED[area] and i != 'train']
  assert not wrong, wrong


def _loaded_by(module: str) -> set[str]:
  code = ('import sys, importlib; importlib.import_module(%r);'
          ' print("\\n".join(sorted(sys.modules)))' % module)
  out = subprocess.run([sys.executable, '-c', code], cwd=REPO, check=True,
                       capture_output=True, text=True).stdout
  return set(out.split())


@pytest.mark.slow
def test_the_llm_loop_loads_no_tfds_and_no_vision_module():
  loaded = _loaded_by('train.llm.loop')
  assert 'train.llm.loop' in loaded  # It ran.
  bad = sorted(m for m in loaded if m.split('.')[0] == 'tensorflow_datasets'
               or m.startswith(('train.vision', 'train.demo')))
  assert not bad, bad
