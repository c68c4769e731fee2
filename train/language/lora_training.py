"""One LoRA training step with gradient accumulation, for the language recipes.

``make_lora_train_step(loss_fn, graphdef, tx, dtype=..., spd=...)`` is the
jitted step the LLM and VQA recipes share: the batch's ``k`` micro-batches
(every array ``[k, micro, ...]``) go through ``loss_fn`` one at a time in a
``lax.scan`` (one micro-batch's activations at a time), their gradients are
added and divided by ``k``,

.. math::

   g = \\frac{1}{k} \\sum_{j=1}^{k} \\nabla_{\\theta} L_j(\\theta),

and one optimizer update is applied to the adapters ``theta`` alone: the base
weights are an input, never an output, so they cannot change.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

import spd_optax

# (graphdef, lora, base, micro_batch, key, dtype) -> the micro-batch's loss.
LossFn = Callable[..., jax.Array]


def make_lora_train_step(loss_fn: LossFn, graphdef: Any,
                         tx: optax.GradientTransformation, *, dtype,
                         spd: bool):
  """``step(lora, opt_state, base, batch, key) -> (lora, opt_state, metrics)``.

  Jitted; ``lora`` and ``opt_state`` are donated. Each micro-batch gets its
  own dropout key (``key`` split ``k`` ways). The metrics: ``train/loss``
  (the mean of the micro-batches' losses), ``train/grad_norm``,
  ``train/adapter_norm`` and, with ``spd``, SPD's diagnostics
  (``spd_optax.diagnostics_summary``) as ``train/spd_*``.
  """

  def step(lora, opt_state, base, batch, key):
    num_micro = jax.tree.leaves(batch)[0].shape[0]
    keys = jax.random.split(key, num_micro)
    grad_fn = jax.value_and_grad(loss_fn, argnums=1)

    def micro_step(grads, xs):
      micro_batch, micro_key = xs
      loss, g = grad_fn(graphdef, lora, base, micro_batch, micro_key, dtype)
      return jax.tree.map(jnp.add, grads, g), loss

    grads, losses = jax.lax.scan(
        micro_step, jax.tree.map(jnp.zeros_like, lora), (batch, keys))
    grads = jax.tree.map(lambda g: g / num_micro, grads)
    updates, opt_state = tx.update(grads, opt_state, lora)
    lora = optax.apply_updates(lora, updates)
    metrics = {'train/loss': jnp.mean(losses),
               'train/grad_norm': optax.tree.norm(grads),
               'train/adapter_norm': optax.tree.norm(lora)}
    if spd:
      metrics.update({k.replace('spd/', 'train/spd_'): v for k, v in
                      spd_optax.diagnostics_summary(opt_state).items()})
    return lora, opt_state, metrics

  return jax.jit(step, donate_argnums=(0, 1))
