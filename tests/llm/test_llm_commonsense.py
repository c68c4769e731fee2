"""train.llm.commonsense against what DoRA's commonsense_evaluate.py returns.

The expected answers below were worked out by hand from DoRA's
``extract_answer`` (``commonsense_reasoning/commonsense_evaluate.py``): the
reply after the last ``### Response:`` (its ``evaluate`` splits and takes
``[-1]``), ``re.findall`` of the set's alternatives, the first hit, ``''``
(here None) when there is none. The regexes are case-sensitive and have no
word boundaries.
"""
import json
import os
import re

import numpy as np
import pytest

from train.llm import commonsense
from train.llm import data
from train.llm import smoke

_EIGHT = ['boolq', 'piqa', 'social_i_qa', 'hellaswag', 'winogrande',
          'ARC-Easy', 'ARC-Challenge', 'openbookqa']

# (set, model reply, what DoRA's extract_answer gives; None for its '').
_REPLIES = [
    ('boolq', 'the correct answer is true', 'true'),
    ('boolq', 'the correct answer is false', 'false'),
    ('boolq', 'I cannot tell.', None),  # No answer word.
    ('boolq', 'false, not true', 'false'),  # Two: the first.
    ('boolq', 'The correct answer is True', None),  # Case.
    ('boolq', 'TRUE or FALSE', None),
    ('boolq', 'the correct answer is true.', 'true'),  # Punctuation.
    ('boolq', 'the correct answer is yes', None),  # Outside the vocabulary.
    ('boolq', 'it is untrue', 'true'),  # Inside a word.
    ('boolq', '', None),  # Empty.
    ('piqa', 'the correct answer is solution2', 'solution2'),
    ('piqa', 'the correct answer is the first one', None),
    ('piqa', 'solution2 rather than solution1', 'solution2'),
    ('piqa', 'the correct answer is Solution1', None),
    ('piqa', 'the correct answer is solution1!', 'solution1'),
    ('piqa', 'the correct answer is solution3', None),
    ('piqa', 'solution12', 'solution1'),
    ('piqa', '', None),
    ('social_i_qa', 'the correct answer is answer3', 'answer3'),
    ('social_i_qa', 'the correct answer is', None),
    ('social_i_qa', 'answer2 or answer1', 'answer2'),
    ('social_i_qa', 'the correct answer is Answer1', None),
    ('social_i_qa', 'the correct answer is answer1.', 'answer1'),
    ('social_i_qa', 'the correct answer is answer5', 'answer5'),  # Matched.
    ('social_i_qa', 'the correct answer is answer6', None),
    ('social_i_qa', '', None),
    ('hellaswag', 'the correct answer is ending4', 'ending4'),
    ('hellaswag', 'the correct answer is ending 1', None),
    ('hellaswag', 'ending3 ending2', 'ending3'),
    ('hellaswag', 'the correct answer is Ending2', None),
    ('hellaswag', 'the correct answer is ending1;', 'ending1'),
    ('hellaswag', 'the correct answer is ending5', None),
    ('hellaswag', '', None),
    ('winogrande', 'the correct answer is option2', 'option2'),
    ('winogrande', 'the correct answer is Sarah', None),
    ('winogrande', 'option1 option2', 'option1'),
    ('winogrande', 'the correct answer is Option1', None),
    ('winogrande', 'the correct answer is option1)', 'option1'),
    ('winogrande', 'the correct answer is option3', None),
    ('winogrande', '', None),
    ('ARC-Easy', 'the correct answer is answer4', 'answer4'),
    ('ARC-Easy', 'the correct answer is answer 4', None),
    ('ARC-Easy', 'answer3, then answer1', 'answer3'),
    ('ARC-Easy', 'the correct answer is ANSWER2', None),
    ('ARC-Easy', 'the correct answer is answer2.', 'answer2'),
    ('ARC-Easy', 'the correct answer is answer5', 'answer5'),
    ('ARC-Easy', 'the correct answer is answer10', 'answer1'),
    ('ARC-Easy', '', None),
    ('ARC-Challenge', 'the correct answer is answer1', 'answer1'),
    ('ARC-Challenge', 'the correct answer is', None),
    ('ARC-Challenge', 'answer4 answer2', 'answer4'),
    ('ARC-Challenge', 'the correct answer is Answer3', None),
    ('ARC-Challenge', 'the correct answer is answer3,', 'answer3'),
    ('ARC-Challenge', 'the correct answer is answer7', None),
    ('ARC-Challenge', '', None),
    ('openbookqa', 'the correct answer is answer2', 'answer2'),
    ('openbookqa', 'the correct answer is B', None),
    ('openbookqa', 'answer1answer4', 'answer1'),
    ('openbookqa', 'the correct answer is Answer4', None),
    ('openbookqa', 'the correct answer is answer4.', 'answer4'),
    ('openbookqa', 'the correct answer is answer5', 'answer5'),  # Matched.
    ('openbookqa', '', None),
]


