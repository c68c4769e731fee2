"""Top-1 accuracy of a classifier on every evaluation set of a config.

The sets are ``input_pipeline.eval_sets(config.dataset)``: the ID validation
split (``val``, for model selection), the ID test split (``id``) and every
OOD set. Each is read once, in padded global batches whose ``mask`` marks the
real examples, so the accuracy is exact whatever the batch size and device
count. :func:`evaluate_zero_shot` evaluates zero-shot CLIP, untrained
(``python -m train.vision.zeroshot_main``).
"""

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections

from train.vision import input_pipeline
from train.vision import mesh as mesh_lib
from train.vision import model_setup

ZERO_SHOT_RESULTS = 'zeroshot.json'  # Written by python -m train.vision.zeroshot_main.


@nnx.jit
def eval_step(model: nnx.Module, batch: dict) -> tuple[jax.Array, jax.Array]:
  """``(correct, counted)`` examples of one batch (padding not counted)."""
  logits = model(batch['image'], train=False)
  correct = (jnp.argmax(logits, -1) == batch['label']) & batch['mask']
  return jnp.sum(correct), jnp.sum(batch['mask'])


def accuracies(model: nnx.Module, config: ml_collections.ConfigDict,
               mesh: jax.sharding.Mesh) -> dict[str, float]:
  """``{'eval/<set>_accuracy': top-1}`` for every evaluation set."""
  results = {}
  for display, (name, split) in input_pipeline.eval_sets(
      config.dataset).items():
    correct = total = 0
    for batch in input_pipeline.eval_batches(
        config.dataset, name, split, global_batch_size=config.eval_batch_size
    ):
      c, t = eval_step(model, mesh_lib.shard_batch(batch, mesh))
      # One batch in flight at a time: on CPU, several dispatched programs
      # with cross-device sums can deadlock XLA's collectives.
      correct += int(c)
      total += int(t)
    results[f'eval/{display}_accuracy'] = correct / max(total, 1)
  return results


def evaluate_zero_shot(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, float]:
  """Zero-shot CLIP's accuracies: the model of step 0, not trained.

  Built exactly as step 0 of a ``head_init='zeroshot'`` run is
  (``train.vision.model_setup.make_model``; its head cached in ``workdir``), and
  evaluated as a run evaluates (:func:`accuracies`).

  Args:
    config: a config with ``model.head_init='zeroshot'``, checked.
    workdir: where the zero-shot head is cached.
  """
  input_pipeline.check_available(config.dataset)
  mesh = mesh_lib.make_mesh(config)
  with jax.set_mesh(mesh):
    model = model_setup.make_model(config, nnx.Rngs(config.seed), workdir)
    mesh_lib.shard_module(model, mesh)
    return accuracies(model, config, mesh)
