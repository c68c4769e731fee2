"""The four ImageNet-C corruptions against values computed by hand."""

import numpy as np
import pytest

from train.segmentation import corruptions as C


def test_brightness_of_a_known_pixel():
  image = np.array([[[200, 100, 50]]], np.uint8)
  # HSV: v = 200/255, s = 150/200 = .75, G sits 1/3 of the way from min to
  # max. Severity 1: v + .1 -> max = 255 v', min = max (1 - s), same hue.
  top = (200 / 255 + 0.1) * 255
  low = top * 0.25
  expected = [top, low + (top - low) / 3, low]
  np.testing.assert_allclose(C.brightness(image, 1)[0, 0], expected,
                             rtol=1e-12)
  # Severity 5 saturates v at 1: max 255.
  assert C.brightness(image, 5)[0, 0, 0] == pytest.approx(255.0)


def test_gaussian_noise_is_the_formula_with_the_same_draws():
  image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 14
  for s, c in zip(C.SEVERITIES, (0.08, 0.12, 0.18, 0.26, 0.38)):
    out = C.gaussian_noise(image, s, np.random.default_rng(7))
    noise = np.random.default_rng(7).normal(size=image.shape) * c
    np.testing.assert_allclose(out, np.clip(image / 255 + noise, 0, 1) * 255,
                               rtol=1e-12)


def test_disk_kernel_shape_sum_and_values():
  k = C.disk(3, 0.1)  # s = .1: the 3x3 Gaussian is a delta (e^-50).
  assert k.shape == (17, 17)
  assert k.sum() == pytest.approx(1.0)
  # i^2 + j^2 <= 9: 7 + 2*5 + 2*5 + 2*1 = 29 pixels of 1/29.
  np.testing.assert_allclose(k[8, 5:12], 1 / 29, rtol=1e-9)
  assert k[8, 4] < 1e-12 and k[5, 8] == pytest.approx(1 / 29)
  assert C.disk(10, 0.5).shape == (21, 21)
  for r, s in C.DEFOCUS[:3]:
    assert C.disk(r, s).sum() == pytest.approx(1.0)
  # r = 8 and 10 reach the grid's edge: the anti-aliasing blur reflects
  # there (OpenCV's border, kept from the reference), adding mass.
  assert C.disk(8, 0.5).sum() > 1.0


def test_gaussian_kernel_is_opencvs():
  # getGaussianKernel(3, .5): exp(-1/(2 .25)) = e^-2 on each side.
  e = np.exp(-2.0)
  total = 1 + 2 * e
  np.testing.assert_allclose(C.gaussian_kernel_1d(3, 0.5),
                             [e / total, 1 / total, e / total])


def test_defocus_keeps_a_flat_image_and_spreads_a_point():
  flat = np.full((20, 20, 3), 90, np.uint8)
  np.testing.assert_allclose(C.defocus_blur(flat, 3), 90.0, rtol=1e-9)
  point = np.zeros((31, 31, 3), np.uint8)
  point[15, 15] = 255
  out = C.defocus_blur(point, 1)
  # Far from the borders, a point's image is the (symmetric) kernel.
  np.testing.assert_allclose(out[7:24, 7:24, 0], C.disk(3, 0.1) * 255,
                             atol=1e-9)


def test_fog_range_and_mean_on_a_flat_image():
  x0 = 0.5
  image = np.full((16, 16, 3), 255 * x0, np.float64)
  for s, (a, _) in zip(C.SEVERITIES, C.FOG):
    out = C.fog(image, s, np.random.default_rng(s)) / 255
    # out = (x0 + a F) x0 / (x0 + a), F in [0, 1] reaching both ends (the
    # 16x16 map is the whole fractal).
    assert out.min() == pytest.approx(x0 * x0 / (x0 + a))
    assert out.max() == pytest.approx(x0)
    fractal = C.plasma_fractal(16, C.FOG[s - 1][1], np.random.default_rng(s))
    assert out[..., 0].mean() == pytest.approx(
        (x0 + a * fractal.mean()) * x0 / (x0 + a))


def test_plasma_fractal_spans_zero_to_one_and_is_seeded():
  a = C.plasma_fractal(32, 2.0, np.random.default_rng(3))
  b = C.plasma_fractal(32, 2.0, np.random.default_rng(3))
  np.testing.assert_array_equal(a, b)
  assert a.min() == 0.0 and a.max() == 1.0
  with pytest.raises(ValueError, match='power of two'):
    C.plasma_fractal(24, 2.0, np.random.default_rng(0))


