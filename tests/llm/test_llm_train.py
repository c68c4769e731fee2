"""LoRA steps: only adapters move, SPD equals the float64 reference, any mesh.

In-process, on a tiny random Llama saved by ``transformers``; the 8-device
check runs in a fresh interpreter with 8 fake CPU devices.
"""

import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import commonsense
import spd_optax
from train.core import optimizers
from train.core import run_identity
from train.llm import checks
from train.llm import loop
from train.language import models
from train.llm import steps
from tests import llm_helpers
from tests import multidevice
from tests import reference

ALL = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj',
       'down_proj')


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  return llm_helpers.save_tiny('llama', str(tmp_path_factory.mktemp('hf')))


def _config(name, **optimizer):
  config = commonsense.get_config(f'smoke,{name}')
  config.optimizer.update(dict(warmup_steps=0, grad_clip_norm=0.0,
                               decay='cosine', **optimizer))
  config.num_train_steps = 10**7  # The learning rate is constant here.
  return config


def _batches(num, *, micro=1, rows=4, length=16, seed=0):
  rng = np.random.default_rng(seed)
  for _ in range(num):
    tokens = rng.integers(3, 96, (micro, rows, length)).astype(np.int32)
    valid = np.ones_like(tokens, bool)
    valid[:, 0, 12:] = False  # Some right padding.
    yield {'input_ids': jnp.asarray(tokens),
           'attention_mask': jnp.asarray(valid),
           'loss_mask': jnp.asarray(valid.astype(np.int32))}


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(x, np.float64)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _set_up(folder, mesh, config, dropout=0.0, dtype='float32'):
  loaded = models.load(folder, mesh=mesh, dtype=dtype)
  adapted = models.add_lora(loaded, models.LoraSpec(4, 8.0, dropout, ALL),
                            mesh=mesh, seed=0)
  tx = optimizers.make_optimizer(config, lora=True)
  lora = adapted.lora.to_pure_dict()
  object.__setattr__(adapted, 'tunix_config', loaded.config)  # For Scorer.
  return adapted, tx, lora, steps.initial_opt_state(tx, lora)


def _capturing(tx):
  """``tx`` after a link that keeps the gradients it is given in its state."""
  keep = optax.GradientTransformation(
      lambda params: jax.tree.map(jnp.zeros_like, params),
      lambda updates, state, params=None: (updates, updates))
  return optax.chain(keep, tx)


def test_spd_steps_move_only_the_adapters_and_equal_the_float64_reference(
    folder):
  # Two micro-batches a step and LoRA dropout: the reference is given the
  # gradient the optimizer was given (the mean of the two).
  mesh = llm_helpers.mesh()
  lr, lam, num = 3e-2, 1.0, 6
  adapted, tx, lora, opt_state = _set_up(
      folder, mesh, _config('spd', learning_rate=lr, weight_decay=lam),
      dropout=0.05)
  tx = _capturing(tx)
  opt_state = steps.initial_opt_state(tx, lora)
  base_before = _flat(adapted.base.to_pure_dict())
  start = _flat(lora)
  step = steps.make_train_step(adapted.graphdef, tx, dtype=jnp.float32,
                               spd=True)
  grads, fired = [], []
  with jax.set_mesh(mesh):
    for i, batch in enumerate(_batches(num, micro=2, seed=1)):
      lora, opt_state, _ = step(lora, opt_state, adapted.base, batch,
                                jax.random.key(i))
      grads.append(_flat(opt_state[0]))  # What the optimizer was given.
      fired.append(_flat(jax.tree.map(
          lambda d: d.projected, spd_optax.get_diagnostics(opt_state),
          is_leaf=lambda x: isinstance(x, spd_optax.ProjectionDiagnostics))))
  theta, history = reference.run_adamspd(
      start, {k: np.zeros_like(v) for k, v in start.items()},
      lambda theta, t: grads[t], num, lr=lr, lam=lam)
  ours = _flat(lora)
  # float32 steps against float64: Adam's bias correction 1 - b2**t loses
  # ~3e-5 of its value to float32 cancellation at t = 2, hence 2e-5 of each
  # leaf's scale (measured: 8e-6).
  for k in ours:
    assert np.abs(ours[k] - theta[k]).max() < 2e-5 * np.abs(theta[k]).max(), k
  assert [{k: bool(v) for k, v in f.items()} for f in fired] == history
  assert sum(map(sum, (h.values() for h in history))) > 0  # SPD fired.
  assert _flat(adapted.base.to_pure_dict()).keys() == base_before.keys()
  for k, v in _flat(adapted.base.to_pure_dict()).items():
    np.testing.assert_array_equal(v, base_before[k], err_msg=k)  # Bitwise.
  assert all(np.abs(ours[k]).max() > 0 for k in ours if 'lora_b' in k)


