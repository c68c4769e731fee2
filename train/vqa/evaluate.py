"""Answers generated for a VQA set, scored with the official VQA accuracy.

Each question's prefix (image tokens, BOS, ``'answer en <question>\\n'``)
is continued greedily (``train.vqa.steps.make_generate``) until EOS or
``max_new_tokens``; the tokens before EOS, decoded without special tokens,
are the answer, scored against the ten human answers
(``train.vqa.metric.accuracy``). A set's accuracy is the mean over its
questions, in percent. The summary: ``id`` (VQAv2 val), ``near_ood`` and
``far_ood``, the plain means over the near- and far-OOD sets evaluated (as
the paper and FRAMES-VQA average them).
"""

from typing import Callable, Sequence

import numpy as np

from train.vqa import data
from train.vqa import metric

SUMMARY = ('id', 'near_ood', 'far_ood')


def decode(tokenizer, ids: Sequence[int], eos_id: int) -> str:
  """The answer: the tokens before the first EOS, without special tokens."""
  ids = [int(i) for i in ids]
  if eos_id in ids:
    ids = ids[:ids.index(eos_id)]
  return tokenizer.decode(ids, skip_special_tokens=True).strip()


def _chunks(rows: list, batch_size: int):
  """``(rows of a fixed-size batch, how many are real)``; the last batch is
  filled with copies of its first row (their answers are dropped)."""
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    yield chunk + [chunk[0]] * (batch_size - len(chunk)), len(chunk)


def answers(rows: list[data.Row], generate: Callable[[dict], np.ndarray],
            encode: Callable[[list[data.Row]], dict], tokenizer, *,
            batch_size: int, eos_id: int) -> list[str]:
  """The generated answer of every row, in order.

  Args:
    rows: the questions.
    generate: a batch of prefixes (``encode``'s arrays) -> int32 tokens
      ``[batch_size, max_new_tokens]``.
    encode: rows -> the prefixes' arrays (tokens, masks, images).
    tokenizer: decodes the answers.
    batch_size: rows per ``generate`` call (one compiled shape).
    eos_id: where an answer ends.
  """
  out = []
  for chunk, real in _chunks(rows, batch_size):
    tokens = np.asarray(generate(encode(chunk)))
    out += [decode(tokenizer, t, eos_id) for t in tokens[:real]]
  return out


def set_accuracy(rows: list[data.Row], predicted: list[str]) -> float:
  """A set's VQA accuracy in percent."""
  return 100.0 * metric.mean_accuracy(predicted, [r.answers for r in rows])


def summary(per_set: dict[str, float], *, near: Sequence[str],
            far: Sequence[str]) -> dict[str, float]:
  """``{'id', 'near_ood', 'far_ood'}`` of the sets' accuracies (a mean is
  left out when none of its sets was evaluated)."""
  out = {}
  if data.ID in per_set:
    out['id'] = per_set[data.ID]
  for key, names in (('near_ood', near), ('far_ood', far)):
    values = [per_set[n] for n in names if n in per_set]
    if values:
      out[key] = float(np.mean(values))
  return out


def evaluate_sets(sets: dict[str, list[data.Row]], answer_fn, *,
                  near: Sequence[str], far: Sequence[str],
                  prefix: str) -> dict[str, float]:
  """``{f'{prefix}/{set or summary}': accuracy %}`` of every set.

  ``answer_fn(rows) -> answers`` (:func:`answers` with the model bound).
  """
  per_set = {name: set_accuracy(rows, answer_fn(rows))
             for name, rows in sets.items()}
  both = {**per_set, **summary(per_set, near=near, far=far)}
  return {f'{prefix}/{k}': v for k, v in both.items()}


def table(results: dict[str, float], prefixes: Sequence[str],
          sets: Sequence[str]) -> tuple[list[list], list[str]]:
  """The final table: one row per set then the summary, one column per
  prefix (the fine-tuned model, or each WiSE-FT alpha)."""
  names = list(sets) + list(SUMMARY)
  rows = [[n] + [results.get(f'{p}/{n}', float('nan')) for p in prefixes]
          for n in names if any(f'{p}/{n}' in results for p in prefixes)]
  return rows, ['set'] + [f'{p} %' for p in prefixes]
