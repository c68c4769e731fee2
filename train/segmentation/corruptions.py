r"""Four ImageNet-C corruptions at severities 1-5, for the validation images.

Hendrycks and Dietterich, *Benchmarking Neural Network Robustness to Common
Corruptions and Perturbations*, ICLR 2019. The constants are those of the
paper's reference code (``hendrycks/robustness``,
``ImageNet-C/imagenet_c/imagenet_c/corruptions.py``), which the
``imagecorruptions`` package keeps for these four; that package is not
installed here (it needs OpenCV and scikit-image), so each is written from
its definition with NumPy / SciPy. On an image :math:`x \in [0, 1]^{H
\times W \times 3}` (the 0..255 input divided by 255), with severity
constant :math:`c`:

- ``gaussian_noise``: :math:`\mathrm{clip}(x + \mathcal N(0, c^2))`,
  :math:`c \in (.08, .12, .18, .26, .38)`, independently per value.
- ``brightness``: in HSV, :math:`v \leftarrow \mathrm{clip}(v + c)`,
  :math:`c \in (.1, .2, .3, .4, .5)`, back to RGB.
- ``defocus_blur``: each channel correlated with a disk kernel of radius
  :math:`r` (the pixels of a :math:`17^2` grid, or :math:`(2r+1)^2` for
  :math:`r > 8`, with :math:`i^2 + j^2 \le r^2`, normalised to sum 1),
  anti-aliased by a :math:`3 \times 3` (:math:`5 \times 5` for
  :math:`r > 8`) Gaussian of standard deviation :math:`s`;
  :math:`(r, s) \in ((3, .1), (4, .5), (6, .5), (8, .5), (10, .5))`.
  Borders reflect without repeating the edge (OpenCV's default,
  ``BORDER_REFLECT_101``, SciPy's ``'mirror'``).
- ``fog``: :math:`\mathrm{clip}((x + a F)\, m / (m + a))` with
  :math:`m = \max x` and :math:`F \in [0, 1]` a diamond-square plasma
  fractal whose noise amplitude divides by :math:`d` each octave;
  :math:`(a, d) \in ((1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4))`.
  The reference draws a :math:`256^2` fractal for its :math:`224^2` images;
  for any size, the fractal's side is the next power of two of the longest
  side (as ``imagecorruptions`` does), cropped to the image.

Each returns floats in ``[0, 255]``; :func:`corrupt` truncates them to
uint8 as the reference's ``make_imagenet_c.py`` saves them. Randomness comes
from a ``numpy.random.Generator``; :func:`corrupt` seeds it with
``(seed, index, corruption, severity)``, so every image's corrupted copy is
the same on every run and process.

>>> import numpy as np
>>> image = np.full((4, 4, 3), 100, np.uint8)
>>> corrupt(image, 'brightness', 1, seed=0, index=0)[0, 0].tolist()
[125, 125, 125]
"""

import numpy as np
from matplotlib import colors
from scipy import ndimage

NAMES = ('fog', 'defocus_blur', 'gaussian_noise', 'brightness')
SEVERITIES = (1, 2, 3, 4, 5)

GAUSSIAN_NOISE = (0.08, 0.12, 0.18, 0.26, 0.38)
BRIGHTNESS = (0.1, 0.2, 0.3, 0.4, 0.5)
DEFOCUS = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))
FOG = ((1.5, 2.0), (2.0, 2.0), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))


def _check(image: np.ndarray, severity: int) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'Expected an [H, W, 3] image, got shape {image.shape}.')
  if severity not in SEVERITIES:
    raise ValueError(f'severity={severity!r}: must be one of {SEVERITIES}.')
  return image.astype(np.float64) / 255.0


def gaussian_noise(image, severity: int, rng: np.random.Generator):
  """Additive Gaussian noise of standard deviation ``GAUSSIAN_NOISE[s-1]``."""
  x = _check(image, severity)
  c = GAUSSIAN_NOISE[severity - 1]
  return np.clip(x + rng.normal(size=x.shape, scale=c), 0, 1) * 255


def brightness(image, severity: int, rng=None):
  """``v + BRIGHTNESS[s-1]`` in HSV (deterministic: ``rng`` unused)."""
  del rng
  x = _check(image, severity)
  hsv = colors.rgb_to_hsv(x)
  hsv[..., 2] = np.clip(hsv[..., 2] + BRIGHTNESS[severity - 1], 0, 1)
  return np.clip(colors.hsv_to_rgb(hsv), 0, 1) * 255


