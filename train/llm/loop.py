"""LoRA fine-tuning of a decoder LLM with SPD (or a baseline), then the eight
commonsense sets: ``train_and_evaluate(config, workdir)``.

Read top to bottom: refuse a bad config, hold the workdir, check it holds
this config's run; build the mesh, load the model and add the adapters, read
the data; restore the newest checkpoint; train (the val loss every
``eval_every_steps``), checkpointing the adapters and the optimizer state;
finally evaluate the test sets, write ``result.json`` and print the table.

It stands on the loop skeleton (``train.core.loop``) as the ViT recipe does,
and keeps the same guarantees: the same command resumes exactly (same
batches, same dropout keys, adapters and optimizer state restored; the base
weights are re-read from their files and never change); one run per workdir,
of one identity (``train.core.run_identity``: a moved workdir or model folder
resumes); SIGTERM or SIGINT saves the current step and stops; every saved step
carries checksums (``train.core.checkpoints``) and none holds a NaN; a NaN
loss stops the run before any checkpoint after it.
"""

import dataclasses
import logging
import os
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
import transformers

from train.core import loop
from train.core import optimizers
from train.core import run_identity
from train.language import families
from train.language import mesh as mesh_lib
from train.language import models
from train.language import scoring
from train.llm import checks
from train.llm import data
from train.llm import evaluate
from train.llm import smoke
from train.llm import steps

TIMING_KEYS = ('train/tokens_per_second',)
# What may change between a run and its resumption: how it is watched and
# saved, the mesh (checkpoints restore onto any), the final evaluation.
RESUMABLE = run_identity.RESUMABLE + ('eval', 'eval_batch_size')


# -- The workdir --------------------------------------------------------------

# The files of a Hugging Face folder that the model is built from.
MODEL_FILES = ('*.safetensors', 'config.json', 'tokenizer*', '*.model',
               'special_tokens_map.json')


def _identity(config: ml_collections.ConfigDict, model_dir: str,
              data_dir: str) -> dict:
  """The run's identity (``train.core.run_identity``): its config, with the model
  and data folders replaced by what they hold (the model's files and the
  data files read, by SHA-256), so a moved workdir or folder resumes."""
  data_files = [config.data.train_file] + [
      os.path.join('dataset', name, 'test.json')
      for name in config.data.test_sets]
  return run_identity.identity(config, {
      'model.path': run_identity.folder_contents(model_dir, MODEL_FILES),
      'data.dir': {f: run_identity.file_sha256(os.path.join(data_dir, f))
                   for f in data_files}})


# -- Set-up -------------------------------------------------------------------

