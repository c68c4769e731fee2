"""PaliGemma and Gemma 3 on Tunix, against ``transformers``.

Each model (PaliGemma: Gemma-1 decoder, multi-query; PaliGemma 2: Gemma-2
decoder, grouped queries, soft-capping, post norms) is built small and
random by ``transformers`` and saved as safetensors (``vqa_helpers``). On
the same images and rows (prefix and suffix, a right-padded batch), our
logits equal its logits to 1e-4 in float32 at every real position, and
greedy decoding gives its tokens. The image path is checked to matter: the
logits move when the image changes or is dropped, and a merge that puts the
image embeddings in the wrong order or drops the first one (Tunix's
``merge_embeddings``) no longer matches. Inputs are laid out as
``PaliGemmaProcessor`` lays them out; bad folders are refused by name; LoRA
trains only its adapters, SigLIP's too when asked.
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
from tests.vqa import vqa_helpers
from train.language import models as lm
from train.vqa import models
from train.vqa import paligemma
from train.vqa import tiny

TOL = 1e-4  # float32, logits of size ~5: the bound.
QUESTIONS = ['what color is the cat', 'how many']
ANSWERS = ['red', 'two dogs on the table']


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp('hf')
  return {k: vqa_helpers.save_tiny(k, str(root / k),
                                   seed=vqa_helpers.SEEDS[k])
          for k in vqa_helpers.ALL_KINDS}


@pytest.fixture(scope='module')
def mesh():
  return llm_helpers.mesh()


@pytest.fixture(scope='module')
def tok():
  return vqa_helpers.tokenizer()


@pytest.fixture(scope='module')
def loaded(folders, mesh):
  return {k: models.load(folders[k], mesh=mesh)
          for k in vqa_helpers.ALL_KINDS}


def _rows(tok, loaded, answers=ANSWERS, max_len=32):
  if loaded.kind == 'gemma3':
    tok = vqa_helpers.tokenizer('gemma3')
  return models.build_inputs(tok, QUESTIONS, answers, loaded=loaded,
                             max_len=max_len)


def _ours(model, batch, pixels):
  return np.asarray(models.logits(model, batch['tokens'], pixels,
                                  batch['input_mask'], batch['prefix_mask']))


@pytest.mark.parametrize('kind', vqa_helpers.ALL_KINDS)
def test_logits_equal_transformers(folders, loaded, tok, kind):
  # Measured: 1.6e-5 (PaliGemma), 6.0e-6 (PaliGemma 2), 3.8e-6 (Gemma 3),
  # logits up to ~9.
  batch, pixels = _rows(tok, loaded[kind]), vqa_helpers.images(2)
  assert not batch['input_mask'].all()  # A padded batch.
  ref = vqa_helpers.transformers_logits(folders[kind], batch, pixels)
  ours = _ours(loaded[kind].model, batch, pixels)
  real = batch['input_mask']
  assert np.abs(ref[real]).max() > 0.5  # Not trivially small logits.
  np.testing.assert_allclose(ours[real], ref[real], rtol=0, atol=TOL)


@pytest.mark.parametrize('kind', ['paligemma', 'gemma3'])
def test_logits_move_with_the_image(loaded, tok, kind):
  model = loaded[kind].model
  batch = _rows(tok, loaded[kind])
  text = batch['input_mask'] & ~(batch['tokens'] == loaded[kind].image_token_id)
  one = _ours(model, batch, vqa_helpers.images(2, seed=0))
  other = _ours(model, batch, vqa_helpers.images(2, seed=1))
  dropped = np.asarray(models.logits(
      model, batch['tokens'], None, batch['input_mask'],
      batch['prefix_mask']))
  assert np.abs(one - other)[text].max() > 1e3 * TOL
  assert np.abs(one - dropped)[text].max() > 1e3 * TOL


_MERGE = paligemma.merge_images


def _merge_reversed(embeddings, features, is_image):
  return _MERGE(embeddings, features[:, ::-1], is_image)


def _merge_tunix(embeddings, features, is_image):
  from tunix.models.gemma3 import merge_embeddings  # pylint: disable=g-import-not-at-top
  return merge_embeddings.merge_embeddings(
      text_embeddings=embeddings, vision_embeddings=features[:, None],
      mask=is_image)


@pytest.mark.parametrize('merge', [_merge_reversed, _merge_tunix])
def test_misplaced_image_tokens_do_not_match(folders, loaded, tok,
                                             monkeypatch, merge):
  # The reference matches only with each image embedding at its own token:
  # in reverse order, or with the first one dropped (Tunix's merge restores
  # position 0, where PaliGemma's first image token is), it does not.
  batch, pixels = _rows(tok, loaded['paligemma']), vqa_helpers.images(2)
  ref = vqa_helpers.transformers_logits(folders['paligemma'], batch, pixels)
  monkeypatch.setattr(paligemma, 'merge_images', merge)
  ours = _ours(loaded['paligemma'].model, batch, pixels)
  real = batch['input_mask']
  assert np.abs(ours - ref)[real].max() > 100 * TOL


@pytest.mark.parametrize('kind', vqa_helpers.ALL_KINDS)
def test_generate_equals_transformers(folders, loaded, tok, kind):
  batch, pixels = _rows(tok, loaded[kind], None, 28), vqa_helpers.images(2)
  assert not batch['input_mask'].all()  # Prompts of two lengths.
  eos, pad, n = tok.eos_token_id, tok.pad_token_id, 8
  ours = np.asarray(models.generate(
      loaded[kind].model, batch['tokens'], pixels, batch['input_mask'],
      batch['prefix_mask'], max_new_tokens=n, eos_id=eos, pad_id=pad))
  ref = vqa_helpers.transformers_generate(folders[kind], batch, pixels,
                                          max_new_tokens=n, eos_id=eos,
                                          pad_id=pad)
  assert ours.shape == (2, n)
  assert len({t for row in ref for t in row}) >= 3  # Not one token repeated.
  for row, expected in zip(ours, ref):
    assert row[:len(expected)].tolist() == expected
    assert (row[len(expected):] == pad).all()


def test_build_inputs_and_preprocess_equal_the_processor(loaded, tok):
  import transformers  # pylint: disable=g-import-not-at-top
  from transformers.models.siglip import image_processing_pil_siglip  # pylint: disable=g-import-not-at-top
  model = loaded['paligemma']
  images_processor = image_processing_pil_siglip.SiglipImageProcessorPil(
      size={'height': model.image_size, 'width': model.image_size},
      image_mean=[0.5] * 3, image_std=[0.5] * 3)
  images_processor.image_seq_length = model.num_image_tokens
  reference_tok = vqa_helpers.tokenizer()
  reference_tok.pad_token = '<pad>'
  processor = transformers.PaliGemmaProcessor(images_processor,
                                              reference_tok)
  raw = np.random.default_rng(0).integers(0, 256, (2, 45, 33, 3),
                                          dtype=np.uint8)
  prompts = [models.PROMPT_TEMPLATE.format(question=q) for q in QUESTIONS]
  ref = processor(images=list(raw), text=prompts, suffix=ANSWERS,
                  padding='max_length', max_length=32, return_tensors='np')
  ours = models.build_inputs(tok, QUESTIONS, ANSWERS, loaded=model,
                             max_len=32)
  real = ref['attention_mask'].astype(bool)
  np.testing.assert_array_equal(ours['input_mask'], real)
  np.testing.assert_array_equal(ours['tokens'][real], ref['input_ids'][real])
  np.testing.assert_array_equal(ours['prefix_mask'][real],
                                ref['token_type_ids'][real] == 0)
  np.testing.assert_array_equal(ours['loss_mask'], ref['labels'] >= 0)
  np.testing.assert_allclose(
      models.preprocess(raw, model.image_size),
      ref['pixel_values'].transpose(0, 2, 3, 1), rtol=0, atol=1e-6)


def test_build_inputs_refuses_a_row_too_long(loaded, tok):
  with pytest.raises(ValueError, match=r'Row 0 .*max_len is 20'):
    models.build_inputs(tok, QUESTIONS, ANSWERS, loaded=loaded['paligemma'],
                        max_len=20)


def test_tiny_folder_loads_here_and_in_transformers(tmp_path, mesh):
  # train.vqa.tiny writes the folder with NumPy alone; transformers reads it
  # as a PaliGemma, with the same logits as ours.
  tok = tiny.word_tokenizer([vqa_helpers.WORDS])
  folder = tiny.write_tiny_paligemma(str(tmp_path / 'tiny'), tok,
                                     image_size=28, patch_size=14)
  ours_loaded = models.load(folder, mesh=mesh)
  batch = models.build_inputs(tok, QUESTIONS, ANSWERS, loaded=ours_loaded,
                              max_len=24)
  pixels = vqa_helpers.images(2)
  ref = vqa_helpers.transformers_logits(folder, batch, pixels)
  real = batch['input_mask']
  np.testing.assert_allclose(_ours(ours_loaded.model, batch, pixels)[real],
                             ref[real], rtol=0, atol=TOL)


# -- Bad folders --------------------------------------------------------------

def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


def _edit_tensors(folder, edit):
  path = os.path.join(folder, 'model.safetensors')
  tensors = safetensors.numpy.load_file(path)
  edit(tensors)
  safetensors.numpy.save_file(tensors, path, metadata={'format': 'pt'})


def _edit_config(folder, edit):
  path = os.path.join(folder, 'config.json')
  with open(path) as f:
    config = json.load(f)
  edit(config)
  with open(path, 'w') as f:
    json.dump(config, f)


VISION_Q = 'vision_tower.encoder.layers.0.self_attn.q_proj.weight'
PROJECTOR = 'multi_modal_projector.linear.weight'


def _nan(t):
  t[VISION_Q][0, 0] = np.nan


def _extra(t):
  t['vision_tower.head.probe'] = np.zeros((1, 24), np.float32)


def _reshaped(t):
  t[PROJECTOR] = t[PROJECTOR][:, :-1]


@pytest.mark.parametrize('edit,match', [
    (lambda t: t.pop(VISION_Q), r'leaf/leaves .* no tensor.*query_proj'),
    (_extra, r"map to no leaf.*'vision_tower.head.probe' of"
             r' .*model.safetensors'),
    (_reshaped, r"'multi_modal_projector.linear.weight' of .* has shape"
                r' \(23, 32\).*projector.kernel'),
    (_nan, rf"'{VISION_Q}' of .*model.safetensors holds 1 NaN"),
])
def test_bad_tensors_refused_by_name(folders, mesh, tmp_path, edit, match):
  folder = _copy(folders['paligemma'], str(tmp_path / 'bad'))
  _edit_tensors(folder, edit)
  with pytest.raises(ValueError, match=match):
    models.load(folder, mesh=mesh)


def _set(part, key, value):
  def edit(config):
    (config[part] if part else config)[key] = value
  return edit


@pytest.mark.parametrize('edit,match', [
    (_set('text_config', 'rms_norm_eps', 1e-5), r'text_config: rms_norm_eps'),
    (_set('text_config', 'hidden_activation', 'relu'), r'hidden_activation'),
    (_set('text_config', 'model_type', 'llama'), r'model_type=.llama'),
    (_set('vision_config', 'layer_norm_eps', 1e-5),
     r'vision_config: layer_norm_eps'),
    (_set('vision_config', 'vision_use_head', True), r'vision_use_head'),
    (_set(None, 'tie_word_embeddings', False), r'tie_word_embeddings'),
    (_set(None, 'model_type', 'llava'), r"model_type 'llava'"),
])
def test_unsupported_config_refused_by_key(folders, mesh, tmp_path, edit,
                                           match):
  folder = _copy(folders['paligemma'], str(tmp_path / 'bad'))
  _edit_config(folder, edit)
  with pytest.raises(ValueError, match=match):
    models.load(folder, mesh=mesh)


# -- LoRA ---------------------------------------------------------------------

SPEC = lm.LoraSpec(rank=4, alpha=8.0, dropout=0.0,
                   targets=('q_proj', 'k_proj', 'v_proj', 'o_proj'))


def _lora_grads(folders, mesh, tok, *, vision, kind='paligemma'):
  loaded = models.load(folders[kind], mesh=mesh)
  adapted = models.add_lora(loaded, SPEC, mesh=mesh, seed=0, vision=vision)
  batch = _rows(tok, loaded)
  pixels = vqa_helpers.images(2)
  # B = 0 at the start: the adapted model is the base model.
  base = _ours(loaded.model, batch, pixels)

  def loss(lora, base_state):
    model = nnx.merge(adapted.graphdef, lora, base_state)
    out = models.logits(model, batch['tokens'], pixels, batch['input_mask'],
                        batch['prefix_mask'])
    logp = jax.nn.log_softmax(out[:, :-1])
    picked = jnp.take_along_axis(logp, batch['tokens'][:, 1:, None], -1)
    return -jnp.sum(picked[..., 0] * batch['loss_mask'][:, 1:]), out

  with jax.set_mesh(mesh):
    (_, out), grads = jax.jit(jax.value_and_grad(
        loss, argnums=(0, 1), has_aux=True))(adapted.lora, adapted.base)
  # Up to float32 rounding (a jitted run against an op-by-op one).
  np.testing.assert_allclose(np.asarray(out), base, rtol=0, atol=TOL / 4)
  return loaded, adapted, grads


def _by_path(state):
  return {'/'.join(map(str, p)): np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(state)}


def test_lora_adapts_the_decoder_only_by_default(folders, mesh, tok):
  loaded, adapted, (lora_grads, base_grads) = _lora_grads(
      folders, mesh, tok, vision=False)
  grads = _by_path(lora_grads)
  assert grads and all(p.startswith('decoder/layers/') for p in grads)
  assert {p.split('/')[4] for p in grads} == {'q_einsum', 'kv_einsum',
                                              'attn_vec_einsum'}
  # Gradients reach the adapters (A's through B = 0 are zero at step 0).
  assert all(np.abs(g).max() > 0 for p, g in grads.items()
             if p.endswith('_b'))
  assert all(v.dtype == np.float32 for v in _by_path(adapted.lora).values())
  # Greedy decoding through the adapters (B = 0) is the base model's.
  prompts, pixels = _rows(tok, loaded, None, 28), vqa_helpers.images(2)
  run = lambda model: np.asarray(models.generate(
      model, prompts['tokens'], pixels, prompts['input_mask'],
      prompts['prefix_mask'], max_new_tokens=8, eos_id=tok.eos_token_id,
      pad_id=tok.pad_token_id))
  with jax.set_mesh(mesh):
    np.testing.assert_array_equal(
        run(nnx.merge(adapted.eval_graphdef, adapted.lora, adapted.base)),
        run(loaded.model))
  # The frozen SigLIP gets none: Tunix's stop-gradient is on.
  vision = {p: g for p, g in _by_path(base_grads).items()
            if p.startswith('vision_encoder/')}
  assert vision and all(np.abs(g).max() == 0 for g in vision.values())


@pytest.mark.parametrize('kind', ['gemma3'])  # PaliGemma's: test_remat_...
def test_lora_on_siglip_gets_gradients(folders, mesh, tok, kind):
  _, _, (lora_grads, _) = _lora_grads(folders, mesh, tok, vision=True,
                                      kind=kind)
  grads = _by_path(lora_grads)
  decoder = [p for p in grads if not p.startswith('vision_encoder/')]
  assert decoder and all(
      p.startswith('decoder/layers/' if kind == 'paligemma' else 'layers/')
      for p in decoder)
  vision = {p: g for p, g in grads.items() if p.startswith('vision_encoder/')}
  assert {p.split('/')[-2] for p in vision} == {
      'query_proj', 'key_proj', 'value_proj', 'out_proj'}
  assert all(np.abs(g).max() > 0 for p, g in vision.items()
             if p.endswith('_b'))


# -- Naming, windows ----------------------------------------------------------

def _published(name):  # As the Hub's paligemma-3b-pt-224 names its tensors.
  return name.replace('vision_tower.', 'vision_tower.vision_model.')


def _in_memory(name):  # As transformers >= 4.52 names its modules.
  for old, new in (('language_model.model.', 'model.language_model.'),
                   ('vision_tower.', 'model.vision_tower.'),
                   ('multi_modal_projector.', 'model.multi_modal_projector.')):
    if name.startswith(old):
      return new + name[len(old):]
  return name


@pytest.mark.parametrize('kind', ['paligemma', 'gemma3'])
@pytest.mark.parametrize('rename', [_published, _in_memory])
def test_every_tensor_naming_loads_the_same_model(folders, loaded, mesh,
                                                  tmp_path, kind, rename):
  folder = _copy(folders[kind], str(tmp_path / 'renamed'))
  _edit_tensors(folder, lambda t: t.update(
      {rename(k): t.pop(k) for k in list(t)}))
  again = models.load(folder, mesh=mesh)
  for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(again.model)),
                               nnx.to_flat_state(nnx.state(
                                   loaded[kind].model))):
    np.testing.assert_array_equal(a.get_value(), b.get_value(),
                                  err_msg='/'.join(map(str, path)))


def test_rows_reaching_the_sliding_window_are_refused(folders, mesh, tok,
                                                      tmp_path):
  # Tunix's Gemma 2 window counts 1-based positions against cache slots:
  # rows must stay inside it (the published 4096 leaves room for 256 image
  # tokens and any question).
  folder = _copy(folders['paligemma2'], str(tmp_path / 'window'))
  _edit_config(folder, _set('text_config', 'sliding_window', 32))
  model = models.load(folder, mesh=mesh)
  batch, pixels = _rows(tok, model, max_len=32), vqa_helpers.images(2)
  with pytest.raises(ValueError, match='sliding window of 32'):
    _ours(model.model, batch, pixels)
  prompts = _rows(tok, model, None, max_len=28)
  with pytest.raises(ValueError, match='sliding window of 32'):
    models.generate(model.model, prompts['tokens'], pixels,
                    prompts['input_mask'], prompts['prefix_mask'],
                    max_new_tokens=4, eos_id=1, pad_id=0)


def test_gemma3_pooling_that_does_not_divide_is_refused(folders, mesh,
                                                        tmp_path):
  folder = _copy(folders['gemma3'], str(tmp_path / 'pool'))
  _edit_config(folder, _set(None, 'mm_tokens_per_image', 9))
  with pytest.raises(ValueError, match='mm_tokens_per_image=9 do not pool'):
    models.load(folder, mesh=mesh)


@pytest.mark.slow  # Tracing 3-4B-parameter graphs: ~15-30 s each.
@pytest.mark.parametrize('name', sorted(vqa_helpers.PUBLISHED))
def test_published_configs_build_transformers_sizes(tmp_path, name):
  # The published config.json (keys left out as on the Hub): the model
  # built has transformers' parameter count, 256 image tokens, its size.
  folder = str(tmp_path / name)
  os.makedirs(folder)
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(vqa_helpers.PUBLISHED[name], f)
  built = models.plan(folder)
  abstract = nnx.eval_shape(built.make)
  ours = sum(int(np.prod(v.shape)) for _, v in
             nnx.to_flat_state(nnx.state(abstract, nnx.Param)))
  assert ours == vqa_helpers.transformers_parameter_count(folder)
  assert built.vision.num_mm_tokens_per_image == 256
  assert built.vision.image_height == (896 if name.startswith('gemma') else 224)


def test_remat_trains_the_same_adapters(folders, mesh, tok):
  # Rematerialised decoder layers (jax.checkpoint around each Tunix layer,
  # merged afresh inside): the same loss and gradients, LoRA dropout's keys
  # included, as without; adapters with B != 0, so LoRA is in the path.
  spec = lm.LoraSpec(rank=4, alpha=8.0, dropout=0.5, targets=SPEC.targets)
  results = []
  for remat in (False, True):
    loaded = models.load(folders['paligemma'], mesh=mesh, remat=remat)
    adapted = models.add_lora(loaded, spec, mesh=mesh, seed=0, vision=True)
    batch, pixels = _rows(tok, loaded), vqa_helpers.images(2)

    def loss(lora, adapted=adapted, batch=batch, pixels=pixels):
      model = nnx.merge(adapted.graphdef, lora, adapted.base)
      model.set_attributes(qwix_rngs=nnx.Rngs(dropout=jax.random.key(0)))
      out = models.logits(model, batch['tokens'], pixels,
                          batch['input_mask'], batch['prefix_mask'])
      return jnp.mean(out ** 2)

    lora = jax.tree.map(lambda x: x + 0.1, adapted.lora)
    with jax.set_mesh(mesh):
      results.append(jax.jit(jax.value_and_grad(loss))(lora))
  (plain, plain_grads), (remat, remat_grads) = results
  np.testing.assert_allclose(remat, plain, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(plain_grads)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  # Every adapter, SigLIP's included (stop-gradient off), gets a gradient.
  grads = _by_path(plain_grads)
  assert {p.split('/')[-2] for p in grads
          if p.startswith('vision_encoder/')} == {
              'query_proj', 'key_proj', 'value_proj', 'out_proj'}
  assert all(np.abs(g).max() > 0 for g in grads.values())


def test_gemma3_remat_refused(folders, mesh):
  with pytest.raises(ValueError, match='remat=.BLOCK. with Gemma 3'):
    models.load(folders['gemma3'], mesh=mesh, remat=True)
