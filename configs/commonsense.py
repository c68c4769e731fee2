r"""LoRA on a decoder LLM, the commonsense protocol of LLM-Adapters and DoRA.

    python -m train.llm --config configs/commonsense.py:MODEL,OPTIMIZER \
        --workdir runs/MODEL_OPTIMIZER \
        --config.model.path=/data/models/MODEL --config.data.dir=/data/llm_adapters

``MODEL``: ``llama7b`` (the paper's), ``llama2_7b``, ``llama3_8b``,
``qwen3_8b``, or ``smoke``; ``OPTIMIZER``: ``adamw`` (the LoRA baseline, as
the references run it: weight decay 0), ``spd`` (Adam-SPD, anchor 0 on the
adapters, lambda 1) or ``l2sp``. ``configs/commonsense.py:smoke`` is
``smoke,spd``.

Weights to fetch (Hugging Face folders: config.json, *.safetensors, the
tokenizer): ``yahma/llama-7b-hf``, ``meta-llama/Llama-2-7b-hf``,
``meta-llama/Meta-Llama-3-8B``, ``Qwen/Qwen3-8B-Base``. Data (``data.dir``):
LLM-Adapters' ``ft-training_set/commonsense_170k.json`` (170,420 rows) next
to its ``dataset/<set>/test.json`` for the eight sets (boolq, piqa,
social_i_qa, hellaswag, winogrande, ARC-Easy, ARC-Challenge, openbookqa), as
DoRA's ``commonsense_reasoning/`` lays them out.

The setting is DoRA's ``commonsense_reasoning`` scripts' with LoRA's row of
its README: rank 32, alpha 64, dropout 0.05 on q, k, v, up and down
projections; lr 3e-4, 100 warmup steps then linear decay, batch 16 (micro
batch 16), 3 epochs of the 170,300 rows left after holding out 120 for the
val loss (31,932 steps), cutoff 256 tokens, loss on the whole prompt
(``train_on_inputs``), gradients clipped at norm 1, bfloat16 compute with
float32 adapters and optimizer state. Evaluation: the response to each test
prompt is generated (at most 32 tokens; greedy, where the references use
4-beam search) and the set's answer word extracted from it.

Targets (DoRA's README, LoRA r32, average of the eight): LLaMA-7B 76.3,
LLaMA2-7B 77.6, LLaMA3-8B 80.8 (AdamW). The paper's claim: Adam-SPD above
them. Qwen3-8B: no published number. None of these was run here (no GPU);
``:smoke`` runs end to end on a CPU in about a minute on a tiny random Llama
and a few generated rows (its accuracies are those of a random model).
"""

import ml_collections

DATASETS = ('boolq', 'piqa', 'social_i_qa', 'hellaswag', 'winogrande',
            'ARC-Easy', 'ARC-Challenge', 'openbookqa')
MODELS = ('llama7b', 'llama2_7b', 'llama3_8b', 'qwen3_8b', 'smoke')
OPTIMIZERS = ('adamw', 'spd', 'l2sp')
# DoRA README, LoRA r32 lr 3e-4: the mean of the eight sets (%).
TARGETS = {'llama7b': 76.3, 'llama2_7b': 77.6, 'llama3_8b': 80.8}


def _parse(arg: str) -> tuple[str, str]:
  parts = [p for p in (arg or 'llama7b').split(',') if p]
  model = parts[0]
  optimizer = parts[1] if len(parts) > 1 else 'spd'
  if model not in MODELS or optimizer not in OPTIMIZERS or len(parts) > 2:
    raise ValueError(f'configs/commonsense.py:{arg}: expected MODEL[,OPTIMIZER]'
                     f' with MODEL in {MODELS} and OPTIMIZER in {OPTIMIZERS}.')
  return model, optimizer


