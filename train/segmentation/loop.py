"""Swin + UperNet fine-tuning with SPD (or a baseline), then clean and
corrupted mIoU: ``train_and_evaluate(config, workdir)``.

Read top to bottom: refuse a bad config, hold the workdir, check it holds
this config's run; build the mesh, the model (a Hugging Face Swin backbone
under a new UperNet head, a whole UperNet folder, or a tiny one from scratch
for the smoke run) and the optimizer (``config.optimizer.name`` on the
backbone, AdamW on the decoder; the backbone frozen for a linear probe);
restore the newest checkpoint; train (clean mIoU every
``eval_every_steps``, and at step 0 the starting model's); finally evaluate
the validation set clean and under each corruption at each severity, write
``result.json`` and print the table.

It stands on the loop skeleton (``train.core.loop``) as the other recipes
do, with the same guarantees: the same command resumes exactly (same
batches, same drop-path keys, params, BatchNorm statistics and optimizer
state restored); one run per workdir, of one identity
(``train.core.run_identity``); SIGTERM or SIGINT saves the current step and
stops; every saved step carries checksums and none holds a NaN; a NaN loss
stops the run before any checkpoint after it.
"""

import dataclasses
import json
import logging
import os
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np

from train.core import loop
from train.core import metrics as metrics_lib
from train.core import optimizers
from train.core import run_identity
from train.segmentation import checks
from train.segmentation import data
from train.segmentation import evaluate
from train.segmentation import pretrained
from train.segmentation import smoke
from train.segmentation import steps
from train.segmentation import upernet

# What may change between a run and its resumption: how it is watched and
# saved, the mesh, the final evaluation, the reader's threads.
RESUMABLE = run_identity.RESUMABLE + (
    'corruptions', 'data.eval_mode', 'data.slide_crop', 'data.slide_stride',
    'data.max_eval_images', 'data.threads', 'eval_at_start')
MODEL_FILES = ('*.safetensors', 'config.json')


def _identity(config, data_dir: str) -> dict:
  """The config, its folders replaced by what they hold (the model's files,
  the split lists, by SHA-256), so a moved workdir or folder resumes."""
  places = {'data.dir': {}}
  for split in ('train', 'val'):
    data.split_ids(data_dir, split)  # Refuses a missing list by its path.
    places['data.dir'][split] = run_identity.file_sha256(
        os.path.join(data_dir, data.SPLITS, f'{split}.txt'))
  if config.model.path:
    places['model.path'] = run_identity.folder_contents(config.model.path,
                                                        MODEL_FILES)
  return run_identity.identity(config, places)


# -- Set-up -------------------------------------------------------------------

@dataclasses.dataclass
class Run:
  """Everything a run holds; ``params``, ``stats``, ``opt_state`` change."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  data_dir: str
  train_ids: list
  val_ids: list
  graphdef: Any
  params: Any
  stats: Any
  rest: Any
  opt_state: Any
  train_step: Any
  evaluator: evaluate.Evaluator


def make_model(config, *, seed: int) -> tuple[upernet.UperNet, dict]:
  """The model and its load report (``{}`` when built from scratch)."""
  num = config.data.num_classes
  heads = dict(hidden_size=config.model.decode_channels,
               auxiliary_channels=config.model.auxiliary_channels,
               auxiliary_loss_weight=config.model.auxiliary_loss_weight)
  if config.model.tiny:
    seg = upernet.SegConfig.tiny(num_labels=num, **heads)
  else:
    seg = pretrained.read_config(config.model.path, num_labels=num)
    if not seg_is_whole(config.model.path):
      seg = dataclasses.replace(seg, **heads)
  seg = dataclasses.replace(seg, backbone=dataclasses.replace(
      seg.backbone, drop_path_rate=config.model.drop_path_rate))
  model = upernet.create(seg, seed=seed)  # UperNet(seg, nnx.Rngs(seed)).
  if config.model.tiny:
    return model, {}
  return model, pretrained.load(config.model.path, model)


def seg_is_whole(folder: str) -> bool:
  """Whether ``folder`` holds a whole UperNet (its head sizes are kept)."""
  with open(os.path.join(folder, 'config.json')) as f:
    return json.load(f).get('model_type') == 'upernet'


def _replicated(tree, mesh):
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.device_put(tree, sharding)


def _set_up(config, mesh, data_dir: str) -> Run:
  train_ids = data.split_ids(data_dir, 'train')
  val_ids = data.split_ids(data_dir, 'val')
  data.check_split(data_dir, train_ids + val_ids)
  model, report = make_model(config, seed=config.seed)
  if report:
    logging.info('Loaded %s; fresh: %s', config.model.path,
                 report.get('fresh'))
  graphdef, params, stats, rest = steps.split(model)
  params, stats, rest = _replicated((params, stats, rest), mesh)
  tx = optimizers.make_backbone_and_head_optimizer(
      config, frozen_backbone=config.train_mode == 'linear_probe')
  spd = config.optimizer.name in ('spd', 'projection') and (
      config.train_mode == 'finetune')
  return Run(
      config, mesh, data_dir, train_ids, val_ids, graphdef, params, stats,
      rest, steps.initial_opt_state(tx, params),
      steps.make_train_step(graphdef, tx,
                            aux_weight=config.model.auxiliary_loss_weight,
                            spd=spd),
      evaluate.Evaluator(graphdef, config, data_dir, val_ids, mesh))


# -- Training -----------------------------------------------------------------

def _shard_batch(batch: dict, mesh) -> dict:
  """This process's rows -> global arrays split over the 'data' axis."""
  sharding = jax.sharding.NamedSharding(mesh,
                                        jax.sharding.PartitionSpec('data'))
  out = {}
  for name, local in batch.items():
    shape = (local.shape[0] * jax.process_count(),) + local.shape[1:]
    out[name] = jax.make_array_from_process_local_data(sharding, local, shape)
  return out


