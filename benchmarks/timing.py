"""What every benchmark here shares: interleaved timing and memory figures.

Each benchmark times several variants (optimizers) of one step in the same
process, round by round, so that machine noise hits them alike, and reports
the median against ``optax.adamw``'s.
"""

import statistics
import time
from typing import Any, Callable, Optional

import jax


def interleaved(calls: dict[str, Callable[[], Any]],
                rounds: int) -> dict[str, float]:
  """Median seconds of each call over ``rounds`` rounds, one call of each
  per round in turn. A call returns what to block on (its device output);
  warm it up (compile) before."""
  times = {name: [] for name in calls}
  for _ in range(rounds):
    for name, call in calls.items():
      start = time.perf_counter()
      jax.block_until_ready(call())
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def tree_bytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def compiled_memory(compiled) -> Optional[dict[str, int]]:
  """XLA's memory analysis of a compiled program (bytes), None where the
  backend gives none."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  fields = ('argument', 'output', 'alias', 'temp', 'generated_code')
  out = {f: int(getattr(analysis, f'{f}_size_in_bytes')) for f in fields}
  peak = getattr(analysis, 'peak_memory_in_bytes', None)
  out['peak'] = None if peak is None else int(peak)
  return out