@dataclasses.dataclass
class Run:
  """Everything a run holds; ``lora`` and ``opt_state`` change each step."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  adapted: models.Adapted
  lora: Any
  opt_state: Any
  tokenizer: Any
  train_rows: list
  val_rows: list
  test_sets: dict
  train_step: Any
  val_loss: Any
  scorer: scoring.Scorer


def _inputs(config, workdir) -> tuple[str, str]:
  """The model and data folders (generated for a smoke run)."""
  if config.smoke.enabled:
    return smoke.prepare(os.path.join(workdir, 'smoke'), config.smoke,
                         seed=config.seed)
  return config.model.path, config.data.dir


def _read_data(config, data_dir) -> tuple[list, list, dict]:
  """Train rows, the held-out validation rows, the test sets."""
  rows = data.read_examples(os.path.join(data_dir, config.data.train_file))
  held_out = set(np.random.default_rng(config.seed).permutation(len(rows))
                 [:config.data.val_size].tolist())
  train = [r for i, r in enumerate(rows) if i not in held_out]
  val = [r for i, r in enumerate(rows) if i in held_out]
  epochs = config.num_train_steps * config.batch_size / max(len(train), 1)
  logging.info('%d training rows (%.2f epochs), %d validation rows.',
               len(train), epochs, len(val))
  tests = evaluate.read_test_sets(data_dir, config.data.test_sets,
                                  config.data.max_eval_examples)
  return train, val, tests


def _set_up(config, mesh, model_dir: str, data_dir: str) -> Run:
  loaded = models.load(model_dir, mesh=mesh, dtype=config.model.dtype,
                       remat=config.model.remat)
  logging.info('Loaded %s: %s', model_dir, loaded.report)
  lora = config.model.lora
  adapted = models.add_lora(loaded, models.LoraSpec(
      lora.rank, lora.alpha, lora.dropout, tuple(lora.targets)),
                            mesh=mesh, seed=config.seed)
  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  train, val, tests = _read_data(config, data_dir)
  tx = optimizers.make_optimizer(config, lora=True)
  dtype = families.DTYPES[config.model.dtype]
  pad = tokenizer.pad_token_id
  adapters = adapted.lora.to_pure_dict()
  return Run(
      config, mesh, adapted, adapters, steps.initial_opt_state(tx, adapters),
      tokenizer, train, val, tests,
      steps.make_train_step(adapted.graphdef, tx, dtype=dtype, spd=(
          config.optimizer.name in ('spd', 'projection'))),
      steps.make_val_loss(adapted.eval_graphdef, dtype=dtype),
      scoring.Scorer(adapted.eval_graphdef, loaded.config, mesh,
                     max_new_tokens=config.eval.max_new_tokens,
                     eos_id=tokenizer.eos_token_id,
                     pad_id=tokenizer.eos_token_id if pad is None else pad))


# -- Training -----------------------------------------------------------------

def _shard_batch(batch: dict, run: Run) -> dict:
  """This process's rows -> global [k, micro, T] arrays (k micro-batches;
  each process gives each micro-batch its share of rows)."""
  k = run.config.batch_size // run.config.micro_batch_size
  sharding = mesh_lib.rows_sharding(run.mesh, axis=1)
  out = {}
  for name, local in batch.items():
    local = np.asarray(local).reshape(k, -1, local.shape[-1])
    out[name] = jax.make_array_from_process_local_data(
        sharding, local, (k, run.config.micro_batch_size, local.shape[-1]))
  return out


def _val_loss(run: Run) -> dict[str, float]:
  """Token-mean loss on the held-out rows (empty when there are none)."""
  if not run.val_rows:
    return {}
  size, cutoff = run.config.eval_batch_size, run.config.data.cutoff_len
  batches = data.train_batches(run.val_rows, run.tokenizer, batch_size=size,
                               seq_len=cutoff, seed=0,
                               train_on_inputs=run.config.data.train_on_inputs)
  total = count = 0.0
  for _ in range(-(-len(run.val_rows) // size)):  # One epoch, some twice.
    batch = {k: mesh_lib.to_global(np.asarray(v), run.mesh)
             for k, v in next(batches).items()}
    t, c = run.val_loss(run.lora, run.adapted.base, batch)
    total, count = total + float(t), count + float(c)
  return {'val/loss': total / max(count, 1.0)}


def _steps(run: Run, start_step: int, session: loop.Session) -> loop.Steps:
  """The skeleton's view of this run: its step, save and evaluation."""
  config = run.config
  batches: Iterator[dict] = data.train_batches(
      run.train_rows, run.tokenizer, batch_size=config.batch_size,
      seq_len=config.data.cutoff_len, seed=config.seed, start_step=start_step,
      process_index=jax.process_index(), process_count=jax.process_count(),
      train_on_inputs=config.data.train_on_inputs)
  lr = optimizers.learning_rate_schedule(config)

  def step(unused_step, key):
    batch = next(batches)
    tokens = int(np.sum(batch['attention_mask'])) * jax.process_count()
    run.lora, run.opt_state, out = run.train_step(
        run.lora, run.opt_state, run.adapted.base, _shard_batch(batch, run),
        key)
    return out, tokens

  def save(step):
    session.checkpointer.save(step, run.lora, run.opt_state, {'step': step})

  return loop.Steps(
      step=step, save=save, evaluate=lambda: _val_loss(run),
      learning_rate=lambda s: float(lr(s - 1)), eval_prefix='val/',
      rate_key='train/tokens_per_second')


# -- The end ------------------------------------------------------------------

def _final_results(run: Run) -> dict[str, float]:
  """The test sets' accuracies."""
  return evaluate.evaluate(
      run.scorer, (run.lora, run.adapted.base), run.tokenizer, run.test_sets,
      modes=tuple(run.config.eval.modes),
      batch_size=run.config.eval_batch_size)


def _table(results: dict[str, float]) -> tuple[list[list], list[str]]:
  """The final table: one row per set, one column per evaluation mode."""
  modes = sorted({k.split('/')[1] for k in results})
  names = sorted({k.split('/')[2] for k in results},
                 key=lambda n: (n == 'mean', n))
  rows = [[n] + [results.get(f'eval/{m}/{n}', float('nan')) for m in modes]
          for n in names]
  return rows, ['set'] + [f'{m} %' for m in modes]


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, float]:
  """Trains, checkpoints and evaluates; returns the test sets' accuracies.

  Refuses a nonsensical config before any work, and a workdir another run
  holds or that holds another config's run. SIGTERM / SIGINT save the
  current step, then raise ``train.core.preemption.Preempted``.
  """
  checks.check(config, num_devices=jax.device_count())
  workdir = os.path.abspath(workdir)
  mesh = mesh_lib.make_mesh(config)
  with loop.session(config, workdir, mesh) as session:
    model_dir, data_dir = _inputs(config, workdir)
    run_identity.claim_workdir(
        workdir, config, ident=_identity(config, model_dir, data_dir),
        resumable=RESUMABLE)
    run = _set_up(config, mesh, model_dir, data_dir)
    session.open_store()
    start_step = session.restore((run.lora, run.opt_state),
                                 lambda *s: _restored(run, *s))
    schedule = loop.Schedule.of(config, start_step,
                                total_steps=config.num_train_steps)
    session.train(_steps(run, start_step, session), schedule, start_step)
    if not session.finished(schedule):
      return {}
    session.checkpointer.wait()
    results = session.evaluate_once(config.num_train_steps,
                                    lambda: _final_results(run))
  if results:
    loop.print_table(*_table(results))
  return results


def _restored(run: Run, lora: Any, opt_state: Any) -> None:
  run.lora, run.opt_state = lora, opt_state
