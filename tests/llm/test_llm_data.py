"""train.llm.data against hand-written prompts, tokens and batch layouts.

The expected prompts are those of LLM-Adapters' / DoRA's ``finetune.py``
(``generate_prompt``), written out by hand; the expected token lists follow
its ``tokenize`` and ``generate_and_tokenize_prompt``.
"""
import json
import os

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
import transformers

from train.llm import data
from train.llm import smoke

# -- A word-level tokenizer with a hand-written vocabulary --------------------

_WORDS = ('Below is an instruction that describes a task . Write a response'
          ' appropriately completes the request , paired with input provides'
          ' further context ### Instruction Input Response : Say hi there Be'
          ' kind').split()
_SPECIAL = ['<pad>', '<unk>', '<s>', '</s>']


def _tokenizer(*, bos=True, eos_at_end=False, pad=True, extra=()):
  """Whitespace/punctuation words; '<s>' in front like Llama's (``bos``)."""
  vocab = {w: i for i, w in enumerate(dict.fromkeys(
      _SPECIAL + list(_WORDS) + list(extra)))}
  tok = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  single = ' '.join((['<s>'] if bos else []) + ['$A'] +
                    (['</s>'] if eos_at_end else []))
  tok.post_processor = processors.TemplateProcessing(
      single=single, special_tokens=[('<s>', vocab['<s>']),
                                     ('</s>', vocab['</s>'])])
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token='<s>', eos_token='</s>',
      unk_token='<unk>', **({'pad_token': '<pad>'} if pad else {}))


def _tokens(tokenizer, ids):
  return tokenizer.convert_ids_to_tokens(ids)


_HI = {'instruction': 'Say hi.', 'input': '', 'output': 'hi there',
       'answer': 'x'}
_HI_WITH_INPUT = {**_HI, 'input': 'Be kind.'}
_HEADER_TOKENS = ('Below is an instruction that describes a task . Write a'
                  ' response that appropriately completes the request .'
                  ).split()
_HEADER_WITH_INPUT_TOKENS = (
    'Below is an instruction that describes a task , paired with an input that'
    ' provides further context . Write a response that appropriately completes'
    ' the request .').split()

# -- prompt -------------------------------------------------------------------


def test_prompt_without_input_is_the_reference_template():
  expected = (
      'Below is an instruction that describes a task. Write a response that'
      ' appropriately completes the request.  \n'
      '\n'
      '                ### Instruction:\n'
      '                Say hi.\n'
      '                \n'
      '                ### Response:\n'
      '                ')
  assert data.prompt(_HI, with_response=False) == expected
  assert data.prompt(_HI, with_response=True) == expected + 'hi there'


def test_prompt_with_input_is_the_reference_template():
  expected = (
      'Below is an instruction that describes a task, paired with an input'
      ' that provides further context. Write a response that appropriately'
      ' completes the request. \n'
      '\n'
      '                ### Instruction:\n'
      '                Say hi.\n'
      '                \n'
      '                ### Input:\n'
      '                Be kind.\n'
      '                \n'
      '                ### Response:\n'
      '                ')
  assert data.prompt(_HI_WITH_INPUT, with_response=False) == expected
  assert data.prompt(_HI_WITH_INPUT, with_response=True) == (
      expected + 'hi there')


def test_prompt_keeps_braces_and_newlines_of_the_text():
  e = {'instruction': 'Use {x}\n\nnow', 'input': '', 'output': '{y}'}
  assert data.prompt(e, with_response=True).endswith(
      '### Instruction:\n                Use {x}\n\nnow\n                \n'
      '                ### Response:\n                {y}')


# -- tokenize -----------------------------------------------------------------

_PROMPT_TOKENS = (['<s>'] + _HEADER_TOKENS +
                  '### Instruction : Say hi . ### Response :'.split())  # 28.


@pytest.mark.parametrize('eos_at_end', [False, True])
def test_tokenize_masks_exactly_the_response_and_appends_eos(eos_at_end):
  # A tokenizer that ends every text with EOS itself gets no second one; the
  # prompt alone then ends with EOS too, which is not counted in it.
  tok = _tokenizer(eos_at_end=eos_at_end)
  out = data.tokenize(tok, _HI, cutoff_len=256)
  assert _tokens(tok, out['input_ids']) == _PROMPT_TOKENS + [
      'hi', 'there', '</s>']
  assert out['loss_mask'] == [0] * 28 + [1, 1, 1]


