"""VQA LoRA steps in-process on the smoke's tiny random PaliGemma: only the
adapters move, SPD's steps equal the float64 reference on the same adapter
gradients, the loss is on the answer tokens only, WiSE-FT's endpoints are
the pre-trained and fine-tuned models, and the evaluation's bookkeeping."""

import dataclasses
import os
import shutil

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import vqa
import spd_optax
from tests import reference
from train.core import optimizers
from train.language import mesh as mesh_lib
from train.vqa import data
from train.vqa import evaluate
from train.vqa import loop
from train.vqa import models
from train.vqa import smoke
from train.vqa import steps
from train.vqa import wise_ft


def _config(name='spd', **optimizer):
  config = vqa.get_config(f'smoke,{name}')
  config.optimizer.update(dict(warmup_steps=0, warmup_init_fraction=0.0,
                               end_fraction=0.0, **optimizer))
  config.num_train_steps = 10**7  # The learning rate is constant here.
  return config


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
  small = ml_collections.ConfigDict(dict(num_train=32, num_eval=2,
                                         image_size=32))
  return smoke.prepare(str(tmp_path_factory.mktemp('smoke')), small, seed=0)


@pytest.fixture(scope='module')
def run(inputs):
  config = _config()
  mesh = mesh_lib.make_mesh(config)
  return loop._set_up(config, mesh, *inputs)  # pylint: disable=protected-access


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(x, np.float64)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _capturing(tx):
  """``tx`` after a link that keeps the gradients it is given in its state."""
  keep = optax.GradientTransformation(
      lambda params: jax.tree.map(jnp.zeros_like, params),
      lambda updates, state, params=None: (updates, updates))
  return optax.chain(keep, tx)


def _batch(run, rows):
  return loop._shard_batch(loop.encode(run, rows, answers=True), run)  # pylint: disable=protected-access


def test_spd_steps_move_only_adapters_and_equal_the_float64_reference(run):
  # Two micro-batches a step: the reference is given the gradient the
  # optimizer was given (their mean).
  lr, lam, num = 3e-2, 1.0, 5
  config = _config(learning_rate=lr, weight_decay=lam)
  tx = _capturing(optimizers.make_optimizer(config, lora=True))
  lora = jax.tree.map(jnp.copy, run.adapted.lora.to_pure_dict())
  opt_state = steps.initial_opt_state(tx, lora)
  start, base_before = _flat(lora), _flat(run.adapted.base.to_pure_dict())
  step = steps.make_train_step(run.adapted.graphdef, tx, dtype=jnp.float32,
                               spd=True)
  grads, fired = [], []
  with jax.set_mesh(run.mesh):
    for i in range(num):
      batch = _batch(run, run.train_rows[4 * i:4 * i + 4])
      lora, opt_state, metrics = step(lora, opt_state, run.adapted.base,
                                      batch, jax.random.key(i))
      assert 'train/spd_fire_rate' in metrics
      grads.append(_flat(opt_state[0]))
      fired.append(_flat(jax.tree.map(
          lambda d: d.projected, spd_optax.get_diagnostics(opt_state),
          is_leaf=lambda x: isinstance(x, spd_optax.ProjectionDiagnostics))))
  theta, history = reference.run_adamspd(
      start, {k: np.zeros_like(v) for k, v in start.items()},
      lambda theta, t: grads[t], num, lr=lr, lam=lam)
  ours = _flat(lora)
  # float32 steps against float64: Adam's bias correction loses ~3e-5 of its
  # value to float32 cancellation at t = 2, hence 2e-5 of each leaf's scale.
  for k in ours:
    assert np.abs(ours[k] - theta[k]).max() < 2e-5 * np.abs(theta[k]).max(), k
  assert [{k: bool(v) for k, v in f.items()} for f in fired] == history
  assert sum(map(sum, (h.values() for h in history))) > 0  # SPD fired.
  after = _flat(run.adapted.base.to_pure_dict())
  assert after.keys() == base_before.keys()
  for k, v in after.items():
    np.testing.assert_array_equal(v, base_before[k], err_msg=k)  # Bitwise.
  for k in ours:  # Every adapter moved (B from zero).
    assert not np.array_equal(ours[k], start[k]), k


_LOGITS = {}  # id(graphdef) -> (graphdef, its jitted logits).


def _logits_fn(graphdef):
  """Jitted float32 logits of the model ``graphdef`` merges (once per graph:
  a graph holding Tunix's ModelConfig is not hashable)."""
  if id(graphdef) not in _LOGITS:
    _LOGITS[id(graphdef)] = (graphdef, jax.jit(
        lambda lora, base, batch: models.logits(
            steps.merged(graphdef, lora, base, jnp.float32), batch['tokens'],
            batch['images'], batch['input_mask'], batch['prefix_mask'])))
  return _LOGITS[id(graphdef)][1]


