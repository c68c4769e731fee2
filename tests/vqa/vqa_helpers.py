"""Tiny random PaliGemma models saved by ``transformers``: the references.

``transformers`` builds each model small and random from its config (every
norm weight random too, so a missing ``1 +`` in Gemma's norm or a swapped
norm shows), and saves it as safetensors with ``save_pretrained``; our
loader reads the folder as it would a published one. The word-level
tokenizer of ``train.vqa.tiny`` is saved beside it.
"""

import numpy as np

from train.vqa import tiny

WORDS = ('answer en what color is the cat dog on table how many red blue'
         ' green yes no two three a of in')
IMAGE_SIZE, PATCH = 28, 7  # 16 image tokens.
TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, head_dim=8)
VISION = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2,
              num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH,
              vision_use_head=False)
KINDS = ('paligemma', 'paligemma2')
ALL_KINDS = KINDS + ('gemma3',)
# Seeds whose greedy continuations are not one token repeated.
SEEDS = {'paligemma': 0, 'paligemma2': 0, 'gemma3': 1}
FRAME = ('<start_of_image>', '<end_of_image>')  # Gemma 3's.


def tokenizer(kind: str = 'paligemma'):
  tok = tiny.word_tokenizer([WORDS])
  if kind == 'gemma3':
    tok.add_special_tokens({'additional_special_tokens': ['<image>', *FRAME]})
  return tok


def _text_config(kind: str, vocab: int) -> dict:
  if kind == 'paligemma':  # Gemma 1: multi-query, as the 2B.
    return dict(TEXT, model_type='gemma', vocab_size=vocab,
                num_key_value_heads=1)
  # Gemma 2: grouped queries, soft-capping, post norms; a window longer than
  # every row (Tunix's sliding mask counts 1-based positions: see models).
  return dict(TEXT, model_type='gemma2', vocab_size=vocab,
              num_key_value_heads=2, query_pre_attn_scalar=8,
              sliding_window=64, final_logit_softcapping=30.0,
              attn_logit_softcapping=50.0)


def _config(kind: str, tok):
  import transformers  # pylint: disable=g-import-not-at-top
  vocab, image = len(tok), tok.convert_tokens_to_ids('<image>')
  vision = dict(VISION, model_type='siglip_vision_model')
  if kind == 'gemma3':  # Six layers: the sixth is global; 16 patches -> 4.
    text = dict(TEXT, model_type='gemma3_text', vocab_size=vocab,
                num_hidden_layers=6, num_key_value_heads=2,
                query_pre_attn_scalar=8, sliding_window=64)
    boi, eoi = tok.convert_tokens_to_ids(list(FRAME))
    return transformers.Gemma3Config(
        vision_config=vision, text_config=text, mm_tokens_per_image=4,
        image_token_index=image, boi_token_index=boi, eoi_token_index=eoi)
  return transformers.PaliGemmaConfig(
      vision_config=vision, text_config=_text_config(kind, vocab),
      image_token_index=image, vocab_size=vocab,
      projection_dim=TEXT['hidden_size'], hidden_size=TEXT['hidden_size'])


def _model_class(kind: str):
  import transformers  # pylint: disable=g-import-not-at-top
  return (transformers.Gemma3ForConditionalGeneration if kind == 'gemma3'
          else transformers.PaliGemmaForConditionalGeneration)


