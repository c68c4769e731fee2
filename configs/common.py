"""Defaults shared by every config; each config overrides what it changes."""

import ml_collections

# CLIP's 7-prompt subset of its 80 ImageNet templates (OpenAI's notebook
# Prompt_Engineering_for_ImageNet.ipynb): a sensible default for any dataset.
CLIP_TEMPLATES = (
    'itap of a {}.',
    'a bad photo of the {}.',
    'a origami {}.',
    'a photo of the large {}.',
    'a {} in a video game.',
    'art of the {}.',
    'a photo of the small {}.',
)


def base_config() -> ml_collections.ConfigDict:
  """Every field a run reads, with one comment each."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Model init, data order and augmentation all derive from it.

  config.model = ml_collections.ConfigDict()
  config.model.name = 'b/16'  # A key of train.vision.vit.MODEL_CONFIGS.
  config.model.num_classes = 1000  # Size of the (new) head.
  config.model.pool = ''  # 'cls' or 'mean'; '' keeps the variant's default.
  config.model.drop_path_rate = 0.0  # Stochastic depth (0.2 in the paper).
  config.model.lora_rank = 0  # > 0: LoRA adapters, only they (and the head) train.
  config.model.lora_alpha = 0.0  # LoRA scale numerator; 0 = the rank.
  config.model.dtype = ''  # Activations, e.g. 'bfloat16' on GPU/TPU; '' = f32.
  config.model.param_dtype = 'float32'  # 'float64' needs JAX_ENABLE_X64=1.
  config.model.head_init = ''  # 'zeroshot' (CLIP): CLIP's zero-shot head; '' = zeros.

  config.pretrained = ml_collections.ConfigDict()
  config.pretrained.path = ''  # HF folder / .safetensors / .npz; '' = random init.
  config.pretrained.dont_load = ('head',)  # Regexes of params kept fresh.

  config.zeroshot = ml_collections.ConfigDict()  # See train.vision.zeroshot_main.
  config.zeroshot.class_names = ''  # File, one name a line; '' = TFDS label names.
  config.zeroshot.templates = CLIP_TEMPLATES  # Prompts; '{}' is the class name.
  config.zeroshot.tokenizer = ''  # tokenizer.json; '' = pretrained.path's.

  config.dataset = ml_collections.ConfigDict()  # See train.vision.input_pipeline.
  config.dataset.name = ''  # TFDS name, e.g. 'imagenet2012'.
  config.dataset.data_dir = ''  # TFDS data_dir; '' = TFDS's default.
  config.dataset.tfds_module = ''  # Imported first: registers a custom builder.
  config.dataset.prepare = False  # Prepare a missing set on first use
  # (for sets TFDS builds without manual downloads, e.g. digits_domains).
  config.dataset.train_split = 'train'
  config.dataset.val_split = ''  # In-distribution validation (model selection).
  config.dataset.eval_split = 'validation'  # In-distribution test.
  config.dataset.image_size = 224
  config.dataset.num_classes = 1000
  config.dataset.mean = (0.5, 0.5, 0.5)  # Per-channel normalisation.
  config.dataset.std = (0.5, 0.5, 0.5)
  config.dataset.crop_fraction = 0.875  # Eval: resize to size/0.875, crop.
  config.dataset.cache_in_memory = False  # A small set: decode it once.
  config.dataset.ood = ml_collections.ConfigDict()  # Name -> {name, split}.
  config.dataset.augment = ml_collections.ConfigDict()
  config.dataset.augment.random_resized_crop = True
  config.dataset.augment.crop_scale = (0.08, 1.0)
  config.dataset.augment.flip = True
  config.dataset.augment.mixup_alpha = 0.8  # 0 = off.
  config.dataset.augment.cutmix_alpha = 1.0  # 0 = off.
  config.dataset.augment.mix_prob = 1.0
  config.dataset.augment.switch_prob = 0.5  # Mixup vs CutMix.
  config.dataset.augment.label_smoothing = 0.1

  # What trains (train.lp_ft): 'full' fine-tuning; 'linear_probe' (the head
  # only, backbone frozen); 'lp_ft': a linear probe for lp_ft.probe_steps,
  # then num_train_steps of full fine-tuning from the probed head.
  config.train_mode = 'full'
  config.lp_ft = ml_collections.ConfigDict()
  config.lp_ft.probe_steps = 0  # Stage 1 of 'lp_ft' (Adam on the head).
  config.lp_ft.probe_learning_rate = 1e-3  # Its peak (warmup + cosine).

  # WiSE-FT (train.vision.wise_ft_main): at the end of a run, evaluate the weights
  # (1 - alpha) * start + alpha * fine-tuned for each alpha; () = off.
  config.wise_ft = ml_collections.ConfigDict()
  config.wise_ft.alphas = ()

  config.optimizer = ml_collections.ConfigDict()
  # 'adam', 'adamw', 'l2sp', 'spd', 'projection' (SPD's non-selective
  # ablation: every layer projected at every step) or 'ftp' (FTP's AdamP).
  config.optimizer.name = 'spd'
  config.optimizer.learning_rate = 2e-5  # Peak of warmup + cosine.
  config.optimizer.warmup_steps = 500
  config.optimizer.weight_decay = 1.0  # lambda of SPD / L2-SP /
  # projection, AdamW's decay, or FTP's k in [0, 1].
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-8
  config.optimizer.grad_clip_norm = 1.0  # 0 = no clipping.
  config.optimizer.decay_head = False  # SPD/L2-SP on the new head too.
  config.optimizer.anchor_dtype = ''  # e.g. 'bfloat16'; '' = the params'.
  config.optimizer.skip_nonfinite = False  # optax.apply_if_finite, else stop.
  config.optimizer.max_nonfinite = 5  # Consecutive skipped steps allowed.

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # Data-parallel axis size; -1 = all remaining devices.
  config.mesh.fsdp = 1  # Parameter/optimizer sharding axis size.

  config.batch_size = 512  # Global, over all devices and hosts.
  config.eval_batch_size = 512
  config.num_train_steps = 10_000
  config.log_every_steps = 50
  config.eval_every_steps = 1000  # Also at the end.
  config.checkpoint_every_steps = 1000  # Also at the end.
  config.keep_checkpoints = 3
  config.async_checkpointing = True  # Orbax writes while training goes on.
  config.max_steps_per_run = 0  # > 0: save and exit after this many steps
  # (for time-limited jobs); the same command then resumes. 0 = no limit.
  config.progress_bar = True
  return config
