"""VQA accuracy on hand-written cases, the expected values worked out by hand
from the official script's rules (see train/vqa/metric.py)."""

import hypothesis
from hypothesis import strategies as st
import pytest

from train.vqa import metric


@pytest.mark.parametrize('raw, expected', [
    # Ends stripped, newlines and tabs are spaces, words re-joined by one space.
    ('  yes\n', 'yes'),
    ('red\tand  blue', 'red and blue'),
    # Lowercased.
    ('YES', 'yes'),
    # A mark not touching a space becomes a space ...
    ('black-and-white', 'black and white'),
    ('t/shirt', 't shirt'),
    # ... one touching a space is removed ...
    ('yes !', 'yes'),
    ('red, white', 'red white'),
    # ... and with a comma between digits every mark is removed.
    ('1,000', '1000'),
    ('10,000-ish', '10000ish'),
    # A period is removed unless a digit follows it.
    ('yes.', 'yes'),
    ('3.5', '3.5'),
    ('st. louis', 'st louis'),
    # Apostrophes are kept.
    ("man's", "man's"),
    # Number words become digits (whole words only).
    ('two', '2'),
    ('none', '0'),
    ('ten', '10'),
    ('eleven', 'eleven'),
    ('someone', 'someone'),
    # Articles are dropped (whole words only).
    ('a dog', 'dog'),
    ('The Cat', 'cat'),
    ('an apple', 'apple'),
    ('another', 'another'),
    # Contractions written without an apostrophe get one.
    ('dont', "don't"),
    ('isnt it', "isn't it"),
    ('oclock', "o'clock"),
    # The map's capitalised keys are never reached (lowercasing comes first).
    ('Im', 'im'),
    # All together.
    ('The Two Dogs, yes!', '2 dogs yes'),
])
def test_prediction_normalisation(raw, expected):
  assert metric.normalize_prediction(raw) == expected


def test_at_most_32_periods_are_removed():
  # The official `count=re.UNICODE` (32): the 33rd period survives.
  assert metric.process_punctuation('.' * 33 + 'x') == '.x'


def _answers(n: int, answer: str = 'cat', other: str = 'dog') -> list[str]:
  return [answer] * n + [other] * (10 - n)


# n annotators of 10 gave the answer. Leaving out one of them leaves n-1
# matches (n subsets), leaving out another leaves n (10-n subsets):
# acc = (n * min(1, (n-1)/3) + (10-n) * min(1, n/3)) / 10.
@pytest.mark.parametrize('n, expected', [
    (0, 0.0),
    (1, (1 * 0 + 9 * (1 / 3)) / 10),       # 0.3
    (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # 0.6
    (3, (3 * (2 / 3) + 7 * 1) / 10),        # 0.9
    (4, (4 * 1 + 6 * 1) / 10),              # 1.0
    (10, 1.0),
])
def test_accuracy_by_number_of_annotators(n, expected):
  assert metric.accuracy('cat', _answers(n)) == pytest.approx(expected,
                                                              abs=1e-12)


def test_accuracy_values_by_hand():
  assert [round(metric.accuracy('cat', _answers(n)), 12)
          for n in range(5)] == [0.0, 0.3, 0.6, 0.9, 1.0]


def test_prediction_is_normalised_before_matching():
  # 'Two.' -> '2'; three annotators said '2'.
  assert metric.accuracy('Two.', _answers(3, '2')) == pytest.approx(0.9)
  assert metric.accuracy('A cat', _answers(1)) == pytest.approx(0.3)


def test_human_answers_get_punctuation_only_and_only_when_they_differ():
  # Different answers: punctuation is applied to them ('cat!' -> 'cat ' is
  # not 'cat', but 'black-and-white' -> 'black and white' is matched).
  answers = ['black-and-white'] * 2 + ['gray'] * 8
  assert metric.accuracy('black and white', answers) == pytest.approx(0.6)
  # Digits and articles are not applied to them: 'two' never matches '2'.
  assert metric.accuracy('2', ['two'] * 3 + ['3'] * 7) == 0.0
  # All ten the same: no processing at all, so 'black-and-white' stays and
  # the normalised prediction 'black and white' does not match it.
  assert metric.accuracy('black-and-white', ['black-and-white'] * 10) == 0.0
  assert metric.accuracy('yes', ['yes'] * 10) == 1.0


def test_mean_over_a_set():
  predictions = ['cat', 'cat', 'Cat.', 'fish']
  answers = [_answers(1), _answers(2), _answers(4), _answers(3)]
  # (0.3 + 0.6 + 1.0 + 0.0) / 4
  assert metric.mean_accuracy(predictions, answers) == pytest.approx(
      1.9 / 4, abs=1e-12)


def test_bad_input_refused():
  with pytest.raises(ValueError, match='at least one human answer'):
    metric.accuracy('x', [])
  with pytest.raises(ValueError, match='2 predictions for 1 questions'):
    metric.mean_accuracy(['a', 'b'], [['a'] * 10])
  with pytest.raises(ValueError, match='No questions'):
    metric.mean_accuracy([], [])


def _literal_official(prediction, answers):
  """The official loop, written out: for each answer left out, count the
  other nine that equal the normalised prediction."""
  predicted = metric.normalize_prediction(prediction)
  if len(set(answers)) > 1:
    answers = [metric.process_punctuation(a) for a in answers]
  scores = []
  for i in range(len(answers)):
    others = answers[:i] + answers[i + 1:]
    scores.append(min(1.0, sum(a == predicted for a in others) / 3))
  return sum(scores) / len(scores)


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(
    answers=st.lists(st.sampled_from(['2', 'two', 'cat', 'a cat', 'cat!',
                                      'black-and-white', 'black and white',
                                      "don't", 'yes']), min_size=10,
                     max_size=10),
    prediction=st.sampled_from(['Two', '2', 'The cat', 'cat', 'dont',
                                'black and white', 'Yes.', 'no']))
def test_leave_one_out_mean_equals_the_literal_loop(answers, prediction):
  assert metric.accuracy(prediction, answers) == pytest.approx(
      _literal_official(prediction, answers), abs=1e-12)