def save_tiny(kind: str, directory: str, *, seed: int = 0,
              init_scale: float = 0.3) -> str:
  """A random ``PaliGemmaForConditionalGeneration`` (``kind`` paligemma,
  paligemma2) or ``Gemma3ForConditionalGeneration`` (gemma3) saved in
  ``directory``, with its tokenizer."""
  import torch  # pylint: disable=g-import-not-at-top
  tok = tokenizer(kind)
  config = _config(kind, tok)
  config.text_config.initializer_range = init_scale
  config.vision_config.initializer_range = init_scale
  torch.manual_seed(seed)
  model = _model_class(kind)(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name and ('language_model' in name
                             or 'soft_emb' in name):  # Gemma's 1 + w.
        p.copy_(0.3 * torch.randn_like(p))
      elif 'norm' in name:  # SigLIP's LayerNorms.
        p.copy_((1.0 if name.endswith('weight') else 0.0)
                + 0.3 * torch.randn_like(p))
      elif name.endswith('bias'):
        p.copy_(0.1 * torch.randn_like(p))
      elif 'mm_input_projection' in name:  # transformers starts it at 0.
        p.copy_(init_scale * torch.randn_like(p))
      elif 'embed_tokens' in name and kind == 'gemma3':
        # Gemma 3's post-norms keep each layer's output at unit size: a
        # smaller embedding lets the layers, not the last token's own
        # embedding, pick the next token (else '\\n' follows '\\n').
        p.mul_(0.1)
  model.save_pretrained(directory, safe_serialization=True)
  tok.save_pretrained(directory)
  return directory


def images(batch: int, seed: int = 0, size: int = IMAGE_SIZE) -> np.ndarray:
  """float32 [B, S, S, 3] in [-1, 1], as ``preprocess`` gives them."""
  rng = np.random.default_rng(seed)
  return rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


def _torch_inputs(model, batch: dict, pixels: np.ndarray) -> dict:
  """token_type_ids: PaliGemma's mark the suffix, Gemma 3's the image."""
  import torch  # pylint: disable=g-import-not-at-top
  if model.config.model_type == 'gemma3':
    types = batch['tokens'] == model.config.image_token_id
  else:
    types = ~batch['prefix_mask']
  return {'input_ids': torch.tensor(batch['tokens'], dtype=torch.long),
          'attention_mask': torch.tensor(batch['input_mask'],
                                         dtype=torch.long),
          'token_type_ids': torch.tensor(types, dtype=torch.long),
          'pixel_values': torch.tensor(pixels.transpose(0, 3, 1, 2))}


def _model(directory: str):
  """In eager attention: ``transformers``' SDPA path drops Gemma 2's
  attention soft-capping."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  with open(os.path.join(directory, 'config.json')) as f:
    kind = json.load(f)['model_type']
  return _model_class(kind).from_pretrained(
      directory, dtype=torch.float32, attn_implementation='eager').eval()


def transformers_logits(directory: str, batch: dict,
                        pixels: np.ndarray) -> np.ndarray:
  """``transformers``' float32 logits of ``build_inputs`` rows (NHWC
  images, given to it as NCHW)."""
  import torch  # pylint: disable=g-import-not-at-top
  model = _model(directory)
  with torch.no_grad():
    return model(**_torch_inputs(model, batch, pixels)).logits.numpy()


def transformers_generate(directory: str, batch: dict, pixels: np.ndarray, *,
                          max_new_tokens: int, eos_id: int,
                          pad_id: int) -> list[list[int]]:
  """Each row's greedy continuation (``generate(do_sample=False)``), one
  row at a time without padding, cut after its EOS."""
  import torch  # pylint: disable=g-import-not-at-top
  model, out = _model(directory), []
  for i in range(len(batch['tokens'])):
    n = int(batch['input_mask'][i].sum())
    row = {k: v[i:i + 1, :n] for k, v in batch.items()}
    inputs = _torch_inputs(model, row, pixels[i:i + 1])
    with torch.no_grad():
      ids = model.generate(**inputs, do_sample=False,
                           max_new_tokens=max_new_tokens, eos_token_id=eos_id,
                           pad_token_id=pad_id)
    new = ids[0, n:].tolist()
    out.append(new[:new.index(eos_id) + 1] if eos_id in new else new)
  return out


# The published models' config.json, as their folders on the Hub hold them
# (keys they leave out take transformers' defaults).
_SIGLIP_SO400M = {'hidden_size': 1152, 'intermediate_size': 4304,
                  'model_type': 'siglip_vision_model',
                  'num_attention_heads': 16,
                  'num_hidden_layers': 27, 'patch_size': 14,
                  'vision_use_head': False}
PUBLISHED = {
    'paligemma-3b-pt-224': {
        'architectures': ['PaliGemmaForConditionalGeneration'],
        'model_type': 'paligemma', 'hidden_size': 2048,
        'image_token_index': 257152, 'projection_dim': 2048,
        'vocab_size': 257216, 'bos_token_id': 2, 'eos_token_id': 1,
        'pad_token_id': 0,
        'text_config': {'hidden_size': 2048, 'intermediate_size': 16384,
                        'model_type': 'gemma', 'num_attention_heads': 8,
                        'num_hidden_layers': 18, 'num_image_tokens': 256,
                        'num_key_value_heads': 1, 'vocab_size': 257216},
        'vision_config': dict(_SIGLIP_SO400M, num_image_tokens=256,
                              projection_dim=2048,
                              projector_hidden_act='gelu_fast')},
    'paligemma2-3b-pt-224': {
        'architectures': ['PaliGemmaForConditionalGeneration'],
        'model_type': 'paligemma', 'hidden_size': 2048,
        'image_token_index': 257152, 'projection_dim': 2304,
        'bos_token_id': 2, 'eos_token_id': 1, 'pad_token_id': 0,
        'text_config': {'hidden_activation': 'gelu_pytorch_tanh',
                        'hidden_size': 2304, 'intermediate_size': 9216,
                        'model_type': 'gemma2', 'num_attention_heads': 8,
                        'num_hidden_layers': 26, 'num_image_tokens': 256,
                        'num_key_value_heads': 4, 'head_dim': 256,
                        'query_pre_attn_scalar': 256, 'sliding_window': 4096,
                        'final_logit_softcapping': 30.0,
                        'attn_logit_softcapping': 50.0,
                        'vocab_size': 257216},
        'vision_config': dict(_SIGLIP_SO400M, image_size=224,
                              num_image_tokens=256, projection_dim=2304,
                              projector_hidden_act='gelu_fast')},
    'gemma-3-4b-pt': {
        'architectures': ['Gemma3ForConditionalGeneration'],
        'model_type': 'gemma3', 'boi_token_index': 255999,
        'eoi_token_index': 256000, 'image_token_index': 262144,
        'mm_tokens_per_image': 256,
        'text_config': {'hidden_size': 2560, 'intermediate_size': 10240,
                        'model_type': 'gemma3_text', 'num_hidden_layers': 34,
                        'rope_scaling': {'factor': 8.0, 'rope_type': 'linear'},
                        'sliding_window': 1024},
        'vision_config': dict(_SIGLIP_SO400M, image_size=896,
                              vision_use_head=False)},
}


def transformers_parameter_count(folder: str) -> int:
  """Parameters of ``transformers``' model of ``folder/config.json``, built
  on the meta device (no memory)."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  with open(os.path.join(folder, 'config.json')) as f:
    kind = json.load(f)['model_type']
  config = transformers.AutoConfig.from_pretrained(folder)
  with torch.device('meta'):
    model = _model_class(kind)(config)
  return sum(p.numel() for p in model.parameters())
