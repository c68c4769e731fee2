"""A decoder LLM from a Hugging Face folder, as a Tunix model with qwix LoRA.

``load(folder, mesh=..., dtype=...)`` builds Tunix's NNX model of the
folder's family from its own ``config.json`` (``train.language.families``),
corrects Tunix's RoPE where it differs from ``transformers``
(``train.language.rope``), and fills every leaf from the folder's safetensors with
the checks of ``train.language.hf_weights``, each tensor placed on its shards by
Tunix's sharding rules. ``add_lora`` puts qwix LoRA adapters
(``nnx.LoRAParam``, float32) on the projections the config names;
``logits`` runs the model on a batch and ``init_cache`` makes the key/value
cache that greedy generation fills.
"""

import dataclasses
import logging
import re
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import qwix

from train.language import families
from train.language import hf_weights
from train.language import rope as rope_lib


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A loaded model and what it is."""
  model: nnx.Module
  family: families.Family
  config: Any  # Tunix's ModelConfig.
  report: dict  # What was read, for the log.


def _abstract(family, config, hf):
  """The model's structure (no arrays), its RoPE corrected where needed."""
  model = nnx.eval_shape(lambda: family.model_class(config, rngs=nnx.Rngs(0)))
  if family.rope is not None:
    rope_lib.correct(model, family.rope(hf), family.attention_class)
  return model


