r"""WiSE-FT: interpolate a fine-tuned model with the model it started from.

Wortsman et al. (CVPR 2022) evaluate, for several :math:`\alpha \in [0, 1]`,

.. math::
  \theta(\alpha) = (1 - \alpha)\, \theta_\text{start} + \alpha\,
  \theta_\text{fine-tuned},

every array of the model, head included. The interface:

- **The starting model** of a run is the model as it is at fine-tuning step
  0: the pre-trained weights loaded, plus the head as initialised (a new
  head; for CLIP runs the zero-shot head ``train.vision.model_setup.make_model``
  builds; for LP-FT the probed head, the start of stage 2).
  ``train.vision.finetune.train_and_evaluate`` saves it once, atomically, before that
  first fine-tuning step, to ``WORKDIR/start_model.npz``
  (:func:`save_start_model`): one array per leaf of
  ``nnx.to_pure_dict(nnx.state(model))``, keyed by its ``keystr`` path.
- :func:`interpolate` ``(start, finetuned, alpha)`` is pure, on pytrees of
  the same structure: :math:`\alpha = 0` gives ``start`` and
  :math:`\alpha = 1` gives ``finetuned`` exactly; non-float leaves must be
  equal in both.
- At the end of a run, ``config.wise_ft.alphas`` (a tuple; empty = off) are
  evaluated on every eval set; the accuracies join the run's results as
  ``wise_ft/<alpha>/eval/<set>_accuracy`` and are written to
  ``WORKDIR/wise_ft.json``.
- On any finished run's workdir (its ``config.json``, newest checkpoint and
  ``start_model.npz``), :func:`evaluate_finished_run` evaluates the alphas
  (default: the config's, else those five) and writes ``DIR/wise_ft.json``;
  ``python -m train.vision.wise_ft_main --workdir DIR [--alphas 0,0.25,0.5,0.75,1]``
  does it and prints a table.

Example:

>>> import numpy as np
>>> start, tuned = {'w': np.float32([0., 2.])}, {'w': np.float32([4., 4.])}
>>> interpolate(start, tuned, 0.5)['w']
array([2., 3.], dtype=float32)
"""

import json
import os
from typing import Any, Callable, Optional, Sequence

from flax import nnx
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from train.core import checkpoints
from train.vision import evaluation
from train.core import files
from train.vision import mesh as mesh_lib
from train.vision import model_setup
from train.vision import train_modes

START_FILE = 'start_model.npz'
RESULTS_FILE = 'wise_ft.json'
DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def interpolate(start: Any, finetuned: Any, alpha: float) -> Any:
  """``(1 - alpha) * start + alpha * finetuned``, leaf by leaf, dtype kept."""
  if jax.tree.structure(start) != jax.tree.structure(finetuned):
    raise ValueError('WiSE-FT: the starting and fine-tuned models differ in'
                     ' structure.')

  def mix(path, s, f):
    s, f = np.asarray(s), np.asarray(f)
    if s.shape != f.shape:
      raise ValueError(f'WiSE-FT: {jax.tree_util.keystr(path)} has shape'
                       f' {s.shape} at the start and {f.shape} fine-tuned.')
    if not np.issubdtype(f.dtype, np.floating):
      if not np.array_equal(s, f):
        raise ValueError(f'WiSE-FT: the non-float leaf'
                         f' {jax.tree_util.keystr(path)} differs.')
      return f
    a = f.dtype.type(alpha)
    return (f.dtype.type(1) - a) * s.astype(f.dtype) + a * f

  return jax.tree_util.tree_map_with_path(mix, start, finetuned)


def save_start_model(workdir: str, model: nnx.Module) -> str:
  """Writes the model's state to ``WORKDIR/start_model.npz`` unless there."""
  path = os.path.join(workdir, START_FILE)
  state = nnx.to_pure_dict(nnx.state(model))
  flat = {jax.tree_util.keystr(p): np.asarray(
      multihost_utils.process_allgather(x, tiled=True))
          for p, x in jax.tree_util.tree_leaves_with_path(state)}
  if jax.process_index() == 0 and not os.path.exists(path):
    with files.atomic_write(path, 'wb') as f:
      np.savez(f, **flat)
  return path


