r"""The device check's optimizer steps: shape sets, optimizers, peak memory.

The optimizer step is measured on three sets of parameter shapes (ViT-B/16,
ViT-L/14, and the LoRA adapters of Llama-3-8B: rank 32 on q, k, v, up and
down, as ``configs/commonsense.py``), each with ``adamw``, ``adamspd``
(float32 and bfloat16 anchors), ``adaml2sp`` and FTP's ``adamftp``; the LoRA set also with ``adamspd``'s zero anchor (the LoRA recipe's,
which stores nothing).

Peak device memory comes from ``device.memory_stats()``, which GPUs and TPUs
give and CPUs do not. JAX cannot reset a peak, so each optimizer is measured
in a process of its own, its shape sets smallest first, and a set whose step
does not raise the process's peak gets no number (null, and why):

    python -m benchmarks.optimizer_sets --memory_child adamspd [--width_div 8 --depth 2]

prints ``{"memory_stats": bool, "peaks": {set: [bytes or null, why not]}}``.
"""

import argparse
import json
import os
import subprocess
import sys

import jax

from benchmarks import llm_shapes
from benchmarks import optimizer_step
from benchmarks import vit_shapes
from configs import commonsense

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPTIMIZERS = ('adamw', 'adamspd', 'adamspd_bf16_anchor', 'adaml2sp', 'adamftp')
LORA_SET = 'llama3_8b_lora'
LORA_ONLY = ('adamspd_zero_anchor',)  # Rows of the LoRA set alone.
CHILD_TIMEOUT_S = 300


def shape_sets(width_div: int = 1,
               depth: int | None = None) -> dict[str, dict]:
  """{set: {name: shape}}, smallest set first; ``width_div`` divides every
  width and ``depth`` (when given) replaces every depth."""
  lora = commonsense.get_config('llama7b').model.lora
  hf = dict(llm_shapes.SHAPES['llama3_8b'])
  hf.update(hidden_size=hf['hidden_size'] // width_div,
            intermediate_size=hf['intermediate_size'] // width_div,
            num_hidden_layers=depth or hf['num_hidden_layers'])
  sets = {
      LORA_SET: llm_shapes.lora_adapter_shapes(hf, lora.rank, lora.targets),
      'vit_b16': vit_shapes.vit_shapes(768 // width_div, depth or 12,
                                       3072 // width_div, 16),
      'vit_l14': vit_shapes.vit_shapes(1024 // width_div, depth or 24,
                                       4096 // width_div, 14),
  }
  return dict(sorted(sets.items(),
                     key=lambda kv: vit_shapes.num_params(kv[1])))


def factories(shape_set: str) -> dict:
  """``{name: factory}`` of the set's optimizers."""
  names = OPTIMIZERS + (LORA_ONLY if shape_set == LORA_SET else ())
  return {n: optimizer_step.OPTIMIZERS[n] for n in names}


def _step_peak(factory, shapes) -> tuple:
  """``(peak bytes, None)`` of one optimizer step built from nothing on the
  device (params, gradients, state, temporaries), or ``(None, why not)``."""
  device = jax.devices()[0]
  before = device.memory_stats()
  grads = jax.device_put(optimizer_step.host_tree(shapes, 1, 1e-3))
  optimizer_step.compiled_step(  # Blocks.
      factory(), optimizer_step.host_tree(shapes, 0, 0.02), grads)
  after = device.memory_stats()
  if after['peak_bytes_in_use'] <= before['peak_bytes_in_use']:
    return None, 'below a peak this process reached before'
  return after['peak_bytes_in_use'] - before['bytes_in_use'], None


def memory_child(name: str, width_div: int, depth: int | None) -> dict:
  """What ``--memory_child`` prints: optimizer ``name``'s peaks."""
  device = jax.devices()[0]
  if device.memory_stats() is None:
    return dict(memory_stats=False, peaks={})
  peaks = {}
  for shape_set, shapes in shape_sets(width_div, depth).items():
    found, _ = factories(shape_set)
    if name in found:
      peaks[shape_set] = _step_peak(found[name], shapes)
  return dict(memory_stats=True, peaks=peaks)


def _run_children(names, width_div: int, depth: int | None) -> dict:
  """{name: the child's output, or the error as a string}, side by side."""
  env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE='false')
  command = [sys.executable, '-m', 'benchmarks.optimizer_sets',
             '--width_div', str(width_div)] + (
                 ['--depth', str(depth)] if depth else [])
  children = {name: subprocess.Popen(
      command + ['--memory_child', name], cwd=REPO, env=env,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for name in names}
  out = {}
  for name, child in children.items():
    try:
      stdout, stderr = child.communicate(timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
      child.kill()
      stdout, stderr = child.communicate()
      stderr = f'timed out after {CHILD_TIMEOUT_S} s'
    out[name] = (json.loads(stdout.splitlines()[-1]) if child.returncode == 0
                 else f'the measuring process failed: {stderr.strip()[-300:]}')
  return out


def peak_memory(names, width_div: int = 1, depth: int | None = None) -> dict:
  """{(set, optimizer): (peak bytes or None, why not)}. Call it before this
  process takes the device (a GPU's client reserves most of its memory).
  The first optimizer's process tells whether the device has memory stats;
  the others then run side by side."""
  names = list(names)
  first = _run_children(names[:1], width_div, depth)
  if isinstance(first[names[0]], dict) and not first[names[0]][
      'memory_stats']:
    why = 'the device gives no memory_stats() (a CPU)'
    return {(s, n): (None, why) for s in shape_sets(width_div, depth)
            for n in names}
  runs = first | _run_children(names[1:], width_div, depth)
  peaks = {}
  for name, run in runs.items():
    for shape_set in shape_sets(width_div, depth):
      if isinstance(run, str):
        peaks[shape_set, name] = (None, run)
      elif shape_set in run['peaks']:
        peaks[shape_set, name] = tuple(run['peaks'][shape_set])
  return peaks


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--memory_child', required=True,
                      help='the optimizer whose peaks to measure')
  parser.add_argument('--width_div', type=int, default=1)
  parser.add_argument('--depth', type=int, default=None)
  args = parser.parse_args()
  print(json.dumps(memory_child(args.memory_child, args.width_div,
                                args.depth)))


if __name__ == '__main__':
  main()
