r"""Images/s of fine-tuning steps: SPD against AdamW on the same model.

Run:  python -m benchmarks.finetune_throughput [--model ti/16] [--image-size 112]
      [--dtype bfloat16]

Builds the ViT once per optimizer, with ``train.vision.finetune``'s jitted, donating
``train_step`` (forward, backward, gradient clipping, optimizer, diagnostics),
and times rounds of steps interleaved across the optimizers on the same
synthetic batch, so that machine noise hits them alike. Prints images/s per
optimizer and the ratio to AdamW (the input pipeline, identical for all, is
left out). ``--dtype bfloat16`` runs the activations in bfloat16 (the params
stay float32), as on a GPU or TPU.
"""

import argparse

from flax import nnx
import jax
import numpy as np

from benchmarks import timing
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


def _host_batch(batch_size: int, image_size: int) -> dict:
  rng = np.random.default_rng(0)
  return {
      'image': rng.standard_normal((batch_size, image_size, image_size, 3),
                                   np.float32),
      'label': np.eye(1000, dtype=np.float32)[
          rng.integers(0, 1000, batch_size)],
  }


def _compiled_run(config, host_batch, steps: int):
  """A call that runs ``steps`` train steps of ``config``, warmed up."""
  mesh = mesh_lib.make_mesh(config)
  with jax.set_mesh(mesh):
    model = model_setup.make_model(config, nnx.Rngs(0))
    mesh_lib.shard_module(model, mesh)
    optimizer = nnx.Optimizer(
        model, optimizers.make_optimizer(config, lora=False), wrt=nnx.Param)
    batch = mesh_lib.shard_batch(host_batch, mesh)

  def call():
    with jax.set_mesh(mesh):
      for i in range(steps):
        out = finetune.train_step(model, optimizer, batch,
                                  jax.random.key(i), None)
    return out

  jax.block_until_ready(call())  # Compiles.
  return call


def images_per_second(model: str, image_size: int, batch_size: int, *,
                      methods=tuple(METHODS), dtype: str = '',
                      rounds: int = 7, steps: int = 3) -> dict[str, float]:
  """{method: images/s} of ``model``'s train step, interleaved rounds of
  ``steps`` steps; ``dtype``: the activations' ('' = float32)."""
  host_batch = _host_batch(batch_size, image_size)
  calls = {}
  for name in methods:
    config = _config(model, image_size, batch_size,
                     {**METHODS[name], 'model.dtype': dtype})
    calls[name] = _compiled_run(config, host_batch, steps)
  medians = timing.interleaved(calls, rounds)
  return {name: batch_size * steps / s for name, s in medians.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--model', default='ti/16')
  parser.add_argument('--image-size', type=int, default=112)
  parser.add_argument('--batch-size', type=int, default=32)
  parser.add_argument('--dtype', default='', help="activations; '' = float32")
  parser.add_argument('--rounds', type=int, default=7)
  parser.add_argument('--steps', type=int, default=3, help='per round')
  args = parser.parse_args()
  ips = images_per_second(args.model, args.image_size, args.batch_size,
                          dtype=args.dtype, rounds=args.rounds,
                          steps=args.steps)
  print(f'device: {jax.devices()[0].device_kind} x{jax.device_count()};'
        f' model {args.model} at {args.image_size}px, batch'
        f' {args.batch_size}; median of {args.rounds} rounds x'
        f' {args.steps} steps')
  print(f'{"optimizer":<10}{"images/s":>10}{"x adamw":>9}')
  for name, value in ips.items():
    print(f'{name:<10}{value:>10.1f}{value / ips["adamw"]:>9.3f}')


if __name__ == '__main__':
  main()