def _steps(run: Run, start_step: int, session: loop.Session) -> loop.Steps:
  """The skeleton's view of this run: its step, save and evaluation."""
  config = run.config
  aug = data.Augmentation(tuple(config.data.scale),
                          tuple(config.data.ratio_range), config.data.crop,
                          config.data.cat_max_ratio)
  batches: Iterator[dict] = data.train_batches(
      run.data_dir, run.train_ids, num_classes=config.data.num_classes,
      batch_size=config.batch_size, seed=config.seed, aug=aug,
      start_step=start_step, process_index=jax.process_index(),
      process_count=jax.process_count(), threads=config.data.threads)
  lr = optimizers.learning_rate_schedule(config)

  def step(unused_step, key):
    batch = _shard_batch(next(batches), run.mesh)
    run.params, run.stats, run.opt_state, out = run.train_step(
        run.params, run.stats, run.opt_state, run.rest, batch, key)
    return out, config.batch_size

  def save(step):
    session.checkpointer.save(step, {'params': run.params,
                                     'batch_stats': run.stats},
                              run.opt_state, {'step': step})

  def clean():
    return run.evaluator.clean(run.params, run.stats, run.rest)

  return loop.Steps(
      step=step, save=save, evaluate=clean,
      learning_rate=lambda s: float(lr(s - 1)), eval_prefix='eval/',
      rate_key='train/images_per_second',
      evaluates_at_start=config.eval_at_start)


def _restored(run: Run, model: Any, opt_state: Any) -> None:
  run.params, run.stats = model['params'], model['batch_stats']
  run.opt_state = opt_state


# -- The end ------------------------------------------------------------------

def _final_results(run: Run) -> dict[str, float]:
  """Clean and corrupted mIoU."""
  return run.evaluator.robustness(run.params, run.stats, run.rest)


def _start_miou(workdir: str) -> float:
  """The step-0 row's clean mIoU (the starting model's), NaN when absent."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return float('nan')
  for row in metrics_lib.read_jsonl(path):
    if row['step'] == 0 and 'eval/mIoU' in row:
      return row['eval/mIoU']
  return float('nan')


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, float]:
  """Trains, checkpoints and evaluates; returns the final metrics.

  Refuses a nonsensical config before any work, and a workdir another run
  holds or that holds another config's run. SIGTERM / SIGINT save the
  current step, then raise ``train.core.preemption.Preempted``.
  """
  checks.check(config, num_devices=jax.device_count())
  workdir = os.path.abspath(workdir)
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  with loop.session(config, workdir, mesh) as session:
    data_dir = (smoke.prepare(os.path.join(workdir, 'smoke'), config.smoke,
                              seed=config.seed)
                if config.smoke.enabled else config.data.dir)
    run_identity.claim_workdir(workdir, config,
                               ident=_identity(config, data_dir),
                               resumable=RESUMABLE)
    run = _set_up(config, mesh, data_dir)
    session.open_store()
    start_step = session.restore(
        ({'params': run.params, 'batch_stats': run.stats}, run.opt_state),
        lambda *s: _restored(run, *s))
    schedule = loop.Schedule.of(config, start_step,
                                total_steps=config.num_train_steps)
    session.train(_steps(run, start_step, session), schedule, start_step)
    if not session.finished(schedule):
      return {}
    session.checkpointer.wait()
    results = session.evaluate_once(config.num_train_steps,
                                    lambda: _final_results(run))
  results['start/mIoU'] = _start_miou(workdir)
  loop.print_table(*evaluate.table(results, config))
  return results
