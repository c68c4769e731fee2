"""Fine-tune a Flax NNX ViT with SPD (or a baseline): the loop of ``python -m train``.

``train_and_evaluate(config, workdir)`` reads top to bottom in four phases:

1. **Set-up** (:func:`_set_up`): check the config, claim the workdir (one run
   per workdir, of one config: ``train.core.run_identity``), build the mesh, the
   model with its pre-trained weights (``train.vision.model_setup``), and the
   optimizer (``train.vision.train_modes``), which is built *after* the weights are
   loaded, so that SPD's and L2-SP's anchor is the pre-trained model.
2. **Restore** (:func:`_restore`): the newest intact checkpoint, if any
   (``train.core.checkpoints``), and the metrics logged up to it.
3. **Steps** (:func:`_train`): the jitted :func:`train_step`, with logging,
   evaluation and checkpoints when :class:`Schedule` says so, until the last
   step, ``config.max_steps_per_run`` steps, or a signal
   (``train.core.preemption``).
4. **Finish** (:func:`_finish`): the final evaluation (and WiSE-FT), the
   summary table.

Everything runs under one ``jax.set_mesh``. A signal saves the current step
and raises ``train.core.preemption.Preempted`` (the command line exits 0); the
same command resumes exactly.
"""

import contextlib
import dataclasses
import functools
import logging
import os
import time
from typing import Any, Optional

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
import tqdm

import spd_optax
from train.core import checkpoints
from train.vision import checks
from train.vision import evaluation
from train.vision import input_pipeline
from train.vision import locations
from train.vision import mesh as mesh_lib
from train.core import metrics as metrics_lib
from train.vision import model_setup
from train.core import preemption as preemption_lib
from train.core import run_identity
from train.vision import train_modes
from train.vision import wise_ft
from train.core import workdir_lock


# -- The step -------------------------------------------------------------------


def cross_entropy(logits: jax.Array, soft_labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy(logits, soft_labels).mean()


def _find(tree: Any, kind: type) -> list:
  """The states of type ``kind`` inside an optimizer state (its structure)."""
  is_kind = lambda s: isinstance(s, kind)
  return [s for s in jax.tree.leaves(tree, is_leaf=is_kind) if is_kind(s)]


def _masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


# The attention key biases have an exactly zero true gradient: SPD's choice on
# them is a coin toss, and Adam moves them by rounding noise. Left out of what
# is logged (not out of training).
LOGGED = spd_optax.exclude_paths(spd_optax.KEY_BIAS_PATTERN)


def deviation_norm(params: Any, anchor: Any) -> jax.Array:
  """``||theta - theta_0||`` over the leaves where ``anchor`` is not masked.

  The attention key biases are left out (:data:`LOGGED`).
  """
  pairs = zip(jax.tree.leaves(params), jax.tree.leaves(anchor, is_leaf=_masked),
              jax.tree.leaves(LOGGED(params)))
  squares = [jnp.sum(jnp.square(p.astype(jnp.float32) - a.astype(jnp.float32)))
             for p, a, logged in pairs if logged and not _masked(a)]
  return jnp.sqrt(sum(squares)) if squares else jnp.zeros([])


def drift_metrics(params: Any, opt_state: Any,
                  start_params: Optional[Any]) -> dict[str, jax.Array]:
  """How far training has moved from the pre-trained weights, to log.

  SPD's own diagnostics when the optimizer has SPD; else the deviation from
  L2-SP's anchor, or from ``start_params`` (a copy kept for Adam and AdamW);
  nothing for a LoRA run without SPD. Decided by the state's structure, at
  trace time. The attention key biases are left out of all of them, and a new
  head is (unless ``optimizer.decay_head``) as it is out of SPD and L2-SP.
  """
  if _find(opt_state, spd_optax.SPDState):
    return {k.replace('spd/', 'train/spd_'): v for k, v in
            spd_optax.diagnostics_summary(opt_state, mask=LOGGED).items()}
  anchored = [s.anchor for s in _find(opt_state, spd_optax.L2SPState)
              if not isinstance(s.anchor, optax.EmptyState)]
  reference = anchored[0] if anchored else start_params
  if reference is None:
    return {}
  return {'train/spd_deviation_norm': deviation_norm(params, reference)}


@functools.partial(nnx.jit, donate_argnames=('model', 'optimizer'))
def train_step(model: nnx.Module, optimizer: nnx.Optimizer, batch: dict,
               dropout_key: jax.Array, start_params: Optional[Any]) -> dict:
  """One step; returns the metrics to log (scalars, on device)."""

  def loss_fn(model):
    logits = model(batch['image'], train=True, dropout_key=dropout_key)
    return cross_entropy(logits.astype(jnp.float32), batch['label'])

  loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(
      0, optimizer.wrt))(model)
  optimizer.update(model, grads)
  params = nnx.as_pure(nnx.state(model, optimizer.wrt))
  return {'train/loss': loss, 'train/grad_norm': optax.tree.norm(grads),
          **drift_metrics(params, nnx.as_pure(optimizer.opt_state),
                          start_params)}


