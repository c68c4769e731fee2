"""LoRA fine-tuning of PaliGemma on VQAv2 with SPD (or a baseline), then the
ID and nine OOD sets: ``train_and_evaluate(config, workdir)``.

Read top to bottom: refuse a bad config, hold the workdir, check it holds
this config's run; build the mesh, load the model and add the adapters, read
the sets; restore the newest checkpoint; train (the held-out part of VQAv2
train scored every ``eval_every_steps``), checkpointing the adapters and the
optimizer state; finally evaluate the held-out rows, VQAv2 val and the OOD
sets (at each WiSE-FT alpha when ``wise_ft.alphas`` is set: the held-out
row picks one), write ``result.json`` and print the table. ``num_train_steps=0`` evaluates the pre-trained model: the
adapters' B is zero at the start, so the model is the loaded one.

It stands on the loop skeleton (``train.core.loop``) as the LLM recipe does,
with its guarantees: the same command resumes exactly (the same batches,
dropout keys, adapters and optimizer state; the base weights are re-read and
never change); one run per workdir, of one identity (the model's files and
the data files read, by content); SIGTERM or SIGINT saves the current step
and stops; checkpoints carry checksums and no NaN; a NaN loss stops the run
before any checkpoint after it.
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
from train.language import models as lm
from train.vqa import checks
from train.vqa import data
from train.vqa import evaluate
from train.vqa import models
from train.vqa import smoke
from train.vqa import steps
from train.vqa import wise_ft

# What may change between a run and its resumption: how it is watched and
# saved, the mesh, the final evaluation.
RESUMABLE = run_identity.RESUMABLE + ('eval', 'eval_batch_size', 'wise_ft')
HELD_OUT = 'held_out'  # The final table's row of the held-out VQAv2 rows.
MODEL_FILES = ('*.safetensors', 'config.json', 'tokenizer*', '*.model',
               'special_tokens_map.json')


def _eval_sets(config) -> tuple[str, ...]:
  return (data.ID,) + tuple(config.data.near_ood) + tuple(config.data.far_ood)


def _identity(config, model_dir: str, data_dir: str) -> dict:
  """The run's identity: its config, the model and data folders replaced by
  the contents of the files read (so a moved folder resumes)."""
  names = sorted({f for s in (data.TRAIN,) + _eval_sets(config)
                  for f in data.files_of(s)})
  return run_identity.identity(config, {
      'model.path': run_identity.folder_contents(model_dir, MODEL_FILES),
      'data.dir': {f: run_identity.file_sha256(os.path.join(data_dir, f))
                   for f in names}})


# -- Set-up -------------------------------------------------------------------

@dataclasses.dataclass
class Run:
  """Everything a run holds; ``lora`` and ``opt_state`` change each step."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  loaded: models.Loaded
  adapted: lm.Adapted
  lora: Any
  opt_state: Any
  tokenizer: Any
  train_rows: list
  val_rows: list
  eval_sets: dict
  train_step: Any
  generate: Any
  eval_len: int  # Text tokens of an evaluation row (``_check_lengths``).


def _inputs(config, workdir) -> tuple[str, str]:
  """The model and data folders (generated for a smoke run)."""
  if config.smoke.enabled:
    return smoke.prepare(os.path.join(workdir, 'smoke'), config.smoke,
                         seed=config.seed)
  return config.model.path, config.data.dir


def _read_data(config, data_dir) -> tuple[list, list, dict]:
  """Training rows, the held-out rows, the evaluation sets (all checked)."""
  rows = data.read_set(data.TRAIN, data_dir)
  train, held_out = data.split_held_out(rows, config.data.val_size,
                                        config.seed)
  if config.data.max_val_examples > 0:
    held_out = held_out[:config.data.max_val_examples]
  logging.info('%d training rows (%.2f epochs), %d held out.', len(train),
               config.num_train_steps * config.batch_size / len(train),
               len(held_out))
  sets = {name: data.read_set(name, data_dir, config.data.max_eval_examples)
          for name in _eval_sets(config)}
  return train, held_out, sets