def _logits(graphdef, lora, base, batch):
  return _logits_fn(graphdef)(lora, base, batch)


def test_loss_is_the_mean_nll_of_the_answer_tokens(run):
  rows = run.train_rows[:2]
  host = loop.encode(run, rows, answers=True)
  # Prefix: image tokens, BOS, prompt, '\n'; then the answer and EOS.
  n_img = run.loaded.num_image_tokens
  for i, r in enumerate(rows):
    answer = data.training_answer(r)
    ids = host['tokens'][i][host['loss_mask'][i]].tolist()
    assert ids == run.tokenizer.encode(answer, add_special_tokens=False) + [
        run.tokenizer.eos_token_id]
    assert host['prefix_mask'][i, :n_img + 1].all()
  batch = {k: jnp.asarray(v) for k, v in host.items()}
  lora = run.adapted.lora.to_pure_dict()
  graphdef = run.adapted.eval_graphdef
  loss = jax.jit(lambda lora, base, batch: steps.loss_fn(
      graphdef, lora, base, batch, None, jnp.float32))(
          lora, run.adapted.base, batch)
  logits = np.asarray(_logits(graphdef, lora, run.adapted.base, batch),
                      np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(
      -1, keepdims=True)) - logits.max(-1, keepdims=True)
  nll = []
  for i in range(len(rows)):
    for t in np.flatnonzero(host['loss_mask'][i]):
      nll.append(-logp[i, t - 1, host['tokens'][i, t]])
  np.testing.assert_allclose(float(loss), np.mean(nll), rtol=1e-5)


def test_wise_ft_endpoints_are_the_pretrained_and_finetuned_models(run):
  host = loop.encode(run, run.val_rows[:2], answers=True)
  batch = {k: jnp.asarray(v) for k, v in host.items()}
  trained = jax.tree.map(lambda x: x + 0.05, run.adapted.lora.to_pure_dict())

  def logits_of(lora):
    return np.asarray(_logits(run.adapted.eval_graphdef, lora,
                              run.adapted.base, batch))

  graphdef, state = nnx.split(run.loaded.model)  # No adapters at all.
  base = np.asarray(jax.jit(lambda state, batch: models.logits(
      nnx.merge(graphdef, state), batch['tokens'], batch['images'],
      batch['input_mask'], batch['prefix_mask']))(state, batch))
  # Alpha 0 is the loaded model; so is the untrained adapter (B = 0).
  np.testing.assert_allclose(logits_of(wise_ft.scaled(trained, 0.0)), base,
                             atol=1e-5)
  np.testing.assert_allclose(logits_of(run.adapted.lora.to_pure_dict()),
                             base, atol=1e-5)
  np.testing.assert_array_equal(logits_of(wise_ft.scaled(trained, 1.0)),
                                logits_of(trained))
  assert np.abs(logits_of(trained) - base).max() > 1e-3
  half = _flat(wise_ft.scaled(trained, 0.5))
  for k, v in _flat(trained).items():
    np.testing.assert_array_equal(half[k], v * 0.5 if 'lora_b' in k else v)
  with pytest.raises(ValueError, match='alpha 1.5 is not in'):
    wise_ft.scaled(trained, 1.5)


def test_held_out_answers_are_decoded_words(run):
  predicted = loop._answer_fn(run, run.lora)(run.val_rows[:5])  # pylint: disable=protected-access
  assert len(predicted) == 5 and all(isinstance(p, str) for p in predicted)
  words = set(smoke.VOCABULARY)
  assert all(set(p.split()) <= words for p in predicted), predicted


class _Tokenizer:
  def decode(self, ids, skip_special_tokens):
    assert skip_special_tokens
    return ' '.join({5: 'red', 6: 'two'}.get(i, '') for i in ids)


def test_answers_stop_at_eos_and_fill_the_last_batch():
  rows = [data.Row(str(i), 'x.jpg', 'q?', ('red',) * 10) for i in range(5)]
  seen = []

  def generate(batch):
    seen.append(batch['n'])
    return np.array([[5, 6, 1, 5], [6, 1, 1, 1], [5, 5, 5, 5]][:3])

  out = evaluate.answers(rows, generate, lambda r: {'n': len(r)},
                         _Tokenizer(), batch_size=3, eos_id=1)
  assert seen == [3, 3]  # The last batch is filled to the compiled size.
  assert out == ['red two', 'two', 'red red red red', 'red two', 'two']
  assert evaluate.set_accuracy(rows, out) == 0.0  # No answer is 'red'.
  assert evaluate.set_accuracy(rows[:1], ['Red.']) == 100.0


