r"""Images/s of fine-tuning steps: SPD against AdamW on the same model.

Run:  python -m benchmarks.finetune_throughput [--model ti/16] [--image-size 112]

Builds the ViT once per optimizer, with ``train.vision.finetune``'s jitted, donating
``train_step`` (forward, backward, gradient clipping, optimizer, diagnostics),
and times rounds of steps interleaved across the optimizers on the same
synthetic batch, so that machine noise hits them alike. Prints images/s per
optimizer and the ratio to AdamW (the input pipeline, identical for all, is
left out).
"""

import argparse
import statistics
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from configs import common
from train.vision import finetune
from train.vision import mesh as mesh_lib
from train.vision import model_setup
from train.core import optimizers

METHODS = {
    'adamw': {'optimizer.name': 'adamw'},
    'spd': {'optimizer.name': 'spd'},
    'l2sp': {'optimizer.name': 'l2sp'},
}


def _config(model: str, image_size: int, batch: int, overrides: dict):
  config = common.base_config()
  config.model.name = model
  config.model.num_classes = 1000
  config.dataset.image_size = image_size
  config.batch_size = batch
  config.num_train_steps = 1000
  config.update_from_flattened_dict(overrides)
  return config


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='ti/16')
  parser.add_argument('--image-size', type=int, default=112)
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--steps', type=int, default=3, help='per round')
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  host_batch = {
      'image': rng.normal(size=(args.batch_size, args.image_size,
                                args.image_size, 3)).astype(np.float32),
      'label': np.eye(1000, dtype=np.float32)[
          rng.integers(0, 1000, args.batch_size)],
  }
  runs = {}
  for name, overrides in METHODS.items():
    config = _config(args.model, args.image_size, args.batch_size, overrides)
    mesh = mesh_lib.make_mesh(config)
    with jax.set_mesh(mesh):
      model = model_setup.make_model(config, nnx.Rngs(0))
      mesh_lib.shard_module(model, mesh)
      optimizer = nnx.Optimizer(
          model, optimizers.make_optimizer(config, lora=False),
          wrt=nnx.Param)
      batch = mesh_lib.shard_batch(host_batch, mesh)
      out = finetune.train_step(model, optimizer, batch, jax.random.key(0),
                             None)  # Compiles.
      jax.block_until_ready(out)
    runs[name] = dict(model=model, optimizer=optimizer, batch=batch,
                      mesh=mesh, times=[])

  for r in range(args.rounds):
    for name, run in runs.items():
      with jax.set_mesh(run['mesh']):
        start = time.perf_counter()
        for i in range(args.steps):
          out = finetune.train_step(run['model'], run['optimizer'], run['batch'],
                                 jax.random.key(i), None)
        jax.block_until_ready(out)
      run['times'].append((time.perf_counter() - start) / args.steps)

  print(f'device: {jax.devices()[0].device_kind} x{jax.device_count()};'
        f' model {args.model} at {args.image_size}px, batch'
        f' {args.batch_size}; median of {args.rounds} rounds x'
        f' {args.steps} steps')
  base = args.batch_size / statistics.median(runs['adamw']['times'])
  print(f'{"optimizer":<10}{"images/s":>10}{"x adamw":>9}')
  for name, run in runs.items():
    ips = args.batch_size / statistics.median(run['times'])
    print(f'{name:<10}{ips:>10.1f}{ips / base:>9.3f}')


if __name__ == '__main__':
  main()
