r"""The eight commonsense sets: their answers, and how a reply is scored.

As LLM-Adapters (``commonsense_evaluate.py``) and DoRA
(``commonsense_reasoning/commonsense_evaluate.py``) score them: the model
replies to each test row's prompt; the reply after the last
``### Response:`` is searched for the set's answer words, case-sensitively
and inside longer words too (``'answer10'`` holds ``'answer1'``); the first
match is the prediction, and it is right when it equals the row's
``answer``. A set's accuracy is the fraction right; the papers' "Avg" is the
plain mean of the eight.

==============  =============  ===========================  =================
set             directory      answers (``answer`` field)   pattern searched
==============  =============  ===========================  =================
BoolQ           boolq          true, false                  true|false
PIQA            piqa           solution1, solution2         solution1|solution2
SIQA            social_i_qa    answer1 .. answer3           answer1|..|answer5
HellaSwag       hellaswag      ending1 .. ending4           ending1|..|ending4
WinoGrande      winogrande     option1, option2             option1|option2
ARC-e           ARC-Easy       answer1 .. answer5 (a)       answer1|..|answer5
ARC-c           ARC-Challenge  answer1 .. answer5 (a)       answer1|..|answer5
OBQA            openbookqa     answer1 .. answer4           answer1|..|answer5
==============  =============  ===========================  =================

(a) Four options almost everywhere; a few rows have three or five, and each
row's instruction ends with its own ``Answer format: answer1/.../answerN``,
which :func:`candidates` reads.

    >>> reply = 'the correct answer is answer2, not answer1.'
    >>> extract_answer('ARC-Easy', reply)
    'answer2'
    >>> row = {'instruction': 'Please choose the correct answer to the'
    ...        ' question: Which is wet?\n\nAnswer1: sand Answer2: rain'
    ...        ' Answer3: salt\n\nAnswer format: answer1/answer2/answer3',
    ...        'input': '', 'output': 'the correct answer is answer2',
    ...        'answer': 'answer2'}
    >>> candidates('ARC-Easy', row)
    ['answer1', 'answer2', 'answer3']
    >>> is_correct('ARC-Easy', row, extract_answer('ARC-Easy', reply))
    True
    >>> extract_answer('boolq', 'The correct answer is True') is None
    True
"""

import re
from typing import Optional

import numpy as np

from train.llm import data

DATASETS = ('boolq', 'piqa', 'social_i_qa', 'hellaswag', 'winogrande',
            'ARC-Easy', 'ARC-Challenge', 'openbookqa')


def _numbered(word: str, n: int) -> tuple[str, ...]:
  return tuple(f'{word}{k}' for k in range(1, n + 1))


# The labels each set's ``answer`` field takes.
_LABELS = {
    'boolq': ('true', 'false'),
    'piqa': _numbered('solution', 2),
    'social_i_qa': _numbered('answer', 3),
    'hellaswag': _numbered('ending', 4),
    'winogrande': _numbered('option', 2),
    'ARC-Easy': _numbered('answer', 5),
    'ARC-Challenge': _numbered('answer', 5),
    'openbookqa': _numbered('answer', 4),
}
# The reference ``extract_answer``'s regex per set: SIQA and OBQA share
# ARC's five answers, though their rows have three and four options.
_CHOICE_OF_FIVE = 'answer1|answer2|answer3|answer4|answer5'
_PATTERNS = {name: re.compile(pattern) for name, pattern in {
    'boolq': 'true|false',
    'piqa': 'solution1|solution2',
    'social_i_qa': _CHOICE_OF_FIVE,
    'hellaswag': 'ending1|ending2|ending3|ending4',
    'winogrande': 'option1|option2',
    'ARC-Easy': _CHOICE_OF_FIVE,
    'ARC-Challenge': _CHOICE_OF_FIVE,
    'openbookqa': _CHOICE_OF_FIVE,
}.items()}
_ANSWER_FORMAT = re.compile(r'Answer format: (\w+(?:/\w+)*)')


def _check_dataset(dataset: str) -> None:
  if dataset not in _LABELS:
    raise ValueError(f'Unknown commonsense set {dataset!r}; the sets are'
                     f' {", ".join(DATASETS)}.')


def extract_answer(dataset: str, generated: str) -> Optional[str]:
  """The answer a reply gives, as the reference ``extract_answer`` reads it.

  Args:
    dataset: one of :data:`DATASETS`.
    generated: the decoded generation, with or without the prompt: only the
      text after the last ``### Response:`` (all of it when there is none) is
      searched, as the reference ``evaluate`` cuts its outputs.

  Returns:
    The first of the set's answer words in it (case-sensitive, also inside
    longer words), or None (the reference's ``''``) when there is none.

  >>> extract_answer('piqa', 'solution2 ... or rather solution1')
  'solution2'
  >>> extract_answer('hellaswag', 'Ending3') is None  # Case matters.
  True
  """
  _check_dataset(dataset)
  reply = generated.split(data.RESPONSE_MARKER)[-1]
  found = _PATTERNS[dataset].search(reply)
  return found.group(0) if found else None


def candidates(dataset: str, example: dict) -> list[str]:
  """The answers a row allows, to score by log-likelihood.

  Those of the row's ``Answer format: a/b/...`` line (the last one in its
  instruction), which every row of the real sets has; the set's whole label
  vocabulary when it has none.

  Raises:
    ValueError: when the line names an answer outside the set's vocabulary
      (a row of another set).

  >>> candidates('winogrande', {'instruction': 'Fill in _.'})
  ['option1', 'option2']
  """
  _check_dataset(dataset)
  formats = _ANSWER_FORMAT.findall(example['instruction'])
  if not formats:
    return list(_LABELS[dataset])
  answers = formats[-1].split('/')
  outside = [a for a in answers if a not in _LABELS[dataset]]
  if outside:
    raise ValueError(f'The row allows {outside}, not answers of {dataset}'
                     f' ({", ".join(_LABELS[dataset])}): {example!r:.200}')
  return answers


