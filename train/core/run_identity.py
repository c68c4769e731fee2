r"""What a run's numbers depend on, and the one rule for reusing what is on disk.

A config names its inputs by where they are (a data folder, a weights file),
but a run's numbers depend on what those places hold. :func:`identity` is the
config with each such path replaced by a description of its content, which
each recipe supplies (``train.vision.locations``: TFDS sets by name, version
and split sizes, weights files by SHA-256; ``train.llm.loop``: the model and
data folders' files by SHA-256).

So a workdir that is moved, copied or reached through another mount, and the
same data in another ``data_dir``, have the same identity, and a changed
checkpoint file does not. Two identities are compared leaving out what may
change between a run and its resumption without changing its numbers
(:data:`RESUMABLE`).

Everything that is reused across invocations is decided here, by one rule
(:func:`reuse`): a record (a JSON file holding the identity it was made for,
the SHA-256 of its data files, and its payload) is reused when it is this
identity's and its data files are intact. A record that cannot be read, or
whose files changed, is *damaged*; one made for another identity is *stale*.
Either way what it belongs to is moved aside (``train.core.files.set_aside``), never
deleted, with one line naming the file and why, and the caller recomputes it
(:func:`load_json` does the same for a plain JSON result).
The demo's finished runs (``result.json``), its foundation
(``foundation.npz``), CLIP's zero-shot head (``zeroshot_head.npz``) and the
workdir of a ``python -m train`` run (:func:`claim_workdir`, which refuses
rather than moves: its checkpoints are the user's) all use it.

    >>> a = {'seed': 0, 'progress_bar': True, 'optimizer': {'lr': 1e-3}}
    >>> b = {'seed': 0, 'progress_bar': False, 'optimizer': {'lr': 3e-3}}
    >>> differing_keys(a, b)
    ['optimizer.lr']
"""

import fnmatch
import functools
import hashlib
import json
import logging
import os
from typing import Any, Iterable, Mapping, Optional, Sequence

import jax
import ml_collections

from train.core import files

# What may differ between a run and its resumption (not num_train_steps: the
# learning-rate schedule depends on it; the mesh: checkpoints restore onto
# any mesh, to float noise).
RESUMABLE = ('progress_bar', 'eval_every_steps', 'log_every_steps',
             'checkpoint_every_steps', 'keep_checkpoints', 'max_steps_per_run',
             'async_checkpointing', 'mesh')

IDENTITY_FILE = 'identity.json'
CONFIG_FILE = 'config.json'


# -- Identity -----------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
  del size, mtime_ns  # The cache key: a rewritten file is hashed again.
  with open(path, 'rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()


def file_sha256(path: str) -> str:
  """The SHA-256 of a file's bytes (computed once per process and version)."""
  path = os.path.abspath(os.path.expanduser(path))
  stat = os.stat(path)
  return _file_sha256(path, stat.st_size, stat.st_mtime_ns)


def digests(paths: Iterable[str]) -> dict[str, str]:
  return {os.path.basename(p): file_sha256(p) for p in paths}


def identity(config: ml_collections.ConfigDict,
             locations: Mapping[str, Any]) -> dict:
  """``config`` as JSON, its location-only paths replaced by their content.

  Args:
    config: a run's config.
    locations: ``{dotted key: what the place it names holds}``, the recipe's
      own (``train.vision.locations``: data sets, weights, tokenizer;
      ``train.llm``: its model and data folders).
  """
  out = json.loads(config.to_json_best_effort(sort_keys=True))
  for key, content in locations.items():
    *parents, leaf = key.split('.')
    node = out
    for part in parents:
      node = node[part]
    node[leaf] = content
  return out


def folder_contents(folder: str, patterns: Sequence[str] = ('*',)
                    ) -> dict[str, str]:
  """``{file name: SHA-256}`` of the files of ``folder`` matching a pattern."""
  names = sorted({n for p in patterns for n in fnmatch.filter(
      os.listdir(folder), p) if os.path.isfile(os.path.join(folder, n))})
  return {n: file_sha256(os.path.join(folder, n)) for n in names}


def content(path: str, key: str) -> str:
  if not os.path.isfile(os.path.expanduser(path)):
    raise FileNotFoundError(f'{path!r} ({key}) does not exist.')
  return file_sha256(path)


def _flatten(tree: Any, prefix: str = '') -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flatten(v, f'{prefix}.{k}' if prefix else k))
  return out


def differing_keys(a: dict, b: dict,
                   ignore: Sequence[str] = RESUMABLE) -> list[str]:
  """Dotted keys whose values differ, leaving out ``ignore`` (and below)."""
  fa, fb = _flatten(a), _flatten(b)
  return sorted(
      k for k in set(fa) | set(fb)
      if fa.get(k, KeyError) != fb.get(k, KeyError)
      and not any(k == i or k.startswith(i + '.') for i in ignore))


# -- Records: reuse, or set aside ---------------------------------------------


def read_json(path: str) -> tuple[Any, Optional[str]]:
  """``(content, None)``, or ``(None, what is wrong)`` for a damaged file."""
  try:
    with open(path) as f:
      return json.load(f), None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    return None, f'not valid JSON ({e})'


def write_record(path: str, ident: dict, *, data_files: Sequence[str] = (),
                 **payload: Any) -> None:
  """Writes ``{identity, sha256 of data_files, **payload}`` atomically."""
  record = {'identity': ident, 'sha256': digests(data_files), **payload}
  with files.atomic_write(path) as f:
    json.dump(record, f, indent=1)


