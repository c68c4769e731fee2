"""A minimal stand-in for train/llm/data.py and train/llm/commonsense.py.

Those two modules are written on another branch (the data and answer
extraction of the commonsense recipe). Until it is merged, the LLM tests put
this stand-in in their place (``install()``); once the real modules exist,
``install()`` does nothing and the tests run against them. It implements the
agreed interface only as far as the tests need, in the real files' formats.

``python -m tests.llm_standin ARGS`` runs ``python -m train.llm ARGS`` with
the stand-in installed (the tests' subprocesses).
"""

import importlib.util
import json
import os
import re
import runpy
import sys
import types

import numpy as np

DATASETS = ('boolq', 'piqa', 'social_i_qa', 'hellaswag', 'winogrande',
            'ARC-Easy', 'ARC-Challenge', 'openbookqa')
_LABELS = {'boolq': ('true', 'false'), 'piqa': ('solution1', 'solution2'),
           'social_i_qa': ('answer1', 'answer2', 'answer3'),
           'hellaswag': ('ending1', 'ending2', 'ending3', 'ending4'),
           'winogrande': ('option1', 'option2'),
           'ARC-Easy': ('answer1', 'answer2', 'answer3', 'answer4'),
           'ARC-Challenge': ('answer1', 'answer2', 'answer3', 'answer4'),
           'openbookqa': ('answer1', 'answer2', 'answer3', 'answer4')}
_WORDS = ('red', 'blue', 'stone', 'river', 'cat', 'tree', 'warm', 'cold')
RESPONSE_MARKER = '### Response:'
_HEAD = ('Below is an instruction that describes a task. Write a response'
         ' that appropriately completes the request.')
_FIELDS = ('instruction', 'input', 'output', 'answer')


def read_examples(path):
  with open(path) as f:
    rows = json.load(f)
  for i, row in enumerate(rows):
    for field in _FIELDS:
      if not isinstance(row.get(field), str):
        raise ValueError(f'{path}: row {i}: field {field!r} is missing.')
  return rows


def prompt(example, *, with_response):
  text = (f'{_HEAD}\n\n### Instruction:\n{example["instruction"]}\n\n'
          f'{RESPONSE_MARKER}\n')
  return text + example['output'] if with_response else text


def evaluation_prompt(example):
  return prompt(example, with_response=False)


def tokenize(tokenizer, example, *, cutoff_len, train_on_inputs=False):
  ids = tokenizer.encode(prompt(example, with_response=True))[:cutoff_len]
  if ids[-1] != tokenizer.eos_token_id and len(ids) < cutoff_len:
    ids.append(tokenizer.eos_token_id)
  skip = 0 if train_on_inputs else min(len(tokenizer.encode(
      prompt(example, with_response=False))), len(ids))
  return {'input_ids': ids, 'loss_mask': [0] * skip + [1] * (len(ids) - skip)}


def train_batches(examples, tokenizer, *, batch_size, seq_len, seed,
                  start_step=0, process_index=0, process_count=1,
                  train_on_inputs=False):
  rows = [tokenize(tokenizer, e, cutoff_len=seq_len,
                   train_on_inputs=train_on_inputs) for e in examples]
  pad = tokenizer.pad_token_id
  pad = tokenizer.eos_token_id if pad is None else pad
  local = batch_size // process_count
  step = start_step
  while True:  # Global batch `step` is a pure function of (seed, step).
    batch = {'input_ids': np.full((local, seq_len), pad, np.int32),
             'loss_mask': np.zeros((local, seq_len), np.int32),
             'attention_mask': np.zeros((local, seq_len), bool)}
    for j in range(local):
      index = step * batch_size + process_index * local + j
      epoch, at = divmod(index, len(rows))
      row = rows[np.random.default_rng([seed, epoch]).permutation(
          len(rows))[at]]
      n = len(row['input_ids'])
      batch['input_ids'][j, :n] = row['input_ids']
      batch['loss_mask'][j, :n] = row['loss_mask']
      batch['attention_mask'][j, :n] = True
    yield batch
    step += 1


def smoke_example(dataset, rng):
  labels = _LABELS[dataset]
  answer = labels[rng.integers(len(labels))]
  options = ' '.join(f'{l.capitalize()}: {rng.choice(_WORDS)}' for l in labels)
  return {'instruction': f'Which {rng.choice(_WORDS)} is {rng.choice(_WORDS)}?'
                         f' {options} Answer format: {"/".join(labels)}',
          'input': '', 'output': f'the correct answer is {answer}',
          'answer': answer}


def _dump(path, rows):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(rows, f)


def write_smoke_data(directory, *, num_train=64, num_test=8, seed=0):
  rng = np.random.default_rng(seed)
  _dump(os.path.join(directory, 'commonsense_170k.json'),
        [smoke_example(DATASETS[i % 8], rng) for i in range(num_train)])
  for name in DATASETS:
    _dump(os.path.join(directory, 'dataset', name, 'test.json'),
          [smoke_example(name, rng) for _ in range(num_test)])


def smoke_tokenizer(examples):
  from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers  # pylint: disable=g-import-not-at-top,g-multiple-import
  import transformers  # pylint: disable=g-import-not-at-top
  tok = Tokenizer(models.WordLevel(unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.train_from_iterator(
      [prompt(e, with_response=True) for e in examples] + list(
          sum(_LABELS.values(), ())),
      trainers.WordLevelTrainer(special_tokens=['<pad>', '<unk>', '<s>',
                                                '</s>']))
  tok.post_processor = processors.TemplateProcessing(
      single='<s> $A', special_tokens=[('<s>', tok.token_to_id('<s>'))])
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token='<s>', eos_token='</s>',
      pad_token='<pad>', unk_token='<unk>')


def extract_answer(dataset, generated):
  found = re.search('|'.join(_LABELS[dataset]),
                    generated.split(RESPONSE_MARKER)[-1])
  return found.group(0) if found else None


def candidates(dataset, example):
  del example
  return list(_LABELS[dataset])


def is_correct(dataset, example, predicted):
  del dataset
  return predicted == example['answer']


def mean_accuracy(per_set):
  return float(np.mean([per_set[name] for name in DATASETS]))


def _module(name, names):
  module = types.ModuleType(name, 'Test stand-in (tests/llm_standin.py).')
  for n in names:
    setattr(module, n, globals()[n])
  return module


def install() -> bool:
  """Puts the stand-in in place of missing modules; True if it did."""
  if ('train.llm.data' in sys.modules
      or importlib.util.find_spec('train.llm.data') is not None):
    return False
  import train.llm  # pylint: disable=g-import-not-at-top
  for short, names in (
      ('data', ('read_examples', 'prompt', 'tokenize', 'train_batches',
                'write_smoke_data', 'smoke_tokenizer', 'RESPONSE_MARKER')),
      ('commonsense', ('DATASETS', 'extract_answer', 'candidates',
                       'is_correct', 'mean_accuracy', 'evaluation_prompt'))):
    module = _module(f'train.llm.{short}', names)
    sys.modules[module.__name__] = module
    setattr(train.llm, short, module)
  return True


if __name__ == '__main__':
  install()
  sys.argv = ['train.llm'] + sys.argv[1:]
  runpy.run_module('train.llm', run_name='__main__', alter_sys=True)
