r"""One LoRA train step of a decoder LLM: AdamW vs Adam-SPD, time and memory.

Run:  python -m benchmarks.llm_step [--shapes smoke|llama3_8b] [--batch 4]
      [--micro_batch 2] [--seq 128] [--repeats 10] [--dtype float32]

Builds the model of the given shapes with random weights on every device
(``train.language.models.random_init``: nothing is read or downloaded), puts the
commonsense recipe's LoRA on it (rank, alpha, dropout and targets of
``configs/commonsense.py``), and times the jitted step of
``train.llm.steps`` (forward, backward over the micro-batches, optimizer
update of the adapters) for each optimizer, interleaved round by round,
reporting the median. Memory is XLA's compiled estimate: the optimizer
state's bytes and the step's temporaries. ``--shapes smoke`` (the default)
runs on a CPU in seconds; ``--shapes llama3_8b --dtype bfloat16 --batch 16
--micro_batch 16 --seq 256`` is the paper-scale step, for a GPU.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import commonsense
from train.core import optimizers
from train.language import families
from train.language import mesh as mesh_lib
from train.language import models
from train.llm import steps

SHAPES = {
    'smoke': dict(model_type='llama', vocab_size=512, hidden_size=64,
                  intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2,
                  rms_norm_eps=1e-5, rope_theta=10_000.0),
    # meta-llama/Meta-Llama-3-8B's config.json.
    'llama3_8b': dict(model_type='llama', vocab_size=128_256,
                      hidden_size=4096, intermediate_size=14_336,
                      num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, rms_norm_eps=1e-5,
                      rope_theta=500_000.0),
}


def _mb(n: float) -> str:
  return f'{n / 2**20:.1f}'


def _batch(args, vocab, mesh):
  rng = np.random.default_rng(0)
  k = args.batch // args.micro_batch
  tokens = rng.integers(3, vocab, (k, args.micro_batch, args.seq), np.int32)
  return jax.device_put({'input_ids': tokens,
                         'attention_mask': np.ones(tokens.shape, bool),
                         'loss_mask': np.ones(tokens.shape, np.int32)},
                        mesh_lib.rows_sharding(mesh, axis=1))


def _steps(args, loaded, adapted, mesh):
  """{optimizer: (step, [lora, opt_state])} with the recipe's optimizers."""
  out = {}
  for name in ('adamw', 'spd'):
    config = commonsense.get_config(f'llama7b,{name}')
    tx = optimizers.make_optimizer(config, lora=True)
    lora = jax.tree.map(jnp.copy, adapted.lora.to_pure_dict())
    step = steps.make_train_step(adapted.graphdef, tx,
                                 dtype=families.DTYPES[args.dtype],
                                 spd=name == 'spd')
    out[name] = (step, [lora, steps.initial_opt_state(tx, lora)])
  del loaded, mesh
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--shapes', choices=sorted(SHAPES), default='smoke')
  parser.add_argument('--dtype', choices=sorted(families.DTYPES),
                      default='float32')
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--micro_batch', type=int, default=2)
  parser.add_argument('--seq', type=int, default=128)
  parser.add_argument('--repeats', type=int, default=10)
  args = parser.parse_args()
  config = commonsense.get_config('llama7b')
  mesh = mesh_lib.make_mesh(config)
  loaded = models.random_init(SHAPES[args.shapes], mesh=mesh,
                              dtype=args.dtype)
  lora = config.model.lora
  adapted = models.add_lora(loaded, models.LoraSpec(
      lora.rank, lora.alpha, lora.dropout, tuple(lora.targets)), mesh=mesh,
                            seed=0)
  batch = _batch(args, SHAPES[args.shapes]['vocab_size'], mesh)
  runs = _steps(args, loaded, adapted, mesh)
  times = {name: [] for name in runs}
  memory = {}
  with jax.set_mesh(mesh):
    for name, (step, state) in runs.items():
      compiled = step.lower(*state, adapted.base, batch,
                            jax.random.key(0)).compile()
      memory[name] = (sum(x.nbytes for x in jax.tree.leaves(state[1])),
                      compiled.memory_analysis().temp_size_in_bytes)
    for r in range(args.repeats + 1):  # Round 0 compiles and warms up.
      for name, (step, state) in runs.items():
        start = time.perf_counter()
        *state[:], out = step(*state, adapted.base, batch, jax.random.key(r))
        jax.block_until_ready(out)
        if r:
          times[name].append(time.perf_counter() - start)
  adapters = sum(x.size for x in jax.tree.leaves(adapted.lora))
  print(f'{args.shapes} ({args.dtype}), LoRA r{lora.rank} on'
        f' {"/".join(lora.targets)}: {adapters / 1e6:.2f}M adapter params;'
        f' batch {args.batch} (micro {args.micro_batch}) x {args.seq} tokens;'
        f' {jax.device_count()} {jax.devices()[0].platform} device(s)')
  print('| optimizer | median ms | x adamw | optimizer state MB |'
        ' XLA temporaries MB |')
  print('| --- | --- | --- | --- | --- |')
  base = statistics.median(times['adamw'])
  for name, t in times.items():
    median = statistics.median(t)
    print(f'| {name} | {1e3 * median:.1f} | {median / base:.2f} |'
          f' {_mb(memory[name][0])} | {_mb(memory[name][1])} |')


if __name__ == '__main__':
  main()