def gaussian_kernel_1d(size: int, sigma: float) -> np.ndarray:
  """OpenCV's ``getGaussianKernel``: ``exp(-(i - (size-1)/2)^2 / 2s^2)``,
  normalised to sum 1."""
  i = np.arange(size) - (size - 1) / 2
  k = np.exp(-i**2 / (2 * sigma**2))
  return k / k.sum()


def disk(radius: float, alias_blur: float) -> np.ndarray:
  """The defocus kernel: a normalised disk, blurred by a small Gaussian."""
  half = 8 if radius <= 8 else int(radius)
  size = 3 if radius <= 8 else 5
  grid = np.arange(-half, half + 1)
  xx, yy = np.meshgrid(grid, grid)
  kernel = (xx**2 + yy**2 <= radius**2).astype(np.float64)
  kernel /= kernel.sum()
  g = gaussian_kernel_1d(size, alias_blur)
  kernel = ndimage.correlate1d(kernel, g, axis=0, mode='mirror')
  return ndimage.correlate1d(kernel, g, axis=1, mode='mirror')


def defocus_blur(image, severity: int, rng=None):
  """Each channel correlated with ``disk(*DEFOCUS[s-1])`` (``rng`` unused)."""
  del rng
  x = _check(image, severity)
  kernel = disk(*DEFOCUS[severity - 1])
  out = np.stack([ndimage.correlate(x[..., d], kernel, mode='mirror')
                  for d in range(3)], axis=-1)
  return np.clip(out, 0, 1) * 255


def plasma_fractal(size: int, decay: float,
                   rng: np.random.Generator) -> np.ndarray:
  """A ``[size, size]`` diamond-square height map in ``[0, 1]``.

  ``size`` is a power of two; the map wraps around (its neighbours are
  taken modulo ``size``). Each octave's midpoints are the mean of their four
  neighbours plus uniform noise in ``[-w^2, w^2]`` (w = 100, divided by
  ``decay`` after each octave), as the reference's ``plasma_fractal``.
  """
  if size < 2 or size & (size - 1):
    raise ValueError(f'plasma_fractal: size={size} is not a power of two.')
  m = np.zeros((size, size))
  step, wibble = size, 100.0

  def noisy_mean(total):
    return total / 4 + wibble * rng.uniform(-wibble, wibble, total.shape)

  while step >= 2:
    half = step // 2
    corners = m[0:size:step, 0:size:step]  # Squares: the centres.
    total = corners + np.roll(corners, -1, axis=0)
    total = total + np.roll(total, -1, axis=1)
    m[half:size:step, half:size:step] = noisy_mean(total)
    centres = m[half:size:step, half:size:step]  # Diamonds: the edges.
    corners = m[0:size:step, 0:size:step]
    total = (centres + np.roll(centres, 1, axis=0)
             + corners + np.roll(corners, -1, axis=1))
    m[0:size:step, half:size:step] = noisy_mean(total)
    total = (centres + np.roll(centres, 1, axis=1)
             + corners + np.roll(corners, -1, axis=0))
    m[half:size:step, 0:size:step] = noisy_mean(total)
    step //= 2
    wibble /= decay
  m -= m.min()
  return m / m.max()


def fog(image, severity: int, rng: np.random.Generator):
  """``(x + a F) max(x) / (max(x) + a)`` with a plasma fractal ``F``."""
  x = _check(image, severity)
  a, decay = FOG[severity - 1]
  h, w = x.shape[:2]
  size = 1 << max(int(np.ceil(np.log2(max(h, w, 2)))), 1)
  top = x.max()
  x = x + a * plasma_fractal(size, decay, rng)[:h, :w, None]
  return np.clip(x * top / (top + a), 0, 1) * 255


_FUNCTIONS = {'fog': fog, 'defocus_blur': defocus_blur,
              'gaussian_noise': gaussian_noise, 'brightness': brightness}


def corrupt(image: np.ndarray, name: str, severity: int, *, seed: int,
            index: int) -> np.ndarray:
  """The ``name`` corruption of a uint8 ``[H, W, 3]`` image, as uint8.

  Args:
    image: RGB, 0..255.
    name: one of :data:`NAMES`.
    severity: 1..5.
    seed, index: the run's seed and the image's index in its set: the
      random draws are a function of ``(seed, index, name, severity)``.
  """
  if name not in _FUNCTIONS:
    raise ValueError(f'Unknown corruption {name!r}; expected one of {NAMES}.')
  rng = np.random.default_rng([seed, index, NAMES.index(name), severity])
  return np.uint8(_FUNCTIONS[name](image, severity, rng))
