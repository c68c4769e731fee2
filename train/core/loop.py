"""The skeleton every recipe's training loop stands on.

A recipe's ``train_and_evaluate`` reads top to bottom::

  mesh = ...
  with loop.session(config, workdir, mesh) as s:   # lock, signals, mesh
    run = <the recipe's set-up: claim the workdir, model, optimizer, data>
    s.open_store()                                 # checkpointer, metrics
    start_step = s.restore(<targets>, <apply>)     # newest intact step
    schedule = loop.Schedule.of(config, start_step, total_steps=...)
    results = s.train(loop.Steps(...), schedule, start_step)
    if s.finished(schedule):
      results = s.evaluate_once(step, <final evaluation>)   # result.json
  loop.print_table(rows, header)

and supplies its state, its step and its evaluation (:class:`Steps`). The
skeleton owns the rest, in one order for every recipe:

- the set-up stack: one run per workdir (``train.core.workdir_lock``),
  SIGTERM / SIGINT (``train.core.preemption``), the mesh, the checkpointer
  (its exit waits for saves) and the metric writer;
- the restore, and its one truncate rule: metric rows after the restored step
  are dropped (all of them when nothing was restored);
- one :class:`Schedule` for logging, evaluation, saving and the per-run step
  cap (``config.max_steps_per_run``);
- the throughput clock, the non-finite check before any row or checkpoint
  is written, the evaluation owed after a resume (a saved step that was not
  evaluated), save-before-evaluate (an evaluation crash loses no training),
  the stop on a signal (``Preempted``, after the save), the final
  evaluation computed once and kept in ``result.json``
  (:meth:`Session.evaluate_once`), the final table.
"""

import contextlib
import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tqdm

from train.core import checkpoints
from train.core import files
from train.core import metrics as metrics_lib
from train.core import preemption as preemption_lib
from train.core import workdir_lock


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
  def of(cls, config: ml_collections.ConfigDict, start_step: int, *,
         total_steps: int, start_of_finetuning: int = 0) -> 'Schedule':
    last = total_steps if config.max_steps_per_run <= 0 else min(
        total_steps, start_step + config.max_steps_per_run)
    return cls(total_steps, last, start_of_finetuning, config.log_every_steps,
               config.eval_every_steps, config.checkpoint_every_steps)

  def logs(self, step: int) -> bool:
    return step % self.log_every == 0 or step == self.total_steps

  def evaluates(self, step: int) -> bool:
    return step % self.eval_every == 0 or step == self.total_steps

  def saves(self, step: int) -> bool:
    """Periodically, at the last step, and at LP-FT's stage boundary."""
    return step % self.checkpoint_every == 0 or step in (
        self.last_step, self.start_of_finetuning)


@dataclasses.dataclass
class Steps:
  """What a recipe supplies to :meth:`Session.train`.

  Attributes:
    step: ``(step, key) -> (metrics on device, work)``: one training step on
      the next batch, with this step's dropout key; ``work`` is what the
      throughput counts (images, tokens). The metrics hold ``train/loss`` and
      ``train/grad_norm``.
    save: ``step -> None``: checkpoints the state after ``step``.
    evaluate: ``() -> {name: value}``: the evaluation to log.
    learning_rate: ``step -> float``, logged with each row.
    eval_prefix: the prefix of the evaluation's keys (``'eval/'``).
    rate_key: the throughput's key (``'train/images_per_second'``).
    evaluates_at_start: whether a run that starts at step 0 evaluates first.
    reached: ``step -> None``, called when the run reaches ``step`` (the
      start step too): the ViT recipe keeps its starting model for WiSE-FT.
  """
  step: Callable[[int, jax.Array], tuple[dict, int]]
  save: Callable[[int], None]
  evaluate: Callable[[], dict[str, float]]
  learning_rate: Callable[[int], float]
  eval_prefix: str
  rate_key: str
  evaluates_at_start: bool = False
  reached: Callable[[int], None] = lambda step: None


class Throughput:
  """Work (images, tokens) per second since the last logged step."""

  def __init__(self):
    self.start, self.work = time.perf_counter(), 0

  def add(self, work: int) -> None:
    self.work += work

  def take(self) -> float:
    rate = self.work / max(time.perf_counter() - self.start, 1e-9)
    self.start, self.work = time.perf_counter(), 0
    return rate


def check_finite(out: dict, step: int, config: ml_collections.ConfigDict,
                 workdir: str) -> None:
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


_fold_in = jax.jit(jax.random.fold_in)  # One dispatch, not one per op.


