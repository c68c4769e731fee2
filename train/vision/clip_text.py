r"""CLIP's text tower in Flax NNX, and the tokenizer its checkpoint ships.

The text encoder of CLIP (Radford et al., 2021) is a causal Transformer:

.. math::

   h = \mathrm{LN}(\mathrm{Blocks}_{\text{causal}}(E[t] + P)), \qquad
   f = h_{\mathrm{eot}}\, W_{\text{proj}},

token embeddings :math:`E[t]` plus learned position embeddings :math:`P`,
pre-LayerNorm blocks whose attention sees only earlier tokens, a final
LayerNorm, the feature of the end-of-text (EOT) token, and an unbiased text
projection into the space the image tower projects into. Blocks reuse
``train.vision.vit``' layers (``Dense``, ``Mlp``, quick GELU), so the parameter
names follow the image tower's: ``token_embedding``, ``pos_embedding``,
``blocks/i/{norm1, attn/{query, key, value, out}, norm2, mlp/{fc1, fc2}}``,
``final_norm``, ``projection``.

Because attention is causal, tokens after EOT never change the EOT feature:
prompts are padded only to the longest one in the batch, which is exact.

Tokenising is the ``tokenizers`` library reading the checkpoint's own
``tokenizer.json`` (CLIP's byte-level BPE with ``</w>`` word ends, lower-case,
``<|startoftext|>`` ... ``<|endoftext|>``), as ``transformers`` does.

Example:

>>> from flax import nnx
>>> import jax.numpy as jnp
>>> tower = TextTransformer(vocab_size=100, context_length=16, width=32,
...                         depth=2, num_heads=2, mlp_dim=64,
...                         projection_dim=8, eot_token_id=99,
...                         rngs=nnx.Rngs(0))
>>> tower(jnp.array([[98, 5, 7, 99, 0]])).shape
(1, 8)
"""

import os
from typing import Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tokenizers

from train.vision import vit

ACTIVATIONS = {
    'quick_gelu': vit.quick_gelu,  # OpenAI's CLIP.
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),  # OpenCLIP's.
}


class CausalAttention(vit.Attention):
  """``vit.Attention`` where each token attends to itself and before."""

  def __call__(self, x: jax.Array) -> jax.Array:
    batch, tokens, width = x.shape
    heads = lambda y: y.reshape(batch, tokens, self.num_heads, -1)
    y = jax.nn.dot_product_attention(
        heads(self.query(x)), heads(self.key(x)), heads(self.value(x)),
        is_causal=True)
    return self.out(y.reshape(batch, tokens, width))