def _optimizer(name: str) -> ml_collections.ConfigDict:
  opt = ml_collections.ConfigDict()
  opt.name = name  # 'adamw', 'spd' or 'l2sp' (train.core.optimizers.METHODS).
  opt.learning_rate = 3e-4  # Peak, after warmup (DoRA's LoRA rows).
  opt.warmup_steps = 100  # As the references' Trainer.
  opt.decay = 'linear'  # transformers' default scheduler (to 0 at the end).
  # AdamW: the references' Trainer default, 0 (so AdamW is Adam there).
  # SPD: lambda = 1, the paper's value for its Adam-SPD rows (its LLM
  # experiment's lambda is not stated in what we have); L2-SP: a start.
  opt.weight_decay = {'adamw': 0.0, 'spd': 1.0, 'l2sp': 1e-2}[name]
  opt.b1 = 0.9  # Adam's moments, as torch.optim.AdamW's defaults.
  opt.b2 = 0.999
  opt.eps = 1e-8
  opt.grad_clip_norm = 1.0  # transformers' Trainer default max_grad_norm.
  opt.decay_head = True  # No new head here: SPD / L2-SP on every adapter.
  opt.anchor_dtype = ''  # Anchor 0 for LoRA: nothing stored.
  opt.skip_nonfinite = False  # optax.apply_if_finite, else stop on a NaN.
  opt.max_nonfinite = 5  # Consecutive skipped steps allowed.
  return opt


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """``arg``: ``MODEL[,OPTIMIZER]`` (see the module docstring)."""
  model, optimizer = _parse(arg)
  config = ml_collections.ConfigDict()
  config.seed = 42  # LoRA init, held-out rows, data order, dropout.

  config.model = ml_collections.ConfigDict()
  config.model.path = ''  # Hugging Face folder (config.json, safetensors).
  config.model.dtype = 'bfloat16'  # Base weights and compute ('float32').
  config.model.remat = 'NONE'  # Tunix RematConfig: 'NONE', 'BLOCK', 'DECODER'.
  config.model.lora = ml_collections.ConfigDict()
  config.model.lora.rank = 32  # DoRA's LoRA rows: r = 32.
  config.model.lora.alpha = 64.0  # Scale alpha / rank = 2.
  config.model.lora.dropout = 0.05  # On the adapters' input (PEFT's).
  # Hugging Face projection names (train.language.families.PROJECTIONS).
  config.model.lora.targets = ('q_proj', 'k_proj', 'v_proj', 'up_proj',
                               'down_proj')

  config.data = ml_collections.ConfigDict()
  config.data.dir = ''  # Holds train_file and dataset/<set>/test.json.
  config.data.train_file = 'commonsense_170k.json'
  config.data.cutoff_len = 256  # Tokens per training row (longer: cut).
  config.data.train_on_inputs = True  # Loss on the prompt too (references).
  config.data.val_size = 120  # Rows held out for the val loss.
  config.data.test_sets = DATASETS  # Evaluated at the end.
  config.data.max_eval_examples = 0  # > 0: the first N rows of each set.

  config.eval = ml_collections.ConfigDict()
  config.eval.modes = ('generate',)  # And/or 'loglik' (train.llm.evaluate).
  config.eval.max_new_tokens = 32  # As the references' evaluation.

  config.optimizer = _optimizer(optimizer)

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # Data-parallel axis; -1 = the remaining devices.
  config.mesh.fsdp = 1  # Parameter sharding axis (Tunix's 'fsdp').
  config.mesh.tp = 1  # Tensor-parallel axis (Tunix's 'tp').

  config.batch_size = 16  # Rows per optimizer step, over all devices.
  config.micro_batch_size = 16  # Rows per forward pass (accumulated).
  config.eval_batch_size = 16  # Rows per evaluation program.
  config.num_train_steps = 31_932  # 3 epochs: 3 * ceil(170,300 / 16).
  config.log_every_steps = 10  # As the references' logging_steps.
  config.eval_every_steps = 80  # Val loss (the references' eval_step).
  config.checkpoint_every_steps = 500  # Adapters + optimizer state.
  config.keep_checkpoints = 3
  config.async_checkpointing = True  # Orbax writes while training goes on.
  config.max_steps_per_run = 0  # > 0: save and exit after N steps.

  config.smoke = ml_collections.ConfigDict()
  config.smoke.enabled = False  # Generate a tiny model and rows (no files).
  config.smoke.num_train = 64  # Generated training rows.
  config.smoke.num_test = 8  # Generated rows per test set.
  config.smoke.hidden_size = 64  # The tiny random Llama's sizes.
  config.smoke.num_layers = 2
  config.smoke.num_heads = 4
  config.smoke.num_kv_heads = 2
  config.smoke.intermediate_size = 128
  _for_model(config, model)
  return config


def _for_model(config: ml_collections.ConfigDict, model: str) -> None:
  """What differs per model (only the smoke run changes the protocol)."""
  if model != 'smoke':
    return
  config.smoke.enabled = True
  config.model.dtype = 'float32'  # CPU.
  config.model.lora.rank = 4
  config.model.lora.alpha = 8.0
  config.data.cutoff_len = 128
  config.data.val_size = 8
  config.eval.modes = ('generate', 'loglik')  # Both paths, end to end.
  config.eval.max_new_tokens = 8
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 2
  config.batch_size = 4
  config.micro_batch_size = 2  # Two micro-batches: accumulation runs.
  config.eval_batch_size = 8
  config.num_train_steps = 8
  config.log_every_steps = 2
  config.eval_every_steps = 4
  config.checkpoint_every_steps = 4