def test_bfloat16_compute_keeps_adapters_and_optimizer_state_float32(folder):
  mesh = llm_helpers.mesh()
  adapted, tx, lora, opt_state = _set_up(folder, mesh, _config('spd'),
                                         dtype='bfloat16')
  step = steps.make_train_step(adapted.graphdef, tx, dtype=jnp.bfloat16,
                               spd=True)
  batch = next(_batches(1))
  with jax.set_mesh(mesh):
    lora, opt_state, out = step(lora, opt_state, adapted.base, batch,
                                jax.random.key(0))
  assert {x.dtype for x in jax.tree.leaves(adapted.base)} == {
      jnp.dtype('bfloat16')}
  assert {x.dtype for x in jax.tree.leaves(lora)} == {jnp.dtype('float32')}
  assert {x.dtype for x in jax.tree.leaves(opt_state)
          if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype('float32')}
  # The loss of the same batch in float32 (before the step: the first step's
  # loss is the starting adapters').
  f32, _, start, _ = _set_up(folder, mesh, _config('spd'))
  total, count = steps.make_val_loss(f32.eval_graphdef, dtype=jnp.float32)(
      start, f32.base, jax.tree.map(lambda x: x[0], batch))
  assert abs(float(out['train/loss']) - total / count) < 1e-2 * total / count


