"""A tiny random PaliGemma folder, written with NumPy (no torch), offline.

``word_tokenizer(texts)`` makes a word-level tokenizer with Gemma's special
tokens (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3), PaliGemma's
``<image>`` and a ``\\n`` token; ``write_tiny_paligemma(directory,
tokenizer, ...)`` writes a ``PaliGemmaForConditionalGeneration`` folder of
random weights with that vocabulary (``config.json``, ``model.safetensors``
in the published tensor naming, tokenizer files) that both
``train.vqa.models.load`` and ``transformers`` read. A random model answers
at chance at best: a smoke run checks that every stage runs.
"""

import json
import os

import numpy as np
import safetensors.numpy
import tokenizers
import transformers

SPECIALS = ['<pad>', '<eos>', '<bos>', '<unk>', '<image>']


def word_tokenizer(texts: list[str]) -> transformers.PreTrainedTokenizerFast:
  """A word-level tokenizer of ``texts``' words, with PaliGemma's specials.

  Words are split on whitespace and punctuation; a word it has not seen is
  ``<unk>``; ``\\n`` (which ends PaliGemma's prompt) is a token of its own.
  It adds no special token by itself (``build_inputs`` places BOS and EOS).
  """
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token='<unk>'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.train_from_iterator(
      list(texts), tokenizers.trainers.WordLevelTrainer(
          special_tokens=SPECIALS))
  tok.add_tokens([tokenizers.AddedToken('\n', normalized=False)])
  tok.decoder = tokenizers.decoders.WordPiece(prefix='##')  # Joins by spaces.
  out = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token='<bos>', eos_token='<eos>',
      pad_token='<pad>', unk_token='<unk>')
  out.add_special_tokens({'additional_special_tokens': ['<image>']})
  return out


def _tensors(vocab: int, text: dict, vision: dict, seed: int) -> dict:
  """Random weights, named as published PaliGemma checkpoints name them."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape, s=0.02: rng.normal(0, s, shape).astype(np.float32)
  d, f, h = text['hidden_size'], text['intermediate_size'], text['head_dim']
  heads, kv = text['num_attention_heads'], text['num_key_value_heads']
  w, vf = vision['hidden_size'], vision['intermediate_size']
  p, c = vision['patch_size'], (vision['image_size'] // vision['patch_size'])
  lang, vis = 'language_model.model.', 'vision_tower.vision_model.'
  t = {lang + 'embed_tokens.weight': normal(vocab, d),
       lang + 'norm.weight': normal(d, s=0.1),
       'multi_modal_projector.linear.weight': normal(d, w),
       'multi_modal_projector.linear.bias': normal(d),
       vis + 'embeddings.patch_embedding.weight': normal(w, 3, p, p),
       vis + 'embeddings.patch_embedding.bias': normal(w),
       vis + 'embeddings.position_embedding.weight': normal(c * c, w),
       vis + 'post_layernorm.weight': 1 + normal(w, s=0.1),
       vis + 'post_layernorm.bias': normal(w)}
  for i in range(text['num_hidden_layers']):
    q = f'{lang}layers.{i}.'
    t.update({q + 'self_attn.q_proj.weight': normal(heads * h, d),
              q + 'self_attn.k_proj.weight': normal(kv * h, d),
              q + 'self_attn.v_proj.weight': normal(kv * h, d),
              q + 'self_attn.o_proj.weight': normal(d, heads * h),
              q + 'mlp.gate_proj.weight': normal(f, d),
              q + 'mlp.up_proj.weight': normal(f, d),
              q + 'mlp.down_proj.weight': normal(d, f),
              q + 'input_layernorm.weight': normal(d, s=0.1),
              q + 'post_attention_layernorm.weight': normal(d, s=0.1)})
  for i in range(vision['num_hidden_layers']):
    q = f'{vis}encoder.layers.{i}.'
    for name in ('q_proj', 'k_proj', 'v_proj', 'out_proj'):
      t[q + f'self_attn.{name}.weight'] = normal(w, w)
      t[q + f'self_attn.{name}.bias'] = normal(w)
    t.update({q + 'mlp.fc1.weight': normal(vf, w), q + 'mlp.fc1.bias':
              normal(vf), q + 'mlp.fc2.weight': normal(w, vf),
              q + 'mlp.fc2.bias': normal(w)})
    for name in ('layer_norm1', 'layer_norm2'):
      t[q + f'{name}.weight'] = 1 + normal(w, s=0.1)
      t[q + f'{name}.bias'] = normal(w)
  return t


def paligemma_config(tokenizer, *, hidden: int = 32, layers: int = 2,
                     heads: int = 4, kv_heads: int = 1, head_dim: int = 8,
                     intermediate: int = 64, vision_hidden: int = 32,
                     vision_layers: int = 1, vision_heads: int = 4,
                     vision_intermediate: int = 64, image_size: int = 28,
                     patch_size: int = 14) -> dict:
  """PaliGemma-1's ``config.json``: these sizes, the tokenizer's words."""
  vocab = len(tokenizer)
  text = {'model_type': 'gemma', 'vocab_size': vocab, 'hidden_size': hidden,
          'intermediate_size': intermediate, 'num_hidden_layers': layers,
          'num_attention_heads': heads, 'num_key_value_heads': kv_heads,
          'head_dim': head_dim, 'hidden_act': 'gelu_pytorch_tanh',
          'hidden_activation': 'gelu_pytorch_tanh', 'rms_norm_eps': 1e-6,
          'rope_theta': 10000.0, 'max_position_embeddings': 8192,
          'attention_bias': False, 'tie_word_embeddings': True,
          'bos_token_id': tokenizer.bos_token_id,
          'eos_token_id': tokenizer.eos_token_id,
          'pad_token_id': tokenizer.pad_token_id}
  vision = {'model_type': 'siglip_vision_model', 'hidden_size': vision_hidden,
            'intermediate_size': vision_intermediate,
            'num_hidden_layers': vision_layers,
            'num_attention_heads': vision_heads, 'image_size': image_size,
            'patch_size': patch_size, 'hidden_act': 'gelu_pytorch_tanh',
            'layer_norm_eps': 1e-6, 'num_channels': 3,
            'vision_use_head': False, 'projection_dim': hidden}
  return {'architectures': ['PaliGemmaForConditionalGeneration'],
          'model_type': 'paligemma', 'text_config': text,
          'vision_config': vision, 'vocab_size': vocab,
          'image_token_index': tokenizer.convert_tokens_to_ids('<image>'),
          'projection_dim': hidden, 'hidden_size': hidden,
          'tie_word_embeddings': True, 'torch_dtype': 'float32'}


def write_tiny_paligemma(directory: str, tokenizer, *, seed: int = 0,
                         **sizes) -> str:
  """A random PaliGemma-1 folder with ``tokenizer``'s vocabulary.

  Args:
    directory: created if needed; ``config.json`` is written last (its
      presence means the folder is complete).
    tokenizer: from :func:`word_tokenizer`.
    seed: the same seed writes the same weights.
    **sizes: :func:`paligemma_config`'s (hidden, layers, image_size, ...).

  Returns:
    ``directory``.
  """
  os.makedirs(directory, exist_ok=True)
  config = paligemma_config(tokenizer, **sizes)
  tensors = _tensors(config['vocab_size'], config['text_config'],
                     config['vision_config'], seed)
  safetensors.numpy.save_file(
      tensors, os.path.join(directory, 'model.safetensors'),
      metadata={'format': 'pt'})
  tokenizer.save_pretrained(directory)
  with open(os.path.join(directory, 'config.json'), 'w') as f:
    json.dump(config, f, indent=2)
  return directory
