"""Sphinx configuration of the spd_optax documentation, in optax's manner.

Build (warnings are errors; the second command runs every example):

    python -m sphinx -W -b html docs docs/_build/html
    python -m sphinx -W -b doctest docs docs/_build/doctest
"""

import os
import sys

# The package from this checkout, whether or not it is installed; and the
# coverage check beside this file.
DOCS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(DOCS))
sys.path.insert(0, os.path.join(DOCS, '_ext'))

import spd_optax  # pylint: disable=g-import-not-at-top,wrong-import-position

project = 'spd_optax'
author = 'the spd_optax authors'
copyright = '2026, the spd_optax authors'  # pylint: disable=redefined-builtin
release = version = spd_optax.__version__

extensions = [
    'sphinx.ext.autodoc',
    'sphinx.ext.autosummary',
    'sphinx.ext.doctest',
    'sphinx.ext.intersphinx',
    'sphinx.ext.mathjax',
    'sphinx.ext.napoleon',
    'myst_parser',  # The README's demo and performance sections, included.
    'coverage_check',  # Fails the build when a public name has no page.
]

source_suffix = {'.rst': 'restructuredtext', '.md': 'markdown'}
exclude_patterns = ['_build']
templates_path = []

# -- autodoc / autosummary / napoleon ------------------------------------------
autosummary_generate = False  # Each API page lists its names by hand.
autodoc_typehints = 'none'  # Signatures stay readable; Args say the types.
autodoc_member_order = 'bysource'
autodoc_default_options = {'members': False}
add_module_names = False
python_use_unqualified_type_names = True  # SPDState.diagnostics: ProjectionDiagnostics.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# -- doctest --------------------------------------------------------------------
# What every example may take for granted, so that examples stay short.
doctest_global_setup = '''
import jax
import jax.numpy as jnp
import numpy as np
import optax
import spd_optax
'''
doctest_test_doctest_blocks = 'default'  # The docstrings' `>>>` examples too.

# -- intersphinx ----------------------------------------------------------------
# CI builds offline, where fetching inventories fails (and -W would make that
# an error): links to jax, optax and Python are made only when asked for.
intersphinx_mapping = {}
if os.environ.get('SPD_OPTAX_DOCS_ONLINE') == '1':
  intersphinx_mapping = {
      'python': ('https://docs.python.org/3', None),
      'jax': ('https://docs.jax.dev/en/latest', None),
      'optax': ('https://optax.readthedocs.io/en/latest', None),
      'flax': ('https://flax.readthedocs.io/en/latest', None),
  }

# -- MyST (the README sections included in the demo and performance pages) ----
myst_heading_anchors = 2
suppress_warnings = ['myst.header']  # The README's sections use `###`.

# -- HTML -----------------------------------------------------------------------
html_theme = 'sphinx_book_theme'
html_title = 'spd_optax'
html_theme_options = {
    'show_toc_level': 2,
    'navigation_with_keys': False,
}
