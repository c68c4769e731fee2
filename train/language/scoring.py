"""What the model says: greedy generation, and the log-likelihood of texts.

Both run one jitted program per batch shape on a model merged from
``(graphdef, lora, base)``, so a caller passes the adapters it trains and
nothing is copied. Batches are global arrays split over the mesh's batch
axes; results come back replicated, so every process can read them.

- :meth:`Scorer.generate` continues left-padded prompts greedily with a
  key/value cache (prefill, then one token a step, until every row has
  produced EOS or ``max_new_tokens``). Positions skip the padding, so a
  padded row continues exactly as it would alone.
- :meth:`Scorer.log_likelihoods` sums ``log p(token | tokens before)`` over
  the marked tokens of right-padded rows: the second evaluation mode, one
  forward pass per batch instead of up to 32.
"""

from flax import nnx
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import numpy as np

from train.language import mesh as mesh_lib
from train.language import models


def _replicated(mesh):
  return NamedSharding(mesh, P())


def _generate_fn(graphdef, cache_spec, max_new_tokens, eos_id, pad_id, out):
  """The jitted greedy decoder of one model graph (closed over, not hashed:
  a Tunix ModelConfig in the graph may be unhashable)."""

  def run(lora, base, tokens, valid):
    # Merged in each trace that runs it: qwix sets an attribute on its
    # modules at every call, which NNX refuses across trace levels.
    merged = lambda: nnx.merge(graphdef, models.cast(lora, _dtype(base)),
                               base)
    batch, prompt_len = tokens.shape
    length = prompt_len + max_new_tokens
    slots = jnp.arange(length)
    cache = models.init_cache(cache_spec, batch, length, _dtype(base))
    key_valid = jnp.zeros((batch, length), jnp.bool_).at[:, :prompt_len].set(
        valid)
    positions = models.positions_of(valid)
    mask = key_valid[:, None, :] & (slots[None, :prompt_len, None]
                                    >= slots[None, None, :])
    logits, cache = models.logits(merged(), tokens, positions, mask, cache)
    first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    next_pos = positions[:, -1] + 1

    def step(state):
      t, token, done, cache, key_valid, generated = state
      generated = generated.at[:, t].set(jnp.where(done, pad_id, token))
      done = done | (token == eos_id)
      slot = prompt_len + t
      key_valid = key_valid.at[:, slot].set(True)
      mask = (key_valid & (slots <= slot)[None])[:, None, :]
      logits, cache = models.logits(merged(), token[:, None],
                                    (next_pos + t)[:, None], mask, cache)
      token = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
      return t + 1, token, done, cache, key_valid, generated

    def running(state):
      t, _, done = state[:3]
      return (t < max_new_tokens) & ~jnp.all(done)

    generated = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    state = (jnp.int32(0), first, jnp.zeros((batch,), jnp.bool_), cache,
             key_valid, generated)
    return jax.lax.while_loop(running, step, state)[-1]

  return jax.jit(run, out_shardings=out)


def _log_likelihoods_fn(graphdef, out):
  def run(lora, base, tokens, valid, scored):
    model = nnx.merge(graphdef, models.cast(lora, _dtype(base)), base)
    logits, _ = models.logits(model, tokens, models.positions_of(valid),
                              models.causal_mask(valid))
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    token_logp = jnp.take_along_axis(logp, tokens[:, 1:, None],
                                     axis=-1)[..., 0]
    return jnp.sum(jnp.where(scored[:, 1:], token_logp, 0.0), axis=-1)

  return jax.jit(run, out_shardings=out)


def _dtype(base) -> jnp.dtype:
  """The compute dtype: that of the base model's weights (the adapters are
  cast to it, as in training)."""
  return jax.tree.leaves(base)[0].dtype


class Scorer:
  """Generation and scoring with one model graph, compiled once per shape.

  Args:
    graphdef: the model graph (``models.Adapted.eval_graphdef``: no dropout).
    config: Tunix's ModelConfig (for the cache's shape).
    mesh: batches are split over its batch axes ('data', 'fsdp').
    max_new_tokens, eos_id, pad_id: for :meth:`generate`.
  """

  def __init__(self, graphdef, config, mesh, *, max_new_tokens: int,
               eos_id: int, pad_id: int):
    self.mesh = mesh
    out = _replicated(mesh)
    self._generate = _generate_fn(graphdef, models.cache_spec(config),
                                  max_new_tokens, eos_id, pad_id, out)
    self._log_likelihoods = _log_likelihoods_fn(graphdef, out)

  def generate(self, lora, base, tokens: np.ndarray,
               valid: np.ndarray) -> np.ndarray:
    """Greedy continuations of left-padded prompts.

    Args:
      lora, base: the model's state (``models.Adapted``).
      tokens: int32 [B, T], prompts padded on the left (B divides over the
        batch axes).
      valid: bool [B, T], False on the padding.

    Returns:
      int32 [B, max_new_tokens]: the tokens after each prompt, ``pad_id``
      after the first EOS (which is kept).
    """
    g = lambda x: mesh_lib.to_global(x, self.mesh)
    return np.asarray(self._generate(lora, base, g(tokens), g(valid)))

  def log_likelihoods(self, lora, base, tokens: np.ndarray, valid: np.ndarray,
                      scored: np.ndarray) -> np.ndarray:
    """float32 [B]: sum of log p(token t | tokens < t) over ``scored`` t.

    Args:
      tokens: int32 [B, T], right-padded.
      valid: bool [B, T], False on the padding.
      scored: bool [B, T], the tokens whose log-probabilities are summed
        (never position 0, which nothing predicts).
    """
    g = lambda x: mesh_lib.to_global(x, self.mesh)
    return np.asarray(self._log_likelihoods(lora, base, g(tokens), g(valid),
                                            g(scored)))
