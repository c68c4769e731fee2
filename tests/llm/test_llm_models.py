"""Tunix decoders from Hugging Face folders, against ``transformers``.

Each family is built small and random by ``transformers`` and saved as
safetensors. Run in float64 (both libraries), our loaded model gives
``transformers``' logits to float64 rounding (~1e-14): the computation is the
same. In float32 the two differ by float32 rounding, which grows with depth
and the logits' size: each float32 comparison is held to
``llm_helpers.rounding_tolerance`` (64 float32 epsilons per layer, times
max |logit|), never to a number one CPU happens to pass. Greedy continuations
are the same tokens and log-likelihoods the same sums. Every bad folder is
refused naming what is wrong.
"""

import json
import os
import shutil

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from tests import llm_helpers

from train.language import families
from train.language import models
from train.language import rope as rope_lib
from train.language import scoring
from train.llm import smoke

T = 40  # Positions compared: past Gemma's window (8) and Llama 3.1's 16.
TARGETS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj',
           'down_proj')


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp('hf')
  return {k: llm_helpers.save_tiny(k, str(root / k))
          for k in llm_helpers.FAMILIES}


@pytest.fixture(scope='module')
def mesh():
  return llm_helpers.mesh()


def _tokens(batch=2, length=T, seed=0):
  return np.random.default_rng(seed).integers(
      3, llm_helpers.SIZES['vocab_size'], (batch, length)).astype(np.int32)


def _our_logits(model, tokens, mesh, *states):
  """Logits of ``model`` (a module, or a graphdef merged with ``states``
  inside the jitted function, as qwix's modules need)."""
  valid = jnp.ones(tokens.shape, bool)

  def run(t, *states):
    m = nnx.merge(model, *states) if states else model
    return models.logits(m, t, models.positions_of(valid),
                         models.causal_mask(valid))[0]

  with jax.set_mesh(mesh):
    return np.asarray(jax.jit(run)(jnp.asarray(tokens), *states))


@pytest.mark.parametrize('kind', llm_helpers.FAMILIES)
def test_logits_equal_transformers_in_float64(folders, mesh, kind):
  # The same weights, every step of both libraries in float64: what is left
  # is float64 rounding, so any real difference (a norm's order or its 1 +,
  # a scale, the window, a RoPE base) shows 1e8 times above the bound.
  tokens = _tokens()
  ref = llm_helpers.transformers_logits(folders[kind], tokens, float64=True)
  with llm_helpers.jax_float64():
    loaded = models.load(folders[kind], mesh=mesh, dtype='float64')
    ours = _our_logits(loaded.model, tokens, mesh)
  assert ours.dtype == ref.dtype == np.float64
  assert np.abs(ref).max() > 0.5  # Not trivially small logits.
  np.testing.assert_allclose(
      ours, ref, rtol=0, atol=llm_helpers.rounding_tolerance(
          ref, loaded.config.num_layers, np.float64))


@pytest.mark.parametrize('kind', llm_helpers.FAMILIES)
def test_logits_equal_transformers_to_float32_rounding(folders, mesh, kind):
  # Measured: 1.2e-5 (Llama), 4.3e-6 (Llama 3.1), 6.3e-6 (Qwen 3), 8.1e-5
  # (Gemma 3: seven layers, logits of 8; 1.06e-4 on another CPU); bounds
  # 6.4e-5, 6.8e-5, 6.2e-5 and 4.4e-4. Each float32 run is about as far from
  # the float64 one (ours 3.3e-6 to 5.4e-5, transformers' 4.6e-6 to 6.3e-5).
  tokens = _tokens()
  loaded = models.load(folders[kind], mesh=mesh, dtype='float32')
  ours = _our_logits(loaded.model, tokens, mesh)
  ref = llm_helpers.transformers_logits(folders[kind], tokens)
  assert np.abs(ref).max() > 0.5  # Not trivially small logits.
  np.testing.assert_allclose(
      ours, ref, rtol=0, atol=llm_helpers.rounding_tolerance(
          ref, loaded.config.num_layers))


