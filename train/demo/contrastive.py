r"""Self-supervised pre-training: renders of one digit in two domains agree.

The demo's "foundation" (``configs/demo.py`` argues the choice): a ViT is
trained without any label, by SimCLR's contrastive loss (Chen et al., ICML
2020), where the two views of an image are the same handwritten digit
rendered in two different domains of ``digits_domains`` (clean, rotated,
inverted, noisy, blurred, thick, coloured, small). For a batch of :math:`B`
digits and unit embeddings :math:`z_1 .. z_{2B}` (the model's head output,
normalised; view :math:`i` and :math:`i + B` are one digit), with
temperature :math:`\tau`,

.. math::
  \ell = -\frac{1}{2B} \sum_i \log
  \frac{\exp(z_i \cdot z_{p(i)} / \tau)}{\sum_{j \ne i} \exp(z_i \cdot z_j / \tau)}.

The head is SimCLR's projection: fine-tuning drops it (``dont_load``).

Example (two digits, each in two domains, identical renders: a low loss):

>>> import jax.numpy as jnp
>>> z = jnp.array([[1., 0.], [0., 1.], [1., 0.], [0., 1.]])
>>> round(float(nt_xent(z, 0.1)), 4)
0.0001
"""

import os

from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from train.vision import checks
from train.vision import input_pipeline
from train.vision import locations
from train.vision import vit
from train.core import optimizers
from train.core import run_identity
from train.vision import pretrained


def nt_xent(z: jax.Array, temperature: float) -> jax.Array:
  """SimCLR's loss; rows ``i`` and ``i + len(z) // 2`` are positives."""
  z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
  n = z.shape[0] // 2
  logits = z @ z.T / temperature
  logits = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, logits)
  positives = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, positives).mean()


def _views(dataset: ml_collections.ConfigDict, split: str) -> np.ndarray:
  """``f32[digits, domains, s, s, 3]``: every render of every digit."""
  examples = input_pipeline.source(dataset.name, split, dataset)
  order = sorted(range(len(examples)), key=lambda i: (
      int(examples[i]['index']), int(examples[i]['domain'])))
  images = np.stack([input_pipeline.eval_example(
      examples[i], dataset=dataset)['image'] for i in order])
  num_domains = len({int(e['domain']) for e in examples})
  return images.reshape(-1, num_domains, *images.shape[1:])


@nnx.jit(donate_argnames=('model', 'optimizer'))
def _step(model, optimizer, images, temperature):
  def loss_fn(model):
    return nt_xent(model(images, train=True), temperature)

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def pretrain(config: ml_collections.ConfigDict, path: str) -> str:
  """Trains the foundation of ``config`` (once) and saves it to ``path``.

  Args:
    config: ``configs/demo.py``'s ``foundation``: ``model``, ``dataset``
      (the ``mixture`` of all domains), ``optimizer``, ``num_train_steps``,
      ``batch_size`` (digits per step, two views each), ``temperature``,
      ``embedding_dim``, ``seed``.
    path: the ``.npz`` to write (``train.vision.pretrained`` format), with its record
      ``path + '.json'`` (``train.core.run_identity``): reused when it was trained
      from this config and its bytes are intact; a damaged or stale one is
      moved aside, named, and trained again.

  Returns:
    ``path``.
  """
  checks.check(config, num_devices=jax.device_count())
  # Prepared first: the identity holds the set's version and sizes.
  input_pipeline.source(config.dataset.name, config.dataset.train_split,
                        config.dataset)
  ident = locations.identity(config)
  record = path + '.json'
  if run_identity.reuse(record, ident, data_files=[path]) is not None:
    return path
  model = _train(config)
  pretrained.save_npz(model, path)  # Atomic.
  run_identity.write_record(record, ident, data_files=[path])
  return path


def _train(config: ml_collections.ConfigDict) -> vit.VisionTransformer:
  """The contrastive pre-training itself: returns the trained model."""
  views = _views(config.dataset, config.dataset.train_split)
  num_digits, num_domains = views.shape[:2]
  model = vit.VisionTransformer(
      **vit.get_model_kwargs(config.model.name),
      num_classes=config.embedding_dim, image_size=config.dataset.image_size,
      rngs=nnx.Rngs(config.seed))
  # The head starts at zero (a classifier's init): give the projection a
  # random one, or every embedding is 0 and the loss has no gradient.
  head = model.head.kernel
  head.set_value(jax.random.normal(jax.random.key(config.seed), head.shape)
                 * head.shape[0] ** -0.5)
  tx = optimizers.make_optimizer(config, lora=False)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  rng = np.random.default_rng(config.seed)
  for _ in tqdm.trange(config.num_train_steps, desc='foundation',
                       disable=not config.progress_bar):
    digits = rng.choice(num_digits, config.batch_size, replace=False)
    # Two different domains per digit.
    first = rng.integers(0, num_domains, config.batch_size)
    second = (first + rng.integers(1, num_domains, config.batch_size)
              ) % num_domains
    images = np.concatenate([views[digits, first], views[digits, second]])
    loss = _step(model, optimizer, jnp.asarray(images), config.temperature)
  if not np.isfinite(float(loss)):
    raise FloatingPointError(f'Contrastive pre-training diverged (loss'
                             f' {float(loss)}); lower its learning rate.')
  return model
