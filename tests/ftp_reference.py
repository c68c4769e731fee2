"""An independent float64 NumPy reference of FTP's AdamP, written from issue 28.

What the issue states, per parameter tensor: AdamW's step ``d``; the move
``c_t = (theta - d) - theta_0``; its L1 norm per row (every axis but the
first summed; a vector or a scalar is one row) plus 1e-8; a radius ``gamma``,
1e-8 at the first step and afterwards moved by its own Adam (rate 1e-2, betas
0.9 / 0.999, the shared step count in the bias corrections) on the
hypergradient ``sum_rows <g_t, c_{t-1}> / norm_{t-1}``, whose positive values
are multiplied by ``k``; ``gamma`` clipped to ``[1e-8, max(norm_t)]``; the new
weights ``theta_0 + clip(gamma / norm_t, 0, 1) * c_t``. Excluded tensors take
AdamW's step. Nothing here imports spd_optax.
"""

import numpy as np

TINY = 1e-8


def _row_sum(x):
  """Sums over every axis but the first (keeping them); all of a vector."""
  if x.ndim >= 2:
    return np.sum(x, axis=tuple(range(1, x.ndim)), keepdims=True)
  return np.sum(x, keepdims=True)


def _adamw_step(grad, theta, m, v, t, lr, b1, b2, eps, wd):
  """The AdamW step ``d`` that the weights move by (``theta - d``)."""
  m = b1 * m + (1 - b1) * grad
  v = b2 * v + (1 - b2) * grad * grad
  d = lr / (1 - b1**t) * m / (np.sqrt(v) / np.sqrt(1 - b2**t) + eps)
  return d + lr * wd * theta, m, v


class _Radius:
  """One tensor's gamma, its Adam moments and the previous move."""

  def __init__(self):
    self.gamma, self.m, self.v = TINY, 0.0, 0.0
    self.prev_c = self.prev_norm = None

  def step(self, grad, c, norm, t, k, mu, b1=0.9, b2=0.999, eps=1e-8):
    if t > 1:
      h = np.sum(_row_sum(grad * self.prev_c) / self.prev_norm)
      if h > 0:
        h = k * h
      self.m = b1 * self.m + (1 - b1) * h
      self.v = b2 * self.v + (1 - b2) * h * h
      m_hat, v_hat = self.m / (1 - b1**t), self.v / (1 - b2**t)
      self.gamma = np.clip(self.gamma - mu * m_hat / (np.sqrt(v_hat) + eps),
                           TINY, np.max(norm))
    self.prev_c, self.prev_norm = c, norm
    return self.gamma


def run_adamftp(theta0, anchor, grad_fn, steps, *, lr, k, wd=0.0, b1=0.9,
                b2=0.999, eps=1e-8, mu=1e-2, exclude=()):
  """AdamP (FTP around AdamW) on a dict of float64 tensors.

  Args:
    theta0: dict name -> starting params.
    anchor: dict name -> anchor (theta0 itself, or zeros).
    grad_fn: (theta dict, step) -> gradient dict.
    steps: number of steps.
    lr, k, wd, b1, b2, eps: AdamW's rate, betas and eps, FTP's k, the decay.
    mu: the rate of gamma's Adam.
    exclude: names that take AdamW's step alone.

  Returns:
    (final theta dict, list of per-step dicts name -> gamma).
  """
  theta = {name: np.array(x, np.float64) for name, x in theta0.items()}
  m = {name: np.zeros_like(x) for name, x in theta.items()}
  v = {name: np.zeros_like(x) for name, x in theta.items()}
  radius = {name: _Radius() for name in theta if name not in exclude}
  history = []
  for t in range(1, steps + 1):
    grads = grad_fn(theta, t - 1)
    gammas = {}
    for name in theta:
      g = np.asarray(grads[name], np.float64)
      d, m[name], v[name] = _adamw_step(g, theta[name], m[name], v[name], t,
                                        lr, b1, b2, eps, wd)
      if name in exclude:
        theta[name] = theta[name] - d
        continue
      c = theta[name] - d - anchor[name]
      norm = _row_sum(np.abs(c)) + TINY
      gammas[name] = radius[name].step(g, c, norm, t, k, mu)
      theta[name] = anchor[name] + np.clip(gammas[name] / norm, 0, 1) * c
    history.append(gammas)
  return theta, history
