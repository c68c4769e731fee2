r"""The jitted programs of VQA fine-tuning: the train step and generation.

The loss is PaliGemma's transfer loss: the prefix (image tokens, BOS, the
prompt) is read with full attention, the answer and its EOS (the suffix,
``loss_mask``) are predicted token by token,

.. math::

   L = -\frac{1}{|S|} \sum_{(b, t) \in S} \log p(x_{b,t} \mid x_{b,<t},
   \mathrm{image}_b),

the mean over the suffix tokens ``S`` of the batch, nothing else. A step
takes ``k`` micro-batches (every array of ``batch`` is ``[k, micro, ...]``),
adds their gradients in a ``lax.scan`` (one micro-batch's activations at a
time), averages them, and applies one optimizer update to the adapters only:
the base weights are an input, never an output, so they cannot change.

Adapters are float32 (so are their gradients and the optimizer state); they
are cast to the compute dtype inside the loss.
"""

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import optax

import spd_optax
from train.language import models as lm
from train.vqa import models

BATCH_KEYS = ('tokens', 'input_mask', 'prefix_mask', 'loss_mask', 'images')


def answer_losses(model, batch) -> tuple[jax.Array, jax.Array]:
  """``(summed NLL of the answer tokens, their number)`` of a micro-batch."""
  tokens = batch['tokens']
  logits = models.logits(model, tokens, batch['images'], batch['input_mask'],
                         batch['prefix_mask'])
  nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1],
                                                        tokens[:, 1:])
  weight = (batch['loss_mask'][:, 1:] & batch['input_mask'][:, 1:]).astype(
      jnp.float32)
  return jnp.sum(nll * weight), jnp.sum(weight)


def merged(graphdef, lora, base, dtype, key=None):
  """The model with the adapters in ``dtype``; LoRA dropout keyed by ``key``
  (qwix reads its dropout keys from ``qwix_rngs``)."""
  model = nnx.merge(graphdef, lm.cast(lora, dtype), base)
  if key is not None:
    model.set_attributes(qwix_rngs=nnx.Rngs(dropout=key))
  return model


def loss_fn(graphdef, lora, base, batch, key, dtype) -> jax.Array:
  """The mean answer loss of one micro-batch, a function of the adapters."""
  total, count = answer_losses(merged(graphdef, lora, base, dtype, key), batch)
  return total / jnp.maximum(count, 1.0)


def make_train_step(graphdef, tx: optax.GradientTransformation, *, dtype,
                    spd: bool):
  """``step(lora, opt_state, base, batch, key) -> (lora, opt_state, metrics)``.

  Jitted; ``lora`` and ``opt_state`` are donated. ``spd``: SPD's diagnostics
  (``spd_optax.diagnostics_summary``) join the metrics as ``train/spd_*``.
  """

  def step(lora, opt_state, base, batch, key):
    num_micro = batch['tokens'].shape[0]
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


def make_generate(graphdef, *, dtype, max_new_tokens: int, eos_id: int,
                  pad_id: int):
  """``generate(lora, base, batch) -> int32 [B, max_new_tokens]``: greedy
  answers (the model API's KV-cached decoding) with the evaluation graph
  (no dropout)."""

  def run(lora, base, batch):
    return models.generate(
        merged(graphdef, lora, base, dtype), batch['tokens'],
        batch['images'], batch['input_mask'], batch['prefix_mask'],
        max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id)

  return jax.jit(run)


def initial_opt_state(tx: optax.GradientTransformation, lora: Any) -> Any:
  """``tx.init`` jitted, so the state lands on the adapters' shardings."""
  return jax.jit(tx.init)(lora)
