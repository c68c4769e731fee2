"""Instruction data for LLM fine-tuning, as LLM-Adapters and DoRA feed it.

The commonsense recipe trains on ``commonsense_170k.json`` and tests on
``dataset/<name>/test.json`` (AGI-Edgerunners/LLM-Adapters; NVlabs/DoRA's
``commonsense_reasoning/`` reads the same files). Each file is a JSON list of
rows ``{'instruction', 'input', 'output', 'answer'}``: in these sets ``input``
is always empty, ``output`` is ``'the correct answer is <answer>'`` and
``answer`` is the label (``'true'``, ``'solution2'``, ``'answer3'`` ...).

- :func:`read_examples` reads and checks a file;
- :func:`prompt` builds the Alpaca-style prompt of the reference
  ``finetune.py`` (``generate_prompt``), whitespace included;
- :func:`tokenize` tokenizes it as that ``finetune.py`` does (the tokenizer's
  own BOS, EOS appended unless truncated, cut at ``cutoff_len``) and marks the
  response tokens for the loss;
- :func:`train_batches` serves endless, seeded, resumable fixed-shape batches,
  each process its share of every global batch.

``train.llm.smoke`` writes tiny files in the real sets' formats and a
tokenizer for them (nothing to download):

    >>> import tempfile
    >>> from train.llm import smoke
    >>> d = tempfile.mkdtemp()
    >>> smoke.write_data(d, num_train=16, num_test=2)
    >>> train = read_examples(f'{d}/commonsense_170k.json')
    >>> len(train), sorted(train[0])
    (16, ['answer', 'input', 'instruction', 'output'])
    >>> tokenizer = smoke.word_tokenizer(train)
    >>> batches = train_batches(train, tokenizer, batch_size=4, seq_len=128,
    ...                         seed=0)
    >>> b = next(batches)
    >>> {k: (v.dtype.name, v.shape) for k, v in sorted(b.items())}
    ... # doctest: +NORMALIZE_WHITESPACE
    {'attention_mask': ('bool', (4, 128)), 'input_ids': ('int32', (4, 128)),
     'loss_mask': ('int32', (4, 128))}
    >>> # The loss sees the response ('the correct answer is X') and the EOS.
    >>> [int(n) for n in b['loss_mask'].sum(axis=1)]
    [6, 6, 6, 6]
"""

import json
import os
from typing import Any, Iterator

import grain
import numpy as np

FIELDS = ('instruction', 'input', 'output', 'answer')

# The reference ``finetune.py`` writes its template as an f-string indented
# inside ``generate_prompt``, so every line after the first starts with 16
# spaces; the header of the prompt without input ends in two spaces, the one
# with input in one. All of it is part of the prompt the model is trained on.
INDENT = ' ' * 16
HEADER = ('Below is an instruction that describes a task. Write a response that'
          ' appropriately completes the request.')
HEADER_WITH_INPUT = (
    'Below is an instruction that describes a task, paired with an input that'
    ' provides further context. Write a response that appropriately completes'
    ' the request.')
RESPONSE_MARKER = '### Response:'
_TEMPLATE = (f'{HEADER}  \n\n'
             f'{INDENT}### Instruction:\n{INDENT}{{instruction}}\n{INDENT}\n'
             f'{INDENT}{RESPONSE_MARKER}\n{INDENT}')
_TEMPLATE_WITH_INPUT = (
    f'{HEADER_WITH_INPUT} \n\n'
    f'{INDENT}### Instruction:\n{INDENT}{{instruction}}\n{INDENT}\n'
    f'{INDENT}### Input:\n{INDENT}{{input}}\n{INDENT}\n'
    f'{INDENT}{RESPONSE_MARKER}\n{INDENT}')

# -- Files --------------------------------------------------------------------

_JSON_KINDS = {dict: 'an object', list: 'an array', str: 'a string',
               int: 'a number', float: 'a number', bool: 'a boolean',
               type(None): 'null'}


def _json_kind(value: Any) -> str:
  return _JSON_KINDS.get(type(value), type(value).__name__)