_fold_in = jax.jit(jax.random.fold_in)  # One dispatch, not one per op.


# -- When to log, evaluate and save ------------------------------------------


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Which steps of a run log, evaluate and save (steps count from 1).

  Attributes:
    total_steps: the run's steps (LP-FT: probe and fine-tuning).
    last_step: the last step of this invocation (``max_steps_per_run``).
    start_of_finetuning: after this step the model is the run's starting
      model (0; LP-FT: the probe's last step), saved for WiSE-FT.
    log_every, eval_every, checkpoint_every: the config's periods.
  """
  total_steps: int
  last_step: int
  start_of_finetuning: int
  log_every: int
  eval_every: int
  checkpoint_every: int

  @classmethod
  def of(cls, config: ml_collections.ConfigDict, start_step: int):
    total = train_modes.total_steps(config)
    last = total if config.max_steps_per_run <= 0 else min(
        total, start_step + config.max_steps_per_run)
    return cls(total, last, train_modes.start_step(config),
               config.log_every_steps, config.eval_every_steps,
               config.checkpoint_every_steps)

  def logs(self, step: int) -> bool:
    return step % self.log_every == 0 or step == self.total_steps

  def evaluates(self, step: int) -> bool:
    return step % self.eval_every == 0 or step == self.total_steps

  def saves(self, step: int) -> bool:
    """Periodically, at the last step, and at LP-FT's stage boundary."""
    return step % self.checkpoint_every == 0 or step in (
        self.last_step, self.start_of_finetuning)


# -- The run ------------------------------------------------------------------


@dataclasses.dataclass
class _Run:
  """What the phases of a run share."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  model: nnx.Module
  optimizer: nnx.Optimizer
  start_params: Optional[Any]  # Adam(W): the pre-trained weights, to log drift.
  checkpointer: checkpoints.Checkpointer
  writer: metrics_lib.MetricWriter

  def save(self, step: int) -> None:
    self.checkpointer.save(step, nnx.as_pure(nnx.state(self.model)),
                           nnx.as_pure(nnx.state(self.optimizer)),
                           {'step': step})

  def accuracies(self) -> dict[str, float]:
    return evaluation.accuracies(self.model, self.config, self.mesh)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *,
    print_summary: bool = True,
) -> dict[str, float]:
  """Trains, evaluates and checkpoints; returns the final eval metrics.

  Refuses a nonsensical config before any work, and a workdir that another
  run holds or that holds a run of another config. SIGTERM / SIGINT save the
  current step, then raise ``train.core.preemption.Preempted``.
  """
  checks.check(config, num_devices=jax.device_count())
  workdir = os.path.abspath(workdir)
  mesh = mesh_lib.make_mesh(config)
  with contextlib.ExitStack() as stack:
    stack.enter_context(workdir_lock.WorkdirLock(workdir))
    preemption = stack.enter_context(preemption_lib.Preemption())
    stack.enter_context(jax.set_mesh(mesh))
    run = _set_up(config, workdir, mesh)
    stack.enter_context(run.checkpointer)  # Its exit waits for saves.
    start_step = _restore(run)
    schedule = Schedule.of(config, start_step)
    eval_results = _train(run, start_step, schedule, preemption)
    return _finish(run, schedule, eval_results, print_summary)


def _set_up(config, workdir: str, mesh) -> _Run:
  """The workdir claimed; model, optimizer, checkpointer and metrics built."""
  input_pipeline.check_available(config.dataset)  # Prepares what it may.
  run_identity.claim_workdir(workdir, config,
                             ident=locations.identity(config))
  model = model_setup.make_model(config, nnx.Rngs(config.seed), workdir)
  mesh_lib.shard_module(model, mesh)
  wrt = train_modes.trainable(config)
  # Built after the weights are loaded: the anchor is the pre-trained model.
  optimizer = nnx.Optimizer(model, train_modes.make_run_optimizer(config),
                            wrt=wrt)
  start_params = None
  if config.optimizer.name in ('adam', 'adamw') and not (
      config.model.lora_rank > 0):
    start_params = _start_params(nnx.as_pure(nnx.state(model, wrt)),
                                 config.optimizer.decay_head)
  checkpointer = checkpoints.Checkpointer(
      os.path.join(workdir, 'checkpoints'), keep=config.keep_checkpoints,
      async_save=config.async_checkpointing)
  return _Run(config, workdir, mesh, model, optimizer, start_params,
              checkpointer, metrics_lib.MetricWriter(workdir))


def _start_params(params: Any, decay_head: bool) -> Any:
  """A copy of the trained params, to log drift from; the head masked out
  as SPD and L2-SP leave it out (``optimizer.decay_head=False``)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: optax.MaskedNode() if not decay_head and 'head' in
      jax.tree_util.keystr(path) else jnp.copy(x), params)