def _problem(path: str, ident: dict, data_files: Sequence[str]
             ) -> tuple[Optional[dict], Optional[str], str]:
  """``(record, problem, kind)``; ``problem`` None when it is reusable."""
  record, damage = read_json(path)
  if damage is None and not isinstance(record, dict):
    damage = f'a JSON {type(record).__name__}, not a record'
  if damage is not None:
    return None, f'{path} is damaged: {damage}', 'damaged'
  if not isinstance(record.get('identity'), dict):
    return None, (f'{path} was written by an older version (it records no'
                  ' identity)'), 'stale'
  for f in data_files:
    name = os.path.basename(f)
    expected = record.get('sha256', {}).get(name)
    if not os.path.isfile(f):
      return None, f'{f} is missing (its record {path} remains)', 'damaged'
    if expected != file_sha256(f):
      return None, (f'{f} is damaged: its SHA-256 differs from the one'
                    f' recorded in {path} when it was written'), 'damaged'
  keys = differing_keys(record['identity'], ident)
  if keys:
    return None, (f'{path} was made for another config or input'
                  f' ({", ".join(keys[:6])}{" ..." if len(keys) > 6 else ""}'
                  ' differ)'), 'stale'
  return record, None, ''


def reuse(path: str, ident: dict, *, data_files: Sequence[str] = (),
          owner: Sequence[str] = ()) -> Optional[dict]:
  """The record at ``path`` when it is ``ident``'s and intact, else None.

  A damaged or stale record is moved aside with everything in ``owner``
  (default: the record and its data files), and one warning says which files
  went where and why. Nothing is moved when there is no record.

  Args:
    path: the record (JSON) written by :func:`write_record`.
    ident: the current :func:`identity`.
    data_files: files whose SHA-256 the record holds (e.g. a ``.npz``).
    owner: what to move aside when the record cannot be reused (e.g. a run's
      whole directory).

  Returns:
    The record (a dict with ``identity``, ``sha256`` and the payload), or
    None when there is none to reuse.
  """
  if not os.path.exists(path):
    return None
  record, problem, kind = _problem(path, ident, data_files)
  if problem is None:
    return record
  if jax.process_index() == 0:  # One process moves; all recompute.
    moved = [files.set_aside(p, kind)
             for p in (owner or [path, *data_files]) if os.path.exists(p)]
    logging.warning('%s; moved it aside to %s, and it will be recomputed.',
                    problem, ', '.join(moved))
  return None


# -- A run's workdir ------------------------------------------------------------


def load_json(path: str) -> Any:
  """The JSON at ``path``; None when absent, or damaged (then moved aside)."""
  if not os.path.exists(path):
    return None
  content, damage = read_json(path)
  if damage is None:
    return content
  if jax.process_index() == 0:
    moved = files.set_aside(path, 'damaged')
    logging.warning('%s is damaged: %s; moved it aside to %s, and it will be'
                    ' recomputed.', path, damage, moved)
  return None


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes ``WORKDIR/config.json``, the config as given (its current paths).

  ``python -m train.vision.wise_ft_main`` rebuilds a run from it. A damaged one is moved
  aside first, never overwritten.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  load_json(path)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with files.atomic_write(path) as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def claim_workdir(workdir: str, config: ml_collections.ConfigDict, *,
                  ident: dict,
                  resumable: Sequence[str] = RESUMABLE) -> dict:
  """Makes ``workdir`` this config's, or refuses a workdir of another one.

  A new workdir gets ``identity.json`` (what the run's numbers depend on, a
  :func:`write_record`) and ``config.json`` (:func:`write_config`). A workdir
  that holds a run resumes it when the identities agree, wherever the workdir
  and its inputs now are, and is refused, naming the differing keys,
  otherwise; its checkpoints are never touched. A workdir written by an older
  version (``config.json`` without ``identity.json``) is compared by its
  config.

  Args:
    workdir: the run's workdir.
    config: its config.
    ident: its identity (:func:`identity`, with the recipe's locations).
    resumable: the keys that may differ on resumption.

  Returns:
    The identity.

  Raises:
    ValueError: the workdir holds a run of another config, or its
      ``identity.json`` (or an older version's ``config.json``) is damaged.
  """
  id_path = os.path.join(workdir, IDENTITY_FILE)
  config_path = os.path.join(workdir, CONFIG_FILE)
  keys = []
  if os.path.exists(id_path):
    record, damage = read_json(id_path)
    if damage is None and not isinstance(record, dict):
      damage = 'not a record'
    _refuse_damaged(workdir, id_path, damage)
    keys = differing_keys(record.get('identity', {}), ident, resumable)
  elif os.path.exists(config_path):  # An older version's workdir.
    saved, damage = read_json(config_path)
    _refuse_damaged(workdir, config_path, damage)
    keys = differing_keys(
        saved, json.loads(config.to_json_best_effort(sort_keys=True)),
        resumable)
  if keys:
    raise ValueError(f'Workdir {workdir} holds a run of a different config'
                     f' (keys {keys} differ); use a new --workdir.')
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    write_record(id_path, ident)
  write_config(workdir, config)
  return ident


def _refuse_damaged(workdir: str, path: str, damage: Optional[str]) -> None:
  if damage is not None:
    raise ValueError(
        f'Workdir {workdir}: {path} is damaged ({damage}), so which config'
        ' its checkpoints belong to is unknown. Use a new --workdir, or move'
        " the file away if you know they are this config's.")
