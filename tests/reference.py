"""Independent float64 NumPy references of the algorithm's docs page.

Each function implements the formulas of one section of docs/algorithm.rst
(the site's "The algorithm" page), as written there: Adam, SPD and its
non-selective ablation, L2-SP. Nothing here imports spd_optax: the tests
compare the library against these.
"""

import numpy as np


def adam_update(grad, m, v, step, lr, b1, b2, eps):
  """One Adam step (bias-corrected moments); returns (update, m, v).

  docs/algorithm.rst, "The inner optimizer: Adam".
  """
  m = b1 * m + (1 - b1) * grad
  v = b2 * v + (1 - b2) * grad * grad
  m_hat = m / (1 - b1**step)
  v_hat = v / (1 - b2**step)
  return -lr * m_hat / (np.sqrt(v_hat) + eps), m, v


def spd_project(grad, theta, proposal, anchor, lam, selective=True):
  """SPD's projection of one tensor; returns (new theta, projected, ratio).

  docs/algorithm.rst, "SPD" (``selective=False``: "The non-selective
  ablation"), with r_t from its definition, not the stable form.
  """
  dev_prev = theta - anchor
  dev_new = proposal - anchor
  condition = -np.sum(grad * dev_prev)
  fires = (condition < 0) if selective else True
  if not fires:
    return proposal, False, 0.0
  norm_new = np.linalg.norm(dev_new)
  norm_prev = np.linalg.norm(dev_prev)
  ratio = 0.0 if norm_new == 0 else np.clip((norm_new - norm_prev) / norm_new, 0, 1)
  return proposal - lam * ratio * dev_new, True, ratio


def run_adamspd(theta0, anchor, grad_fn, steps, lr=1e-2, b1=0.9, b2=0.999,
                eps=1e-8, lam=1.0, selective=True):
  """Adam-SPD on a dict of float64 tensors.

  Args:
    theta0: dict name -> starting params.
    anchor: dict name -> anchor (the same as theta0, or zeros).
    grad_fn: (theta dict, step) -> gradient dict.
    steps: number of steps.

  Returns:
    (final theta dict, list of per-step dicts name -> projected, deviation
    norms per step).
  """
  theta = {k: np.array(x, np.float64) for k, x in theta0.items()}
  m = {k: np.zeros_like(x) for k, x in theta.items()}
  v = {k: np.zeros_like(x) for k, x in theta.items()}
  history = []
  for step in range(1, steps + 1):
    grads = grad_fn(theta, step - 1)
    fired = {}
    for k in theta:
      g = np.asarray(grads[k], np.float64)
      u, m[k], v[k] = adam_update(g, m[k], v[k], step, lr, b1, b2, eps)
      theta[k], fired[k], _ = spd_project(
          g, theta[k], theta[k] + u, anchor[k], lam, selective)
    history.append(fired)
  return theta, history


def run_adaml2sp(theta0, anchor, grad_fn, steps, lr=1e-2, b1=0.9, b2=0.999,
                 eps=1e-8, lam=0.1):
  """Adam on the L2-SP-regularised loss, on a dict of float64 tensors.

  docs/algorithm.rst, "L2-SP, the baseline": g + lam * (theta - anchor) goes
  into Adam. Arguments as :func:`run_adamspd`; returns the final theta dict.
  """
  theta = {k: np.array(x, np.float64) for k, x in theta0.items()}
  m = {k: np.zeros_like(x) for k, x in theta.items()}
  v = {k: np.zeros_like(x) for k, x in theta.items()}
  for step in range(1, steps + 1):
    grads = grad_fn(theta, step - 1)
    for k in theta:
      g = np.asarray(grads[k], np.float64) + lam * (theta[k] - anchor[k])
      u, m[k], v[k] = adam_update(g, m[k], v[k], step, lr, b1, b2, eps)
      theta[k] = theta[k] + u
  return theta
