r"""LoRA on PaliGemma (or Gemma 3) for VQAv2, tested on nine OOD VQA sets.

    python -m train.vqa --config configs/vqa.py:MODEL,METHOD \
        --workdir runs/MODEL_METHOD \
        --config.model.path=/data/models/paligemma-3b-pt-224 \
        --config.data.dir=/data/vqa

``MODEL``: ``paligemma_3b`` (the paper's, ``google/paligemma-3b-pt-224``),
``gemma3_4b`` (``google/gemma-3-4b-pt``) or ``smoke``; ``METHOD``: ``adamw``
(the LoRA baseline), ``spd`` (Adam-SPD, anchor 0 on the adapters, lambda
1e-4), ``l2sp`` or ``wise_ft`` (AdamW, then the adapters' fine-tuned delta
scaled by alpha = 0, 0.25, 0.5, 0.75, 1, each evaluated). ``:smoke`` is
``smoke,spd``: a tiny random PaliGemma and generated images, end to end on a
CPU. ``--config.num_train_steps=0`` evaluates the pre-trained model
(zero-shot) with the same command.

The paper's setting, as the authors' FRAMES-VQA runs it
(``projects/paligemma/*.yaml``): LoRA rank 8 on the language model's
``q_proj k_proj v_proj o_proj``; lr 1e-3, linear warmup over 1,000 steps
from 1e-4, cosine decay to 1e-4; their ``weight_decay`` 1e-4 is SPD's lambda
(and AdamW's decay for the baseline); 10 epochs; batch 16 with 2 accumulation
steps (32 rows per update); the prompt ``'answer en {question}'`` with the
answer as the suffix, the loss on the answer tokens only; greedy decoding.
Picking uses a held-out part of VQAv2 train (``data.val_size`` rows, our
choice); the ID test is VQAv2 val.

Weights to fetch (Hugging Face folders: config.json, *.safetensors,
tokenizer): ``google/paligemma-3b-pt-224``, ``google/gemma-3-4b-pt``. Data
under ``data.dir`` (``train.vqa.data.LAYOUTS`` lists every path):

- ``vqav2/``: ``v2_OpenEnded_mscoco_{train,val}2014_questions.json`` and
  ``v2_mscoco_{train,val}2014_annotations.json`` (visualqa.org);
  ``coco/train2014``, ``coco/val2014``, ``coco/val2017``: the COCO images.
- ``iv_vqa/iv_vqa_test.json``, ``cv_vqa/cv_vqa_test.json`` with their edited
  images in ``iv_vqa/images``, ``cv_vqa/images`` (Agarwal et al., CVPR 2020,
  as FRAMES-VQA's processed copies: a list of ``{question_id, question,
  answer: [10], image}``).
- ``vqa_rephrasings/v2_OpenEnded_mscoco_valrep2014_humans_og_questions.json``
  and ``..._annotations.json`` (Shah et al. 2019, on COCO val2014).
- ``vqa_cp/vqacp_v2_test_{questions,annotations}.json`` (Agrawal et al. 2018).
- ``vqa_ce/counterexamples.json`` (Dancette et al. 2021: question ids of
  VQAv2 val).
- ``advqa/v1_OpenEnded_mscoco_val2017_advqa_questions.json`` and
  ``v1_mscoco_val2017_advqa_annotations.json`` (Sheng et al. 2021).
- ``okvqa/OpenEnded_mscoco_val2014_questions.json`` and
  ``mscoco_val2014_annotations.json`` (Marino et al. 2019).
- ``textvqa/TextVQA_0.5.1_val.json`` with ``textvqa/train_images/`` (Singh et
  al. 2019).
- ``vizwiz/Annotations/val.json`` with ``vizwiz/val/`` (Gurari et al. 2018).

None of these was run here (no GPU, no weights, no data): ``:smoke`` runs
end to end on a CPU in under three minutes on a tiny random PaliGemma and
generated images laid out as the ten sets' files; its accuracies are those of
a random model.
"""

import ml_collections

MODELS = ('paligemma_3b', 'gemma3_4b', 'smoke')
METHODS = ('adamw', 'spd', 'l2sp', 'wise_ft')
NEAR_OOD = ('iv_vqa', 'cv_vqa', 'vqa_rephrasings', 'vqa_cp', 'vqa_ce',
            'advqa')
FAR_OOD = ('okvqa', 'textvqa', 'vizwiz')
# VQAv2 train has 443,757 questions; 5,000 are held out for picking.
TRAIN_ROWS = 443_757 - 5_000


def _parse(arg: str) -> tuple[str, str]:
  parts = [p for p in (arg or 'paligemma_3b').split(',') if p]
  model = parts[0]
  method = parts[1] if len(parts) > 1 else ('spd' if model == 'smoke'
                                            else 'adamw')
  if model not in MODELS or method not in METHODS or len(parts) > 2:
    raise ValueError(f'configs/vqa.py:{arg}: expected MODEL[,METHOD] with'
                     f' MODEL in {MODELS} and METHOD in {METHODS}.')
  return model, method