def test_summary_and_table():
  per_set = {'vqav2_val': 50.0, 'iv_vqa': 40.0, 'vqa_cp': 20.0,
             'okvqa': 10.0}
  s = evaluate.summary(per_set, near=('iv_vqa', 'vqa_cp', 'advqa'),
                       far=('okvqa', 'vizwiz'))
  assert s == {'id': 50.0, 'near_ood': 30.0, 'far_ood': 10.0}
  results = {f'test/{k}': v for k, v in {**per_set, **s}.items()}
  rows, header = evaluate.table(results, ['test'], data.EVAL_SETS)
  assert header == ['set', 'test %']
  assert [r[0] for r in rows] == ['vqav2_val', 'iv_vqa', 'vqa_cp', 'okvqa',
                                  'id', 'near_ood', 'far_ood']
  assert rows[-2] == ['near_ood', 30.0]


def test_a_real_run_refuses_a_missing_image_before_training(inputs, tmp_path):
  model_dir, data_dir = inputs
  copy = str(tmp_path / 'data')
  shutil.copytree(data_dir, copy)
  missing = data.read_set('advqa', copy)[1].image
  os.remove(missing)
  config = _config()
  config.smoke.enabled = False
  config.model.path, config.data.dir = model_dir, copy
  workdir = str(tmp_path / 'run')
  with pytest.raises(FileNotFoundError,
                     match=f"row 1: field 'image_id': image {missing} does"
                           ' not exist'):
    loop.train_and_evaluate(config, workdir)
  assert not os.path.exists(os.path.join(workdir, 'checkpoints'))


def test_rows_too_long_are_refused_before_training(run):
  rows = run.train_rows[:6]
  check = lambda max_len, named: loop._check_lengths(  # pylint: disable=protected-access
      _with_max_len(run.config, max_len), run.loaded, run.tokenizer, named)
  # The text tokens of each row exactly as build_inputs lays it out: the
  # longest fits its own length and not one less.
  lengths = loop.encode(run, rows, answers=True)['input_mask'].sum(axis=1) - (
      run.loaded.num_image_tokens)
  longest = int(lengths.max())
  check(longest, {'t': (rows, True)})
  with pytest.raises(ValueError, match=f'max_len={longest - 1}:'
                     f' {int((lengths == longest).sum())} rows of \'t\''):
    check(longest - 1, {'t': (rows, True)})
  # An evaluation question longer than max_len is not refused: evaluation
  # pads to the longest question (a multiple of 8), which then fits whole.
  long = data.Row('77', rows[0].image, 'what ' * 40 + '?', rows[0].answers)
  eval_len = check(16, {'t': (rows, True), 'okvqa': ([long], False)})
  assert eval_len % 8 == 0 and eval_len > 40
  assert check(longest, {'t': (rows, True)}) == longest
  inputs = loop.encode(dataclasses.replace(run, eval_len=eval_len), [long],
                       answers=False)
  text = inputs['input_mask'].sum() - run.loaded.num_image_tokens
  assert eval_len - 8 < text <= eval_len
  assert inputs['tokens'].shape[1] == run.loaded.num_image_tokens + eval_len


def _with_max_len(config, max_len):
  config = config.copy_and_resolve_references()
  config.data.max_len = max_len
  return config


def test_a_question_too_long_is_named_with_the_key_to_raise(run):
  row = run.train_rows[0]
  long = data.Row(row.question_id, row.image, 'what ' * 40 + '?',
                  row.answers)
  with pytest.raises(ValueError, match=r"Row 0 .*question_id\): \['"
                     + row.question_id + r"'\]; raise config.data.max_len"):
    loop.encode(run, [long], answers=True)


@pytest.mark.slow  # A whole run in-process: ~30 s of compiling.
def test_the_gemma3_variant_trains_and_evaluates(inputs, tmp_path):
  from tests.vqa import vqa_helpers  # pylint: disable=g-import-not-at-top
  model_dir = vqa_helpers.save_tiny('gemma3', str(tmp_path / 'gemma3'),
                                    seed=vqa_helpers.SEEDS['gemma3'])
  config = vqa.get_config('gemma3_4b,spd')
  config.model.update(dict(path=model_dir, dtype='float32'))
  config.model.lora.update(dict(rank=4, alpha=4.0))
  config.data.update(dict(dir=inputs[1], val_size=8, max_val_examples=2,
                          max_eval_examples=2, near_ood=('vqa_cp',),
                          far_ood=('okvqa',)))
  config.eval.max_new_tokens = 2
  config.update(dict(batch_size=4, micro_batch_size=2, eval_batch_size=2,
                     num_train_steps=2, log_every_steps=1,
                     eval_every_steps=2, checkpoint_every_steps=2))
  results = loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert sorted(results) == sorted(
      f'test/{n}' for n in ('held_out', 'vqav2_val', 'vqa_cp', 'okvqa', 'id',
                            'near_ood', 'far_ood'))
  assert all(0.0 <= v <= 100.0 for v in results.values())
