"""The jitted programs of LoRA fine-tuning: the train step and the val loss.

The loss is the causal LM loss of the reference ``finetune.py``
(``transformers``' ``LlamaForCausalLM``): token t is predicted from the
tokens before it, the mean over the tokens of the batch whose ``loss_mask``
is 1 (padding never). A step takes ``k`` micro-batches (``batch['input_ids']``
is ``[k, micro, T]``), adds their gradients in a ``lax.scan`` (activations of
one micro-batch at a time) and averages them, as gradient accumulation over
micro-batches does, then applies one optimizer update to the adapters only
(``train.language.lora_training``, shared with the VQA recipe): the base
weights are an input, never an output, so they cannot change.

Adapters are float32 (and so are the gradients and the optimizer state);
they are cast to the compute dtype (the base weights' dtype, e.g. bfloat16)
inside the loss, so the forward and backward passes run in it.
"""

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import optax

from train.language import lora_training
from train.language import models


def token_losses(model, batch) -> tuple[jax.Array, jax.Array]:
  """``(summed NLL, number of tokens)`` of one micro-batch."""
  tokens, valid = batch['input_ids'], batch['attention_mask']
  logits, _ = models.logits(model, tokens, models.positions_of(valid),
                            models.causal_mask(valid))
  nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1],
                                                        tokens[:, 1:])
  weight = (batch['loss_mask'][:, 1:] * valid[:, 1:]).astype(jnp.float32)
  return jnp.sum(nll * weight), jnp.sum(weight)


def _merged(graphdef, lora, base, dtype, key):
  """The model with the adapters in ``dtype`` and LoRA dropout keyed by
  ``key`` (qwix reads its dropout keys from ``qwix_rngs``)."""
  model = nnx.merge(graphdef, models.cast(lora, dtype), base)
  model.set_attributes(qwix_rngs=nnx.Rngs(dropout=key))
  return model


def loss_fn(graphdef, lora, base, batch, key, dtype) -> jax.Array:
  """The mean loss of one micro-batch, as a function of the adapters."""
  total, count = token_losses(_merged(graphdef, lora, base, dtype, key), batch)
  return total / jnp.maximum(count, 1.0)


def make_train_step(graphdef, tx: optax.GradientTransformation, *,
                    dtype, spd: bool):
  """``step(lora, opt_state, base, batch, key) -> (lora, opt_state, metrics)``
  on :func:`loss_fn` (``train.language.lora_training``: jitted, ``lora`` and
  ``opt_state`` donated; ``spd``: SPD's diagnostics join the metrics)."""
  return lora_training.make_lora_train_step(loss_fn, graphdef, tx,
                                            dtype=dtype, spd=spd)


def make_val_loss(graphdef, *, dtype):
  """``val(lora, base, batch) -> (summed NLL, tokens)``, jitted (no dropout:
  ``graphdef`` is the evaluation graph)."""

  def val(lora, base, batch):
    return token_losses(nnx.merge(graphdef, models.cast(lora, dtype), base),
                        batch)

  return jax.jit(val)


def initial_opt_state(tx: optax.GradientTransformation, lora: Any) -> Any:
  """``tx.init`` jitted, so the state lands on the adapters' shardings."""
  return jax.jit(tx.init)(lora)