def _set_up(config, mesh, model_dir: str, data_dir: str) -> Run:
  loaded = models.load(model_dir, mesh=mesh, dtype=config.model.dtype,
                       remat=config.model.remat)
  logging.info('Loaded %s: %s', model_dir, loaded.report)
  spec = config.model.lora
  adapted = models.add_lora(loaded, lm.LoraSpec(
      spec.rank, spec.alpha, spec.dropout, tuple(spec.targets)), mesh=mesh,
                            seed=config.seed, vision=spec.vision)
  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  train, held_out, sets = _read_data(config, data_dir)
  eval_len = _check_lengths(
      config, loaded, tokenizer,
      {data.TRAIN: (train + held_out, True),
       **{name: (rows, False) for name, rows in sets.items()}})
  tx = optimizers.make_optimizer(config, lora=True)
  dtype = families.DTYPES[config.model.dtype]
  adapters = adapted.lora.to_pure_dict()
  eos = tokenizer.eos_token_id
  pad = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
  return Run(
      config, mesh, loaded, adapted, adapters,
      steps.initial_opt_state(tx, adapters), tokenizer, train, held_out, sets,
      steps.make_train_step(adapted.graphdef, tx, dtype=dtype, spd=(
          config.optimizer.name in ('spd', 'projection'))),
      steps.make_generate(adapted.eval_graphdef, dtype=dtype,
                          max_new_tokens=config.eval.max_new_tokens,
                          eos_id=eos, pad_id=pad), eval_len)


def _token_counts(tokenizer, texts: list[str]) -> np.ndarray:
  """Tokens of each text as ``models.build_inputs`` encodes it (batched)."""
  ids = tokenizer(texts, add_special_tokens=False)['input_ids']
  return np.array([len(i) for i in ids], np.int64)