def _without_correction(model, family):
  for _, module in nnx.iter_modules(model):
    if isinstance(module, family.attention_class):
      module.__class__ = family.attention_class


@pytest.mark.parametrize('kind', ['llama', 'llama31'])
def test_tunix_rope_without_the_config_theta_was_the_error(folders, mesh,
                                                           kind):
  # Tunix's attention calls apply_rope without rope_theta (base 1e6): exact
  # at position 0, wrong more and more with the position.
  tokens = _tokens()
  loaded = models.load(folders[kind], mesh=mesh, dtype='float32')
  _without_correction(loaded.model, loaded.family)
  ref = llm_helpers.transformers_logits(folders[kind], tokens)
  err = np.abs(_our_logits(loaded.model, tokens, mesh) - ref)
  by_position = err.max(axis=(0, 2))
  rounding = llm_helpers.rounding_tolerance(ref, loaded.config.num_layers)
  assert by_position[0] <= rounding
  assert by_position[-8:].max() > 100 * rounding


def test_rope_frequencies_as_transformers_computes_them():
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import LlamaConfig  # pylint: disable=g-import-not-at-top
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # pylint: disable=g-import-not-at-top
  scaling = {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
             'high_freq_factor': 4.0, 'original_max_position_embeddings': 8192}
  config = LlamaConfig(head_dim=128, hidden_size=4096, num_attention_heads=32,
                       rope_theta=500_000.0, rope_scaling=dict(scaling))
  ref, _ = ROPE_INIT_FUNCTIONS['llama3'](config, torch.device('cpu'))
  ours = rope_lib.Rope(theta=500_000.0, **{k: v for k, v in scaling.items()
                                           if k != 'rope_type'},
                       kind='llama3').inv_freq(128)
  # Both float32: a few roundings apart (measured: 1.5 epsilons).
  np.testing.assert_allclose(ours, ref.numpy(),
                             rtol=4 * np.finfo(np.float32).eps)


@pytest.mark.parametrize('kind', ['llama', 'gemma3'])
def test_greedy_generation_equals_transformers(folders, mesh, kind):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  loaded = models.load(folders[kind], mesh=mesh, dtype='float32')
  adapted = models.add_lora(loaded, models.LoraSpec(2, 4.0, 0.0, TARGETS),
                            mesh=mesh, seed=0)
  scorer = scoring.Scorer(adapted.eval_graphdef, loaded.config, mesh,
                          max_new_tokens=12, eos_id=2, pad_id=0)
  rng = np.random.default_rng(1)
  prompts = [list(rng.integers(3, 96, n)) for n in (5, 14, 9, 3)]  # > window
  tokens, valid = np.zeros((4, 16), np.int32), np.zeros((4, 16), bool)
  for i, p in enumerate(prompts):  # Left-padded.
    tokens[i, 16 - len(p):], valid[i, 16 - len(p):] = p, True
  with jax.set_mesh(mesh):
    ours = scorer.generate(adapted.lora, adapted.base, tokens, valid)
  hf = transformers.AutoModelForCausalLM.from_pretrained(folders[kind])
  for i, p in enumerate(prompts):
    ref = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=12,
                      eos_token_id=2, pad_token_id=0)[0, len(p):].tolist()
    assert ours[i].tolist() == ref + [0] * (12 - len(ref)), i


def test_log_likelihoods_equal_transformers(folders, mesh):
  loaded = models.load(folders['qwen3'], mesh=mesh, dtype='float32')
  adapted = models.add_lora(loaded, models.LoraSpec(2, 4.0, 0.0, TARGETS),
                            mesh=mesh, seed=0)
  scorer = scoring.Scorer(adapted.eval_graphdef, loaded.config, mesh,
                          max_new_tokens=1, eos_id=2, pad_id=0)
  tokens = _tokens(batch=2, length=12)
  valid = np.ones_like(tokens, bool)
  valid[1, 9:] = False  # Right padding: not scored.
  scored = valid.copy()
  scored[:, :5] = False
  with jax.set_mesh(mesh):
    ours = scorer.log_likelihoods(adapted.lora, adapted.base, tokens, valid,
                                  scored)
  logits = llm_helpers.transformers_logits(folders['qwen3'], tokens)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  per_token = np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
  ref = np.sum(per_token * scored[:, 1:], axis=-1)
  # Logits within rounding (delta) move each log-softmax by at most 2 delta,
  # and a row's sum by 2 delta per scored token.
  delta = llm_helpers.rounding_tolerance(logits, loaded.config.num_layers)
  np.testing.assert_allclose(
      ours, ref, rtol=0, atol=2 * delta * scored[:, 1:].sum(axis=-1).max())


