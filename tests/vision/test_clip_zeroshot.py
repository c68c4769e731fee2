"""CLIP's text tower and zero-shot head against ``transformers``' CLIPModel.

The reference is a tiny ``transformers.CLIPModel`` with random weights, saved
as safetensors with a tokenizer written by ``transformers``' CLIPTokenizer
(a small byte-level BPE vocabulary, nothing downloaded): our code and
``transformers`` read the same ``tokenizer.json``.
"""

import copy
import json
import os
import shutil
import subprocess
import sys
from unittest import mock

from flax import nnx
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import pre_tokenizers

from configs import common
from configs import tiny
from train.vision import clip_text
from train.vision import checks
from train.vision import evaluation
from train.vision import finetune
from train.core import metrics
from train.vision import model_setup
from train.vision import wise_ft
from train.vision import pretrained
from train.vision import zeroshot
from tests import trainlib
from tests.vision.test_models_and_weights import _images, _randomize

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

CLASSES = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven',
           'eight', 'nine')
TEMPLATES = ('a photo of a {}.', 'a drawing of the {}.', 'itap of my {}.')
CONTEXT = 16  # max_position_embeddings: long prompts get truncated.


def _clip_tokenizer(words):
  """A CLIP-style BPE vocabulary whose merges spell out ``words``."""
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  vocab = alphabet + [c + '</w>' for c in alphabet]
  merges = []
  for word in sorted(set(words)):
    pieces = list(word[:-1]) + [word[-1] + '</w>']
    while len(pieces) > 1:
      merged = pieces[0] + pieces[1]
      if (pieces[0], pieces[1]) not in merges:
        merges.append((pieces[0], pieces[1]))
        if merged not in vocab:
          vocab.append(merged)
      pieces = [merged] + pieces[2:]
  vocab += ['<|startoftext|>', '<|endoftext|>']
  return transformers.CLIPTokenizer(
      vocab={t: i for i, t in enumerate(vocab)},
      merges=merges)


@pytest.fixture(scope='module')
def hf_clip(tmp_path_factory):
  """(torch CLIPModel, HF tokenizer, folder with safetensors + tokenizer)."""
  words = ' '.join(t.format(c) for c in CLASSES for t in TEMPLATES)
  tokenizer = _clip_tokenizer(words.replace('.', ' ').split())
  eot = tokenizer.convert_tokens_to_ids('<|endoftext|>')
  config = transformers.CLIPConfig(
      text_config=dict(vocab_size=len(tokenizer), hidden_size=32,
                       intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, max_position_embeddings=CONTEXT,
                       eos_token_id=eot, bos_token_id=eot - 1,
                       pad_token_id=eot),
      vision_config=dict(hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2,
                         image_size=32, patch_size=4),
      projection_dim=16)
  torch.manual_seed(0)  # The same tiny CLIP in every session.
  model = _randomize(transformers.CLIPModel(config).eval(), seed=3)
  path = str(tmp_path_factory.mktemp('hf_clip'))
  model.save_pretrained(path, safe_serialization=True)
  tokenizer.save_pretrained(path)
  assert os.path.exists(os.path.join(path, 'tokenizer.json'))
  return model, transformers.CLIPTokenizer.from_pretrained(path), path


def _torch_text(model, hf_tokenizer, texts):
  ids = hf_tokenizer(list(texts), padding=True, truncation=True,
                     max_length=CONTEXT, return_tensors='pt')
  with torch.no_grad():
    pooled = model.text_model(**ids).pooler_output
    return pooled.numpy(), model.text_projection(pooled).numpy()


def _config(path, class_file, **zeroshot_fields):
  config = tiny.get_config()
  config.model.name = 'clip-mu/4'
  config.model.head_init = 'zeroshot'
  config.pretrained.path = path
  config.zeroshot.class_names = str(class_file)
  config.zeroshot.templates = TEMPLATES
  config.zeroshot.update(zeroshot_fields)
  return config


def _class_file(tmp_path, names=CLASSES):
  path = tmp_path / 'classes.txt'
  path.write_text('\n'.join(names) + '\n')
  return path


