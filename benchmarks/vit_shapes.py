"""Parameter shapes of ViT-B/16 (timm layout: 86.6M float32 in 152 tensors)."""

import numpy as np


def vit_b16_shapes(num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
  """Name -> shape for ViT-B/16 at 224px with a fused qkv projection."""
  d, mlp, layers, tokens = 768, 3072, 12, 197
  shapes = {
      'patch_embed/kernel': (16, 16, 3, d),
      'patch_embed/bias': (d,),
      'cls_token': (1, 1, d),
      'pos_embed': (1, tokens, d),
  }
  for i in range(layers):
    b = f'blocks_{i}'
    shapes |= {
        f'{b}/norm1/scale': (d,), f'{b}/norm1/bias': (d,),
        f'{b}/attn/qkv/kernel': (d, 3 * d), f'{b}/attn/qkv/bias': (3 * d,),
        f'{b}/attn/proj/kernel': (d, d), f'{b}/attn/proj/bias': (d,),
        f'{b}/norm2/scale': (d,), f'{b}/norm2/bias': (d,),
        f'{b}/mlp/fc1/kernel': (d, mlp), f'{b}/mlp/fc1/bias': (mlp,),
        f'{b}/mlp/fc2/kernel': (mlp, d), f'{b}/mlp/fc2/bias': (d,),
    }
  shapes |= {'norm/scale': (d,), 'norm/bias': (d,),
             'head/kernel': (d, num_classes), 'head/bias': (num_classes,)}
  return shapes


def num_params(shapes) -> int:
  return int(sum(np.prod(s) for s in shapes.values()))