def test_tokenize_with_input():
  tok = _tokenizer()
  out = data.tokenize(tok, _HI_WITH_INPUT, cutoff_len=256)
  prompt_tokens = (['<s>'] + _HEADER_WITH_INPUT_TOKENS +
                   '### Instruction : Say hi . ### Input : Be kind . ###'
                   ' Response :'.split())
  assert _tokens(tok, out['input_ids']) == prompt_tokens + [
      'hi', 'there', '</s>']
  assert out['loss_mask'] == [0] * len(prompt_tokens) + [1, 1, 1]
  assert len(prompt_tokens) == 43


def test_tokenize_train_on_inputs_puts_every_token_in_the_loss():
  out = data.tokenize(_tokenizer(), _HI, cutoff_len=256, train_on_inputs=True)
  assert out['loss_mask'] == [1] * 31


@pytest.mark.parametrize('cutoff_len, tail, mask_ones', [
    (31, ['hi', 'there', '</s>'], 3),  # 30 tokens, room for EOS.
    (30, ['hi', 'there'], 2),  # Exactly full: no EOS (as the reference).
    (29, ['hi'], 1),  # Truncated: no EOS.
])
def test_tokenize_cutoff(cutoff_len, tail, mask_ones):
  tok = _tokenizer()
  out = data.tokenize(tok, _HI, cutoff_len=cutoff_len)
  assert _tokens(tok, out['input_ids']) == _PROMPT_TOKENS + tail
  assert out['loss_mask'] == [0] * 28 + [1] * mask_ones


def test_tokenize_cut_inside_the_prompt_has_nothing_in_the_loss():
  tok = _tokenizer()
  out = data.tokenize(tok, _HI, cutoff_len=20)
  assert _tokens(tok, out['input_ids']) == _PROMPT_TOKENS[:20]
  assert out['loss_mask'] == [0] * 20


def test_tokenize_without_bos_adds_none():
  tok = _tokenizer(bos=False)  # Like Qwen's: no BOS.
  out = data.tokenize(tok, _HI, cutoff_len=256)
  assert _tokens(tok, out['input_ids']) == _PROMPT_TOKENS[1:] + [
      'hi', 'there', '</s>']
  assert out['loss_mask'] == [0] * 27 + [1, 1, 1]


def test_tokenize_needs_an_eos_token():
  tok = _tokenizer()
  tok.eos_token = None
  with pytest.raises(ValueError, match='has no EOS'):
    data.tokenize(tok, _HI, cutoff_len=256)


# -- train_batches ------------------------------------------------------------

_N = 10  # Examples 'Say wK' -> 'oK': 27 prompt tokens, 'oK', '</s>'.
_ROWS = [{'instruction': f'Say w{k}', 'input': '', 'output': f'o{k}',
          'answer': f'o{k}'} for k in range(_N)]
_EXTRA = [f'w{k}' for k in range(_N)] + [f'o{k}' for k in range(_N)]
_SEQ = 32


def _which(tokenizer, batch) -> list[int]:
  """The example in each row: its 'wK' is token 23."""
  return [int(tokenizer.convert_ids_to_tokens(int(i))[1:])
          for i in batch['input_ids'][:, 23]]


