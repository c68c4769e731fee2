"""Fine-tune a Flax NNX ViT with SPD (or a baseline) on any number of devices.

Read top to bottom: build the mesh, the model (and load pre-trained weights),
the optimizer (its anchor is the loaded weights); restore the newest checkpoint
if there is one; then the jitted train step and the loop with periodic
evaluation on the in-distribution and out-of-distribution sets, metrics and
checkpoints.
"""

import contextlib
import functools
import json
import logging
import os
import time
from typing import Any, Iterator

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
import tqdm

import spd_optax
from train import checkpoints
from train import config_checks
from train import input_pipeline
from train import lp_ft
from train import metrics as metrics_lib
from train import models
from train import optimizers
from train import preemption as preemption_lib
from train import weights
from train import wise_ft
from train import workdir_lock
from train import zeroshot


# -- Mesh and sharding --------------------------------------------------------

def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """A ('data', 'fsdp') mesh over every device of every process."""
  num_devices = jax.device_count()
  fsdp = config.mesh.fsdp
  data = config.mesh.data if config.mesh.data > 0 else num_devices // fsdp
  if data * fsdp != num_devices:
    raise ValueError(
        f'config.mesh: data={config.mesh.data} x fsdp={fsdp} does not cover'
        f' the {num_devices} devices.'
    )
  # Auto axes: the compiler propagates shardings from the annotated params
  # and batches through the model.
  return jax.make_mesh((data, fsdp), ('data', 'fsdp'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def batch_sharding(mesh) -> NamedSharding:
  """Batches are split over every device (both mesh axes)."""
  return NamedSharding(mesh, P(('data', 'fsdp')))


def shard_batch(batch: dict, mesh) -> dict:
  """This process's slice of a global batch -> a global sharded array."""
  sharding = batch_sharding(mesh)
  return {
      k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
      for k, v in batch.items()
  }


# -- Model and optimizer ------------------------------------------------------

def make_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs,
               workdir: str | None = None):
  """The ViT of ``config.model``, with pre-trained weights when given.

  With ``config.model.head_init='zeroshot'`` the head is CLIP's zero-shot
  classifier (``train.zeroshot``; cached in ``workdir`` when given).
  """
  kwargs = models.get_model_kwargs(config.model.name)
  kwargs.update(
      num_classes=config.model.num_classes,
      image_size=config.dataset.image_size,
      drop_path_rate=config.model.drop_path_rate,
      lora_rank=config.model.lora_rank,
  )
  if config.model.pool:
    kwargs['pool'] = config.model.pool
  if config.model.lora_alpha:
    kwargs['lora_alpha'] = config.model.lora_alpha
  if config.model.dtype:  # Activations only: params keep param_dtype.
    kwargs['dtype'] = jnp.dtype(config.model.dtype)
  kwargs['param_dtype'] = jnp.dtype(config.model.param_dtype)
  if config.model.head_init not in ('', 'zeroshot'):
    raise ValueError(f'config.model.head_init={config.model.head_init!r}:'
                     " expected '' or 'zeroshot'.")
  zero_shot = config.model.head_init == 'zeroshot'
  if zero_shot:
    zeroshot.check_config(config)  # Before reading any weights.
  model = models.VisionTransformer(**kwargs, normalize_features=zero_shot,
                                   rngs=rngs)
  if config.pretrained.path:
    report = weights.load_pretrained(
        model,
        config.pretrained.path,
        dont_load=tuple(config.pretrained.dont_load),
    )
    logging.info('Loaded pre-trained weights: %s', report)
  if zero_shot:
    zeroshot.init_head(model, config, workdir)
  return model


def trainable_filter(config: ml_collections.ConfigDict):
  """What the optimizer updates: all params, or LoRA adapters plus the head."""
  if config.model.lora_rank > 0:
    return nnx.Any(nnx.LoRAParam, nnx.All(nnx.Param, nnx.PathContains('head')))
  return nnx.Param


def shard_module(module, mesh) -> None:
  """Places every array of ``module`` by its partitioning metadata."""
  state = nnx.state(module)
  shardings = nnx.get_named_sharding(state, mesh)
  nnx.update(module, jax.device_put(state, shardings))


# -- Steps --------------------------------------------------------------------

def cross_entropy(logits: jax.Array, soft_labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy(logits, soft_labels).mean()


@functools.partial(nnx.jit, donate_argnames=('model', 'optimizer'))
def train_step(model, optimizer, batch, dropout_key, anchor_params):
  """One step; returns the metrics to log (scalars, on device)."""

  def loss_fn(model):
    logits = model(batch['image'], train=True, dropout_key=dropout_key)
    return cross_entropy(logits.astype(jnp.float32), batch['label'])

  loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(
      0, optimizer.wrt))(model)
  optimizer.update(model, grads)
  out = {'train/loss': loss, 'train/grad_norm': optax.tree.norm(grads)}
  opt_state = nnx.as_pure(optimizer.opt_state)
  try:
    out.update({
        k.replace('spd/', 'train/spd_'): v
        for k, v in spd_optax.diagnostics_summary(opt_state).items()
    })
  except ValueError:  # Not SPD: deviation from the kept pre-trained copy.
    if anchor_params is not None:
      params = nnx.as_pure(nnx.state(model, optimizer.wrt))
      out['train/spd_deviation_norm'] = optax.tree.norm(
          jax.tree.map(jnp.subtract, params, anchor_params)
      )
  return out


_fold_in = jax.jit(jax.random.fold_in)  # One dispatch, not one per op.


@nnx.jit
def eval_step(model, batch):
  logits = model(batch['image'], train=False)
  correct = (jnp.argmax(logits, -1) == batch['label']) & batch['mask']
  return jnp.sum(correct), jnp.sum(batch['mask'])


def evaluate(model, config, mesh) -> dict[str, float]:
  """Top-1 accuracy on the ID test split and every OOD set."""
  results = {}
  for display, (name, split) in input_pipeline.eval_sets(config.dataset).items():
    correct = total = 0
    for batch in input_pipeline.eval_batches(
        config.dataset, name, split, global_batch_size=config.eval_batch_size
    ):
      c, t = eval_step(model, shard_batch(batch, mesh))
      # One batch in flight at a time: on CPU, several dispatched programs
      # with cross-device sums can deadlock XLA's collectives.
      correct += int(c)
      total += int(t)
    results[f'eval/{display}_accuracy'] = correct / max(total, 1)
  return results


# -- The run ------------------------------------------------------------------

def _check_workdir_config(workdir: str, config: ml_collections.ConfigDict):
  """A workdir holds one run: refuse to resume a different config in it."""
  path = os.path.join(workdir, 'config.json')
  current = json.loads(config.to_json_best_effort(sort_keys=True))
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    # What may change between a run and its resumption (not num_train_steps:
    # the learning-rate schedule depends on it).
    # Nor the mesh: checkpoints restore onto any mesh.
    resumable = ('progress_bar', 'eval_every_steps', 'log_every_steps',
                 'checkpoint_every_steps', 'keep_checkpoints',
                 'max_steps_per_run', 'async_checkpointing', 'mesh')
    diff = sorted(
        k for k in set(saved) | set(current)
        if k not in resumable and saved.get(k) != current.get(k)
    )
    if diff:
      raise ValueError(
          f'Workdir {workdir} holds a run of a different config (keys'
          f' {diff} differ from {path}); use a new --workdir.'
      )
  elif jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(path + '.tmp', 'w') as f:
      json.dump(current, f, indent=2, sort_keys=True)
    os.replace(path + '.tmp', path)


def _check_finite(out, step, config, workdir) -> None:
  """Stops on a non-finite loss or gradient unless the config skips them."""
  loss, grad_norm = out['train/loss'], out['train/grad_norm']
  if config.optimizer.skip_nonfinite or (
      np.isfinite(loss) and np.isfinite(grad_norm)):
    return
  raise FloatingPointError(
      f'Loss is {loss} and gradient norm {grad_norm} at step {step}; the'
      f' newest checkpoint in {workdir} is from before it. Lower'
      ' config.optimizer.learning_rate, or set'
      ' config.optimizer.skip_nonfinite=True to skip such steps'
      ' (optax.apply_if_finite).'
  )


def _is_eval_step(step: int, config: ml_collections.ConfigDict) -> bool:
  return (step % config.eval_every_steps == 0
          or step == lp_ft.total_steps(config))


def _eval_pending(step: int, config, writer) -> bool:
  """Whether ``step`` was saved but not evaluated (preempted, eval failed)."""
  pending = (step > 0 and _is_eval_step(step, config)
             and not writer.has_row(step, 'eval/'))
  return bool(multihost_utils.broadcast_one_to_all(np.bool_(pending)))


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *,
    print_summary: bool = True,
) -> dict[str, float]:
  """Trains, evaluates and checkpoints; returns the final eval metrics.

  Refuses a nonsensical config before any work, and a workdir that another
  run holds. SIGTERM / SIGINT save the current step, then raise
  ``train.preemption.Preempted`` (the command line exits 0).
  """
  config_checks.check(config, num_devices=jax.device_count())
  workdir = os.path.abspath(workdir)
  with contextlib.ExitStack() as cleanup:
    cleanup.enter_context(workdir_lock.WorkdirLock(workdir))
    preemption = cleanup.enter_context(preemption_lib.Preemption())
    return _train_and_evaluate(config, workdir, preemption, cleanup,
                               print_summary)