def is_correct(dataset: str, example: dict, predicted: Optional[str]) -> bool:
  """Whether ``predicted`` (from :func:`extract_answer`) is the row's answer.

  Raises:
    ValueError: when the row's ``answer`` is not one of the set's labels.

  >>> is_correct('boolq', {'answer': 'false'}, None)
  False
  """
  _check_dataset(dataset)
  label = example['answer']
  if label not in _LABELS[dataset]:
    raise ValueError(f'The row\'s answer {label!r} is not one of {dataset}\'s'
                     f' ({", ".join(_LABELS[dataset])}).')
  return predicted == label


def mean_accuracy(per_set: dict[str, float]) -> float:
  """The plain mean of the eight sets' accuracies (the papers' "Avg").

  >>> mean_accuracy(dict(zip(DATASETS, [70, 80, 80, 90, 80, 80, 70, 78])))
  78.5
  """
  missing = [name for name in DATASETS if name not in per_set]
  unknown = [name for name in per_set if name not in _LABELS]
  if missing or unknown:
    raise ValueError(f'mean_accuracy needs the eight sets {DATASETS}; missing'
                     f' {missing}, unknown {unknown}.')
  return float(sum(per_set[name] for name in DATASETS) / len(DATASETS))


def evaluation_prompt(example: dict) -> str:
  """The prompt the reference ``commonsense_evaluate.py`` generates from.

  Its ``generate_prompt`` differs from training's (:func:`data.prompt`) in
  whitespace only: blank lines without the indent, and one trailing space
  after the header without input, none after the one with input. (Its caller
  passes no input; the test sets have none.)
  """
  i = data.INDENT
  if example['input']:
    return (f'{data.HEADER_WITH_INPUT}\n\n{i}### Instruction:\n'
            f'{i}{example["instruction"]}\n\n{i}### Input:\n'
            f'{i}{example["input"]}\n\n{i}{data.RESPONSE_MARKER}\n{i}')
  return (f'{data.HEADER} \n\n{i}### Instruction:\n{i}{example["instruction"]}'
          f'\n\n{i}{data.RESPONSE_MARKER}\n{i}')


# -- Smoke data ---------------------------------------------------------------

_WORDS = ('apple', 'river', 'stone', 'cloud', 'paper', 'green', 'quick',
          'table', 'light', 'heavy', 'music', 'bread', 'glass', 'water',
          'chair', 'plant', 'small', 'warm', 'cold', 'dog', 'cat', 'sun')
# How each set's instructions read: the opening, the option names, the text
# between options, and the text before the ``Answer format:`` line.
_STYLE = {
    'boolq': ('Please answer the following question with true or false,'
              ' question:', '', '\n\n'),
    'piqa': ('Please choose the correct solution to the question:', '\n\n',
             '\n\n'),
    'social_i_qa': ('Please choose the correct answer to the question:', ' ',
                    '\n\n'),
    'hellaswag': ('Please choose the correct ending to complete the given'
                  ' sentence:', ' ', '\n\n'),
    'winogrande': ('Please choose the correct answer to fill in the blank to'
                   ' complete the given sentence:', ' ', ' '),
    'ARC-Easy': ('Please choose the correct answer to the question:', ' ',
                 '\n\n'),
    'ARC-Challenge': ('Please choose the correct answer to the question:', ' ',
                      '\n\n'),
    'openbookqa': ('Please choose the correct answer to the question:', ' ',
                   '\n\n'),
}
_NUM_OPTIONS = {'boolq': (2,), 'piqa': (2,), 'social_i_qa': (3,),
                'hellaswag': (4,), 'winogrande': (2,), 'openbookqa': (4,),
                'ARC-Easy': (3, 4, 4, 4, 5), 'ARC-Challenge': (3, 4, 4, 4, 5)}


def _phrase(rng: np.random.Generator, n: int) -> str:
  return ' '.join(rng.choice(_WORDS, size=n))


def _question(dataset: str, rng: np.random.Generator) -> str:
  if dataset == 'boolq':
    return f'is the {_phrase(rng, 3)}?'
  if dataset == 'hellaswag':
    return f'{_phrase(rng, 1).capitalize()}: the {_phrase(rng, 5)}.'
  if dataset == 'winogrande':
    return f'The {_phrase(rng, 2)} _ {_phrase(rng, 3)}.'
  return f'Which {_phrase(rng, 4)}?'


def smoke_example(dataset: str, rng: np.random.Generator) -> dict:
  """A made-up row phrased as ``dataset``'s rows are (see the module table)."""
  _check_dataset(dataset)
  opening, between, before_format = _STYLE[dataset]
  labels = _LABELS[dataset][:rng.choice(_NUM_OPTIONS[dataset])]
  answer = labels[rng.integers(len(labels))]
  instruction = f'{opening} {_question(dataset, rng)}'
  if dataset != 'boolq':
    instruction += '\n\n' + between.join(
        f'{label.capitalize()}: {_phrase(rng, 3)}' for label in labels)
  instruction += f'{before_format}Answer format: {"/".join(labels)}'
  return {'instruction': instruction, 'input': '',
          'output': f'the correct answer is {answer}', 'answer': answer}