def test_fog_on_a_size_that_is_not_a_power_of_two():
  image = np.full((10, 13, 3), 128, np.uint8)
  out = C.fog(image, 2, np.random.default_rng(0))
  assert out.shape == image.shape and np.isfinite(out).all()


def test_corrupt_is_deterministic_per_image_and_refuses_bad_input():
  image = np.random.default_rng(0).integers(0, 256, (12, 12, 3)).astype(
      np.uint8)
  for name in C.NAMES:
    a = C.corrupt(image, name, 3, seed=1, index=4)
    assert a.dtype == np.uint8 and a.shape == image.shape
    np.testing.assert_array_equal(a, C.corrupt(image, name, 3, seed=1,
                                               index=4))
  assert not np.array_equal(C.corrupt(image, 'fog', 3, seed=1, index=4),
                            C.corrupt(image, 'fog', 3, seed=1, index=5))
  with pytest.raises(ValueError, match='snow'):
    C.corrupt(image, 'snow', 1, seed=0, index=0)
  with pytest.raises(ValueError, match='severity=6'):
    C.corrupt(image, 'fog', 6, seed=0, index=0)
  with pytest.raises(ValueError, match=r'\(12, 12\)'):
    C.corrupt(image[..., 0], 'fog', 1, seed=0, index=0)


# ImageNet-C's constants (Hendrycks & Dietterich 2019, the reference's
# corruptions.py), written here apart from the module's own tables.
_IMAGENET_C = {
    'gaussian_noise': (0.08, 0.12, 0.18, 0.26, 0.38),
    'brightness': (0.1, 0.2, 0.3, 0.4, 0.5),
    'defocus_blur': ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
    'fog': ((1.5, 2), (2., 2), (2.5, 1.7), (2.5, 1.5), (3., 1.4)),
}


def test_the_severity_tables_are_imagenet_cs():
  assert C.GAUSSIAN_NOISE == _IMAGENET_C['gaussian_noise']
  assert C.BRIGHTNESS == _IMAGENET_C['brightness']
  assert C.DEFOCUS == _IMAGENET_C['defocus_blur']
  assert C.FOG == _IMAGENET_C['fog']


@pytest.mark.parametrize('severity', C.SEVERITIES)
def test_brightness_of_a_known_pixel_at_each_severity(severity):
  image = np.array([[[200, 100, 50]]], np.uint8)
  # v = 200/255 raised by c and capped at 1; s = .75 and the hue (G a third
  # of the way from min to max) unchanged.
  c = _IMAGENET_C['brightness'][severity - 1]
  top = min(200 / 255 + c, 1.0) * 255
  low = top * 0.25
  np.testing.assert_allclose(C.brightness(image, severity)[0, 0],
                             [top, low + (top - low) / 3, low], rtol=1e-12)


@pytest.mark.parametrize('severity', C.SEVERITIES)
def test_defocus_of_a_point_is_the_disk_of_its_severity(severity):
  radius, blur = _IMAGENET_C['defocus_blur'][severity - 1]
  kernel = C.disk(radius, blur)
  half = kernel.shape[0] // 2
  # Before the anti-aliasing blur, the disk is the lattice points within the
  # radius: count them by hand for the (r <= 8: 3 x 3, s) blur's centre.
  n = sum(1 for i in range(-half, half + 1) for j in range(-half, half + 1)
          if i * i + j * j <= radius * radius)
  assert kernel.shape == (2 * half + 1,) * 2 and n > 0
  assert kernel[half, half] <= 1 / n + 1e-12  # Blurring never sharpens.
  point = np.zeros((4 * half + 3, 4 * half + 3, 3), np.uint8)
  point[2 * half + 1, 2 * half + 1] = 255
  out = C.defocus_blur(point, severity)
  np.testing.assert_allclose(
      out[half + 1:3 * half + 2, half + 1:3 * half + 2, 1],
      np.clip(kernel, 0, 1) * 255, atol=1e-9)


def test_plasma_fractal_of_two_by_two_by_hand():
  # One octave (step 2, half 1, wibble 100): the centre m11 is the mean of
  # four zero corners plus 100 U(-100, 100); each edge the mean of two
  # centres (wrapped) and two corners plus its own draw.
  draws = np.random.default_rng(5)
  u1, u2, u3 = (100 * draws.uniform(-100, 100, (1, 1))[0, 0] for _ in range(3))
  m11 = u1
  m = np.array([[0.0, 2 * m11 / 4 + u2], [2 * m11 / 4 + u3, m11]])
  m -= m.min()
  np.testing.assert_allclose(
      C.plasma_fractal(2, 2.0, np.random.default_rng(5)), m / m.max(),
      rtol=1e-12)
