r"""WiSE-FT on LoRA adapters: the fine-tuned delta scaled by alpha.

With LoRA, a projection's weight is :math:`W = W_0 + s\,A B` (qwix: ``*_lora_a``
is A, ``*_lora_b`` is B, ``s`` = alpha / rank), and B starts at zero, so the
pre-trained model is the adapted one at its start. WiSE-FT's weight-space
ensemble :math:`W_0 + \alpha (W_{ft} - W_0) = W_0 + \alpha\, s\, A B` is the
adapters with B scaled by alpha (A kept): alpha = 0 is the pre-trained
model, 1 the fine-tuned one. (Interpolating A and B both would scale the
delta by alpha squared.)
"""

from typing import Any

import jax


def is_lora_b(path) -> bool:
  """Whether a leaf is a B: qwix names it ``<weight>_lora_b``."""
  last = path[-1]
  return str(getattr(last, 'key', getattr(last, 'name', last))).endswith(
      'lora_b')


def scaled(lora: Any, alpha: float) -> Any:
  """The adapters whose delta is ``alpha`` times ``lora``'s: every
  ``lora_b`` times ``alpha``, every ``lora_a`` as it is."""
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f'WiSE-FT alpha {alpha} is not in [0, 1].')
  found = []

  def scale(path, leaf):
    if is_lora_b(path):
      found.append(path)
      return leaf * alpha
    return leaf

  out = jax.tree_util.tree_map_with_path(scale, lora)
  if not found:
    raise ValueError('No lora_b leaf among the adapters: nothing to scale.')
  return out


def prefix(alpha: float) -> str:
  """The results' key prefix of one alpha: ``'test/alpha_0.5'``."""
  return f'test/alpha_{alpha:g}'
