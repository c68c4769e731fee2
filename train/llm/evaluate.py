"""The eight commonsense sets, answered by the model and scored per set.

Two modes (``config.eval.modes``):

- ``'generate'``, the protocol of LLM-Adapters and DoRA
  (``commonsense_evaluate.py``): each test row's evaluation prompt is
  continued for at most ``max_new_tokens`` (32 there), the reply is searched
  for the set's answer words (``commonsense.extract_answer``) and compared
  with the row's answer. The references decode with ``num_beams=4`` (beam
  search, no sampling); we decode greedily.
- ``'loglik'``: each allowed answer (``commonsense.candidates``) is written
  after the prompt as the training targets are (``'the correct answer is
  answerK'``), and the one the model gives the highest log-likelihood is the
  prediction: one forward pass per row and candidate instead of a decode.

Accuracy is in percent per set; ``eval/<mode>/mean`` is the plain mean of the
eight (``commonsense.mean_accuracy``, the papers' "Avg"), reported when all
eight were evaluated. Prompts are sorted by length and padded to a multiple
of ``BUCKET`` tokens, so few shapes are compiled.
"""

import os

import numpy as np

from train.llm import commonsense
from train.llm import data

# How commonsense_170k writes every target (its 'output' field).
RESPONSE_PREFIX = 'the correct answer is '
BUCKET = 32
MODES = ('generate', 'loglik')


def read_test_sets(data_dir: str, names, max_examples: int = 0) -> dict:
  """``{set: rows}`` from ``data_dir/dataset/<set>/test.json`` (the first
  ``max_examples`` of each when > 0)."""
  out = {}
  for name in names:
    rows = data.read_examples(os.path.join(data_dir, 'dataset', name,
                                           'test.json'))
    out[name] = rows[:max_examples] if max_examples > 0 else rows
  return out


def _padded(rows: list[list[int]], *, left: bool, pad_id: int,
            batch_size: int):
  """int32 tokens and bool valid [batch_size, bucketed length]."""
  length = -(-max(len(r) for r in rows) // BUCKET) * BUCKET
  tokens = np.full((batch_size, length), pad_id, np.int32)
  valid = np.zeros((batch_size, length), bool)
  for i, r in enumerate(rows):
    where = slice(length - len(r), length) if left else slice(0, len(r))
    tokens[i, where], valid[i, where] = r, True
  for i in range(len(rows), batch_size):  # Filler rows, results ignored.
    tokens[i], valid[i] = tokens[0], valid[0]
  return tokens, valid


def _pad_id(tokenizer) -> int:
  pad = tokenizer.pad_token_id
  return tokenizer.eos_token_id if pad is None else pad


def _generated_answers(name, rows, scorer, state, tokenizer, batch_size):
  prompts = [tokenizer.encode(commonsense.evaluation_prompt(r),
                              add_special_tokens=True) for r in rows]
  order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))
  predicted = [None] * len(rows)
  for start in range(0, len(order), batch_size):
    chunk = order[start:start + batch_size]
    tokens, valid = _padded([prompts[i] for i in chunk], left=True,
                            pad_id=_pad_id(tokenizer), batch_size=batch_size)
    replies = scorer.generate(*state, tokens, valid)
    for i, reply in zip(chunk, replies):
      ids = list(reply)
      if tokenizer.eos_token_id in ids:
        ids = ids[:ids.index(tokenizer.eos_token_id)]
      text = tokenizer.decode(ids, skip_special_tokens=True)
      predicted[i] = commonsense.extract_answer(name, text)
  return predicted


def _candidate_rows(name, row, tokenizer):
  """Token ids of the prompt + each answer, and where the answers start."""
  prompt = commonsense.evaluation_prompt(row)
  answers = commonsense.candidates(name, row)
  ids = [tokenizer.encode(prompt + RESPONSE_PREFIX + a,
                          add_special_tokens=True) for a in answers]
  shared = 0  # Tokens all candidates share: they score the same in each.
  while all(len(x) > shared for x in ids) and len(
      {x[shared] for x in ids}) == 1:
    shared += 1
  return answers, ids, max(shared, 1)


def _likeliest_answers(name, rows, scorer, state, tokenizer, batch_size):
  flat = []  # (row index, answer, ids, first scored token)
  for i, row in enumerate(rows):
    answers, ids, shared = _candidate_rows(name, row, tokenizer)
    flat += [(i, a, x, shared) for a, x in zip(answers, ids)]
  best = {}
  for start in range(0, len(flat), batch_size):
    chunk = flat[start:start + batch_size]
    tokens, valid = _padded([x for _, _, x, _ in chunk], left=False,
                            pad_id=_pad_id(tokenizer), batch_size=batch_size)
    scored = valid.copy()
    for j, (_, _, _, shared) in enumerate(chunk):
      scored[j, :shared] = False
    scores = scorer.log_likelihoods(*state, tokens, valid, scored)
    for (i, answer, _, _), score in zip(chunk, scores):
      if i not in best or score > best[i][0]:
        best[i] = (float(score), answer)
  return [best[i][1] for i in range(len(rows))]


def evaluate(scorer, state, tokenizer, test_sets: dict, *, modes,
             batch_size: int) -> dict[str, float]:
  """``{'eval/<mode>/<set>': accuracy %, 'eval/<mode>/mean': ...}``.

  Args:
    scorer: a ``scoring.Scorer`` of the model's evaluation graph.
    state: ``(lora, base)``.
    tokenizer: the model folder's tokenizer.
    test_sets: ``{set: rows}`` (:func:`read_test_sets`).
    modes: some of :data:`MODES`.
    batch_size: rows per program (a multiple of the batch shards).
  """
  answer = {'generate': _generated_answers, 'loglik': _likeliest_answers}
  results = {}
  for mode in modes:
    per_set = {}
    for name, rows in test_sets.items():
      predicted = answer[mode](name, rows, scorer, state, tokenizer,
                               batch_size)
      right = sum(commonsense.is_correct(name, r, p)
                  for r, p in zip(rows, predicted))
      per_set[name] = 100.0 * right / max(len(rows), 1)
      results[f'eval/{mode}/{name}'] = per_set[name]
    if set(per_set) == set(commonsense.DATASETS):
      results[f'eval/{mode}/mean'] = commonsense.mean_accuracy(per_set)
  return results
