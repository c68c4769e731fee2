"""``digits_domains``: real handwritten digits in shifted domains, as a TFDS set.

scikit-learn ships 1,797 handwritten digits (8x8 grey levels, from the UCI
optical digits set). This TFDS builder upsamples them to 32x32 RGB and renders
each one in several label-preserving domains, so that one input pipeline
serves them like any TFDS set and a laptop can study robustness to
distribution shift with nothing to download:

=========  ===================================================================
clean      the digit, bilinear upsampled, white on black, centred
rotate     rotated by 35 to 60 degrees either way
invert     black on white
noise      Gaussian pixel noise (sigma 0.4)
blur       Gaussian blur (sigma 1.6)
thick      strokes dilated (3x3 grey dilation)
color      random foreground and background colours
small      shrunk to half size at a random place
mixture    every domain above, for pre-training: the ``pretrain`` split only
=========  ===================================================================

and a second family of label-preserving shifts that the ``mixture`` never
holds, so that a model pre-trained on it has seen none of them ("far" OOD, as
against the "near" shifts above, which it saw without labels):

=========  ===================================================================
shear      sheared by 0.3 to 0.5 either way (an affine slant)
elastic    elastically deformed (a smooth random displacement field)
outline    hollow strokes: the outline of the thickened digit
occlude    a grey bar, 3 pixels wide, across the image at a random place
clutter    three random grey strokes in the background
=========  ===================================================================

Splits are fixed (seed 0) and disjoint by digit, the same in every domain:
``pretrain`` (697 digits: for a "foundation" model), ``train`` (400: for
fine-tuning), ``validation`` (300: model selection) and ``test`` (400). The
random parts of a domain (an angle, a colour) are seeded by the digit's index,
so every build is identical. Each example also carries that ``index``, so
that the renders of one digit in several domains can be told apart from
another digit's (views of one instance, for self-supervised pre-training).

Importing this module registers the builder with TFDS, as any TFDS dataset
module does: ``tfds.builder('digits_domains/rotate', data_dir=...)`` then
prepares it without downloading anything. The input pipeline does so on first
use when ``config.dataset.tfds_module = 'train.demo.digits_domains'`` and
``config.dataset.prepare = True``.

    >>> import tempfile
    >>> import tensorflow_datasets as tfds
    >>> from train.demo import digits_domains
    >>> data_dir = tempfile.mkdtemp()
    >>> digits_domains.build(data_dir, configs=('rotate',))  # ~1 s each.
    >>> ds = tfds.data_source('digits_domains/rotate', split='test',
    ...                       data_dir=data_dir)
    >>> len(ds), ds[0]['image'].shape
    (400, (32, 32, 3))

Written as ``array_record`` files with ``Tensor`` features, so neither
building nor reading needs TensorFlow.
"""

import contextlib
import io

import numpy as np
from scipy import ndimage
import tensorflow_datasets as tfds

IMAGE_SIZE = 32
SHIFTS = ('rotate', 'invert', 'noise', 'blur', 'thick', 'color', 'small')
DOMAINS = ('clean',) + SHIFTS  # What the pre-training mixture holds.
FAR_SHIFTS = ('shear', 'elastic', 'outline', 'occlude', 'clutter')
ALL_DOMAINS = DOMAINS + FAR_SHIFTS
SPLIT_SIZES = {'pretrain': 697, 'train': 400, 'validation': 300, 'test': 400}


def split_indices() -> dict[str, np.ndarray]:
  """Digit indices of each split: a fixed permutation of the 1,797 digits."""
  order = np.random.default_rng(0).permutation(1797)
  out, start = {}, 0
  for name, size in SPLIT_SIZES.items():
    out[name] = np.sort(order[start:start + size])
    start += size
  return out


def _clean(digit: np.ndarray) -> np.ndarray:
  """8x8 grey levels in [0, 16] -> 32x32 in [0, 1], a 2-pixel border."""
  img = ndimage.zoom(digit.astype(np.float64) / 16.0, 28 / 8, order=1)
  out = np.zeros((IMAGE_SIZE, IMAGE_SIZE))
  out[2:30, 2:30] = np.clip(img, 0.0, 1.0)
  return out