class TextBlock(nnx.Module):
  """A pre-LayerNorm block with causal self-attention."""

  def __init__(self, width, mlp_dim, num_heads, *, activation, eps,
               dense_kwargs, rngs):
    self.norm1 = nnx.LayerNorm(width, epsilon=eps, rngs=rngs)
    self.attn = CausalAttention(width, num_heads, dense_kwargs=dense_kwargs)
    self.norm2 = nnx.LayerNorm(width, epsilon=eps, rngs=rngs)
    self.mlp = vit.Mlp(width, mlp_dim, activation,
                          dense_kwargs=dense_kwargs)

  def __call__(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class TextTransformer(nnx.Module):
  """CLIP's text encoder: token ids -> the (projected) EOT feature.

  Args:
    vocab_size, context_length: the tokenizer's vocabulary and the longest
      prompt (77 for OpenAI's CLIP).
    width, depth, num_heads, mlp_dim: the Transformer's shape.
    projection_dim: size of the text projection; 0 = none (the model returns
      the final LayerNorm's EOT feature, ``CLIPTextModel``'s pooler output).
    eot_token_id: the end-of-text token; the feature is taken at its first
      occurrence in each row.
    activation: ``'quick_gelu'`` or ``'gelu'``.
    layer_norm_eps: LayerNorm epsilon.
    dtype: computation dtype; params stay float32.
    rngs: initialisation randomness.
  """

  def __init__(self, *, vocab_size: int, context_length: int, width: int,
               depth: int, num_heads: int, mlp_dim: int, projection_dim: int,
               eot_token_id: int, activation: str = 'quick_gelu',
               layer_norm_eps: float = 1e-5, dtype=None, rngs: nnx.Rngs):
    if activation not in ACTIVATIONS:
      raise ValueError(f'activation={activation!r}: expected one of'
                       f' {sorted(ACTIVATIONS)}.')
    self.context_length, self.eot_token_id = context_length, eot_token_id
    self.token_embedding = nnx.Embed(vocab_size, width, dtype=dtype,
                                     rngs=rngs)
    self.pos_embedding = nnx.Param(
        0.01 * jax.random.normal(rngs.params(), (context_length, width)))
    dense_kwargs = dict(lora_rank=0, lora_alpha=0.0, dtype=dtype,
                        param_dtype=jnp.float32, rngs=rngs)
    self.blocks = nnx.List([
        TextBlock(width, mlp_dim, num_heads,
                  activation=ACTIVATIONS[activation], eps=layer_norm_eps,
                  dense_kwargs=dense_kwargs, rngs=rngs)
        for _ in range(depth)
    ])
    self.final_norm = nnx.LayerNorm(width, epsilon=layer_norm_eps, rngs=rngs)
    self.projection = (
        nnx.Linear(width, projection_dim, use_bias=False, dtype=dtype,
                   rngs=rngs) if projection_dim else None)

  def __call__(self, token_ids: jax.Array, *, project: bool = True
               ) -> jax.Array:
    """``int[b, t]`` ids (each row holding an EOT) -> ``[b, d]`` features.

    ``project=False`` skips the text projection (``CLIPTextModel``'s pooled
    output).
    """
    tokens = token_ids.shape[1]
    if tokens > self.context_length:
      raise ValueError(f'{tokens} tokens: the text tower takes at most'
                       f' {self.context_length}.')
    x = self.token_embedding(token_ids)
    x = x + self.pos_embedding[:tokens].astype(x.dtype)
    for block in self.blocks:
      x = block(x)
    x = self.final_norm(x)
    eot = jnp.argmax(token_ids == self.eot_token_id, axis=-1)
    x = x[jnp.arange(x.shape[0]), eot]
    if project and self.projection is not None:
      x = self.projection(x)
    return x


# -- Tokenizer ----------------------------------------------------------------

EOT_TOKEN = '<|endoftext|>'


def tokenizer_path(config: ml_collections.ConfigDict) -> str:
  """``config.zeroshot.tokenizer``, else ``tokenizer.json`` of the checkpoint."""
  return os.path.expanduser(config.zeroshot.tokenizer or os.path.join(
      config.pretrained.path, 'tokenizer.json'))


class Tokenizer:
  """A checkpoint's ``tokenizer.json``, padded to the batch's longest prompt.

  Args:
    path: ``tokenizer.json``, or the folder that holds it.
  """

  def __init__(self, path: str):
    file = os.path.join(path, 'tokenizer.json') if os.path.isdir(path) else (
        path)
    if not os.path.isfile(file):
      raise FileNotFoundError(
          f'Tokenizer file {file!r} (config.zeroshot.tokenizer, or'
          ' tokenizer.json in config.pretrained.path) does not exist. It'
          ' comes with the Hugging Face CLIP folder; from a folder with only'
          ' vocab.json and merges.txt, write it with: python -c "import'
          ' transformers as t; t.CLIPTokenizer.from_pretrained(DIR)'
          '.save_pretrained(DIR)"')
    self.file = file
    self._tokenizer = tokenizers.Tokenizer.from_file(file)
    self._tokenizer.no_padding()
    self._tokenizer.no_truncation()
    self.eot_token_id = self._tokenizer.token_to_id(EOT_TOKEN)
    if self.eot_token_id is None:
      raise ValueError(f'{file}: no {EOT_TOKEN!r} token; not a CLIP'
                       ' tokenizer.')

  def __call__(self, texts: Sequence[str], context_length: int, *,
               multiple_of: int = 8) -> np.ndarray:
    """``int32[len(texts), t]`` ids, ``t <= context_length``.

    A prompt longer than ``context_length`` keeps its first tokens and ends
    with EOT (as OpenAI's ``clip.tokenize(..., truncate=True)``). Rows are
    padded with EOT to the longest, rounded up to ``multiple_of`` (few
    distinct shapes to compile).
    """
    encodings = self._tokenizer.encode_batch(list(texts))
    longest = min(max(len(e.ids) for e in encodings), context_length)
    length = min(-(-longest // multiple_of) * multiple_of, context_length)
    ids = np.full((len(texts), length), self.eot_token_id, np.int32)
    for row, e in zip(ids, encodings):
      if e.ids[-1] != self.eot_token_id:
        raise ValueError(f'{self.file}: {e.tokens} does not end with'
                         f' {EOT_TOKEN!r}; not a CLIP tokenizer.')
      tokens = e.ids if len(e.ids) <= context_length else (
          e.ids[:context_length - 1] + [self.eot_token_id])
      row[:len(tokens)] = tokens
    return ids


def encode_texts(tower: TextTransformer, tokenizer: Tokenizer,
                 texts: Sequence[str], *, batch_size: int = 256) -> np.ndarray:
  """Every text's feature, ``float32[len(texts), d]``, in batches."""
  encode = nnx.jit(lambda tower, ids: tower(ids))
  out = []
  for start in range(0, len(texts), batch_size):
    ids = tokenizer(texts[start:start + batch_size], tower.context_length)
    out.append(np.asarray(encode(tower, jnp.asarray(ids)), np.float32))
  return np.concatenate(out)
