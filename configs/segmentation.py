r"""Swin-T + UperNet on PASCAL-Context 59, clean and corrupted (the paper's
dense-prediction experiment).

    python -m train.segmentation --config configs/segmentation.py:smoke \
        --workdir runs/seg_smoke
    python -m train.segmentation --config configs/segmentation.py:spd \
        --workdir runs/seg_spd \
        --config.model.path=/data/swin-tiny-patch4-window7-224 \
        --config.data.dir=/data/VOCdevkit/VOC2010

Variants: ``adamw`` (the baseline), ``l2sp``, ``spd`` (Adam-SPD on the
backbone), ``projection`` (SPD's non-selective ablation), ``linear_probe``
(backbone frozen, the decoder alone trained), ``smoke``. The same workdir
resumes; any field can be overridden on the command line.

Weights to fetch: ``microsoft/swin-tiny-patch4-window7-224`` (a Hugging Face
folder: config.json, model.safetensors), loaded as the backbone under a new
UperNet head (``train.segmentation.pretrained``); a whole
``UperNetForSemanticSegmentation`` folder loads too. Data: PASCAL-Context
converted by mmsegmentation's ``tools/dataset_converters/pascal_context.py``
(VOC2010 ``JPEGImages``, ``SegmentationClassContext`` PNGs, 0 background and
1..59, ``ImageSets/SegmentationContext/{train,val}.txt``: 4,996 and 5,104
images).

The setting. The authors never released their segmentation code, so this
follows mmsegmentation's public configs: the data pipeline of
``configs/_base_/datasets/pascal_context_59.py`` (random rescale 0.5-2 of
520 x 520 keeping the aspect, 480 crops with cat_max_ratio 0.75, flip,
photometric distortion; test: the image fitted in 520 x 520, sliding 480
windows with stride 320 as the PASCAL-Context 59 model configs' ``test_cfg``,
logits resized back; 59 classes, background ignored), the
model and optimizer of ``configs/swin/swin-tiny-patch4-window7-in1k-pre_
upernet_8xb2-160k_ade20k-512x512.py`` (UperNet 512 channels, auxiliary FCN
head 256 channels with loss weight 0.4, drop path 0.3; AdamW lr 6e-5,
betas (0.9, 0.999), weight decay 0.01, 1500 linear warmup iterations, then
linear ("poly", power 1) decay to 0) and PASCAL-Context 59's 80k-iteration
schedule at batch 16 (its ``*_4xb4-80k_pascal-context-59-480x480`` configs).
AdamW's decay leaves out norms and relative-position tables, as mmseg's
``paramwise_cfg`` (``optimizer.no_decay``); SyncBN is BatchNorm over the
global batch. SPD's lambda (1.0) and L2-SP's (1e-2) are
starting points, not tuned values: the paper does not state them for this
experiment. Evaluation: mIoU on the validation set, clean and under fog,
defocus blur, Gaussian noise and brightness at severities 1-5
(``train.segmentation.corruptions``), each corruption's mean over
severities. No number here was measured on PASCAL-Context (no GPU, no
data); ``:smoke`` runs on CPU in about two minutes (docs/segmentation.md).
"""

import ml_collections

VARIANTS = ('adamw', 'l2sp', 'spd', 'projection', 'linear_probe', 'smoke')
CORRUPTIONS = ('fog', 'defocus_blur', 'gaussian_noise', 'brightness')


