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
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import spd_optax
from benchmarks import timing
from benchmarks.vit_shapes import num_params, shrink, vit_b16_shapes

OPTIMIZERS = {
    'adamw': lambda: optax.adamw(1e-4, weight_decay=0.1),
    'adam': lambda: optax.adam(1e-4),
    'adamspd': lambda: spd_optax.adamspd(1e-4, weight_decay=1.0),
    'adamspd_bf16_anchor': lambda: spd_optax.adamspd(
        1e-4, weight_decay=1.0, anchor_dtype=jnp.bfloat16),
    # LoRA's anchor (the recipe's): nothing stored, SPD decays towards 0.
    'adamspd_zero_anchor': lambda: spd_optax.adamspd(
        1e-4, weight_decay=1.0, anchor='zeros'),
    # The generic wrapper around a whole-tree optimizer.
    'spd(adam)': lambda: spd_optax.selective_projection_decay(
        optax.adam(1e-4), weight_decay=1.0),
    'adaml2sp': lambda: spd_optax.adaml2sp(1e-4, weight_decay=0.1),
    'adamftp': lambda: spd_optax.adamftp(1e-4, k=1.0),
}


def host_tree(shapes, seed: int, scale: float) -> dict[str, np.ndarray]:
  """N(0, scale^2) float32 leaves of ``shapes``, drawn by NumPy (no compile;
  a few seconds for ViT-L/14's 304M: draw once, put on the device often)."""
  rng = np.random.default_rng(seed)
  return {k: scale * rng.standard_normal(s, np.float32)
          for k, s in shapes.items()}


def make_step(opt):
  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state
  return step


def compiled_step(opt, host_params, grads):
  """``(compiled step, [params, state])`` after one warm-up step, from
  fresh device copies of ``host_params``."""
  params = jax.device_put(host_params)
  state = jax.jit(opt.init)(params)  # One program, not one per leaf and op.
  compiled = make_step(opt).lower(params, state, grads).compile()
  carry = list(compiled(params, state, grads))
  jax.block_until_ready(carry)
  return compiled, carry


def time_optimizers(shapes, factories: dict[str, Callable], repeats: int):
  """{name: median_s, state_bytes, xla (compiled memory)} of one step each,
  measured in interleaved rounds."""
  host_params = host_tree(shapes, 0, 0.02)
  grads = jax.device_put(host_tree(shapes, 1, 1e-3))
  calls, out = {}, {}
  for name, factory in factories.items():
    compiled, carry = compiled_step(factory(), host_params, grads)

    def call(compiled=compiled, carry=carry):
      carry[:] = compiled(*carry, grads)
      return carry[0]
    calls[name] = call
    out[name] = dict(state_bytes=timing.tree_bytes(carry[1]),
                     xla=timing.compiled_memory(compiled))
  for name, median in timing.interleaved(calls, repeats).items():
    out[name]['median_s'] = median
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=15)
  parser.add_argument('--small', action='store_true',
                      help='a 1/16-width model, for a quick smoke run')
  parser.add_argument('--only', nargs='*', default=None)
  args = parser.parse_args()

  shapes = vit_b16_shapes()
  if args.small:
    shapes = shrink(shapes, 4)
  names = args.only or list(OPTIMIZERS)
  print(f'device: {jax.devices()[0].device_kind} x{jax.device_count()}, '
        f'{len(shapes)} tensors, {num_params(shapes) / 1e6:.1f}M float32 params')
  runs = time_optimizers(shapes, {n: OPTIMIZERS[n] for n in names},
                         args.repeats)
  base = runs['adamw']['median_s'] if 'adamw' in runs else None
  param_bytes = 4 * num_params(shapes)
  print(f'{"optimizer":<22}{"median ms":>10}{"x adamw":>9}'
        f'{"state / params":>16}{"XLA temp MB":>13}')
  for name, r in runs.items():
    med = r['median_s']
    ratio = f'{med / base:.2f}' if base else '-'
    temp = r['xla']['temp'] if r['xla'] else -1
    print(f'{name:<22}{med * 1e3:>10.1f}{ratio:>9}'
          f'{r["state_bytes"] / param_bytes:>16.2f}{temp / 2**20:>13.1f}')


if __name__ == '__main__':
  main()
