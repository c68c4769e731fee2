r"""Checksums of a checkpoint's arrays, and the leaves that are not finite.

A bit flipped on disk inside an array's data is invisible to Orbax (it checks
its index files, not the numbers), so every saved step records, per leaf, a
checksum of the array's bits, and a restore recomputes it from what it read.
The checksum of an array :math:`x` with :math:`n` elements, read as unsigned
words :math:`u_i` (row-major index :math:`i`), is

.. math::

   c(x) = \sum_i (2i + 1)\, u_i \bmod 2^{32}

(64-bit elements count as two words). Flipping bit :math:`b` of one word
changes :math:`c` by :math:`\pm 2^b (2i + 1) \bmod 2^{32} \neq 0`, since
:math:`2i + 1` is odd: every single-bit flip is detected. The sum is computed
on the devices where the array lives, by one jitted pass over the state (each
device sums its own shard, then the scalars are added), so no array is
gathered, and the value depends only on the global array, not on the mesh: a
step saved on 8 devices verifies when restored onto 1. (One program for all
leaves, not one per leaf: on CPU, hundreds of small programs with
cross-device sums in flight at once deadlock XLA's collectives.)

The same pass reports which floating-point leaves hold a NaN or an inf; no
checkpoint is written with one.

    >>> import jax.numpy as jnp
    >>> tree = {'w': jnp.arange(4.0), 'b': jnp.array([1.0, jnp.nan])}
    >>> sums, nonfinite = fingerprint(tree)
    >>> nonfinite
    ["['b']"]
    >>> flipped = {'w': tree['w'].at[3].set(3.0000002), 'b': tree['b']}
    >>> fingerprint(flipped)[0]["['w']"] != sums["['w']"]
    True
"""

from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

_WORDS = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}


def _words(x: jax.Array) -> jax.Array:
  """``x``'s bits as unsigned integers (a trailing axis of 2 for 64-bit)."""
  if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if x.dtype == jnp.bool_:
    x = x.astype(jnp.uint8)
  return lax.bitcast_convert_type(x, _WORDS[x.dtype.itemsize])


def _checksum(x: jax.Array) -> jax.Array:
  u = _words(x).astype(jnp.uint32)
  index = jnp.zeros(u.shape, jnp.uint32)  # Row-major, without a reshape.
  stride = 1
  for d in reversed(range(u.ndim)):
    index += lax.broadcasted_iota(jnp.uint32, u.shape, d) * jnp.uint32(
        stride % 2**32)
    stride *= u.shape[d]
  return jnp.sum(u * (2 * index + 1), dtype=jnp.uint32)


def _finite(x: jax.Array) -> jax.Array:
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.all(jnp.isfinite(x))
  return jnp.array(True)


@jax.jit
def _fingerprint(leaves: list[jax.Array]):
  return [_checksum(x) for x in leaves], [_finite(x) for x in leaves]


def fingerprint(tree: Any) -> tuple[dict[str, int], list[str]]:
  """``({leaf path: checksum}, [paths of leaves with a NaN or inf])``.

  Paths are ``jax.tree_util.keystr`` of the leaves; non-array leaves are
  skipped.
  """
  pairs = [(jax.tree_util.keystr(p), x)
           for p, x in jax.tree_util.tree_leaves_with_path(tree)
           if isinstance(x, (jax.Array, np.ndarray))]
  sums, finite = jax.device_get(_fingerprint([x for _, x in pairs]))
  checksums = {name: int(s) for (name, _), s in zip(pairs, sums)}
  nonfinite = [name for (name, _), ok in zip(pairs, finite) if not ok]
  return checksums, nonfinite


def mismatches(expected: dict[str, int], tree: Any) -> list[str]:
  """Paths whose checksum in ``tree`` differs from ``expected`` (or is missing)."""
  actual, _ = fingerprint(tree)
  return sorted(k for k in set(expected) | set(actual)
                if expected.get(k) != actual.get(k))
