"""What the checkpoint checksums and non-finite guard cost per save.

    python -m benchmarks.checkpoint_integrity

Times ``train.core.integrity.fingerprint`` (one jitted pass: checksums and
finiteness of every leaf) on the tiny config's model and SPD state, next to a
synchronous Orbax save of the same state, then on 256 MiB of float32 leaves
to give a cost per GB. Medians of 5 after one warm-up (the compile).
"""

import tempfile
import time

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from configs import tiny
from train.core import checkpoints
from train.core import integrity
from train.vision import model_setup
from train.core import optimizers


def _median_s(fn, repeats=5) -> float:
  fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def main():
  config = tiny.get_config()
  model = model_setup.make_model(config, nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optimizers.make_optimizer(config, lora=False),
                            wrt=nnx.Param)
  state = {'model': nnx.as_pure(nnx.state(model)),
           'optimizer': nnx.as_pure(nnx.state(optimizer))}
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  fp = _median_s(lambda: integrity.fingerprint(state))
  with tempfile.TemporaryDirectory() as d:
    ckpt = checkpoints.Checkpointer(d, keep=1)
    step = iter(range(1, 100))
    save = _median_s(lambda: ckpt.save(next(step), state['model'],
                                       state['optimizer'], {}))
    ckpt.close()
  print(f'tiny config: {nbytes / 2**20:.2f} MiB in'
        f' {len(jax.tree.leaves(state))} leaves; fingerprint'
        f' {fp * 1e3:.1f} ms, of a save taking {save * 1e3:.0f} ms in all')
  big = {f'w{i}': jnp.ones((4096, 4096), jnp.float32) for i in range(4)}
  fp_big = _median_s(lambda: integrity.fingerprint(big))
  print(f'256 MiB in 4 leaves: {fp_big * 1e3:.0f} ms, so about'
        f' {fp_big * 4:.2f} s per GiB on {jax.devices()[0].device_kind}')


if __name__ == '__main__':
  main()
