"""Parameter shapes of ViTs (timm layout) at 224px, and a way to shrink them.

ViT-B/16: 86.6M float32 in 152 tensors; ViT-L/14: 304M in 296.
"""

import numpy as np


def vit_shapes(width: int, depth: int, mlp_dim: int, patch: int,
               image_size: int = 224,
               num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
  """Name -> shape of a ViT with a fused qkv projection and a class token."""
  d, tokens = width, (image_size // patch) ** 2 + 1
  shapes = {
      'patch_embed/kernel': (patch, patch, 3, d),
      'patch_embed/bias': (d,),
      'cls_token': (1, 1, d),
      'pos_embed': (1, tokens, d),
  }
  for i in range(depth):
    b = f'blocks_{i}'
    shapes |= {
        f'{b}/norm1/scale': (d,), f'{b}/norm1/bias': (d,),
        f'{b}/attn/qkv/kernel': (d, 3 * d), f'{b}/attn/qkv/bias': (3 * d,),
        f'{b}/attn/proj/kernel': (d, d), f'{b}/attn/proj/bias': (d,),
        f'{b}/norm2/scale': (d,), f'{b}/norm2/bias': (d,),
        f'{b}/mlp/fc1/kernel': (d, mlp_dim), f'{b}/mlp/fc1/bias': (mlp_dim,),
        f'{b}/mlp/fc2/kernel': (mlp_dim, d), f'{b}/mlp/fc2/bias': (d,),
    }
  shapes |= {'norm/scale': (d,), 'norm/bias': (d,),
             'head/kernel': (d, num_classes), 'head/bias': (num_classes,)}
  return shapes


def vit_b16_shapes(num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
  return vit_shapes(768, 12, 3072, 16, num_classes=num_classes)


def vit_l14_shapes(num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
  return vit_shapes(1024, 24, 4096, 14, num_classes=num_classes)


def shrink(shapes, factor: int) -> dict[str, tuple[int, ...]]:
  """Every dimension divided by ``factor`` (at least 1): the same tensors,
  ``factor**2`` times fewer elements in a matrix."""
  return {k: tuple(max(1, s // factor) for s in v) for k, v in shapes.items()}


def num_params(shapes) -> int:
  return int(sum(np.prod(s) for s in shapes.values()))