def test_every_set_has_replies_here():
  assert sorted({r[0] for r in _REPLIES}) == sorted(_EIGHT)


def test_datasets_are_the_reference_directories():
  assert list(commonsense.DATASETS) == _EIGHT


@pytest.mark.parametrize('dataset, reply, expected', _REPLIES)
def test_extract_answer_as_dora(dataset, reply, expected):
  assert commonsense.extract_answer(dataset, reply) == expected


# A decoded generation holds the prompt, whose instruction names every answer.
_DECODED = (
    'Below is an instruction that describes a task. Write a response that'
    ' appropriately completes the request. \n\n                ### Instruction:'
    '\n                Please choose the correct solution to the question: Dry'
    ' a wet phone.\n\nSolution1: rice\n\nSolution2: oven\n\nAnswer format:'
    ' solution1/solution2\n\n                ### Response:\n                '
    'the correct answer is solution2')


@pytest.mark.parametrize('reply, expected', [
    (_DECODED, 'solution2'),
    (_DECODED.replace('is solution2', 'is unclear'), None),
    # The model writes another response section: the last one counts.
    (_DECODED + '\n### Response: solution1', 'solution1'),
    ('### Response:', None),
])
def test_extract_answer_reads_after_the_last_response_marker(reply, expected):
  assert commonsense.extract_answer('piqa', reply) == expected


@pytest.mark.parametrize('name', ['BoolQ', 'siqa', 'arc_easy', ''])
def test_unknown_set_is_refused_naming_it_and_the_known(name):
  for call in (lambda: commonsense.extract_answer(name, 'true'),
               lambda: commonsense.candidates(name, {'instruction': 'x'}),
               lambda: commonsense.is_correct(name, {'answer': 'true'},
                                              'true')):
    with pytest.raises(ValueError) as e:
      call()
    assert repr(name) in str(e.value)
    assert 'boolq, piqa, social_i_qa, hellaswag, winogrande, ARC-Easy,' \
        ' ARC-Challenge, openbookqa' in str(e.value)


# -- candidates ---------------------------------------------------------------

# Rows as the real test sets phrase them (LLM-Adapters' dataset/*/test.json).
_ROWS = {
    'boolq': ('Please answer the following question with true or false,'
              ' question: is the sky blue?\n\nAnswer format: true/false',
              ['true', 'false']),
    'piqa': ('Please choose the correct solution to the question: Dry a'
             ' phone.\n\nSolution1: rice\n\nSolution2: oven\n\nAnswer format:'
             ' solution1/solution2', ['solution1', 'solution2']),
    'social_i_qa': ('Please choose the correct answer to the question: Kai'
                    ' left. Why?\n\nAnswer1: tired Answer2: late Answer3: ill'
                    '\n\nAnswer format: answer1/answer2/answer3',
                    ['answer1', 'answer2', 'answer3']),
    'hellaswag': ('Please choose the correct ending to complete the given'
                  ' sentence: Baking: A man mixes flour.\n\nEnding1: he eats'
                  ' Ending2: he bakes Ending3: he sings Ending4: he runs\n\n'
                  'Answer format: ending1/ending2/ending3/ending4',
                  ['ending1', 'ending2', 'ending3', 'ending4']),
    'winogrande': ('Please choose the correct answer to fill in the blank to'
                   ' complete the given sentence: Sarah helped Maria as _ was'
                   ' kind.\n\nOption1: Sarah Option2: Maria Answer format:'
                   ' option1/option2', ['option1', 'option2']),
    'ARC-Easy': ('Please choose the correct answer to the question: Which is'
                 ' a gas?\n\nAnswer1: ice Answer2: steam Answer3: rock'
                 ' Answer4: wood Answer5: salt\n\nAnswer format: answer1/'
                 'answer2/answer3/answer4/answer5',
                 ['answer1', 'answer2', 'answer3', 'answer4', 'answer5']),
    'ARC-Challenge': ('Please choose the correct answer to the question: Which'
                      ' is hot?\n\nAnswer1: sun Answer2: moon Answer3: snow'
                      '\n\nAnswer format: answer1/answer2/answer3',
                      ['answer1', 'answer2', 'answer3']),
    'openbookqa': ('Please choose the correct answer to the question: Plants'
                   ' need\n\nAnswer1: light Answer2: noise Answer3: iron'
                   ' Answer4: plastic\n\nAnswer format: answer1/answer2/answer3'
                   '/answer4', ['answer1', 'answer2', 'answer3', 'answer4']),
}


@pytest.mark.parametrize('dataset', _EIGHT)
def test_candidates_are_the_rows_answer_format(dataset):
  instruction, expected = _ROWS[dataset]
  assert commonsense.candidates(dataset, {'instruction': instruction}) == (
      expected)