def _restore(run: _Run) -> int:
  """Restores the newest intact checkpoint; returns its step (0: none)."""
  restored = run.checkpointer.restore_latest(
      nnx.as_pure(nnx.state(run.model)), nnx.as_pure(nnx.state(run.optimizer)))
  start_step = 0
  if restored is not None:
    start_step, model_state, opt_state, _ = restored
    nnx.update(run.model, model_state)
    nnx.update(run.optimizer, opt_state)
    logging.info('Resumed from step %d in %s', start_step, run.workdir)
  # Rows logged after the checkpoint are logged again; at step 0 none is kept
  # (a run killed before its first save starts afresh).
  run.writer.truncate_after(start_step if start_step > 0 else -1)
  return start_step


def _evaluation_owed(run: _Run, step: int, schedule: Schedule) -> bool:
  """Whether ``step``, where the run starts, lacks an evaluation it is owed.

  Step 0 of a zero-shot run (zero-shot CLIP is logged), and a saved step that
  was not evaluated (preempted before, or its evaluation crashed).
  """
  if step == 0:
    owed = run.config.model.head_init == 'zeroshot'
  else:
    owed = schedule.evaluates(step) and not run.writer.has_row(step, 'eval/')
  return bool(multihost_utils.broadcast_one_to_all(np.bool_(owed)))


def _train(run: _Run, start_step: int, schedule: Schedule,
           preemption: preemption_lib.Preemption) -> dict[str, float]:
  """Steps ``start_step + 1 .. schedule.last_step``; the latest evaluation."""
  config, eval_results = run.config, {}
  if _evaluation_owed(run, start_step, schedule):
    eval_results = run.accuracies()
    run.writer.write(start_step, eval_results)
  _save_start_model_at(run, start_step, schedule)
  batches = input_pipeline.train_batches(
      config.dataset, global_batch_size=config.batch_size, seed=config.seed,
      start_step=start_step)
  root_key = jax.random.key(config.seed + 1)
  step_fn = nnx.cached_partial(train_step, run.model, run.optimizer)
  throughput = _Throughput()
  progress = tqdm.tqdm(
      total=schedule.total_steps, initial=start_step, desc='train',
      disable=not config.progress_bar or jax.process_index() != 0)
  for step in range(start_step + 1, schedule.last_step + 1):
    out = step_fn(mesh_lib.shard_batch(next(batches), run.mesh),
                  _fold_in(root_key, step), run.start_params)
    throughput.add(config.batch_size)
    stopping = preemption.reached(step)
    _save_start_model_at(run, step, schedule)
    saving = schedule.saves(step) or stopping
    if schedule.logs(step) or saving:  # No checkpoint may hold NaNs.
      out = jax.device_get(out)
      _check_finite(out, step, run)
    if schedule.logs(step):
      _log(run, step, out, throughput, progress)
    if saving:  # Before evaluating.
      run.save(step)
    progress.update(1)
    if stopping:  # Evaluated when the run resumes.
      progress.close()
      _stop(run, step, preemption)
    if schedule.evaluates(step):
      eval_results = _evaluate_keeping_training(run, step, saved=saving)
      run.writer.write(step, eval_results)
  progress.close()
  return eval_results