def _batches(tokenizer, n, **kwargs):
  kwargs = {'batch_size': 4, 'seq_len': _SEQ, 'seed': 0, **kwargs}
  it = data.train_batches(_ROWS, tokenizer, **kwargs)
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert sorted(x) == sorted(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_batches_shapes_padding_and_masks():
  tok = _tokenizer(extra=_EXTRA)
  for b in _batches(tok, 3):
    assert b['input_ids'].dtype == np.int32
    assert b['loss_mask'].dtype == np.int32
    assert b['attention_mask'].dtype == np.bool_
    assert b['input_ids'].shape == b['loss_mask'].shape == (4, _SEQ)
    assert b['attention_mask'].shape == (4, _SEQ)
    for row, (ids, loss, att) in enumerate(zip(
        b['input_ids'], b['loss_mask'], b['attention_mask'])):
      k = _which(tok, b)[row]
      assert _tokens(tok, ids[27:29]) == [f'o{k}', '</s>']
      assert att.tolist() == [True] * 29 + [False] * 3
      assert loss.tolist() == [0] * 27 + [1, 1] + [0] * 3
      assert ids[29:].tolist() == [tok.convert_tokens_to_ids('<pad>')] * 3


def test_batches_pad_with_eos_when_the_tokenizer_has_no_pad():
  tok = _tokenizer(extra=_EXTRA, pad=False)
  b = _batches(tok, 1)[0]
  assert _tokens(tok, b['input_ids'][0, 29:]) == ['</s>'] * 3
  assert b['loss_mask'][:, 29:].sum() == 0
  assert not b['attention_mask'][:, 29:].any()


def test_batches_are_deterministic_in_the_seed():
  tok = _tokenizer(extra=_EXTRA)
  _assert_same(_batches(tok, 6), _batches(tok, 6))
  orders = [sum((_which(tok, b) for b in _batches(tok, 5, seed=s)), [])
            for s in (0, 1)]
  assert orders[0] != orders[1]


def test_resumed_batches_equal_the_uninterrupted_stream():
  tok = _tokenizer(extra=_EXTRA)
  full = _batches(tok, 9)
  _assert_same(_batches(tok, 4, start_step=5), full[5:9])


@pytest.mark.parametrize('start_step', [0, 3])
def test_process_shares_concatenate_to_the_global_batch(start_step):
  tok = _tokenizer(extra=_EXTRA)
  whole = _batches(tok, 5, start_step=start_step)
  shares = [_batches(tok, 5, start_step=start_step, process_index=p,
                     process_count=2) for p in (0, 1)]
  for step in range(5):
    for k in whole[step]:
      assert shares[0][step][k].shape[0] == 2
      np.testing.assert_array_equal(
          np.concatenate([shares[0][step][k], shares[1][step][k]]),
          whole[step][k])


def test_every_epoch_is_a_fresh_permutation():
  tok = _tokenizer(extra=_EXTRA)
  # Batches of 5 from 10 examples: each epoch is two batches.
  seen = sum((_which(tok, b) for b in _batches(tok, 8, batch_size=5)), [])
  epochs = [seen[i:i + _N] for i in range(0, len(seen), _N)]
  for epoch in epochs:
    assert sorted(epoch) == list(range(_N))
  assert len({tuple(e) for e in epochs}) > 1


def test_batches_span_epochs_when_the_size_does_not_divide():
  tok = _tokenizer(extra=_EXTRA)
  seen = sum((_which(tok, b) for b in _batches(tok, 5, batch_size=4)), [])
  assert sorted(seen[:_N]) == list(range(_N))  # Batch 2 holds epoch 1's start.
  assert sorted(seen[_N:2 * _N]) == list(range(_N))


def test_each_example_is_tokenized_once():
  tok = _tokenizer(extra=_EXTRA)
  calls = []

  class Counting:

    def __getattr__(self, name):
      return getattr(tok, name)

    def __call__(self, *args, **kwargs):
      calls.append(args[0])
      return tok(*args, **kwargs)

  it = data.train_batches(_ROWS, Counting(), batch_size=5, seq_len=_SEQ,
                          seed=0)
  for _ in range(6):  # Three epochs.
    next(it)
  assert len(calls) == 2 * _N  # With and without the response.


def test_batch_size_must_divide_among_processes():
  with pytest.raises(ValueError, match=r'batch_size 6 .* process_count 4'):
    data.train_batches(_ROWS, _tokenizer(extra=_EXTRA), batch_size=6,
                       seq_len=_SEQ, seed=0, process_count=4)


# -- read_examples ------------------------------------------------------------


def _write(tmp_path, value, name='rows.json'):
  path = os.path.join(tmp_path, name)
  with open(path, 'w', encoding='utf-8') as f:
    f.write(value if isinstance(value, str) else json.dumps(value))
  return path


_GOOD = {'instruction': 'Q?', 'input': '', 'output': 'the correct answer is'
         ' true', 'answer': 'true'}


def test_read_examples_returns_the_rows(tmp_path):
  rows = [_GOOD, {**_GOOD, 'input': 'ctx', 'output': ''}]
  assert data.read_examples(_write(tmp_path, rows)) == rows


@pytest.mark.parametrize('text, message', [
    ('[{"instruction": "Q?",', 'is not valid JSON'),
    ('', 'is not valid JSON'),
    ('{"instruction": "Q?"}', 'holds an object, not a list'),
    ('"rows"', 'holds a string, not a list'),
])
def test_read_examples_refuses_a_bad_file_by_name(tmp_path, text, message):
  path = _write(tmp_path, text, name='bad_file.json')
  with pytest.raises(ValueError, match=message) as e:
    data.read_examples(path)
  assert str(e.value).startswith(path)


@pytest.mark.parametrize('row, message', [
    (['Q?', '', 'a', 'a'], 'row 2 is an array, not an object'),
    ('Q?', 'row 2 is a string, not an object'),
    ({k: v for k, v in _GOOD.items() if k != 'instruction'},
     "row 2: field 'instruction' is missing"),
    ({k: v for k, v in _GOOD.items() if k != 'input'},
     "row 2: field 'input' is missing"),
    ({k: v for k, v in _GOOD.items() if k != 'output'},
     "row 2: field 'output' is missing"),
    ({k: v for k, v in _GOOD.items() if k != 'answer'},
     "row 2: field 'answer' is missing"),
    ({**_GOOD, 'input': None}, "row 2: field 'input' is null, not a string"),
    ({**_GOOD, 'answer': True},
     "row 2: field 'answer' is a boolean, not a string"),
    ({**_GOOD, 'output': 3}, "row 2: field 'output' is a number, not a"),
    ({**_GOOD, 'instruction': ''}, "row 2: field 'instruction' is empty"),
    ({**_GOOD, 'answer': ''}, "row 2: field 'answer' is empty"),
])
def test_read_examples_refuses_a_malformed_row_by_file_row_and_field(
    tmp_path, row, message):
  path = _write(tmp_path, [_GOOD, _GOOD, row, _GOOD], name='set.json')
  with pytest.raises(ValueError) as e:
    data.read_examples(path)
  assert str(e.value).startswith(f'{path}: ')
  assert message in str(e.value)


def test_read_examples_without_required_answers(tmp_path):
  no_answer = {k: v for k, v in _GOOD.items() if k != 'answer'}
  path = _write(tmp_path, [no_answer, {**_GOOD, 'answer': ''}])
  assert len(data.read_examples(path, require_answer=False)) == 2
  bad = _write(tmp_path, [no_answer, {**_GOOD, 'answer': 1}], name='b.json')
  with pytest.raises(ValueError, match="row 1: field 'answer' is a number"):
    data.read_examples(bad, require_answer=False)


# -- write_smoke_data ---------------------------------------------------------

_SETS = ['ARC-Challenge', 'ARC-Easy', 'boolq', 'hellaswag', 'openbookqa',
         'piqa', 'social_i_qa', 'winogrande']


def _files(directory):
  return sorted(os.path.relpath(os.path.join(d, f), directory)
                for d, _, fs in os.walk(directory) for f in fs)


def test_smoke_data_files_and_round_trip(tmp_path):
  smoke.write_data(str(tmp_path), num_train=24, num_test=5, seed=3)
  assert _files(tmp_path) == ['commonsense_170k.json'] + [
      f'dataset/{name}/test.json' for name in _SETS]
  train = data.read_examples(str(tmp_path / 'commonsense_170k.json'))
  assert len(train) == 24
  for name in _SETS:
    rows = data.read_examples(str(tmp_path / 'dataset' / name / 'test.json'))
    assert len(rows) == 5
  for row in train:
    assert row['input'] == ''
    assert row['output'] == f'the correct answer is {row["answer"]}'


def test_smoke_data_is_deterministic_in_the_seed(tmp_path):
  def contents(seed):
    d = tmp_path / str(seed)
    smoke.write_data(str(d), num_train=16, num_test=3, seed=seed)
    return {f: (d / f).read_bytes() for f in _files(d)}
  first = contents(0)
  assert contents(0) == first
  other = contents(1)
  assert all(other[f] != first[f] for f in first)


def test_smoke_data_writes_atomically(tmp_path, monkeypatch):
  smoke.write_data(str(tmp_path), num_train=8, num_test=2)
  before = (tmp_path / 'commonsense_170k.json').read_bytes()

  def broken_dump(*args, **kwargs):
    raise OSError('disk full')
  monkeypatch.setattr(json, 'dump', broken_dump)
  with pytest.raises(OSError, match='disk full'):
    smoke.write_data(str(tmp_path), num_train=8, num_test=2, seed=1)
  assert (tmp_path / 'commonsense_170k.json').read_bytes() == before
  assert [f for f in _files(tmp_path) if 'tmp' in f] == []