@pytest.mark.slow  # An 8-device snippet: a process of its own.
def test_an_8_device_mesh_equals_one_device(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', llm_helpers.FAST_COMPILE)
  multidevice.run_with_devices('''
    import tempfile
    import jax, jax.numpy as jnp, numpy as np
    from tests import llm_helpers
    from tests.llm.test_llm_train import _batches, _config, _set_up
    from train.language import scoring
    from train.llm import steps
    from jax.sharding import NamedSharding, PartitionSpec as P

    folder = llm_helpers.save_tiny('llama', tempfile.mkdtemp())
    prompts = np.random.default_rng(3).integers(3, 96, (8, 16), np.int32)
    valid = np.ones((8, 16), bool)
    valid[:4, :5] = False  # Left padding for generation.

    def run(mesh):
      adapted, tx, lora, opt = _set_up(folder, mesh, _config('adamw'),
                                       dropout=0.05)
      step = steps.make_train_step(adapted.graphdef, tx, dtype=jnp.float32,
                                   spd=False)
      batch_sharding = NamedSharding(mesh, P(None, ('data', 'fsdp')))
      with jax.set_mesh(mesh):
        # Two rows per batch shard: with one, XLA:CPU's partitioner gets
        # this model's gradients wrong on a 2x2x2 mesh (see README).
        for i, batch in enumerate(_batches(2, micro=2, rows=8)):
          batch = jax.device_put(batch, batch_sharding)
          lora, opt, out = step(lora, opt, adapted.base, batch,
                                jax.random.key(i))
        scorer = scoring.Scorer(adapted.eval_graphdef, adapted.tunix_config,
                                mesh, max_new_tokens=6, eos_id=2, pad_id=0)
        generated = scorer.generate(lora, adapted.base, prompts, valid)
        scores = scorer.log_likelihoods(lora, adapted.base, prompts,
                                        np.ones_like(valid), valid)
      return adapted, lora, out, generated, scores

    mesh8 = llm_helpers.mesh((2, 2, 2), jax.devices())
    mesh1 = llm_helpers.mesh()
    a8, lora8, out8, gen8, ll8 = run(mesh8)
    a1, lora1, out1, gen1, ll1 = run(mesh1)
    sharded = [x.sharding.spec for x in jax.tree.leaves(a8.base)
               if 'fsdp' in str(x.sharding.spec) and 'tp' in str(
                   x.sharding.spec)]
    assert sharded and len(jax.tree.leaves(a8.base)[0].sharding.device_set) == 8
    for x, y in zip(jax.tree.leaves(jax.device_get(lora8)),
                    jax.tree.leaves(jax.device_get(lora1))):
      np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    for k in out1:
      np.testing.assert_allclose(out8[k], out1[k], rtol=1e-4, err_msg=k)
    np.testing.assert_array_equal(gen8, gen1)
    np.testing.assert_allclose(ll8, ll1, rtol=1e-5)
    print('ok')
  ''', num_devices=8)


# -- Configs ------------------------------------------------------------------

def test_every_setting_builds_and_says_how_to_run_it():
  assert 'python -m train.llm --config configs/commonsense.py:' in (
      commonsense.__doc__)
  for model in commonsense.MODELS:
    for name in commonsense.OPTIMIZERS:
      config = commonsense.get_config(f'{model},{name}')
      assert config.optimizer.name in optimizers.METHODS
      found = checks.problems(config, num_devices=1)
      if model == 'smoke':
        assert not found, found
      else:  # The folders are the user's to give.
        assert found == [
            "config.model.path='': must name a folder (or set"
            " config.smoke.enabled=True)",
            "config.data.dir='': must name a folder (or set"
            " config.smoke.enabled=True)"]
  paper = commonsense.get_config('llama7b,adamw')
  assert (paper.model.lora.rank, paper.model.lora.alpha,
          paper.optimizer.learning_rate, paper.batch_size,
          paper.data.cutoff_len) == (32, 64.0, 3e-4, 16, 256)
  with pytest.raises(ValueError, match='expected MODEL'):
    commonsense.get_config('llama9b')


BAD_VALUES = [
    ('model.lora.rank', 0, 'config.model.lora.rank=0: must be > 0'),
    ('model.lora.dropout', 1.0, 'config.model.lora.dropout=1.0: must be in'
     ' [0, 1)'),
    ('model.lora.targets', ('qkv',), "config.model.lora.targets=('qkv',):"
     ' must be a non-empty tuple of projections'),
    ('model.dtype', 'int8', "config.model.dtype='int8': must be one of"),
    ('data.test_sets', ('mmlu',), "config.data.test_sets=('mmlu',): must be"),
    ('eval.modes', ('beam',), "config.eval.modes=('beam',): must be"),
    ('optimizer.decay', 'step', "config.optimizer.decay='step': must be one"),
    ('optimizer.learning_rate', -1.0,
     'config.optimizer.learning_rate=-1.0: must be >= 0'),
    ('optimizer.name', 'sgd', "config.optimizer.name='sgd': must be one of"),
    ('micro_batch_size', 3, 'config.micro_batch_size=3: must divide'
     ' config.batch_size=4'),
    ('keep_checkpoints', 0, 'config.keep_checkpoints=0: must be >= 1'),
]


@pytest.mark.parametrize('key,value,message', BAD_VALUES,
                         ids=[k for k, _, _ in BAD_VALUES])
def test_a_bad_value_is_refused_naming_its_key(key, value, message):
  config = commonsense.get_config('smoke')
  section, _, field = key.rpartition('.')
  node = config
  for part in filter(None, section.split('.')):
    node = node[part]
  node[field] = value
  with pytest.raises(ValueError) as e:
    checks.check(config, num_devices=1)
  assert message in str(e.value)


def test_micro_batches_must_split_over_the_batch_shards():
  config = commonsense.get_config('smoke')
  config.mesh.tp = 2  # 8 devices, 4 batch shards; micro batch 2.
  assert checks.problems(config, num_devices=8) == [
      'config.micro_batch_size=2: must be a multiple of the 4 batch shards'
      ' (devices / mesh.tp)']


def test_a_workdir_is_its_identity_moved_or_not_and_another_is_refused(
    tmp_path):
  def claim(workdir, config):
    model_dir, data_dir = loop._inputs(config, workdir)  # pylint: disable=protected-access
    return run_identity.claim_workdir(
        workdir, config, ident=loop._identity(config, model_dir, data_dir),  # pylint: disable=protected-access
        resumable=loop.RESUMABLE)

  workdir = str(tmp_path / 'run')
  config = commonsense.get_config('smoke')
  ident = claim(workdir, config)
  assert set(ident['model']['path']) >= {'config.json', 'model.safetensors',
                                         'tokenizer.json'}
  config.max_steps_per_run = 3  # Resumable: allowed.
  config.eval.modes = ('loglik',)
  claim(workdir, config)
  moved = str(tmp_path / 'elsewhere' / 'run')  # Its smoke inputs move along.
  shutil.copytree(workdir, moved)
  assert claim(moved, config) == claim(workdir, config)
  config.model.lora.rank = 8
  with pytest.raises(ValueError, match=r"holds a run of a different config"
                     r" \(keys \['model.lora.rank'\] differ"):
    claim(moved, config)
  config.model.lora.rank = 4
  with open(os.path.join(moved, 'smoke', 'data', 'commonsense_170k.json'),
            'a') as f:
    f.write(' ')  # Other data bytes, same place: another run.
  with pytest.raises(ValueError, match=r"data.dir.commonsense_170k.json"):
    claim(moved, config)
  assert isinstance(config, ml_collections.ConfigDict)
