r"""The jitted programs of VQA fine-tuning: the train step and generation.

The loss is PaliGemma's transfer loss: the prefix (image tokens, BOS, the
prompt) is read with full attention, the answer and its EOS (the suffix,
``loss_mask``) are predicted token by token,

.. math::

   L = \frac{1}{k} \sum_{j=1}^{k} -\frac{1}{|S_j|} \sum_{(b, t) \in S_j}
   \log p(x_{b,t} \mid x_{b,<t}, \mathrm{image}_b),

the mean over the ``k`` micro-batches of each one's mean over its suffix
tokens ``S_j``, nothing else: gradient accumulation as LAVIS's runner (which
FRAMES-VQA trains with) does it, the loss of each micro-batch divided by
``k``. With ``k = 1`` it is the mean over the batch's suffix tokens; with
several, a token of a micro-batch with short answers weighs more than one of
a micro-batch with long answers, so ``micro_batch_size`` is part of the
setting (``train.core.run_identity`` keeps it). A step takes ``k``
micro-batches (every array of ``batch`` is ``[k, micro, ...]``), adds their
gradients in a ``lax.scan`` (one micro-batch's activations at a time),
averages them, and applies one optimizer update to the adapters only: the
base weights are an input, never an output, so they cannot change.

Adapters are float32 (so are their gradients and the optimizer state); they
are cast to the compute dtype inside the loss.
"""

from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import optax

from train.language import lora_training
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


def make_train_step(graphdef, tx: optax.GradientTransformation, *,
                    dtype, spd: bool):
  """``step(lora, opt_state, base, batch, key) -> (lora, opt_state, metrics)``
  on :func:`loss_fn` (``train.language.lora_training``: jitted, ``lora`` and
  ``opt_state`` donated; ``spd``: SPD's diagnostics join the metrics)."""
  return lora_training.make_lora_train_step(loss_fn, graphdef, tx,
                                            dtype=dtype, spd=spd)


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