def test_lora_is_peft_lora_on_the_named_projections(folders, mesh):
  # qwix's adapters on q_proj and down_proj: A [in, r], B [r, out], scale
  # alpha/r, A ~ U(+-1/sqrt(in)), B = 0; the model with random B equals
  # the base model with W + (alpha/r) A B merged in.
  loaded = models.load(folders['llama'], mesh=mesh, dtype='float32')
  spec = models.LoraSpec(4, 2.0, 0.0, ('q_proj', 'down_proj'))
  adapted = models.add_lora(loaded, spec, mesh=mesh, seed=0)
  lora = adapted.lora.to_pure_dict()
  assert sorted(lora['layers'][0]['attn']) == ['q_proj']
  assert sorted(lora['layers'][0]['mlp']) == ['down_proj']
  a = np.asarray(lora['layers'][0]['attn']['q_proj']['w_lora_a'])
  assert a.shape == (32, 4) and 0.1 < np.abs(a).max() <= 32 ** -0.5
  rng = np.random.default_rng(0)
  lora = jax.tree.map(lambda x: x + 0.1 * rng.normal(size=x.shape).astype(
      np.float32) if x.ndim and x.shape[0] == 4 else x, lora)
  tokens = _tokens()
  ours = _our_logits(adapted.eval_graphdef, tokens, mesh, lora, adapted.base)
  merged = jax.tree.map(np.array, adapted.base.to_pure_dict())
  for i in range(2):
    q = lora['layers'][i]['attn']['q_proj']
    merged['layers'][i]['attn']['q_proj']['w'] += 0.5 * np.einsum(
        'dr,rnh->dnh', q['w_lora_a'], q['w_lora_b'])
    d = lora['layers'][i]['mlp']['down_proj']
    merged['layers'][i]['mlp']['down_proj']['kernel'] += 0.5 * (
        d['kernel_lora_a'] @ d['kernel_lora_b'])
  base_model = nnx.merge(nnx.graphdef(loaded.model),
                         jax.tree.map(jnp.asarray, merged))
  merged_logits = _our_logits(base_model, tokens, mesh)
  np.testing.assert_allclose(ours, merged_logits, rtol=0,
                             atol=llm_helpers.rounding_tolerance(
                                 merged_logits, loaded.config.num_layers))


def test_gemma3_fused_projections_are_adapted_whole_or_not(folders, mesh):
  loaded = models.load(folders['gemma3'], mesh=mesh, dtype='float32')
  with pytest.raises(ValueError, match=r"fuses \['k_proj', 'v_proj'\]"):
    models.lora_paths(loaded, ('q_proj', 'k_proj'))
  with pytest.raises(ValueError, match="each must be one of"):
    models.lora_paths(loaded, ('qkv',))
  assert models.lora_paths(loaded, ('k_proj', 'v_proj')) == ['attn/kv_einsum']


# -- Bad folders ----------------------------------------------------------------

def _edit(src, dst, edit_tensors=None, edit_config=None):
  shutil.copytree(src, dst)
  path = os.path.join(dst, 'model.safetensors')
  if edit_tensors:
    tensors = dict(safetensors.numpy.load_file(path))
    edit_tensors(tensors)
    safetensors.numpy.save_file(tensors, path)
  if edit_config:
    with open(os.path.join(dst, 'config.json')) as f:
      config = json.load(f)
    edit_config(config)
    with open(os.path.join(dst, 'config.json'), 'w') as f:
      json.dump(config, f)
  return dst