@pytest.mark.parametrize('dataset, expected', [
    ('boolq', ['true', 'false']),
    ('piqa', ['solution1', 'solution2']),
    ('social_i_qa', ['answer1', 'answer2', 'answer3']),
    ('hellaswag', ['ending1', 'ending2', 'ending3', 'ending4']),
    ('winogrande', ['option1', 'option2']),
    ('ARC-Easy', ['answer1', 'answer2', 'answer3', 'answer4', 'answer5']),
    ('ARC-Challenge', ['answer1', 'answer2', 'answer3', 'answer4', 'answer5']),
    ('openbookqa', ['answer1', 'answer2', 'answer3', 'answer4']),
])
def test_candidates_without_a_format_line_are_the_sets_labels(
    dataset, expected):
  assert commonsense.candidates(dataset, {'instruction': 'Choose.'}) == (
      expected)


def test_candidates_refuse_another_sets_row():
  with pytest.raises(ValueError, match=r"\['solution1', 'solution2'\].*boolq"):
    commonsense.candidates('boolq', {'instruction': _ROWS['piqa'][0]})
  with pytest.raises(ValueError, match=r"\['answer4'\].*social_i_qa"):
    commonsense.candidates('social_i_qa',
                           {'instruction': _ROWS['openbookqa'][0]})


# -- is_correct, mean_accuracy ------------------------------------------------


@pytest.mark.parametrize('dataset, answer, predicted, expected', [
    ('boolq', 'true', 'true', True),
    ('boolq', 'true', 'false', False),
    ('boolq', 'false', None, False),
    ('social_i_qa', 'answer3', 'answer5', False),
    ('ARC-Easy', 'answer5', 'answer5', True),
    ('winogrande', 'option1', 'Option1', False),
])
def test_is_correct(dataset, answer, predicted, expected):
  assert commonsense.is_correct(dataset, {'answer': answer}, predicted) is (
      expected)


def test_is_correct_refuses_a_label_outside_the_set():
  with pytest.raises(ValueError, match="'answer4' is not one of social_i_qa"):
    commonsense.is_correct('social_i_qa', {'answer': 'answer4'}, 'answer4')


def test_mean_accuracy_is_the_readme_average():
  # DoRA's commonsense_reasoning/README.md, LLaMA-7B: DoRA r32 (Average
  # 78.4) and LoRA r32 (76.25, printed 76.3); in a shuffled key order.
  dora = [69.7, 83.4, 78.6, 87.2, 81.0, 81.9, 66.2, 79.2]
  lora = [67.5, 80.8, 78.2, 83.4, 80.4, 78.0, 62.6, 79.1]
  for row, average in ((dora, 78.4), (lora, 76.25)):
    per_set = dict(reversed(list(zip(_EIGHT, row))))
    assert commonsense.mean_accuracy(per_set) == pytest.approx(average)


def test_mean_accuracy_needs_the_eight():
  seven = {name: 0.5 for name in _EIGHT[:7]}
  with pytest.raises(ValueError, match=r"missing \['openbookqa'\]"):
    commonsense.mean_accuracy(seven)
  with pytest.raises(ValueError, match=r"unknown \['mmlu'\]"):
    commonsense.mean_accuracy({**seven, 'openbookqa': 0.5, 'mmlu': 0.1})


# -- evaluation_prompt --------------------------------------------------------


def test_evaluation_prompt_is_the_reference_evaluation_template():
  row = {'instruction': 'Say hi.', 'input': '', 'output': 'hi',
         'answer': 'x'}
  assert commonsense.evaluation_prompt(row) == (
      'Below is an instruction that describes a task. Write a response that'
      ' appropriately completes the request. \n'
      '\n'
      '                ### Instruction:\n'
      '                Say hi.\n'
      '\n'
      '                ### Response:\n'
      '                ')
  assert commonsense.evaluation_prompt({**row, 'input': 'Be kind.'}) == (
      'Below is an instruction that describes a task, paired with an input'
      ' that provides further context. Write a response that appropriately'
      ' completes the request.\n'
      '\n'
      '                ### Instruction:\n'
      '                Say hi.\n'
      '\n'
      '                ### Input:\n'
      '                Be kind.\n'
      '\n'
      '                ### Response:\n'
      '                ')


# -- Smoke data in the sets' formats ------------------------------------------