def _check_lengths(config, loaded, tokenizer, named: dict) -> int:
  """Refuses, before training, training rows longer than ``data.max_len``
  text tokens; returns the text length evaluation pads to.

  ``named``: ``{set: (rows, with the training answer)}``. A row takes the
  kind's fixed tokens (BOS, Gemma 3's image frame; measured on a one-word
  question) plus its prompt's and, in training, its answer's and EOS. A set
  evaluated without answers is never refused: evaluation pads every question
  to the longest one's length (at least ``data.max_len``, a multiple of 8),
  so that a long question of an OOD set (VizWiz's spoken ones) is read
  whole.
  """
  eval_len = config.data.max_len
  prompt = config.data.prompt
  probe = models.build_inputs(
      tokenizer, ['x'], None, loaded=loaded, max_len=4096,
      prompt_template=prompt)['input_mask'].sum()
  fixed = int(probe) - loaded.num_image_tokens - int(
      _token_counts(tokenizer, [prompt.format(question='x') + '\n'])[0])
  for name, (rows, with_answers) in named.items():
    need = fixed + _token_counts(
        tokenizer, [prompt.format(question=r.question) + '\n' for r in rows])
    if with_answers:
      need += _token_counts(tokenizer,
                            [data.training_answer(r) for r in rows]) + 1
    if not with_answers:
      eval_len = max(eval_len, -(-int(need.max(initial=0)) // 8) * 8)
      continue
    over = np.flatnonzero(need > config.data.max_len)
    if over.size:
      raise ValueError(
          f'config.data.max_len={config.data.max_len}: {over.size} rows of'
          f' {name!r} need more text tokens (up to {int(need.max())}), e.g.'
          f' question ids {[rows[i].question_id for i in over[:5]]}.')
  return eval_len


def encode(run: Run, rows: list, *, answers: bool) -> dict[str, np.ndarray]:
  """Rows -> PaliGemma's inputs (``models.build_inputs``) and images; with
  ``answers``, the training answer as the suffix."""
  max_len = run.loaded.num_image_tokens + (
      run.config.data.max_len if answers else run.eval_len)
  try:
    out = models.build_inputs(
        run.tokenizer, [r.question for r in rows],
        [data.training_answer(r) for r in rows] if answers else None,
        loaded=run.loaded, max_len=max_len,
        prompt_template=run.config.data.prompt)
  except ValueError as e:  # Name the questions and the key to raise.
    raise ValueError(f'{e} Questions of this batch (by question_id):'
                     f' {[r.question_id for r in rows]}; raise'
                     ' config.data.max_len (text tokens).') from e
  out['images'] = data.load_images(rows, models.preprocess,
                                   run.loaded.image_size)
  return out


# -- Training -----------------------------------------------------------------

def _shard_batch(batch: dict, run: Run) -> dict:
  """This process's rows -> global [k, micro, ...] arrays (k micro-batches;
  each process gives each micro-batch its share of rows)."""
  k = run.config.batch_size // run.config.micro_batch_size
  sharding = mesh_lib.rows_sharding(run.mesh, axis=1)
  out = {}
  for name in steps.BATCH_KEYS:
    local = np.asarray(batch[name])
    local = local.reshape(k, -1, *local.shape[1:])
    out[name] = jax.make_array_from_process_local_data(
        sharding, local, (k, run.config.micro_batch_size, *local.shape[2:]))
  return out


def _answer_fn(run: Run, lora: Any):
  """rows -> generated answers, with adapters ``lora``."""
  def generate(batch):
    batch = {k: mesh_lib.to_global(v, run.mesh) for k, v in batch.items()
             if k != 'loss_mask'}
    return run.generate(lora, run.adapted.base, batch)

  return lambda rows: evaluate.answers(
      rows, generate, lambda r: encode(run, r, answers=False), run.tokenizer,
      batch_size=run.config.eval_batch_size, eos_id=run.tokenizer.eos_token_id)


def _held_out_accuracy(run: Run) -> dict[str, float]:
  """VQA accuracy (%) on the held-out rows of VQAv2 train (picking)."""
  if not run.val_rows:
    return {}
  predicted = _answer_fn(run, run.lora)(run.val_rows)
  return {'val/accuracy': evaluate.set_accuracy(run.val_rows, predicted)}


def _steps(run: Run, start_step: int, session: loop.Session) -> loop.Steps:
  """The skeleton's view of this run: its step, save and evaluation."""
  config = run.config
  batches: Iterator[dict] = data.train_batches(
      run.train_rows, lambda rows: encode(run, rows, answers=True),
      batch_size=config.batch_size, seed=config.seed, start_step=start_step,
      process_index=jax.process_index(), process_count=jax.process_count())
  lr = optimizers.learning_rate_schedule(config)

  def step(unused_step, key):
    batch = next(batches)
    run.lora, run.opt_state, out = run.train_step(
        run.lora, run.opt_state, run.adapted.base, _shard_batch(batch, run),
        key)
    return out, config.batch_size

  def save(step):
    session.checkpointer.save(step, run.lora, run.opt_state, {'step': step})

  return loop.Steps(
      step=step, save=save, evaluate=lambda: _held_out_accuracy(run),
      learning_rate=lambda s: float(lr(s - 1)), eval_prefix='val/',
      rate_key='train/rows_per_second')


# -- The end ------------------------------------------------------------------

def _prefixes(config) -> list[tuple[str, float]]:
  """``(results prefix, alpha)`` of each final evaluation."""
  alphas = tuple(config.wise_ft.alphas)
  if not alphas:
    return [('test', 1.0)]
  return [(wise_ft.prefix(a), float(a)) for a in alphas]


def _final_results(run: Run) -> dict[str, float]:
  """Every set's accuracy, at each WiSE-FT alpha."""
  results = {}
  # The held-out rows too: what picks among runs (and WiSE-FT's alphas).
  sets = ({HELD_OUT: run.val_rows} if run.val_rows else {}) | run.eval_sets
  for prefix, alpha in _prefixes(run.config):
    lora = run.lora if alpha == 1.0 else wise_ft.scaled(run.lora, alpha)
    results.update(evaluate.evaluate_sets(
        sets, _answer_fn(run, lora), near=run.config.data.near_ood,
        far=run.config.data.far_ood, prefix=prefix))
  return results


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, float]:
  """Trains, checkpoints and evaluates; returns every set's accuracy (%).

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
    prefixes = [p for p, _ in _prefixes(config)]
    loop.print_table(*evaluate.table(results, prefixes,
                                     (HELD_OUT,) + _eval_sets(config)))
  return results


def _restored(run: Run, lora: Any, opt_state: Any) -> None:
  run.lora, run.opt_state = lora, opt_state