def read_examples(path: str, *, require_answer: bool = True) -> list[dict]:
  """The rows of an LLM-Adapters JSON file, each checked.

  Every row must be an object whose ``instruction`` (non-empty), ``input``
  and ``output`` (possibly empty) are strings, and whose ``answer`` is a
  non-empty string (or, with ``require_answer=False``, absent or a string).

  Args:
    path: e.g. ``.../commonsense_170k.json`` or ``.../dataset/piqa/test.json``.
    require_answer: refuse rows without an ``answer`` (the test sets and
      commonsense_170k all carry one; plain Alpaca data does not).

  Returns:
    The rows, as read.

  Raises:
    ValueError: naming the file (and the row index and field) when the file is
      not JSON, not a list, or a row is malformed.

  >>> import tempfile
  >>> path = tempfile.mkdtemp() + '/bad.json'
  >>> with open(path, 'w') as f:
  ...   json.dump([{'instruction': 'Q?', 'input': '', 'output': 'x'}], f)
  >>> read_examples(path)  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ValueError: .../bad.json: row 0: field 'answer' is missing.
  >>> len(read_examples(path, require_answer=False))
  1
  """
  with open(path, encoding='utf-8') as f:
    try:
      rows = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path} is not valid JSON: {e}') from e
  if not isinstance(rows, list):
    raise ValueError(f'{path} holds {_json_kind(rows)}, not a list of'
                     f' examples (objects with the fields {FIELDS}).')
  for i, row in enumerate(rows):
    _check_row(row, f'{path}: row {i}', require_answer=require_answer)
  return rows


def _check_row(row: Any, where: str, *, require_answer: bool) -> None:
  if not isinstance(row, dict):
    raise ValueError(f'{where} is {_json_kind(row)}, not an object with the'
                     f' fields {FIELDS}.')
  for field in FIELDS:
    if field not in row:
      if field == 'answer' and not require_answer:
        continue
      raise ValueError(f'{where}: field {field!r} is missing.')
    if not isinstance(row[field], str):
      raise ValueError(f'{where}: field {field!r} is'
                       f' {_json_kind(row[field])}, not a string.')
    if not row[field] and (field == 'instruction' or
                           field == 'answer' and require_answer):
      raise ValueError(f'{where}: field {field!r} is empty.')


# -- Prompts and tokens -------------------------------------------------------


def prompt(example: dict, *, with_response: bool) -> str:
  """The reference ``finetune.py``'s prompt, whitespace included.

  The template with an ``### Input:`` section when ``example['input']`` is
  non-empty, the one without otherwise; ``with_response`` appends
  ``example['output']`` after ``### Response:`` and its line's indent. Without
  it, the prompt is the prefix that :func:`tokenize` leaves out of the loss.

  >>> p = prompt({'instruction': 'Say hi.', 'input': '', 'output': 'hi'},
  ...            with_response=True)
  >>> p.splitlines()  # doctest: +NORMALIZE_WHITESPACE
  ['Below is an instruction that describes a task. Write a response that
    appropriately completes the request.  ', '',
   '                ### Instruction:', '                Say hi.',
   '                ', '                ### Response:', '                hi']
  """
  template = _TEMPLATE_WITH_INPUT if example['input'] else _TEMPLATE
  text = template.format(instruction=example['instruction'],
                         input=example['input'])
  return text + example['output'] if with_response else text


def _token_ids(tokenizer, text: str, cutoff_len: int) -> list[int]:
  # As the reference: the tokenizer's own special tokens (BOS for Llama),
  # truncated to cutoff_len tokens.
  return list(tokenizer(text, truncation=True, max_length=cutoff_len)
              ['input_ids'])


def tokenize(tokenizer, example: dict, *, cutoff_len: int,
             train_on_inputs: bool = False) -> dict:
  """Token ids of the full prompt and the mask of the tokens the loss sees.

  As the reference ``finetune.py`` (``tokenize`` and
  ``generate_and_tokenize_prompt``): the prompt with its response is
  tokenized with the tokenizer's special tokens and cut at ``cutoff_len``
  tokens; EOS is appended when the ids do not already end with it and there
  is room (fewer than ``cutoff_len`` ids). Without ``train_on_inputs``, the
  first ``n`` positions are left out of the loss, ``n`` being the length of
  the prompt without response tokenized the same way (not counting an EOS
  that the tokenizer itself puts at the end of every text).

  Args:
    tokenizer: a ``transformers`` tokenizer with an EOS token.
    example: a row (see :func:`read_examples`).
    cutoff_len: the most tokens kept.
    train_on_inputs: put every token in the loss. The reference's default
      is True and its scripts keep it; the papers' runs trained on prompts.

  Returns:
    ``{'input_ids': list[int], 'loss_mask': list[int]}`` of one length;
    ``loss_mask[t] == 1`` when the loss predicts token ``t`` (from the tokens
    before it).
  """
  eos = tokenizer.eos_token_id
  if eos is None:
    raise ValueError(f'The tokenizer {type(tokenizer).__name__} has no EOS'
                     ' token; the response must end with one.')
  ids = _token_ids(tokenizer, prompt(example, with_response=True), cutoff_len)
  if ids[-1] != eos and len(ids) < cutoff_len:
    ids.append(eos)
  if train_on_inputs:
    return {'input_ids': ids, 'loss_mask': [1] * len(ids)}
  user = _token_ids(tokenizer, prompt(example, with_response=False), cutoff_len)
  # A tokenizer that ends every text with EOS ends the prompt with it too;
  # the reference would then leave the response's first token out of the loss.
  skip = min(len(user) - (user[-1] == eos), len(ids))
  return {'input_ids': ids, 'loss_mask': [0] * skip + [1] * (len(ids) - skip)}