def _optimizer(method: str) -> ml_collections.ConfigDict:
  opt = ml_collections.ConfigDict()
  # 'adamw', 'spd' or 'l2sp' (train.core.optimizers.METHODS); WiSE-FT
  # trains with AdamW.
  opt.name = 'adamw' if method == 'wise_ft' else method
  opt.learning_rate = 1e-3  # Peak, after warmup.
  opt.warmup_steps = 1000  # Linear, from warmup_init_fraction of the peak.
  opt.warmup_init_fraction = 0.1  # Starts at 1e-4.
  opt.decay = 'cosine'
  opt.end_fraction = 0.1  # Cosine down to 1e-4.
  opt.weight_decay = 1e-4  # FRAMES-VQA's: SPD's lambda, AdamW's decay.
  opt.b1 = 0.9  # Adam's moments, as torch.optim.AdamW's defaults.
  opt.b2 = 0.999
  opt.eps = 1e-8
  opt.grad_clip_norm = 0.0  # None (LAVIS's runner does not clip).
  opt.decay_head = True  # No new head: SPD / L2-SP on every adapter.
  opt.anchor_dtype = ''  # Anchor 0 for LoRA: nothing stored.
  opt.skip_nonfinite = False  # optax.apply_if_finite, else stop on a NaN.
  opt.max_nonfinite = 5  # Consecutive skipped steps allowed.
  return opt


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """``arg``: ``MODEL[,METHOD]`` (see the module docstring)."""
  model, method = _parse(arg)
  config = ml_collections.ConfigDict()
  config.seed = 42  # LoRA init, held-out rows, data order, dropout.

  config.model = ml_collections.ConfigDict()
  config.model.path = ''  # Hugging Face folder (config.json, safetensors).
  config.model.dtype = 'bfloat16'  # Base weights and compute ('float32').
  config.model.remat = False  # Rematerialise the decoder blocks.
  config.model.lora = ml_collections.ConfigDict()
  config.model.lora.rank = 8  # FRAMES-VQA's PaliGemma LoRA.
  config.model.lora.alpha = 8.0  # Scale alpha / rank = 1 (PEFT's default).
  config.model.lora.dropout = 0.0  # On the adapters' input.
  config.model.lora.targets = ('q_proj', 'k_proj', 'v_proj', 'o_proj')
  config.model.lora.vision = False  # Adapters on SigLIP's attention too.

  config.data = ml_collections.ConfigDict()
  config.data.dir = ''  # Holds every set (see the module docstring).
  config.data.prompt = 'answer en {question}'  # PaliGemma's VQA prefix.
  config.data.max_len = 32  # Text tokens per row (prompt + answer), padded.
  config.data.val_size = 5000  # VQAv2 train rows held out for picking.
  config.data.max_val_examples = 5000  # Of those, scored at each eval.
  config.data.near_ood = NEAR_OOD  # Evaluated at the end, with VQAv2 val.
  config.data.far_ood = FAR_OOD
  config.data.max_eval_examples = 0  # > 0: the first N rows of each set.

  config.eval = ml_collections.ConfigDict()
  config.eval.max_new_tokens = 10  # Greedy decoding, stops at EOS.

  config.wise_ft = ml_collections.ConfigDict()
  # Alphas of the fine-tuned delta evaluated at the end (() = the end point
  # only); 0 is the pre-trained model, 1 the fine-tuned one.
  config.wise_ft.alphas = ((0.0, 0.25, 0.5, 0.75, 1.0) if method == 'wise_ft'
                           else ())

  config.optimizer = _optimizer(method)

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # Data-parallel axis; -1 = the remaining devices.
  config.mesh.fsdp = 1  # Parameter sharding axis (Tunix's 'fsdp').
  config.mesh.tp = 1  # Tensor-parallel axis (Tunix's 'tp').

  config.batch_size = 32  # Rows per optimizer step: 16 x 2 accumulation.
  config.micro_batch_size = 16  # Rows per forward pass (accumulated).
  config.eval_batch_size = 16  # Rows per generation program.
  config.num_train_steps = -(-10 * TRAIN_ROWS // 32)  # 10 epochs: 137,112.
  config.log_every_steps = 50
  config.eval_every_steps = 5000  # Held-out VQA accuracy (picking).
  config.checkpoint_every_steps = 1000  # Adapters + optimizer state.
  config.keep_checkpoints = 3
  config.async_checkpointing = True  # Orbax writes while training goes on.
  config.max_steps_per_run = 0  # > 0: save and exit after N steps.

  config.smoke = ml_collections.ConfigDict()
  config.smoke.enabled = False  # Generate a tiny model and data (no files).
  config.smoke.num_train = 48  # Generated VQAv2 train rows.
  config.smoke.num_eval = 4  # Generated rows per evaluation set.
  config.smoke.image_size = 32  # Of the generated images (model: its own).
  _for_model(config, model)
  return config


def _for_model(config: ml_collections.ConfigDict, model: str) -> None:
  """What differs per model (only the smoke run changes the protocol)."""
  if model == 'gemma3_4b':
    config.data.max_len = 48  # Gemma 3's chat-free prompt is longer.
    return
  if model != 'smoke':
    return
  config.smoke.enabled = True
  config.model.dtype = 'float32'  # CPU.
  config.model.lora.rank = 4
  config.model.lora.alpha = 4.0
  config.data.max_len = 16
  config.data.val_size = 8
  config.data.max_val_examples = 8
  config.eval.max_new_tokens = 3
  config.optimizer.warmup_steps = 2
  config.batch_size = 4
  config.micro_batch_size = 2  # Two micro-batches: accumulation runs.
  config.eval_batch_size = 4
  config.num_train_steps = 6
  config.log_every_steps = 2
  config.eval_every_steps = 3
  config.checkpoint_every_steps = 3
