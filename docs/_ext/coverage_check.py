"""Fails the docs build when a public name of spd_optax has no page.

Every name in ``spd_optax.__all__`` must be documented (``autofunction``,
``autoclass``, ``py:data``...) on some page as ``spd_optax.<name>``; a missing
one is reported as a warning, which ``-W`` turns into an error.
"""

from sphinx.util import logging

import spd_optax

logger = logging.getLogger(__name__)


def _check(app, env):
  del app
  documented = set(env.get_domain('py').objects)
  missing = sorted(
      name for name in spd_optax.__all__
      if f'spd_optax.{name}' not in documented
  )
  if missing:
    logger.warning(
        'coverage_check: public names of spd_optax without an API page: %s'
        ' (add them to a page under docs/api/).', ', '.join(missing))


def setup(app):
  app.connect('env-check-consistency', _check)
  return {'parallel_read_safe': True, 'parallel_write_safe': True}