def _optimizer(name: str) -> ml_collections.ConfigDict:
  opt = ml_collections.ConfigDict()
  # train.core.optimizers.METHODS, on the backbone; the decoder: AdamW.
  opt.name = name
  opt.learning_rate = 6e-5  # mmseg's Swin + UperNet AdamW.
  opt.warmup_steps = 1500  # mmseg: LinearLR over 1500 iterations.
  opt.decay = 'linear'  # mmseg: PolyLR, power 1.0, eta_min 0.
  # The backbone's: AdamW's decoupled decay, SPD's lambda, L2-SP's lambda.
  opt.weight_decay = {'adamw': 0.01, 'spd': 1.0, 'projection': 1.0,
                      'l2sp': 1e-2}[name]
  opt.head_weight_decay = 0.01  # The new decoder's AdamW decay (mmseg's).
  # No AdamW decay on these (regular expressions over leaf paths): mmseg's
  # paramwise_cfg for Swin (norms, relative position tables; the heads'
  # BatchNorm too, named batch_norm here). SPD / L2-SP anchor every leaf.
  opt.no_decay = ('norm', 'relative_position_bias_table')
  opt.b1 = 0.9
  opt.b2 = 0.999
  opt.eps = 1e-8
  opt.grad_clip_norm = 0.0  # mmseg's Swin configs do not clip.
  opt.decay_head = True  # Inside the backbone every leaf is anchored.
  opt.anchor_dtype = ''  # The anchor in the params' dtype.
  opt.skip_nonfinite = False  # optax.apply_if_finite, else stop on a NaN.
  opt.max_nonfinite = 5
  return opt


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """``arg``: one of :data:`VARIANTS` (default ``spd``)."""
  variant = arg or 'spd'
  if variant not in VARIANTS:
    raise ValueError(f'configs/segmentation.py:{arg}: expected one of'
                     f' {VARIANTS}.')
  method = {'linear_probe': 'adamw', 'smoke': 'spd'}.get(variant, variant)
  config = ml_collections.ConfigDict()
  config.seed = 0  # Head init, data order, augmentation, drop path, noise.
  config.train_mode = 'linear_probe' if variant == 'linear_probe' else (
      'finetune')  # 'finetune' or 'linear_probe' (backbone frozen).

  config.model = ml_collections.ConfigDict()
  config.model.path = ''  # HF folder: a Swin backbone or a whole UperNet.
  config.model.decode_channels = 512  # UperNet's channels (new head).
  config.model.auxiliary_channels = 256  # The FCN head's (new head).
  config.model.auxiliary_loss_weight = 0.4
  config.model.drop_path_rate = 0.3  # mmseg's Swin-T (HF's config: 0.1).
  config.model.tiny = False  # A tiny Swin + UperNet from scratch (smoke).

  config.data = ml_collections.ConfigDict()
  config.data.dir = ''  # VOC2010 after mmseg's converter (see above).
  config.data.num_classes = 59
  config.data.scale = (520, 520)  # RandomResize's scale ...
  config.data.ratio_range = (0.5, 2.0)  # ... times a ratio in this range.
  config.data.crop = 480  # RandomCrop (then padded to it, label 255).
  config.data.cat_max_ratio = 0.75
  config.data.eval_scale = (520, 520)  # Test: the image fitted in this.
  # mmseg's PASCAL-Context test: 'slide' (windows of slide_crop every
  # slide_stride, logits averaged) on the image fitted in eval_scale; 'whole'.
  config.data.eval_mode = 'slide'
  config.data.slide_crop = 480
  config.data.slide_stride = 320
  config.data.max_eval_images = 0  # > 0: the first N validation images.
  config.data.threads = 4  # grain's reader threads (order is unchanged).

  config.corruptions = ml_collections.ConfigDict()
  config.corruptions.names = CORRUPTIONS  # ImageNet-C's, at the end.
  config.corruptions.severities = (1, 2, 3, 4, 5)
  config.corruptions.max_images = 0  # > 0: the first N images corrupted.

  config.optimizer = _optimizer(method)

  config.batch_size = 16  # Over all devices (mmseg: 4 GPUs x 4).
  config.num_train_steps = 80_000
  config.log_every_steps = 50
  config.eval_every_steps = 8_000  # Clean mIoU (the full table at the end).
  config.eval_at_start = True  # The starting model's clean mIoU, step 0.
  config.checkpoint_every_steps = 4_000
  config.keep_checkpoints = 3
  config.async_checkpointing = True
  config.max_steps_per_run = 0  # > 0: save and exit after N steps.

  config.smoke = ml_collections.ConfigDict()
  config.smoke.enabled = False  # Generated digits scenes, no files needed.
  config.smoke.num_train = 240
  config.smoke.num_val = 40
  config.smoke.size = 48  # Canvas side (pixels).
  config.smoke.per_scene = 5  # Digits per scene.
  config.smoke.zoom = 2  # Each 8x8 digit drawn 16x16.
  if variant == 'smoke':
    _smoke(config)
  return config


def _smoke(config: ml_collections.ConfigDict) -> None:
  """A tiny Swin + UperNet from scratch on digits scenes, on a CPU."""
  config.smoke.enabled = True
  config.model.tiny = True
  config.model.decode_channels = 32
  config.model.auxiliary_channels = 16
  config.model.drop_path_rate = 0.0
  config.data.num_classes = 11  # Background + ten digits.
  config.data.scale = (48, 48)
  config.data.ratio_range = (0.75, 1.5)
  config.data.crop = 32
  config.data.eval_scale = (48, 48)
  config.data.eval_mode = 'whole'  # The 48 x 48 scenes: one window.
  config.data.threads = 0
  config.optimizer.learning_rate = 4e-3  # From scratch.
  config.optimizer.warmup_steps = 20
  config.batch_size = 8
  config.num_train_steps = 400
  config.log_every_steps = 50
  config.eval_every_steps = 400
  config.checkpoint_every_steps = 100