Q = 'model.layers.1.self_attn.q_proj.weight'


def _set(key, value):
  return lambda d: d.__setitem__(key, value)


BAD = {
    'missing': (lambda t: t.pop(Q), None,
                "leaf/leaves of the model are in no tensor of the folder:"
                " layers.1.attn.q_proj.w"),
    'extra': (_set('model.layers.0.mlp.extra.weight', np.ones(3, np.float32)),
              None, "'model.layers.0.mlp.extra.weight' of {file}"),
    'misshaped': (lambda t: t.__setitem__(Q, t[Q][:, :-1].copy()), None,
                  "'model.layers.1.self_attn.q_proj.weight' of {file} has"
                  " shape (32, 31) (992 values) but the model wants it as"
                  " (32, 4, 8)"),
    'nan': (lambda t: t[Q].__setitem__((0, 0), np.nan), None,
            "Tensor 'model.layers.1.self_attn.q_proj.weight' of {file} holds"
            " 1 NaN or inf values"),
    'other_layer_count': (None, _set('num_hidden_layers', 1),
                          "'model.layers.1.input_layernorm.weight' of {file}"
                          " maps to 'layers.1.input_layernorm.w', which the"
                          " model (built from config.json) does not have"),
    'unknown_family': (None, _set('model_type', 'mistral'),
                       "model_type 'mistral' is not a family we support"),
    'bias': (None, _set('attention_bias', True),
             "attention_bias=True cannot be computed by Tunix's decoder"),
    'rope': (None, _set('rope_parameters', {'rope_type': 'yarn',
                                            'rope_theta': 1e4}),
             "rope_type 'yarn' (rope_parameters/rope_scaling) is not"
             " supported"),
    'untied_head': (lambda t: t.__setitem__('lm_head.weight', np.zeros(
        (96, 32), np.float32)), _set('tie_word_embeddings', True),
                    'ties the output layer to the embedding'),
}


@pytest.mark.parametrize('case', sorted(BAD))
def test_a_bad_folder_is_refused_naming_what_is_wrong(folders, mesh,
                                                       tmp_path, case):
  edit_tensors, edit_config, message = BAD[case]
  folder = _edit(folders['llama'], str(tmp_path / case), edit_tensors,
                 edit_config)
  message = message.format(file=os.path.join(folder, 'model.safetensors'))
  with pytest.raises(ValueError) as e:
    models.load(folder, mesh=mesh, dtype='float32')
  assert message in str(e.value), str(e.value)


def test_gemma3_features_tunix_cannot_compute_are_refused(folders, tmp_path):
  for key, value in (('final_logit_softcapping', 30.0),
                     ('query_pre_attn_scalar', 100),
                     ('layer_types', ['full_attention'] * 7)):
    folder = _edit(folders['gemma3'], str(tmp_path / key), None,
                   _set(key, value))
    hf, where = families.read_config(folder)
    with pytest.raises(ValueError, match=f'{key}=.* cannot be computed'):
      families.GEMMA3.build(hf, where, jnp.float32,
                            families.GEMMA3.default_sharding())


def test_smoke_model_is_a_transformers_llama(mesh, tmp_path):
  from train.llm import data  # pylint: disable=g-import-not-at-top
  smoke.write_data(str(tmp_path / 'data'), num_train=8, num_test=1,
                        seed=0)
  rows = data.read_examples(str(tmp_path / 'data' / 'commonsense_170k.json'))
  smoke.write_tiny_llama(str(tmp_path / 'model'), smoke.word_tokenizer(rows),
                         hidden=32, layers=2, heads=4, kv_heads=2,
                         intermediate=48, seed=0)
  loaded = models.load(str(tmp_path / 'model'), mesh=mesh, dtype='float32')
  tokens = _tokens(length=16) % 20
  ref = llm_helpers.transformers_logits(str(tmp_path / 'model'), tokens)
  np.testing.assert_allclose(
      _our_logits(loaded.model, tokens, mesh), ref, rtol=0,
      atol=llm_helpers.rounding_tolerance(ref, loaded.config.num_layers))
