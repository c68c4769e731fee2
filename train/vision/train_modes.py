r"""What a run trains, stage by stage: full fine-tuning, linear probe, LP-FT.

``config.train_mode`` picks one of three ways to use a pre-trained model:

- ``'full'``: fine-tune every parameter (or, with LoRA, the adapters and the
  head) with ``config.optimizer``.
- ``'linear_probe'``: train the head only. The backbone is not in the
  optimizer at all (``wrt`` is the head), so its arrays are never written.
- ``'lp_ft'`` (Kumar et al., ICLR 2022): steps :math:`1..P` probe the head
  (Adam at ``lp_ft.probe_learning_rate`` with its own warmup and cosine over
  :math:`P = ` ``lp_ft.probe_steps`` steps, clipped on the head's gradient);
  steps :math:`P+1..P+N` fine-tune with ``config.optimizer`` as ``'full'``
  does (:math:`N = ` ``num_train_steps``, its schedule starting at step
  :math:`P+1`) from the probed head. One optimizer holds both stages
  (:func:`staged`), so its state has the same structure on either side of
  the boundary and a checkpoint from either stage restores exactly. SPD's and
  L2-SP's anchor is taken when the optimizer is built, from the pre-trained
  backbone, which the probe does not move.

Example (an optimizer that runs ``first`` for 2 steps, then ``second``):

>>> import jax.numpy as jnp, optax
>>> tx = staged(optax.sgd(1.0), optax.sgd(10.0), first_steps=2)
>>> params = jnp.zeros(())
>>> state = tx.init(params)
>>> for _ in range(3):
...   u, state = tx.update(jnp.ones(()), state, params)
...   params = optax.apply_updates(params, u)
>>> params
Array(-12., dtype=float32)
"""

from typing import Any, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import optax

from train.core import optimizers

MODES = ('full', 'linear_probe', 'lp_ft')
HEAD = nnx.All(nnx.Param, nnx.PathContains('head'))


def total_steps(config: ml_collections.ConfigDict) -> int:
  """Steps of the whole run: the probe's, then the fine-tuning's."""
  return start_step(config) + config.num_train_steps


def start_step(config: ml_collections.ConfigDict) -> int:
  """After how many steps the model is the run's starting model.

  0, except for LP-FT: the fine-tuning stage starts from the probed head.
  """
  return config.lp_ft.probe_steps if config.train_mode == 'lp_ft' else 0


def trainable(config: ml_collections.ConfigDict) -> Any:
  """The ``nnx`` filter of what the optimizer updates.

  The head alone for a linear probe; with LoRA (``model.lora_rank > 0``) the
  adapters and the head; else every ``nnx.Param``.
  """
  if config.train_mode == 'linear_probe':
    return HEAD
  if config.model.lora_rank > 0:
    return nnx.Any(nnx.LoRAParam, HEAD)
  return nnx.Param


def _probe_config(config: ml_collections.ConfigDict):
  """LP-FT's stage 1 as a linear-probe run of its own would be configured."""
  probe = config.copy_and_resolve_references()
  probe.optimizer.name = 'adam'
  probe.optimizer.learning_rate = config.lp_ft.probe_learning_rate
  probe.optimizer.skip_nonfinite = False
  probe.num_train_steps = config.lp_ft.probe_steps
  return probe


def probe_config(config: ml_collections.ConfigDict):
  """The ``linear_probe`` run whose head LP-FT's stage 1 computes."""
  probe = _probe_config(config)
  probe.train_mode = 'linear_probe'
  probe.wise_ft.alphas = ()
  return probe


def _head_mask(params):
  return jax.tree.map(lambda x: not x, optimizers.not_head_mask(params))


def make_run_optimizer(config: ml_collections.ConfigDict
                       ) -> optimizers.KeyedTransformation:
  """The run's optimizer: its method's, preceded by the probe for LP-FT.

  The result is :func:`optimizers.keyed_by_config`: runs of a sweep share one
  compiled step.
  """
  lora = config.model.lora_rank > 0
  tx = optimizers.make_optimizer(config, lora=lora)
  if config.train_mode == 'lp_ft':
    probe = optimizers.make_optimizer(_probe_config(config), lora=lora)
    first = optax.chain(optax.masked(probe, _head_mask),
                        optax.masked(optax.set_to_zero(),
                                     optimizers.not_head_mask))
    tx = staged(first, tx, config.lp_ft.probe_steps)
  return optimizers.keyed_by_config(tx, config, lora=lora)


def learning_rate(config: ml_collections.ConfigDict, step: int) -> float:
  """The learning rate of step ``step`` (1-based), for logging."""
  if config.train_mode == 'lp_ft':
    probe_steps = config.lp_ft.probe_steps
    if step <= probe_steps:
      return optimizers.learning_rate_schedule(_probe_config(config))(step - 1)
    step -= probe_steps
  return optimizers.learning_rate_schedule(config)(step - 1)


class StagedState(NamedTuple):
  count: jax.Array  # int32[]: steps taken.
  first: optax.OptState
  second: optax.OptState


def staged(first: optax.GradientTransformation,
           second: optax.GradientTransformation,
           first_steps: int) -> optax.GradientTransformationExtraArgs:
  """``first`` for ``first_steps`` updates, then ``second``.

  Both states are kept; each advances only during its own stage, so
  ``second``'s schedule starts at its own step 0.

  Args:
    first: the transformation of updates ``0 .. first_steps - 1``.
    second: the transformation of every later update.
    first_steps: the number of updates of the first stage.

  Returns:
    A ``GradientTransformationExtraArgs`` whose state is a
    :class:`StagedState`.
  """
  first = optax.with_extra_args_support(first)
  second = optax.with_extra_args_support(second)

  def init_fn(params):
    return StagedState(jnp.zeros([], jnp.int32), first.init(params),
                       second.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    def run_first():
      u, s = first.update(updates, state.first, params, **extra_args)
      return u, s, state.second

    def run_second():
      u, s = second.update(updates, state.second, params, **extra_args)
      return u, state.first, s

    u, s1, s2 = jax.lax.cond(state.count < first_steps, run_first,
                             run_second)
    return u, StagedState(optax.safe_increment(state.count), s1, s2)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