def _flat(tree: dict, prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in tree.items():
    key = f'{prefix}{k}'
    if isinstance(v, dict):
      out.update(_flat(v, key + '.'))
    else:
      out[key] = v
  return out


def _unflat(flat: dict[str, Any], like: dict, prefix: str = '') -> dict:
  return {k: (_unflat(flat, v, f'{prefix}{k}.') if isinstance(v, dict)
              else flat[f'{prefix}{k}']) for k, v in like.items()}


def _sources(folder, family, config, hf) -> tuple[dict, list]:
  sources, raw, ignored = hf_weights.collect(
      folder, family.tensor_map(config),
      ignore_vision=hf.get('model_type') == 'gemma3')
  if family is families.GEMMA3:
    sources = hf_weights.fuse_qkv(
        sources, fused_qkv=config.num_heads == config.num_kv_heads)
  if hf.get('tie_word_embeddings', family is families.GEMMA3):
    check_tie = hf_weights.tied_head(
        sources, raw, ('lm_head.w', 'unused.lm_head.weight'))
    if check_tie is not None:
      check_tie()
  return sources, ignored


def load(folder: str, *, mesh: jax.sharding.Mesh, dtype: str = 'bfloat16',
         remat: str = 'NONE') -> Loaded:
  """The folder's model, every leaf from its safetensors, on ``mesh``.

  Args:
    folder: a Hugging Face model folder (``config.json``, ``*.safetensors``).
    mesh: with axes 'fsdp' and 'tp' (Tunix's parameter sharding) and 'data'.
    dtype: of the weights and the computation ('float32' for checks).
    remat: Tunix's ``RematConfig`` name: 'NONE', 'BLOCK' or 'DECODER'.

  Raises:
    ValueError: an unknown family, a config.json Tunix cannot compute, or
      weights that do not fit (see ``train.language.hf_weights``), by name.
  """
  hf, where = families.read_config(folder)
  family = families.family_of(hf, folder)
  config = family.build(hf, where, families.DTYPES[dtype],
                        families.with_batch_axes(family.default_sharding()))
  remat_enum = type(config.remat_config)
  config = dataclasses.replace(config, remat_config=remat_enum[remat])
  with jax.set_mesh(mesh):
    abstract = _abstract(family, config, hf)
  graphdef, state = nnx.split(abstract)
  like = state.to_pure_dict()
  leaves = _flat(like)
  shardings = _flat(nnx.get_named_sharding(state, mesh).to_pure_dict())
  sources, ignored = _sources(folder, family, config, hf)
  hf_weights.check_structure(sources, leaves)
  np_dtype = np.dtype(families.DTYPES[dtype])
  values = {k: hf_weights.place(sources[k], np_dtype, shardings[k])
            for k in leaves}
  model = nnx.merge(graphdef, _unflat(values, like))
  report = {'family': family.name, 'tensors': len(sources),
            'ignored': len(ignored), 'dtype': dtype}
  if ignored:
    logging.info('Left unread on purpose (%d): %s', len(ignored),
                 ', '.join(ignored[:5]) + (' ...' if len(ignored) > 5 else ''))
  return Loaded(model, family, config, report)


def random_init(hf: dict, *, mesh: jax.sharding.Mesh, dtype: str = 'bfloat16',
                seed: int = 0) -> Loaded:
  """A model of ``hf``'s (config.json's) shapes with random N(0, 0.02)
  weights drawn on its shards: benchmarks of published sizes, no files."""
  family = families.family_of(hf, '<random>')
  config = family.build(hf, '<random>', families.DTYPES[dtype],
                        families.with_batch_axes(family.default_sharding()))
  with jax.set_mesh(mesh):
    abstract = _abstract(family, config, hf)
  graphdef, state = nnx.split(abstract)
  leaves = nnx.to_flat_state(state)
  shardings = [s.get_value() for _, s in nnx.to_flat_state(
      nnx.get_named_sharding(state, mesh))]

  def init():
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return [0.02 * jax.random.normal(k, v.shape, families.DTYPES[dtype])
            for k, (_, v) in zip(keys, leaves)]

  values = jax.jit(init, out_shardings=shardings)()
  state = nnx.from_flat_state([(p, v.replace(x)) for (p, v), x in
                               zip(leaves, values)])
  return Loaded(nnx.merge(graphdef, state), family, config,
                {'family': family.name, 'random': True, 'dtype': dtype})


# -- LoRA ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class LoraSpec:
  rank: int
  alpha: float
  dropout: float
  targets: tuple[str, ...]  # Hugging Face projection names (q_proj, ...).


def _float32(initializer):
  """``initializer`` drawing float32, whatever the base weights' dtype."""
  return lambda key, shape, dtype=None: initializer(key, shape, jnp.float32)


# qwix draws these when it traces the adapters (abstractly: only their
# float32 dtype is kept); _init_lora draws the values.
_LORA_A_INIT = _float32(jax.nn.initializers.variance_scaling(
    1 / 3, 'fan_in', 'uniform'))
_LORA_B_INIT = _float32(jax.nn.initializers.zeros)


def lora_paths(loaded: Loaded, targets: tuple[str, ...]) -> list[str]:
  """Tunix module paths (under ``layers/N/``) of the projections named."""
  modules = loaded.family.lora_modules(loaded.config)
  unknown = [t for t in targets if t not in modules]
  if unknown or not targets:
    raise ValueError(f'config.model.lora.targets={targets!r}: each must be'
                     f' one of {families.PROJECTIONS}, and at least one.')
  paths = sorted({modules[t] for t in targets})
  for path in paths:  # A fused projection is adapted whole or not at all.
    shared = sorted(t for t, p in modules.items() if p == path)
    if not set(shared) <= set(targets):
      raise ValueError(
          f'config.model.lora.targets={targets!r}: {loaded.family.name}'
          f' fuses {shared} into one Tunix einsum ({path}); name all of them'
          ' or none.')
  return paths


@dataclasses.dataclass(frozen=True)
class Adapted:
  """A model with LoRA adapters, split as training uses it.

  ``nnx.merge(graphdef, lora, base)`` is the model; ``eval_graphdef`` is
  the same graph with LoRA dropout off (qwix applies its dropout on every
  call once a rule has one, so evaluation merges the state into it).
  """
  graphdef: Any
  eval_graphdef: Any
  lora: nnx.State  # nnx.LoRAParam leaves, float32.
  base: nnx.State  # Everything else: the loaded weights, untouched.


def _lora_graph(loaded: Loaded, spec: LoraSpec, paths: list[str], seed: int):
  """qwix's LoRA model, abstract: ``(graphdef, lora, rest)`` (no arrays)."""
  provider = qwix.LoraProvider(
      module_path=r'layers/\d+/(' + '|'.join(map(re.escape, paths)) + ')',
      rank=spec.rank, alpha=spec.alpha, dropout=spec.dropout,
      lora_a_initializer=_LORA_A_INIT, lora_b_initializer=_LORA_B_INIT)
  abstract = nnx.eval_shape(lambda: qwix.apply_lora_to_model(
      loaded.model, provider, rngs=nnx.Rngs(seed),
      **loaded.model.get_model_input()))
  return nnx.split(abstract, nnx.LoRAParam, ...)


def _lora_a(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
  """PEFT's A: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)), fan_in the
  contracted dims (all but the rank, the last)."""
  bound = 1.0 / np.sqrt(np.prod(shape[:-1]))
  return rng.uniform(-bound, bound, shape).astype(np.float32)


def _init_lora(abstract: nnx.State, mesh, seed: int) -> nnx.State:
  """A drawn as PEFT does, B zeros, float32, on the shards qwix gave them.

  Drawn on the host (NumPy, one generator per leaf from ``seed``): no
  program to compile, the same values on every process and mesh.
  """
  flat = nnx.to_flat_state(abstract)
  shardings = nnx.to_flat_state(nnx.get_named_sharding(abstract, mesh))
  leaves = []
  for i, ((path, v), (_, sharding)) in enumerate(zip(flat, shardings)):
    if str(path[-1]).endswith('_a'):
      host = _lora_a(v.shape, np.random.default_rng([seed, i]))
    else:
      host = np.zeros(v.shape, np.float32)
    leaves.append((path, v.replace(jax.make_array_from_callback(
        host.shape, sharding.get_value(), lambda index, h=host: h[index]))))
  return nnx.from_flat_state(leaves)


def add_lora(loaded: Loaded, spec: LoraSpec, *, mesh, seed: int) -> Adapted:
  """qwix LoRA adapters on the projections of ``spec``; base untouched.

  The adapter graph is traced abstractly (no forward pass is run, no weight
  copied); A is drawn as PEFT does (U(+-1/sqrt(fan_in))), B is zero.
  """
  paths = lora_paths(loaded, spec.targets)
  with jax.set_mesh(mesh):
    graphdef, lora_abstract, rest = _lora_graph(loaded, spec, paths, seed)
    eval_graphdef, _, _ = _lora_graph(
        loaded, dataclasses.replace(spec, dropout=0.0), paths, seed)
  adapted = {'/'.join(map(str, p[:-1])) for p, _ in
             nnx.to_flat_state(lora_abstract)}
  for path in paths:
    if not any(a.endswith(path) for a in adapted):
      raise ValueError(f'LoRA found no {path} module in {loaded.family.name}'
                       ' (qwix matched nothing).')
  base = nnx.state(loaded.model)
  if ({p for p, _ in nnx.to_flat_state(rest)}
      != {p for p, _ in nnx.to_flat_state(base)}):
    raise ValueError('qwix changed the base model\'s variables; expected'
                     ' only nnx.LoRAParam leaves to be added.')
  return Adapted(graphdef, eval_graphdef,
                 _init_lora(lora_abstract, mesh, seed), base)


# -- Running it ---------------------------------------------------------------

def cast(lora, dtype):
  """The float32 adapters in the compute dtype (the base weights'), so
  activations stay in it; gradients flow back to float32 through the cast."""
  return jax.tree.map(lambda x: x.astype(dtype), lora)


def logits(model, tokens, positions, attention_mask, cache=None):
  """``(float32 logits [B, T, V], cache)`` of Tunix's forward pass (float64
  logits for a float64 model, as the float64 parity tests run it).

  Args:
    model: a Tunix decoder (with or without adapters).
    tokens, positions: int32 [B, T].
    attention_mask: bool [B, T, S]: which of the S keys (the cache's slots,
      or the T tokens when there is no cache) each query attends to.
    cache: from :func:`init_cache`, or None.
  """
  out, cache = model(tokens, positions, cache, attention_mask)
  return out.astype(jnp.promote_types(out.dtype, jnp.float32)), cache


def cache_spec(config) -> tuple[int, int, int]:
  """``(num_layers, num_kv_heads, head_dim)``: hashable, unlike some of
  Tunix's ModelConfigs, so jitted functions can take it as static."""
  return config.num_layers, config.num_kv_heads, config.head_dim


def init_cache(spec: tuple[int, int, int], batch_size: int, length: int,
               dtype) -> dict:
  """An empty key/value cache in the layout all three Tunix families use."""
  num_layers, num_kv_heads, head_dim = spec
  shape = (batch_size, length, num_kv_heads, head_dim)
  return {f'layer_{i}': {'k': jnp.zeros(shape, dtype),
                         'v': jnp.zeros(shape, dtype),
                         'end_index': jnp.zeros((batch_size,), jnp.int32)}
          for i in range(num_layers)}


def causal_mask(valid: jax.Array) -> jax.Array:
  """bool [B, T, T]: causal, and no query attends to a padding key."""
  t = valid.shape[-1]
  causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
  return causal[None] & valid[:, None, :]


def positions_of(valid: jax.Array) -> jax.Array:
  """Token positions that skip padding (left or right): cumsum - 1, >= 0."""
  return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)


def vocab_size(config) -> int:
  return getattr(config, 'vocab_size', None) or config.num_embed

