r"""One jitted, donating optimizer step on ViT-B/16 shapes: SPD vs AdamW.

Run:  python -m benchmarks.optimizer_step [--repeats 15] [--small]

Builds the 152 ViT-B/16 parameter tensors (86.6M float32), then times
``params, state = step(params, state, grads)`` for each optimizer in the same
process, interleaving the optimizers round by round and reporting the median,
so machine noise hits them alike. Prints each optimizer's time, its ratio to
``optax.adamw`` and XLA's compiled memory (state bytes and temporaries).

Besides ``adamspd`` it times the generic wrapper around ``optax.adam``, which
cannot run Adam leaf by leaf (the README explains the difference), and FTP's
``adamftp`` (AdamW plus an anchor and the previous move).
"""

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import spd_optax
from benchmarks.vit_shapes import num_params, vit_b16_shapes

OPTIMIZERS = {
    'adamw': lambda: optax.adamw(1e-4, weight_decay=0.1),
    'adam': lambda: optax.adam(1e-4),
    'adamspd': lambda: spd_optax.adamspd(1e-4, weight_decay=1.0),
    'adamspd_bf16_anchor': lambda: spd_optax.adamspd(
        1e-4, weight_decay=1.0, anchor_dtype=jnp.bfloat16),
    # The generic wrapper around a whole-tree optimizer.
    'spd(adam)': lambda: spd_optax.selective_projection_decay(
        optax.adam(1e-4), weight_decay=1.0),
    'adaml2sp': lambda: spd_optax.adaml2sp(1e-4, weight_decay=0.1),
    'adamftp': lambda: spd_optax.adamftp(1e-4, k=1.0),
}


def _tree_bytes(tree) -> int:
  return sum(x.nbytes for x in jax.tree.leaves(tree))


def make_step(opt):
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=15)
  parser.add_argument('--small', action='store_true',
                      help='a 1/16-width model, for a quick smoke run')
  parser.add_argument('--only', nargs='*', default=None)
  args = parser.parse_args()

  shapes = vit_b16_shapes()
  if args.small:
    shapes = {k: tuple(max(1, s // 4) for s in v) for k, v in shapes.items()}
  rng = np.random.default_rng(0)
  host = {k: rng.normal(size=s).astype(np.float32) * 0.02
          for k, s in shapes.items()}
  grads = {k: jnp.asarray(rng.normal(size=s).astype(np.float32) * 1e-3)
           for k, s in shapes.items()}
  names = args.only or list(OPTIMIZERS)
  print(f'device: {jax.devices()[0].device_kind} x{jax.device_count()}, '
        f'{len(shapes)} tensors, {num_params(shapes) / 1e6:.1f}M float32 params')

  runs = {}
  for name in names:
    opt = OPTIMIZERS[name]()
    params = jax.tree.map(jnp.asarray, host)
    state = opt.init(params)
    step = make_step(opt)
    compiled = step.lower(params, state, grads).compile()
    memory = compiled.memory_analysis()
    params, state = step(params, state, grads)  # Warm-up (compiles).
    jax.block_until_ready(params)
    runs[name] = dict(step=step, params=params, state=state, times=[],
                      state_bytes=_tree_bytes(state),
                      temp_bytes=getattr(memory, 'temp_size_in_bytes', -1))

  for _ in range(args.repeats):  # Interleaved rounds.
    for name in names:
      r = runs[name]
      start = time.perf_counter()
      r['params'], r['state'] = r['step'](r['params'], r['state'], grads)
      jax.block_until_ready(r['params'])
      r['times'].append(time.perf_counter() - start)

  base = statistics.median(runs['adamw']['times']) if 'adamw' in runs else None
  param_bytes = _tree_bytes(host)
  print(f'{"optimizer":<22}{"median ms":>10}{"x adamw":>9}'
        f'{"state / params":>16}{"XLA temp MB":>13}')
  for name in names:
    r = runs[name]
    med = statistics.median(r['times'])
    ratio = f'{med / base:.2f}' if base else '-'
    print(f'{name:<22}{med * 1e3:>10.1f}{ratio:>9}'
          f'{r["state_bytes"] / param_bytes:>16.2f}'
          f'{r["temp_bytes"] / 2**20:>13.1f}')


if __name__ == '__main__':
  main()
