"""Fine-tune a Flax NNX ViT with SPD (or a baseline): the loop of ``python -m train``.

``train_and_evaluate(config, workdir)`` reads top to bottom, on the loop
skeleton (``train.core.loop``: the workdir's lock, signals, checkpoints,
metrics, the schedule, the non-finite check, the final table):

1. **Set-up** (:func:`_set_up`): check the config, claim the workdir (one run
   per workdir, of one config: ``train.core.run_identity``), build the mesh,
   the model with its pre-trained weights (``train.vision.model_setup``), and
   the optimizer (``train.vision.train_modes``), which is built *after* the
   weights are loaded, so that SPD's and L2-SP's anchor is the pre-trained
   model.
2. **Restore**: the newest intact checkpoint, if any, and the metrics logged
   up to it.
3. **Steps** (:meth:`_Run.steps`): the jitted :func:`train_step` on the
   next batch, the checkpoint, the accuracies, and the starting model kept
   for WiSE-FT, which the skeleton calls when its schedule says so, until the
   last step, ``config.max_steps_per_run`` steps, or a signal.
4. **Finish** (:func:`_final_evaluation`): the final evaluation (and
   WiSE-FT), the summary table.

Everything runs under one ``jax.set_mesh``. A signal saves the current step
and raises ``train.core.preemption.Preempted`` (the command line exits 0); the
same command resumes exactly.
"""

import dataclasses
import functools
import os
from typing import Any, Optional

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import optax

import spd_optax
from train.core import loop
from train.core import run_identity
from train.vision import checks
from train.vision import evaluation
from train.vision import input_pipeline
from train.vision import locations
from train.vision import mesh as mesh_lib
from train.vision import model_setup
from train.vision import train_modes
from train.vision import wise_ft


# -- The step -------------------------------------------------------------------


def cross_entropy(logits: jax.Array, soft_labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy(logits, soft_labels).mean()


def _find(tree: Any, kind: Any) -> list:
  """The states of type ``kind`` (or a tuple of types) inside an optimizer
  state (its structure)."""
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
  L2-SP's or FTP's anchor (and FTP's diagnostics), or from ``start_params``
  (a copy kept for Adam and AdamW); nothing for a LoRA run without SPD or
  FTP. Decided by the state's structure, at trace time. The attention key
  biases are left out of all of them, and a new head is (unless
  ``optimizer.decay_head``) as it is out of SPD, L2-SP and FTP.
  """
  if _find(opt_state, spd_optax.SPDState):
    return {k.replace('spd/', 'train/spd_'): v for k, v in
            spd_optax.diagnostics_summary(opt_state, mask=LOGGED).items()}
  ftp = ({k.replace('ftp/', 'train/ftp_'): v for k, v in
          spd_optax.ftp_diagnostics_summary(opt_state, mask=LOGGED).items()}
         if _find(opt_state, spd_optax.FTPState) else {})
  anchored = [s.anchor for s in _find(opt_state, (spd_optax.L2SPState,
                                                   spd_optax.FTPState))
              if not isinstance(s.anchor, optax.EmptyState)]
  reference = anchored[0] if anchored else start_params
  if reference is None:
    return ftp
  return {**ftp, 'train/spd_deviation_norm': deviation_norm(params, reference)}


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


# -- The run ------------------------------------------------------------------


@dataclasses.dataclass
class _Run:
  """The state of a run, and the step and evaluation the skeleton calls."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  model: nnx.Module
  optimizer: nnx.Optimizer
  start_params: Optional[Any]  # Adam(W): the pre-trained weights, to log drift.
  session: loop.Session

  def save(self, step: int) -> None:
    self.session.checkpointer.save(
        step, nnx.as_pure(nnx.state(self.model)),
        nnx.as_pure(nnx.state(self.optimizer)), {'step': step})

  def accuracies(self) -> dict[str, float]:
    return evaluation.accuracies(self.model, self.config, self.mesh)

  def restore(self) -> int:
    def apply(model_state, opt_state):
      nnx.update(self.model, model_state)
      nnx.update(self.optimizer, opt_state)
    return self.session.restore(
        (nnx.as_pure(nnx.state(self.model)),
         nnx.as_pure(nnx.state(self.optimizer))), apply)

  def steps(self, start_step: int, schedule: loop.Schedule) -> loop.Steps:
    """The skeleton's view of this run: its step, save and evaluation."""
    config = self.config
    batches = input_pipeline.train_batches(
        config.dataset, global_batch_size=config.batch_size, seed=config.seed,
        start_step=start_step)
    step_fn = nnx.cached_partial(train_step, self.model, self.optimizer)

    def step(unused_step, key):
      batch = mesh_lib.shard_batch(next(batches), self.mesh)
      return step_fn(batch, key, self.start_params), config.batch_size

    def reached(step):  # The run's starting model, for WiSE-FT.
      if step == schedule.start_of_finetuning:
        wise_ft.save_start_model(self.workdir, self.model)

    return loop.Steps(
        step=step, save=self.save, evaluate=self.accuracies,
        learning_rate=lambda s: train_modes.learning_rate(config, s),
        eval_prefix='eval/', rate_key='train/images_per_second',
        evaluates_at_start=config.model.head_init == 'zeroshot',
        reached=reached)


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
  with loop.session(config, workdir, mesh) as session:
    run = _set_up(config, workdir, mesh, session)
    session.open_store()
    start_step = run.restore()
    schedule = loop.Schedule.of(
        config, start_step, total_steps=train_modes.total_steps(config),
        start_of_finetuning=train_modes.start_step(config))
    eval_results = session.train(run.steps(start_step, schedule), schedule,
                                 start_step)
    if session.finished(schedule):
      eval_results = _final_evaluation(run, eval_results)
  if print_summary:
    loop.print_table(
        [[k.removeprefix('eval/').removesuffix('_accuracy'), v]
         for k, v in eval_results.items()], ['eval set', 'accuracy'])
  return eval_results


def _set_up(config, workdir: str, mesh, session: loop.Session) -> _Run:
  """The workdir claimed; the model and its optimizer built."""
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
  return _Run(config, workdir, mesh, model, optimizer, start_params, session)


def _start_params(params: Any, decay_head: bool) -> Any:
  """A copy of the trained params, to log drift from; the head masked out
  as SPD and L2-SP leave it out (``optimizer.decay_head=False``)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: optax.MaskedNode() if not decay_head and 'head' in
      jax.tree_util.keystr(path) else jnp.copy(x), params)


def _final_evaluation(run: _Run,
                      eval_results: dict[str, float]) -> dict[str, float]:
  """The final evaluation (and WiSE-FT) of a finished run."""
  if not eval_results:  # Resumed a finished run: evaluate what is there.
    eval_results = run.accuracies()
  if run.config.wise_ft.alphas:
    eval_results.update(wise_ft.evaluate_alphas(
        run.model, run.workdir, run.config.wise_ft.alphas,
        lambda model: evaluation.accuracies(model, run.config, run.mesh)))
  return eval_results