def _train_and_evaluate(config, workdir, preemption, cleanup, print_summary):
  _check_workdir_config(workdir, config)
  mesh = make_mesh(config)
  input_pipeline.check_available(config.dataset)

  with jax.set_mesh(mesh):
    model = make_model(config, nnx.Rngs(config.seed), workdir)
    shard_module(model, mesh)
    # A linear probe trains the head only; LP-FT probes, then fine-tunes.
    wrt = lp_ft.trainable_filter(config, trainable_filter(config))
    lora = config.model.lora_rank > 0
    tx = lp_ft.make_optimizer(config, lora=lora)
    # Built after the weights are loaded: the anchor is the pre-trained model.
    optimizer = nnx.Optimizer(model, tx, wrt=wrt)
    anchor_params = None
    if config.optimizer.name in ('adam', 'adamw') and not lora:
      anchor_params = jax.tree.map(
          jnp.copy, nnx.as_pure(nnx.state(model, wrt)))

  ckpt = cleanup.enter_context(checkpoints.Checkpointer(  # Waits for saves.
      os.path.join(workdir, 'checkpoints'), keep=config.keep_checkpoints,
      async_save=config.get('async_checkpointing', False),
  ))
  start_step = 0
  restored = ckpt.restore_latest(
      nnx.as_pure(nnx.state(model)), nnx.as_pure(nnx.state(optimizer))
  )
  if restored is not None:
    start_step, model_state, opt_state, _ = restored
    nnx.update(model, model_state)
    nnx.update(optimizer, opt_state)
    logging.info('Resumed from step %d in %s', start_step, workdir)

  writer = metrics_lib.MetricWriter(workdir)
  writer.truncate_after(start_step)
  if start_step == 0 and config.model.head_init == 'zeroshot':
    writer.truncate_after(-1)  # Killed before its first save: start afresh.
    with jax.set_mesh(mesh):  # Step 0 is zero-shot CLIP: log its accuracy.
      writer.write(0, evaluate(model, config, mesh))
  train_iter: Iterator[dict] = input_pipeline.train_batches(
      config.dataset,
      global_batch_size=config.batch_size,
      seed=config.seed,
      start_step=start_step,
  )
  root_key = jax.random.key(config.seed + 1)
  eval_results: dict[str, float] = {}
  total_steps = lp_ft.total_steps(config)  # LP-FT: probe + fine-tuning.
  if _eval_pending(start_step, config, writer):
    with jax.set_mesh(mesh):
      eval_results = evaluate(model, config, mesh)
    writer.write(start_step, eval_results)
  progress = tqdm.tqdm(
      total=total_steps, initial=start_step, desc='train',
      disable=not config.progress_bar or jax.process_index() != 0,
  )
  window_start, window_images = time.perf_counter(), 0
  last_step = total_steps
  if config.max_steps_per_run > 0:
    last_step = min(last_step, start_step + config.max_steps_per_run)
  stop = False

  def save(step):
    ckpt.save(step, nnx.as_pure(nnx.state(model)),
              nnx.as_pure(nnx.state(optimizer)), {'step': step})

  with jax.set_mesh(mesh):
    if start_step == lp_ft.start_step(config):  # For WiSE-FT.
      wise_ft.save_start(workdir, model)
    # Walks the model's graph once, not at every step (Python overhead).
    cached_step = nnx.cached_partial(train_step, model, optimizer)
    for step in range(start_step + 1, last_step + 1):
      batch = shard_batch(next(train_iter), mesh)
      out = cached_step(batch, _fold_in(root_key, step), anchor_params)
      window_images += config.batch_size
      stop = preemption.reached(step)
      if step == lp_ft.start_step(config):  # LP-FT's probed model.
        wise_ft.save_start(workdir, model)
      is_log_step = (step % config.log_every_steps == 0
                     or step == total_steps)
      is_checkpoint_step = (step % config.checkpoint_every_steps == 0
                            or step in (last_step, lp_ft.start_step(config))
                            or stop)
      if is_log_step or is_checkpoint_step:  # No checkpoint may hold NaNs.
        out = jax.device_get(out)
        _check_finite(out, step, config, workdir)
      if is_log_step:
        elapsed = time.perf_counter() - window_start
        out['train/learning_rate'] = lp_ft.learning_rate(config, step)
        out['train/images_per_second'] = window_images / max(elapsed, 1e-9)
        writer.write(step, out)
        progress.set_postfix(loss=f'{out["train/loss"]:.3f}',
                             img_s=f'{out["train/images_per_second"]:.0f}')
        window_start, window_images = time.perf_counter(), 0
      if is_checkpoint_step:  # Before evaluating.
        save(step)
      progress.update(1)
      if stop:  # Evaluated when the run resumes.
        break
      if _is_eval_step(step, config):
        try:
          eval_results = evaluate(model, config, mesh)
        except Exception:
          if not is_checkpoint_step:
            save(step)  # An eval crash loses no training: resume evaluates.
          raise
        writer.write(step, eval_results)
  progress.close()
  if stop:
    ckpt.wait()
    writer.close()
    raise preemption_lib.Preempted(
        f'Stopped by {preemption.signal_name} after step {step}, saved in'
        f' {workdir}; run the same command to resume.')
  if last_step < total_steps:
    logging.info('Stopped after step %d (config.max_steps_per_run); run the'
                 ' same command to continue.', last_step)
  else:
    with jax.set_mesh(mesh):
      if not eval_results:  # Resumed a finished run: evaluate what is there.
        eval_results = evaluate(model, config, mesh)
      if config.wise_ft.alphas:
        eval_results.update(wise_ft.evaluate_alphas(
            model, workdir, config.wise_ft.alphas,
            lambda m: evaluate(m, config, mesh)))
  ckpt.close()
  writer.close()
  if print_summary and jax.process_index() == 0:
    rows = [[k.removeprefix('eval/').removesuffix('_accuracy'), v]
            for k, v in eval_results.items()]
    print(metrics_lib.format_table(rows, ['eval set', 'accuracy']))
  return eval_results