def load_start_model(workdir: str, like: Any) -> Any:
  """The saved starting model, as a pytree structured like ``like``."""
  path = os.path.join(workdir, START_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'WiSE-FT needs the starting model {path}, which runs save before'
        ' their first fine-tuning step; this run has none.')
  with np.load(path) as saved:
    leaves = []
    for p, x in jax.tree_util.tree_leaves_with_path(like):
      key = jax.tree_util.keystr(p)
      if key not in saved:
        raise ValueError(f'{path} has no array {key}: it is not this run\'s'
                         ' starting model.')
      if saved[key].shape != np.shape(x):
        raise ValueError(f'{path}: {key} has shape {saved[key].shape}, the'
                         f' model {np.shape(x)}.')
      leaves.append(saved[key])
  return jax.tree.unflatten(jax.tree.structure(like), leaves)


def evaluate_alphas(model, workdir: str, alphas: Sequence[float],
                    evaluate: Callable[[Any], dict]) -> dict[str, float]:
  """Accuracies of every alpha; the model is left as it was.

  Args:
    model: the fine-tuned NNX model (its state is swapped, then restored).
    workdir: the run's workdir (holds ``start_model.npz``).
    alphas: the interpolation weights of the fine-tuned model.
    evaluate: ``model -> {'eval/<set>_accuracy': ...}``.

  Returns:
    ``{'wise_ft/<alpha>/eval/<set>_accuracy': ...}``, also written to
    ``WORKDIR/wise_ft.json``.
  """
  state = nnx.state(model)
  finetuned = jax.tree.map(np.asarray, nnx.to_pure_dict(state))
  start = load_start_model(workdir, finetuned)
  shardings = jax.tree.map(lambda x: x.sharding, nnx.to_pure_dict(state))
  results, by_alpha = {}, {}
  for alpha in alphas:
    if not 0.0 <= alpha <= 1.0:
      raise ValueError(f'config.wise_ft.alphas: {alpha} is not in [0, 1].')
    mixed = jax.device_put(interpolate(start, finetuned, alpha), shardings)
    nnx.replace_by_pure_dict(state, mixed)
    nnx.update(model, state)
    by_alpha[str(float(alpha))] = accuracies = evaluate(model)
    results.update({f'wise_ft/{float(alpha)}/{k}': v
                    for k, v in accuracies.items()})
  nnx.replace_by_pure_dict(state, jax.device_put(finetuned, shardings))
  nnx.update(model, state)
  if jax.process_index() == 0:
    with files.atomic_write(os.path.join(workdir, RESULTS_FILE)) as f:
      json.dump(by_alpha, f, indent=2)
  return results


def evaluate_finished_run(
    workdir: str, alphas: Optional[Sequence[float]] = None,
    config: Optional[ml_collections.ConfigDict] = None,
) -> dict[float, dict[str, float]]:
  """Evaluates WiSE-FT on a finished run; returns ``{alpha: accuracies}``.

  Args:
    workdir: the run's workdir: its newest checkpoint must be the final step.
    alphas: default: the config's ``wise_ft.alphas``, else
      :data:`DEFAULT_ALPHAS`.
    config: the run's config; default: its ``config.json``. (A caller that
      moved the workdir passes the config with the current paths.)
  """
  workdir = os.path.abspath(workdir)
  if config is None:
    config = _saved_config(workdir)
  alphas = tuple(alphas or config.wise_ft.alphas or DEFAULT_ALPHAS)
  directory = os.path.join(workdir, 'checkpoints')
  step = train_modes.total_steps(config)
  if step not in checkpoints.Checkpointer(directory).all_steps():
    raise FileNotFoundError(f'{directory} has no checkpoint of the final step'
                            f' {step}: the run is not finished.')
  mesh = mesh_lib.make_mesh(config)
  with jax.set_mesh(mesh):
    model = model_setup.make_model(config, nnx.Rngs(config.seed), workdir)
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, checkpoints.read_step(directory,
                                                          step)['model'])
    nnx.update(model, state)
    mesh_lib.shard_module(model, mesh)
    results = evaluate_alphas(
        model, workdir, alphas,
        lambda m: evaluation.accuracies(m, config, mesh))
  return {a: {k.split('/', 2)[2]: v for k, v in results.items()
              if k.startswith(f'wise_ft/{float(a)}/')} for a in alphas}


def _saved_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} is missing: --workdir must be a'
                            ' run\'s workdir.')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))