# How each set's instructions open (LLM-Adapters' dataset/*/test.json).
_OPENINGS = {
    'boolq': 'Please answer the following question with true or false,'
             ' question: ',
    'piqa': 'Please choose the correct solution to the question: ',
    'social_i_qa': 'Please choose the correct answer to the question: ',
    'hellaswag': 'Please choose the correct ending to complete the given'
                 ' sentence: ',
    'winogrande': 'Please choose the correct answer to fill in the blank to'
                  ' complete the given sentence: ',
    'ARC-Easy': 'Please choose the correct answer to the question: ',
    'ARC-Challenge': 'Please choose the correct answer to the question: ',
    'openbookqa': 'Please choose the correct answer to the question: ',
}
_VOCABULARY = {
    'boolq': {'true', 'false'},
    'piqa': {'solution1', 'solution2'},
    'social_i_qa': {'answer1', 'answer2', 'answer3'},
    'hellaswag': {'ending1', 'ending2', 'ending3', 'ending4'},
    'winogrande': {'option1', 'option2'},
    'ARC-Easy': {'answer1', 'answer2', 'answer3', 'answer4', 'answer5'},
    'ARC-Challenge': {'answer1', 'answer2', 'answer3', 'answer4', 'answer5'},
    'openbookqa': {'answer1', 'answer2', 'answer3', 'answer4'},
}


def _check_smoke_row(name, row):
  assert row['instruction'].startswith(_OPENINGS[name])
  options = commonsense.candidates(name, row)
  assert row['answer'] in options
  assert set(options) <= _VOCABULARY[name]
  assert row['instruction'].endswith('Answer format: ' + '/'.join(options))
  # The model's reply to it is scored right.
  reply = data.prompt(row, with_response=True)
  assert commonsense.extract_answer(name, reply) == row['answer']
  assert commonsense.is_correct(name, row, row['answer'])


def test_smoke_data_answers_are_each_sets_candidates(tmp_path):
  smoke.write_data(str(tmp_path), num_train=32, num_test=12, seed=5)
  for name in _EIGHT:
    rows = data.read_examples(
        os.path.join(tmp_path, 'dataset', name, 'test.json'))
    for row in rows:
      _check_smoke_row(name, row)
  with open(tmp_path / 'commonsense_170k.json', encoding='utf-8') as f:
    train = json.load(f)
  # Every set's rows are in the training file (four each).
  for name, opening in _OPENINGS.items():
    if name.startswith('ARC') or name in ('social_i_qa', 'openbookqa'):
      continue  # Those four open alike.
    assert sum(r['instruction'].startswith(opening) for r in train) == 4


# The layout of each set's real rows (LLM-Adapters' dataset/*/test.json;
# hellaswag's as DoRA's evaluation prints them), the text between as ``.+``.
_Q = 'Please choose the correct answer to the question: '
_LAYOUTS = {
    'boolq': (r'Please answer the following question with true or false,'
              r' question: [^\n]+\?\n\nAnswer format: true/false'),
    'piqa': (r'Please choose the correct solution to the question: [^\n]+\n\n'
             r'Solution1: [^\n]+\n\nSolution2: [^\n]+\n\n'
             r'Answer format: solution1/solution2'),
    'social_i_qa': (_Q + r'[^\n]+\n\nAnswer1: .+ Answer2: .+ Answer3: .+\n\n'
                    r'Answer format: answer1/answer2/answer3'),
    'hellaswag': (r'Please choose the correct ending to complete the given'
                  r' sentence: \w+: [^\n]+\n\nEnding1: .+ Ending2: .+'
                  r' Ending3: .+ Ending4: .+\n\n'
                  r'Answer format: ending1/ending2/ending3/ending4'),
    'winogrande': (r'Please choose the correct answer to fill in the blank to'
                   r' complete the given sentence: [^\n]*_[^\n]*\n\n'
                   r'Option1: .+ Option2: .+ Answer format: option1/option2'),
    'ARC-Easy': (_Q + r'[^\n]+\n\nAnswer1: .+ Answer2: .+ Answer3: .+'
                 r'( Answer4: .+( Answer5: .+)?)?\n\n'
                 r'Answer format: answer1/answer2/answer3'
                 r'(/answer4(/answer5)?)?'),
    'openbookqa': (_Q + r'[^\n]+\n\nAnswer1: .+ Answer2: .+ Answer3: .+'
                   r' Answer4: .+\n\nAnswer format: answer1/answer2/answer3'
                   r'/answer4'),
}
_LAYOUTS['ARC-Challenge'] = _LAYOUTS['ARC-Easy']


@pytest.mark.parametrize('name', _EIGHT)
def test_smoke_rows_have_their_sets_layout(name):
  rng = np.random.default_rng(0)
  for _ in range(20):
    row = commonsense.smoke_example(name, rng)
    assert re.fullmatch(_LAYOUTS[name], row['instruction']), row
    assert row['input'] == ''
    assert row['output'] == 'the correct answer is ' + row['answer']


def test_smoke_arc_rows_have_three_to_five_options():
  rng = np.random.default_rng(0)
  counts = {len(commonsense.candidates(
      'ARC-Easy', commonsense.smoke_example('ARC-Easy', rng)))
            for _ in range(200)}
  assert counts == {3, 4, 5}