def test_text_features_match_transformers_with_and_without_projection(
    hf_clip):
  model, hf_tokenizer, path = hf_clip
  tokenizer = clip_text.Tokenizer(path)
  tower, logit_scale = pretrained.load_text_tower(
      path, eot_token_id=tokenizer.eot_token_id)
  texts = [t.format(c) for c in CLASSES[:4] for t in TEMPLATES]
  texts.append(' '.join(CLASSES) + ' ' + ' '.join(CLASSES))  # Truncated.
  ids = tokenizer(texts, CONTEXT)
  hf_ids = hf_tokenizer(texts, truncation=True, max_length=CONTEXT)
  for row, expected in zip(ids, hf_ids['input_ids']):  # Same tokens.
    np.testing.assert_array_equal(row[:len(expected)], expected)
  pooled, projected = _torch_text(model, hf_tokenizer, texts)
  ours = tower(jnp.asarray(ids))
  np.testing.assert_allclose(ours, projected, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(tower(jnp.asarray(ids), project=False), pooled,
                             atol=1e-4, rtol=1e-4)
  assert np.abs(projected).max() > 0.1  # Not a trivially small output.
  np.testing.assert_allclose(logit_scale, model.logit_scale.exp().item(),
                             rtol=1e-6)


def test_zero_shot_logits_match_transformers(hf_clip, tmp_path):
  model, hf_tokenizer, path = hf_clip
  images = _images(n=4, seed=5)
  pixels = torch.from_numpy(images.transpose(0, 3, 1, 2))
  # One template: the head's rows are the prompts' own embeddings, and the
  # logits are CLIPModel's logits_per_image exactly.
  config = _config(path, _class_file(tmp_path), templates=('a {}.',))
  ours = model_setup.make_model(config, nnx.Rngs(0))(jnp.asarray(images))
  inputs = hf_tokenizer([f'a {c}.' for c in CLASSES], padding=True,
                        return_tensors='pt')
  with torch.no_grad():
    expected = model(**inputs, pixel_values=pixels).logits_per_image.numpy()
  np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=1e-4)
  # Several templates: CLIP's prompt ensemble (normalise each prompt's
  # embedding, average over templates, normalise) in float64 NumPy.
  config = _config(path, _class_file(tmp_path))
  ours = model_setup.make_model(config, nnx.Rngs(0))(jnp.asarray(images))
  prompts = [t.format(c) for c in CLASSES for t in TEMPLATES]
  _, text = _torch_text(model, hf_tokenizer, prompts)
  with torch.no_grad():
    image = model.visual_projection(
        model.vision_model(pixel_values=pixels).pooler_output).numpy()
  normalize = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  text = normalize(text.astype(np.float64)).reshape(len(CLASSES),
                                                    len(TEMPLATES), -1)
  head = normalize(text.mean(axis=1))
  expected = (model.logit_scale.exp().item()
              * normalize(image.astype(np.float64)) @ head.T)
  np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=1e-4)
  assert np.ptp(expected) > 1.0  # The classes are told apart.


