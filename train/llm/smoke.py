"""Inputs for a run with nothing downloaded: generated rows, a tiny Llama.

``prepare(directory, ...)`` writes, once, the eight sets' smoke files
(:func:`write_data`), a word-level tokenizer of their words
(:func:`word_tokenizer`) and a randomly initialised Llama whose vocabulary
is that tokenizer's, as a Hugging Face folder (``config.json``,
``model.safetensors``, tokenizer files) that ``transformers`` loads too. A
random model answers at chance at best: the smoke run checks that every
stage runs, not what it learns.
"""

import json
import os

import jax
from jax.experimental import multihost_utils
import numpy as np
import safetensors.numpy
import tokenizers
import transformers

from train.core import files
from train.llm import commonsense
from train.llm import data


def write_data(directory: str, *, num_train: int = 64, num_test: int = 8,
               seed: int = 0) -> None:
  """Tiny stand-ins for the real files, in the eight sets' formats.

  Writes ``directory/commonsense_170k.json`` (``num_train`` rows from the
  eight sets in turn, shuffled) and ``directory/dataset/<name>/test.json``
  (``num_test`` rows each), laid out as the reference scripts expect, each
  atomically. The rows phrase their instructions and answers as the real
  sets do, with made-up words (``commonsense.smoke_example``); the same
  ``seed`` writes the same bytes.
  """
  rng = np.random.default_rng([seed, 0])
  names = commonsense.DATASETS
  train = [commonsense.smoke_example(names[k % len(names)], rng)
           for k in rng.permutation(num_train)]  # Every set, in any order.
  _write_json(os.path.join(directory, 'commonsense_170k.json'), train)
  for i, name in enumerate(commonsense.DATASETS):
    rng = np.random.default_rng([seed, 1 + i])
    _write_json(os.path.join(directory, 'dataset', name, 'test.json'),
                [commonsense.smoke_example(name, rng) for _ in range(num_test)])


def _write_json(path: str, value) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with files.atomic_write(path) as f:
    json.dump(value, f, indent=1)


def word_tokenizer(examples: list[dict]) -> transformers.PreTrainedTokenizerFast:
  """A word-level tokenizer of the examples' prompts, for runs offline.

  Its vocabulary is the words and punctuation runs of the prompts; it adds
  ``<s>`` in front, as Llama's does, and has ``</s>`` and ``<pad>``.
  """
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token='<unk>'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.train_from_iterator(
      [data.prompt(e, with_response=True) for e in examples],
      tokenizers.trainers.WordLevelTrainer(
          special_tokens=['<pad>', '<unk>', '<s>', '</s>']))
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single='<s> $A', special_tokens=[('<s>', tok.token_to_id('<s>'))])
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token='<s>', eos_token='</s>',
      pad_token='<pad>', unk_token='<unk>')


def _llama_tensors(vocab: int, hidden: int, layers: int, heads: int,
                   kv_heads: int, intermediate: int, seed: int) -> dict:
  rng = np.random.default_rng(seed)
  head_dim = hidden // heads
  normal = lambda *shape: rng.normal(0, 0.02, shape).astype(np.float32)
  tensors = {'model.embed_tokens.weight': normal(vocab, hidden),
             'model.norm.weight': np.ones(hidden, np.float32),
             'lm_head.weight': normal(vocab, hidden)}
  for i in range(layers):
    p = f'model.layers.{i}.'
    tensors.update({
        p + 'self_attn.q_proj.weight': normal(heads * head_dim, hidden),
        p + 'self_attn.k_proj.weight': normal(kv_heads * head_dim, hidden),
        p + 'self_attn.v_proj.weight': normal(kv_heads * head_dim, hidden),
        p + 'self_attn.o_proj.weight': normal(hidden, heads * head_dim),
        p + 'mlp.gate_proj.weight': normal(intermediate, hidden),
        p + 'mlp.up_proj.weight': normal(intermediate, hidden),
        p + 'mlp.down_proj.weight': normal(hidden, intermediate),
        p + 'input_layernorm.weight': np.ones(hidden, np.float32),
        p + 'post_attention_layernorm.weight': np.ones(hidden, np.float32),
    })
  return tensors


def write_tiny_llama(directory: str, tokenizer, *, hidden: int, layers: int,
                     heads: int, kv_heads: int, intermediate: int,
                     seed: int) -> None:
  """A random ``LlamaForCausalLM`` folder with ``tokenizer``'s vocabulary."""
  os.makedirs(directory, exist_ok=True)
  vocab = len(tokenizer)
  config = {
      'architectures': ['LlamaForCausalLM'], 'model_type': 'llama',
      'vocab_size': vocab, 'hidden_size': hidden,
      'intermediate_size': intermediate, 'num_hidden_layers': layers,
      'num_attention_heads': heads, 'num_key_value_heads': kv_heads,
      'head_dim': hidden // heads, 'hidden_act': 'silu',
      'max_position_embeddings': 2048, 'rms_norm_eps': 1e-5,
      'rope_theta': 10000.0, 'tie_word_embeddings': False,
      'attention_bias': False, 'mlp_bias': False,
      'bos_token_id': tokenizer.bos_token_id,
      'eos_token_id': tokenizer.eos_token_id,
      'pad_token_id': tokenizer.pad_token_id, 'torch_dtype': 'float32'}
  tensors = _llama_tensors(vocab, hidden, layers, heads, kv_heads,
                           intermediate, seed)
  safetensors.numpy.save_file(tensors, os.path.join(directory,
                                                    'model.safetensors'),
                              metadata={'format': 'pt'})
  tokenizer.save_pretrained(directory)
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2)  # Last: its presence means complete.


def prepare(directory: str, smoke, *, seed: int) -> tuple[str, str]:
  """``(model folder, data folder)`` under ``directory``, written once.

  Args:
    directory: e.g. ``WORKDIR/smoke``.
    smoke: ``config.smoke`` (num_train, num_test, and the model's sizes).
    seed: the same seed writes the same files.
  """
  model_dir = os.path.join(directory, 'model')
  data_dir = os.path.join(directory, 'data')
  if jax.process_index() == 0 and not os.path.exists(
      os.path.join(model_dir, 'config.json')):
    write_data(data_dir, num_train=smoke.num_train, num_test=smoke.num_test,
               seed=seed)
    rows = data.read_examples(os.path.join(data_dir, 'commonsense_170k.json'))
    tokenizer = word_tokenizer(rows)
    write_tiny_llama(model_dir, tokenizer, hidden=smoke.hidden_size,
                     layers=smoke.num_layers, heads=smoke.num_heads,
                     kv_heads=smoke.num_kv_heads,
                     intermediate=smoke.intermediate_size, seed=seed)
  multihost_utils.sync_global_devices('smoke inputs written')
  return model_dir, data_dir