# -- Batches ------------------------------------------------------------------


class _Pad:
  """Right-pads one tokenized example to ``seq_len`` (a class: grain names a
  transformation by its ``repr``)."""

  def __init__(self, seq_len: int, pad_id: int):
    self.seq_len, self.pad_id = seq_len, pad_id

  def __repr__(self) -> str:
    return f'Pad({self.seq_len})'

  def __call__(self, example: dict) -> dict:
    n = len(example['input_ids'])
    ids = np.full(self.seq_len, self.pad_id, np.int32)
    ids[:n] = example['input_ids']
    loss_mask = np.zeros(self.seq_len, np.int32)
    loss_mask[:n] = example['loss_mask']
    return {'input_ids': ids, 'loss_mask': loss_mask,
            'attention_mask': np.arange(self.seq_len) < n}


def train_batches(
    examples: list[dict], tokenizer, *, batch_size: int, seq_len: int,
    seed: int, start_step: int = 0, process_index: int = 0,
    process_count: int = 1, train_on_inputs: bool = False,
) -> Iterator[dict]:
  """This process's part of global batches ``start_step``, ``start_step+1``...

  Endless: epoch after epoch, each in a fresh order drawn from ``seed``
  (grain's ``MapDataset`` shuffle; a batch may span two epochs). Global batch
  ``i`` is a pure function of ``(seed, i)``, so a run resumed at step ``s``
  sees the batches an uninterrupted run would; process ``p`` of ``P`` gets
  rows ``[p*b/P, (p+1)*b/P)`` of every global batch. Every example is
  tokenized once, here (:func:`tokenize` with ``cutoff_len=seq_len``), and
  right-padded with the tokenizer's pad id (its EOS when it has none).

  Args:
    examples: rows (see :func:`read_examples`).
    tokenizer: a ``transformers`` tokenizer with an EOS token.
    batch_size: the global batch size, over all processes.
    seq_len: the length of every row (the reference's ``cutoff_len``).
    seed: the data order.
    start_step: the number of global batches already consumed.
    process_index, process_count: this process and how many there are.
    train_on_inputs: see :func:`tokenize`.

  Yields:
    ``{'input_ids': int32[b, seq_len], 'loss_mask': int32[b, seq_len],
    'attention_mask': bool[b, seq_len]}``, ``b = batch_size //
    process_count``; padding has ``loss_mask`` 0 and ``attention_mask``
    False.
  """
  if batch_size % process_count:
    raise ValueError(f'batch_size {batch_size} is not divisible by'
                     f' process_count {process_count}.')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in [0,'
                     f' {process_count}).')
  if not examples:
    raise ValueError('No examples to train on.')
  pad_id = tokenizer.pad_token_id
  pad_id = tokenizer.eos_token_id if pad_id is None else pad_id
  tokenized = [tokenize(tokenizer, e, cutoff_len=seq_len,
                        train_on_inputs=train_on_inputs) for e in examples]
  ds = (grain.MapDataset.source(tokenized)
        .seed(seed)
        .shuffle()  # A fresh permutation every epoch.
        .repeat(None)
        .map(_Pad(seq_len, pad_id))
        .batch(batch_size // process_count))
  # Global batch i is local batches i*P .. i*P + P - 1: process p takes i*P+p.
  ds = ds[start_step * process_count + process_index::process_count]
  # No reader threads: the examples are in memory, and a batch is a copy.
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0,
                                                   prefetch_buffer_size=0)))