@pytest.mark.slow
def test_step_zero_and_wise_ft_alpha_zero_are_the_zero_shot_mode(
    hf_clip, digits_data_dir, tmp_path):
  """`python -m train.vision.zeroshot_main`, then a run and WiSE-FT in its workdir."""
  _, _, path = hf_clip
  workdir = str(tmp_path / 'run')
  overrides = [
      '--config.model.name=clip-mu/4', '--config.model.head_init=zeroshot',
      f'--config.pretrained.path={path}',
      f'--config.zeroshot.class_names={_class_file(tmp_path)}',
      f'--config.dataset.data_dir={digits_data_dir}',
  ]
  result = subprocess.run(
      [sys.executable, '-m', 'train.vision.zeroshot_main',
       '--config=configs/tiny.py', f'--workdir={workdir}', *overrides],
      env=trainlib.env_with_devices(1), cwd=trainlib.REPO,
      capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  assert 'zero-shot accuracy' in result.stdout
  with open(os.path.join(workdir, evaluation.ZERO_SHOT_RESULTS)) as f:
    zero_shot = json.load(f)
  assert set(zero_shot) == {'eval/val_accuracy', 'eval/id_accuracy',
                            'eval/rotate_accuracy', 'eval/invert_accuracy'}
  cache = os.path.join(workdir, zeroshot.CACHE_FILE)
  cached_at = os.stat(cache).st_mtime_ns
  # A run in the same workdir: its step-0 evaluation, from the cached head.
  config = _config(path, _class_file(tmp_path),
                   templates=common.CLIP_TEMPLATES)  # As on the command line.
  config.dataset.data_dir = digits_data_dir
  config.num_train_steps = config.eval_every_steps = 2
  config.wise_ft.alphas = (0.0,)
  with mock.patch.object(zeroshot, 'head_weights',
                         side_effect=AssertionError('recomputed')):
    final = finetune.train_and_evaluate(config, workdir, print_summary=False)
    # WiSE-FT on the finished run, as `python -m train.vision.wise_ft_main` does.
    by_alpha = wise_ft.evaluate_finished_run(workdir, [0.0])
  assert os.stat(cache).st_mtime_ns == cached_at
  rows = metrics.read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  step0 = {k: v for k, v in rows[0].items() if k != 'step'}
  assert rows[0]['step'] == 0 and step0 == zero_shot
  assert rows[-1]['step'] == 2
  # WiSE-FT's alpha 0 is the zero-shot model exactly.
  for name, accuracy in zero_shot.items():
    assert final[f'wise_ft/0.0/{name}'] == accuracy, name
  assert by_alpha[0.0] == zero_shot
  # ... and not the fine-tuned one: the run moved the head.
  with np.load(os.path.join(workdir, wise_ft.START_FILE)) as start:
    start_head = start["['head']['kernel']"]
  tuned_head = trainlib.final_state(workdir)[0]['head']['kernel']
  assert not np.allclose(start_head, tuned_head, atol=1e-6)


def test_bad_input_is_refused_by_name(hf_clip, digits_data_dir, tmp_path):
  model, _, path = hf_clip
  # A class-name file of the wrong length.
  short = _class_file(tmp_path, CLASSES[:9])
  with pytest.raises(ValueError, match=r"classes.txt.*has 9 names but the"
                     r" dataset has 10 classes"):
    model_setup.make_model(_config(path, short), nnx.Rngs(0))
  # An image-only checkpoint (with a tokenizer) has no text tower.
  vision = tmp_path / 'vision_only'
  vision_config = copy.deepcopy(model.config.vision_config)
  vision_config.projection_dim = 16
  transformers.CLIPVisionModelWithProjection(vision_config).save_pretrained(
      str(vision), safe_serialization=True)
  shutil.copy(os.path.join(path, 'tokenizer.json'), vision)
  with pytest.raises(ValueError, match=r"vision_only.*has no text tower"):
    model_setup.make_model(_config(str(vision), _class_file(tmp_path)),
                           nnx.Rngs(0))
  # No tokenizer.json next to the weights.
  bare = tmp_path / 'no_tokenizer'
  os.makedirs(bare)
  for f in ('model.safetensors', 'config.json'):
    shutil.copy(os.path.join(path, f), bare)
  with pytest.raises(FileNotFoundError,
                     match=r"no_tokenizer/tokenizer.json.*does not exist"):
    model_setup.make_model(_config(str(bare), _class_file(tmp_path)),
                           nnx.Rngs(0))
  # Label names that are not words (digits '0'..'9') need a class-name file.
  config = _config(path, '')
  config.dataset.data_dir = digits_data_dir
  with pytest.raises(ValueError, match='not words.*config.zeroshot.class_names'):
    zeroshot.class_names(config)
  # A model that is not a CLIP image tower with a projection.
  config = _config(path, _class_file(tmp_path))
  config.model.name = 'mu/4'  # Refused by the config's rules, before work.
  with pytest.raises(ValueError, match="'mu/4' is not a CLIP image tower"):
    checks.check(config, num_devices=1)


def test_class_names_from_readable_tfds_labels(tmp_path):
  config = _config('unused', '')
  config.dataset.num_classes = 3
  label = mock.Mock(names=['aircraft_carrier', 'airplane', 'alarm_clock'])
  builder = mock.Mock(info=mock.Mock(features={'label': label}))
  with mock.patch('tensorflow_datasets.builder', return_value=builder):
    assert zeroshot.class_names(config) == [
        'aircraft carrier', 'airplane', 'alarm clock']  # DomainNet's style.
    config.dataset.num_classes = 4
    with pytest.raises(ValueError, match='3 label names but'):
      zeroshot.class_names(config)


def test_head_cache_is_reused_and_recomputed_when_stale(hf_clip, tmp_path):
  _, _, path = hf_clip
  config = _config(path, _class_file(tmp_path))
  head = (np.eye(10, 16, dtype=np.float32), 50.0)
  with mock.patch.object(zeroshot, 'head_weights',
                         return_value=head) as compute:
    for _ in range(2):  # Computed once, then read.
      w, scale = zeroshot.cached_head_weights(config, str(tmp_path))
    assert compute.call_count == 1
    np.testing.assert_array_equal(w, head[0])
    assert scale == 50.0
    config.zeroshot.templates = ('a {}.',)  # Other prompts: recomputed.
    zeroshot.cached_head_weights(config, str(tmp_path))
    assert compute.call_count == 2
    with open(tmp_path / zeroshot.CACHE_FILE, 'r+b') as f:
      f.truncate(100)  # A damaged cache is never used.
    zeroshot.cached_head_weights(config, str(tmp_path))
    assert compute.call_count == 3
  with pytest.raises(FileNotFoundError, match='tokenizer.json'):
    config.zeroshot.tokenizer = str(tmp_path / 'tokenizer.json')
    zeroshot.cached_head_weights(config, str(tmp_path / 'other'))