def _far(x: np.ndarray, domain: str, rng: np.random.Generator) -> np.ndarray:
  """A ``FAR_SHIFTS`` domain of the clean 32x32 digit ``x`` (in [0, 1])."""
  size = IMAGE_SIZE
  if domain == 'shear':
    s = rng.uniform(0.3, 0.5) * rng.choice([-1, 1])
    centre = (size - 1) / 2
    # Output (r, c) reads input (r, c + s (r - centre)): rows slide sideways.
    return ndimage.affine_transform(x, [[1, 0], [s, 1]],
                                    offset=[0, -s * centre], order=1)
  if domain == 'elastic':
    dy, dx = (ndimage.gaussian_filter(rng.uniform(-1, 1, x.shape), 4.0) * 30
              for _ in range(2))
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing='ij')
    return ndimage.map_coordinates(x, [rows + dy, cols + dx], order=1)
  if domain == 'outline':
    thick = ndimage.grey_dilation(x, size=(3, 3), mode='constant')
    edge = ndimage.morphological_gradient(thick, size=(3, 3), mode='constant')
    return edge / max(edge.max(), 1e-6)
  if domain == 'occlude':
    x = x.copy()
    start = rng.integers(8, size - 11)
    if rng.random() < 0.5:
      x[start:start + 3] = 0.5
    else:
      x[:, start:start + 3] = 0.5
    return x
  if domain == 'clutter':
    strokes = np.zeros_like(x)
    for _ in range(3):
      (r0, c0), (r1, c1) = rng.uniform(0, size - 1, (2, 2))
      t = np.linspace(0, 1, 64)
      strokes[np.round(r0 + t * (r1 - r0)).astype(int),
              np.round(c0 + t * (c1 - c0)).astype(int)] = 0.6
    return np.maximum(x, strokes)
  raise ValueError(f'Unknown domain {domain!r}; known: {ALL_DOMAINS}.')


def render(digit: np.ndarray, domain: str, index: int) -> np.ndarray:
  """The 32x32x3 uint8 image of an 8x8 ``digit`` in ``domain``."""
  rng = np.random.default_rng([index, ALL_DOMAINS.index(domain)])
  x = _clean(digit)
  fg, bg = np.ones(3), np.zeros(3)
  if domain == 'rotate':
    angle = rng.uniform(35, 60) * rng.choice([-1, 1])
    x = ndimage.rotate(x, angle, reshape=False, order=1)
  elif domain == 'invert':
    fg, bg = bg, fg
  elif domain == 'noise':
    x = x + rng.normal(0.0, 0.4, x.shape)
  elif domain == 'blur':
    x = ndimage.gaussian_filter(x, 1.6)
    x = x / max(x.max(), 1e-6)
  elif domain == 'thick':
    x = ndimage.grey_dilation(x, size=(3, 3))
  elif domain == 'color':
    fg, bg = rng.uniform(0.5, 1.0, 3), rng.uniform(0.0, 0.45, 3)
    if rng.random() < 0.5:
      fg, bg = bg, fg
  elif domain == 'small':
    small = ndimage.zoom(x, 0.5, order=1)
    x = np.zeros_like(x)
    top, left = rng.integers(0, IMAGE_SIZE - small.shape[0] + 1, 2)
    x[top:top + small.shape[0], left:left + small.shape[1]] = small
  elif domain != 'clean':
    x = _far(x, domain, rng)
  x = np.clip(x, 0.0, 1.0)[..., None]
  img = bg * (1.0 - x) + fg * x
  return np.round(img * 255).astype(np.uint8)


class DigitsDomains(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's handwritten digits in shifted domains (see module doc)."""

  VERSION = tfds.core.Version('3.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.',
                   '2.0.0': 'Validation of 300 digits; an index feature.',
                   '3.0.0': 'Far shifts, never in the mixture.'}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name=d, description=f'Digits, {d} domain.')
      for d in ALL_DOMAINS + ('mixture',)
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(
                shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=10),
            'domain': tfds.features.ClassLabel(names=list(ALL_DOMAINS)),
            'index': tfds.features.Scalar(dtype=np.int32),  # Of the digit.
        }),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: scikit-learn ships the digits.
    splits = split_indices()
    if self.builder_config.name == 'mixture':  # 8 renders of each digit.
      splits = {'pretrain': splits['pretrain']}
    return {name: self._generate_examples(indices)
            for name, indices in splits.items()}

  def _generate_examples(self, indices):
    # Imported here: it takes seconds, and only building the set needs it.
    from sklearn import datasets  # pylint: disable=g-import-not-at-top
    digits = datasets.load_digits()
    domains = DOMAINS if self.builder_config.name == 'mixture' else (
        self.builder_config.name,)
    for i in indices:
      for domain in domains:
        yield f'{i}_{domain}', {
            'image': render(digits.images[i], domain, int(i)),
            'label': int(digits.target[i]),
            'domain': domain,
            'index': int(i),
        }


def build(data_dir: str, configs=ALL_DOMAINS + ('mixture',)) -> None:
  """Prepares the named configs under ``data_dir`` (a no-op when present)."""
  for name in configs:
    builder = DigitsDomains(config=name, data_dir=data_dir,
                            file_format='array_record')
    # TFDS's is_prepared() warns about a folder it does not find; ask it
    # only about one that exists.
    if not (builder.data_path.exists() and builder.is_prepared()):
      tfds.disable_progress_bar()  # Ours say enough.
      # TFDS prints its progress to stdout; keep stdout for the caller.
      with contextlib.redirect_stdout(io.StringIO()):
        builder.download_and_prepare()