@dataclasses.dataclass
class Session:
  """A run's workdir, held: what the recipe's loop and the skeleton share."""
  config: ml_collections.ConfigDict
  workdir: str
  preemption: preemption_lib.Preemption
  stack: contextlib.ExitStack
  checkpointer: Optional[checkpoints.Checkpointer] = None
  writer: Optional[metrics_lib.MetricWriter] = None

  def open_store(self) -> None:
    """The checkpointer (its exit waits for saves) and the metric writer."""
    config = self.config
    self.checkpointer = self.stack.enter_context(checkpoints.Checkpointer(
        os.path.join(self.workdir, 'checkpoints'),
        keep=config.keep_checkpoints, async_save=config.async_checkpointing))
    self.writer = metrics_lib.MetricWriter(self.workdir)
    self.stack.callback(self.writer.close)

  def restore(self, targets: Sequence[Any],
              apply: Callable[..., None]) -> int:
    """Restores the newest intact checkpoint; returns its step (0: none).

    ``apply(*states)`` puts the restored states (as ``targets``) in the run.
    Rows logged after the checkpoint are logged again; at step 0 none is
    kept (a run killed before its first save starts afresh).
    """
    restored = self.checkpointer.restore_latest(*targets)
    start_step = 0
    if restored is not None:
      start_step, *states, _ = restored
      apply(*states)
      logging.info('Resumed from step %d in %s', start_step, self.workdir)
    self.writer.truncate_after(start_step if start_step > 0 else -1)
    return start_step

  def train(self, steps: Steps, schedule: Schedule,
            start_step: int) -> dict[str, float]:
    """Steps ``start_step + 1 .. schedule.last_step``; the latest evaluation."""
    eval_results = {}
    if self._evaluation_owed(steps, start_step, schedule):
      eval_results = steps.evaluate()
      self.writer.write(start_step, eval_results)
    steps.reached(start_step)
    root_key = jax.random.key(self.config.seed + 1)
    throughput = Throughput()
    progress = tqdm.tqdm(
        total=schedule.total_steps, initial=start_step, desc='train',
        disable=not self.config.get('progress_bar', False)
        or jax.process_index() != 0)
    for step in range(start_step + 1, schedule.last_step + 1):
      out, work = steps.step(step, _fold_in(root_key, step))
      throughput.add(work)
      stopping = self.preemption.reached(step)
      steps.reached(step)
      saving = schedule.saves(step) or stopping
      if schedule.logs(step) or saving:  # No checkpoint may hold NaNs.
        out = jax.device_get(out)
        check_finite(out, step, self.config, self.workdir)
      if schedule.logs(step):
        self._log(steps, step, out, throughput, progress)
      if saving:  # Before evaluating.
        steps.save(step)
      progress.update(1)
      if stopping:  # Evaluated when the run resumes.
        progress.close()
        self._stop(step)
      if schedule.evaluates(step):
        eval_results = self._evaluate_keeping_training(steps, step,
                                                       saved=saving)
        self.writer.write(step, eval_results)
    progress.close()
    return eval_results

  def evaluate_once(self, step: int,
                    evaluate: Callable[[], dict[str, float]]
                    ) -> dict[str, float]:
    """The run's final evaluation, computed once: ``evaluate()`` is logged
    at ``step`` and kept in ``result.json``; a finished run run again reads
    it back instead of evaluating again."""
    path = os.path.join(self.workdir, 'result.json')
    if os.path.exists(path):  # Finished before: nothing to redo.
      with open(path) as f:
        return json.load(f)['metrics']
    results = evaluate()
    self.writer.write(step, results)
    if jax.process_index() == 0:
      with files.atomic_write(path) as f:
        json.dump({'step': step, 'metrics': results}, f, indent=2,
                  sort_keys=True)
    return results

  def finished(self, schedule: Schedule) -> bool:
    """Whether the run is done (not stopped by ``max_steps_per_run``)."""
    if schedule.last_step < schedule.total_steps:
      logging.info('Stopped after step %d (config.max_steps_per_run); run the'
                   ' same command to continue.', schedule.last_step)
      return False
    return True

  def _evaluation_owed(self, steps: Steps, step: int,
                       schedule: Schedule) -> bool:
    """Whether ``step``, where the run starts, lacks an evaluation it is owed.

    Step 0 where the recipe evaluates first, and a saved step that was not
    evaluated (preempted before, or its evaluation crashed).
    """
    if step == 0:
      owed = steps.evaluates_at_start
    else:
      owed = schedule.evaluates(step) and not self.writer.has_row(
          step, steps.eval_prefix)
    return bool(multihost_utils.broadcast_one_to_all(np.bool_(owed)))

  def _log(self, steps: Steps, step: int, out: dict, throughput: Throughput,
           progress) -> None:
    out['train/learning_rate'] = steps.learning_rate(step)
    out[steps.rate_key] = throughput.take()
    self.writer.write(step, out)
    progress.set_postfix(loss=f'{out["train/loss"]:.3f}',
                         rate=f'{out[steps.rate_key]:.0f}/s')

  def _evaluate_keeping_training(self, steps: Steps, step: int, *,
                                 saved: bool) -> dict[str, float]:
    """Evaluates; if that crashes, ``step`` is saved first (and re-raised).

    The resumed run then evaluates it (:meth:`_evaluation_owed`): an
    evaluation crash loses no training.
    """
    try:
      return steps.evaluate()
    except Exception:
      if not saved:
        steps.save(step)
      raise

  def _stop(self, step: int):
    """After a signal: ``step`` is saved; wait for it, then tell the caller."""
    self.checkpointer.wait()
    self.writer.close()
    raise preemption_lib.Preempted(
        f'Stopped by {self.preemption.signal_name} after step {step}, saved'
        f' in {self.workdir}; run the same command to resume.')


@contextlib.contextmanager
def session(config: ml_collections.ConfigDict, workdir: str,
            mesh: jax.sharding.Mesh) -> Iterator[Session]:
  """Holds ``workdir`` (one run), catches SIGTERM / SIGINT, sets ``mesh``.

  Everything the run opens after (:meth:`Session.open_store`) is closed on
  the way out, in reverse order, whatever happens.
  """
  with contextlib.ExitStack() as stack:
    stack.enter_context(workdir_lock.WorkdirLock(workdir))
    preemption = stack.enter_context(preemption_lib.Preemption())
    stack.enter_context(jax.set_mesh(mesh))
    yield Session(config, workdir, preemption, stack)


def print_table(rows: list[list], header: list[str]) -> None:
  """The run's final table, printed once (process 0)."""
  if jax.process_index() == 0:
    print(metrics_lib.format_table(rows, header))
