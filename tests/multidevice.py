"""Runs a snippet in a fresh interpreter with 8 fake CPU devices.

XLA's device count is fixed when jax first initialises, so tests that need a
mesh run their body in a subprocess. The snippet asserts; the test checks
that it exited cleanly.
"""

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_with_devices(code: str, num_devices: int = 8, timeout: int = 600):
  env = dict(os.environ)
  env['XLA_FLAGS'] = (
      env.get('XLA_FLAGS', '')
      + f' --xla_force_host_platform_device_count={num_devices}')
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  result = subprocess.run(
      [sys.executable, '-c', textwrap.dedent(code)], env=env, cwd=REPO,
      capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, (
      f'snippet failed (exit {result.returncode}):\n{result.stdout}\n'
      f'{result.stderr[-5000:]}')
  return result.stdout