def _save_start_model_at(run: _Run, step: int, schedule: Schedule) -> None:
  """The run's starting model, for WiSE-FT, once ``step`` reaches it."""
  if step == schedule.start_of_finetuning:
    wise_ft.save_start_model(run.workdir, run.model)


def _check_finite(out: dict, step: int, run: _Run) -> None:
  """Stops on a non-finite loss or gradient unless the config skips them."""
  loss, grad_norm = out['train/loss'], out['train/grad_norm']
  if run.config.optimizer.skip_nonfinite or (
      np.isfinite(loss) and np.isfinite(grad_norm)):
    return
  raise FloatingPointError(
      f'Loss is {loss} and gradient norm {grad_norm} at step {step}; the'
      f' newest checkpoint in {run.workdir} is from before it. Lower'
      ' config.optimizer.learning_rate, or set'
      ' config.optimizer.skip_nonfinite=True to skip such steps'
      ' (optax.apply_if_finite).'
  )


class _Throughput:
  """Images per second since the last logged step."""

  def __init__(self):
    self.start, self.images = time.perf_counter(), 0

  def add(self, images: int) -> None:
    self.images += images

  def take(self) -> float:
    rate = self.images / max(time.perf_counter() - self.start, 1e-9)
    self.start, self.images = time.perf_counter(), 0
    return rate


def _log(run: _Run, step: int, out: dict, throughput: _Throughput,
         progress) -> None:
  out['train/learning_rate'] = train_modes.learning_rate(run.config, step)
  out['train/images_per_second'] = throughput.take()
  run.writer.write(step, out)
  progress.set_postfix(loss=f'{out["train/loss"]:.3f}',
                       img_s=f'{out["train/images_per_second"]:.0f}')


def _evaluate_keeping_training(run: _Run, step: int, *,
                               saved: bool) -> dict[str, float]:
  """Evaluates; if that crashes, ``step`` is saved first (and re-raised).

  The resumed run then evaluates it (:func:`_evaluation_owed`): an
  evaluation crash loses no training.
  """
  try:
    return run.accuracies()
  except Exception:
    if not saved:
      run.save(step)
    raise


def _stop(run: _Run, step: int, preemption: preemption_lib.Preemption):
  """After a signal: ``step`` is saved; wait for it, then tell the caller."""
  run.checkpointer.wait()
  run.writer.close()
  raise preemption_lib.Preempted(
      f'Stopped by {preemption.signal_name} after step {step}, saved in'
      f' {run.workdir}; run the same command to resume.')


def _finish(run: _Run, schedule: Schedule, eval_results: dict[str, float],
            print_summary: bool) -> dict[str, float]:
  """The final evaluation (and WiSE-FT) of a finished run; the summary."""
  config = run.config
  if schedule.last_step < schedule.total_steps:
    logging.info('Stopped after step %d (config.max_steps_per_run); run the'
                 ' same command to continue.', schedule.last_step)
  else:
    if not eval_results:  # Resumed a finished run: evaluate what is there.
      eval_results = run.accuracies()
    if config.wise_ft.alphas:
      eval_results.update(wise_ft.evaluate_alphas(
          run.model, run.workdir, config.wise_ft.alphas,
          lambda model: evaluation.accuracies(model, config, run.mesh)))
  run.checkpointer.close()
  run.writer.close()
  if print_summary and jax.process_index() == 0:
    rows = [[k.removeprefix('eval/').removesuffix('_accuracy'), v]
            for k, v in eval_results.items()]
    print(metrics_lib.format_table(rows, ['eval set', 'accuracy']))
  return eval_results
