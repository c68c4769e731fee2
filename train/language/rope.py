r"""Rotary position embeddings as Hugging Face computes them, for Tunix.

Tunix 0.1.7's Llama 3 and Qwen 3 attention call their module's
``apply_rope(x, positions, head_dim=...)`` without the config's
``rope_theta``, so every model rotates with the function's default base,
:math:`10^6`, whatever its ``config.json`` says (Llama 3: :math:`5 \cdot
10^5`; LLaMA-1/2 and a default ``transformers`` config: :math:`10^4`). The
error is zero at position 0 and grows with the position (2e-3 at position 63
in the logits of a tiny random Llama). Nor can that function express Llama
3.1's frequency-dependent scaling (``rope_type='llama3'``).

The correction is thin: each attention module of such a model carries a
:class:`Rope` (``hf_rope``, a static attribute) and its class becomes a
subclass whose ``block`` makes that rope current; Tunix's module-level
``apply_rope`` is replaced by a dispatcher that uses the current rope, and
falls back to Tunix's own function when there is none (so nothing changes for
other users of those modules). The rotation itself is the "rotate half"
layout both libraries use:

.. math::

   \omega_i = \theta^{-2i/d},\quad
   x' = x \cos(p\,\omega) + \mathrm{rot}(x) \sin(p\,\omega),

with :math:`\omega` divided by ``factor`` for ``'linear'`` and, for
``'llama3'``, by ``factor`` at long wavelengths, unchanged at short ones and
interpolated between (Llama 3.1's rule).

    >>> rope = Rope(theta=10_000.0)
    >>> [round(float(w), 6) for w in rope.inv_freq(8)]
    [1.0, 0.1, 0.01, 0.001]
    >>> round(Rope(theta=1e4, kind='linear', factor=2.0).inv_freq(4)[1].item(), 6)
    0.005
"""

import contextvars
import dataclasses
import functools
import math

from flax import nnx
import jax.numpy as jnp
import numpy as np

KINDS = ('default', 'linear', 'llama3')

_CURRENT = contextvars.ContextVar('hf_rope', default=None)


@dataclasses.dataclass(frozen=True)
class Rope:
  """One model's rotary embedding, as its ``config.json`` gives it."""
  theta: float
  kind: str = 'default'  # One of KINDS.
  factor: float = 1.0  # 'linear' and 'llama3'.
  low_freq_factor: float = 1.0  # 'llama3' only.
  high_freq_factor: float = 4.0  # 'llama3' only.
  original_max_position_embeddings: int = 8192  # 'llama3' only.

  def inv_freq(self, head_dim: int, dtype=np.float32) -> np.ndarray:
    """The angular frequencies, rounded to float32 as ``transformers``
    rounds them (or float64 throughout, for a float64 model)."""
    exponents = np.arange(0, head_dim, 2).astype(dtype) / dtype(head_dim)
    inv = (1.0 / (dtype(self.theta) ** exponents)).astype(dtype)
    if self.kind == 'linear':
      return (inv / dtype(self.factor)).astype(dtype)
    if self.kind == 'llama3':
      return self._llama3(inv).astype(dtype)
    return inv

  def _llama3(self, inv: np.ndarray) -> np.ndarray:
    old = self.original_max_position_embeddings
    wavelen = 2 * math.pi / inv
    low_wavelen = old / self.low_freq_factor  # Longer: divided by factor.
    high_wavelen = old / self.high_freq_factor  # Shorter: unchanged.
    smooth = ((old / wavelen - self.low_freq_factor)
              / (self.high_freq_factor - self.low_freq_factor))
    mid = (1 - smooth) * inv / self.factor + smooth * inv
    out = np.where(wavelen > low_wavelen, inv / self.factor, inv)
    between = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return np.where(between, mid, out)


def rotate(x: jnp.ndarray, positions: jnp.ndarray, rope: Rope) -> jnp.ndarray:
  """``x`` [B, L, N, H] rotated by ``positions`` [B, L] (``transformers``).

  Angles, cos and sin in float32 as ``transformers`` computes them, then in
  ``x``'s dtype; in float64 when ``x`` is (the float64 parity check)."""
  angle_dtype = np.float64 if x.dtype == jnp.float64 else np.float32
  inv = jnp.asarray(rope.inv_freq(x.shape[-1], angle_dtype))
  angles = positions.astype(angle_dtype)[..., None] * inv  # [B, L, H/2]
  cos = jnp.cos(angles)[..., None, :].astype(x.dtype)  # [B, L, 1, H/2]
  sin = jnp.sin(angles)[..., None, :].astype(x.dtype)
  first, second = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([first * cos - second * sin,
                          second * cos + first * sin], axis=-1)


def _dispatcher(tunix_apply_rope):
  """Tunix's ``apply_rope``, or ours while a module's rope is current."""

  @functools.wraps(tunix_apply_rope)
  def apply_rope(inputs, positions, *args, **kwargs):
    rope = _CURRENT.get()
    if rope is None:
      return tunix_apply_rope(inputs, positions, *args, **kwargs)
    return rotate(inputs, positions, rope)

  apply_rope.tunix_apply_rope = tunix_apply_rope
  return apply_rope


def install(tunix_model_module) -> None:
  """Routes ``tunix_model_module.apply_rope`` through the dispatcher (once)."""
  current = tunix_model_module.apply_rope
  if not hasattr(current, 'tunix_apply_rope'):
    tunix_model_module.apply_rope = _dispatcher(current)


@functools.cache
def _corrected(attention_cls: type) -> type:
  """``attention_cls`` whose ``block`` runs with its ``hf_rope`` current."""

  def block(self, *args, **kwargs):
    token = _CURRENT.set(self.hf_rope)
    try:
      return attention_cls.block(self, *args, **kwargs)
    finally:
      _CURRENT.reset(token)

  return type(attention_cls.__name__, (attention_cls,),
              {'block': block, '__module__': __name__,
               '__qualname__': f'HFRope{attention_cls.__name__}'})


def correct(model, rope: Rope, attention_cls: type) -> None:
  """Gives every ``attention_cls`` module of ``model`` the rope ``rope``."""
  for _, module in nnx.iter_modules(model):
    if type(module) is attention_cls:  # pylint: disable=unidiomatic-typecheck
      module.hf_rope = rope
      module.__class__ = _corrected(attention_cls)
