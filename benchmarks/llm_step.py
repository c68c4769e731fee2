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

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import timing
from benchmarks.llm_shapes import SHAPES
from configs import commonsense
from train.core import optimizers
from train.language import families
from train.language import mesh as mesh_lib
from train.language import models
from train.llm import steps


def _mb(n: float) -> str:
  return f'{n / 2**20:.1f}'


def _batch(vocab, mesh, batch, micro_batch, seq):
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, vocab, (batch // micro_batch, micro_batch, seq),
                        np.int32)
  return jax.device_put({'input_ids': tokens,
                         'attention_mask': np.ones(tokens.shape, bool),
                         'loss_mask': np.ones(tokens.shape, np.int32)},
                        mesh_lib.rows_sharding(mesh, axis=1))


def _adapted(hf: dict, dtype: str):
  """``(model with the recipe's LoRA on random weights, mesh, LoRA config)``."""
  config = commonsense.get_config('llama7b')
  mesh = mesh_lib.make_mesh(config)
  loaded = models.random_init(hf, mesh=mesh, dtype=dtype)
  lora = config.model.lora
  adapted = models.add_lora(loaded, models.LoraSpec(
      lora.rank, lora.alpha, lora.dropout, tuple(lora.targets)), mesh=mesh,
                            seed=0)
  return adapted, mesh, lora


def _compiled_call(adapted, name: str, dtype: str, batch):
  """A call of one LoRA step with the recipe's optimizer ``name``, compiled
  and warmed up, and the compiled program."""
  config = commonsense.get_config(f'llama7b,{name}')
  tx = optimizers.make_optimizer(config, lora=True)
  lora = jax.tree.map(jnp.copy, adapted.lora.to_pure_dict())
  step = steps.make_train_step(adapted.graphdef, tx,
                               dtype=families.DTYPES[dtype],
                               spd=name == 'spd')
  state = [lora, steps.initial_opt_state(tx, lora)]
  compiled = step.lower(*state, adapted.base, batch,
                        jax.random.key(0)).compile()

  def call():
    *state[:], metrics = compiled(*state, adapted.base, batch,
                                  jax.random.key(0))
    return metrics

  jax.block_until_ready(call())
  return call, compiled, state


def time_lora_steps(hf: dict, *, dtype: str, batch: int, micro_batch: int,
                    seq: int, repeats: int, names=('adamw', 'spd')) -> dict:
  """{optimizer: median_s, state_bytes, xla}, plus 'adapter_params' and
  'lora' (rank, targets): the LoRA step on random weights of ``hf``'s
  shapes, interleaved rounds."""
  adapted, mesh, lora = _adapted(hf, dtype)
  out = {'adapter_params': sum(x.size for x in jax.tree.leaves(adapted.lora)),
         'lora': lora}
  calls = {}
  with jax.set_mesh(mesh):
    tokens = _batch(hf['vocab_size'], mesh, batch, micro_batch, seq)
    for name in names:
      calls[name], compiled, state = _compiled_call(adapted, name, dtype,
                                                    tokens)
      out[name] = dict(state_bytes=timing.tree_bytes(state[1]),
                       xla=timing.compiled_memory(compiled))
    for name, median in timing.interleaved(calls, repeats).items():
      out[name]['median_s'] = median
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
  out = time_lora_steps(SHAPES[args.shapes], dtype=args.dtype,
                        batch=args.batch, micro_batch=args.micro_batch,
                        seq=args.seq, repeats=args.repeats)
  lora = out['lora']
  print(f'{args.shapes} ({args.dtype}), LoRA r{lora.rank} on'
        f' {"/".join(lora.targets)}: {out["adapter_params"] / 1e6:.2f}M'
        f' adapter params; batch {args.batch} (micro {args.micro_batch}) x'
        f' {args.seq} tokens; {jax.device_count()}'
        f' {jax.devices()[0].platform} device(s)')
  print('| optimizer | median ms | x adamw | optimizer state MB |'
        ' XLA temporaries MB |')
  print('| --- | --- | --- | --- | --- |')
  base = out['adamw']['median_s']
  for name in ('adamw', 'spd'):
    r = out[name]
    print(f'| {name} | {1e3 * r["median_s"]:.1f} |'
          f' {r["median_s"] / base:.2f} | {_mb(r["state_bytes"])} |'
          f' {_mb(r["xla"]["temp"])} |')


if __name__ == '__main__':
  main()
