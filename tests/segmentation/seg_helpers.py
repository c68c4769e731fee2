"""Tiny random Swin / UperNet models built and saved by ``transformers``.

The references of the segmentation model tests: ``transformers`` builds each
model small from its config, every tensor is then drawn at random (LayerNorm
and BatchNorm scales around 1, weights at 1 / sqrt(fan in), BatchNorm
running statistics and the relative position bias tables too, so that a
swapped or missing piece shows), and the model is saved as safetensors; our
loader reads the folder as it would a published one.
"""

import numpy as np

# A Swin small enough for seconds, with windows of 4 so that a 61 x 75 image
# pads at the patch (61 = 4 * 15 + 1), at the windows and at patch merging.
SWIN = dict(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4],
            window_size=4, patch_size=4, image_size=64, drop_path_rate=0.0,
            out_features=['stage1', 'stage2', 'stage3', 'stage4'])
# SegConfig.tiny's widths; the auxiliary head with two convs and the input
# concatenated (conv_cat), so that its every piece is compared.
HEAD = dict(hidden_size=32, auxiliary_channels=16, auxiliary_num_convs=2,
            auxiliary_concat_input=True, use_auxiliary_head=True)


def randomize(model, seed: int) -> None:
  """Every parameter and BatchNorm buffer drawn at random, in place."""
  import torch  # pylint: disable=g-import-not-at-top
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if name.endswith('weight') and p.ndim == 1:  # Norm scales.
        p.copy_(1.0 + 0.2 * noise)
      elif p.ndim >= 2 and 'relative_position' not in name:
        # Linear and conv weights at 1 / sqrt(fan in): activations O(1).
        p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
      else:  # Biases, the relative position bias tables.
        p.copy_(0.2 * noise)
    for name, b in model.named_buffers():
      if name.endswith('running_mean'):
        b.copy_(0.3 * torch.randn(b.shape, generator=gen))
      elif name.endswith('running_var'):
        b.copy_(0.5 + torch.rand(b.shape, generator=gen))


def swin_config(**overrides):
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.SwinConfig(**{**SWIN, **overrides})


def upernet(num_labels: int = 5, *, seed: int = 0, swin=None, **head):
  """A random ``UperNetForSemanticSegmentation`` (eval mode)."""
  import transformers  # pylint: disable=g-import-not-at-top
  config = transformers.UperNetConfig(
      backbone_config=swin_config(**(swin or {})), num_labels=num_labels,
      **{**HEAD, **head})
  model = transformers.UperNetForSemanticSegmentation(config)
  randomize(model, seed)
  return model.eval()


def swin_model(kind: str = 'model', *, seed: int = 0, **overrides):
  """A random ``SwinModel`` / ``SwinForImageClassification`` /
  ``SwinBackbone`` (``kind`` 'model', 'classification', 'backbone')."""
  import transformers  # pylint: disable=g-import-not-at-top
  cls = {'model': transformers.SwinModel,
         'classification': transformers.SwinForImageClassification,
         'backbone': transformers.SwinBackbone}[kind]
  extra = {'num_labels': 7} if kind == 'classification' else {}
  model = cls(swin_config(**overrides, **extra))
  randomize(model, seed)
  return model.eval()


def save(model, directory: str) -> str:
  model.save_pretrained(directory, safe_serialization=True)
  return directory


def pixels(height: int, width: int, *, batch: int = 2,
           seed: int = 0) -> np.ndarray:
  """Random normalised images, ``[B, H, W, 3]`` float32."""
  return np.random.default_rng(seed).normal(
      size=(batch, height, width, 3)).astype(np.float32)


def torch_features(backbone, images: np.ndarray) -> list[np.ndarray]:
  """A ``SwinBackbone``'s feature maps, NHWC."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    out = backbone(torch.from_numpy(images.transpose(0, 3, 1, 2)))
  return [f.numpy().transpose(0, 2, 3, 1) for f in out.feature_maps]


def torch_logits(model, images: np.ndarray) -> dict[str, np.ndarray]:
  """An UperNet's logits (and auxiliary logits), NHWC, in eval mode."""
  import torch  # pylint: disable=g-import-not-at-top
  x = torch.from_numpy(images.transpose(0, 3, 1, 2))
  with torch.no_grad():
    logits = model(x).logits
    features = model.backbone(x).feature_maps
    out = {'logits': logits}
    if model.auxiliary_head is not None:
      aux = model.auxiliary_head(features)
      out['auxiliary_logits'] = torch.nn.functional.interpolate(
          aux, size=x.shape[2:], mode='bilinear', align_corners=False)
  return {k: v.numpy().transpose(0, 2, 3, 1) for k, v in out.items()}
