r"""VQA accuracy, as the official evaluation (``vqaEval.py``) computes it.

The official script (GT-Vision-Lab/VQA ``vqaEval.py``; LAVIS and FRAMES-VQA
run the same code as ``common/vqa_tools/vqa_eval.py``) scores one predicted
answer against the ten human answers of a question:

.. math::

   \mathrm{acc} = \frac{1}{10} \sum_{i=1}^{10}
     \min\Big(1, \frac{\#\{j \ne i : a_j = \hat a\}}{3}\Big),

the mean over the ten leave-one-out subsets of nine answers of
``min(#matches / 3, 1)``. By the number ``n`` of the ten annotators who gave
the predicted answer: 0 -> 0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, 4 or more -> 1.

Before matching, the prediction is normalised (:func:`normalize_prediction`):
newlines and tabs become spaces and the ends are stripped; punctuation is
removed or replaced by a space (:func:`process_punctuation`); it is lowercased,
number words ``none``, ``zero`` .. ``ten`` become digits, the articles ``a``,
``an``, ``the`` are dropped and contractions written without an apostrophe get
one (:func:`process_digit_article`). The human answers get only the
punctuation step, and only when they are not all the same string (the
published annotations are already lowercased and written with digits). These
asymmetries, the period rule's regular expression (which removes a period
unless a digit follows it, at most 32 of them) and the contractions map with
its capitalised keys (never reached after lowercasing) are kept as the
official script has them, so that the numbers are the official ones.
"""

import re
from typing import Sequence

NUMBER_WORDS = {
    'none': '0', 'zero': '0', 'one': '1', 'two': '2', 'three': '3',
    'four': '4', 'five': '5', 'six': '6', 'seven': '7', 'eight': '8',
    'nine': '9', 'ten': '10'}
ARTICLES = frozenset({'a', 'an', 'the'})
# Removed (or replaced by a space, see process_punctuation); apostrophes and
# periods are not in it.
PUNCTUATION = (';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\',
               '_', '-', '>', '<', '@', '`', ',', '?', '!')
# The official map, entries as it has them (its keys with a capital never
# match, since words are lowercased first).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't",
    "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd",
    "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've",
    "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've"}

# A comma between two digits ('1,000'): then every punctuation mark is removed
# rather than replaced by a space.
_DIGIT_COMMA = re.compile(r'(\d)(,)(\d)')
# A period not followed by a digit. (The official pattern begins with
# '(?!<=\d)', a mistyped look-behind that is a look-ahead which always holds
# before a period; it changes nothing, so it is left out.)
_PERIOD = re.compile(r'\.(?!\d)')
# The official script passes re.UNICODE (32) as `count` of `sub`: at most 32
# periods are removed.
_MAX_PERIODS = 32


def process_punctuation(text: str) -> str:
  """Punctuation as the official script treats it.

  Each mark of :data:`PUNCTUATION` is removed when it touches a space in
  ``text`` (``'p '`` or ``' p'``) or when ``text`` has a comma between two
  digits, and replaced by a space otherwise; then periods not followed by a
  digit are removed (``'3.5'`` keeps its period).

  >>> process_punctuation('yes!'), process_punctuation('black-and-white')
  ('yes ', 'black and white')
  >>> process_punctuation('1,000 ft.'), process_punctuation('3.5')
  ('1000 ft', '3.5')
  """
  out = text
  has_digit_comma = _DIGIT_COMMA.search(text) is not None
  for mark in PUNCTUATION:
    if mark + ' ' in text or ' ' + mark in text or has_digit_comma:
      out = out.replace(mark, '')
    else:
      out = out.replace(mark, ' ')
  return _PERIOD.sub('', out, count=_MAX_PERIODS)


def process_digit_article(text: str) -> str:
  """Lowercased words, number words as digits, no articles, contractions
  with their apostrophe, joined by single spaces.

  >>> process_digit_article('The  Two dogs'), process_digit_article('dont')
  ('2 dogs', "don't")
  """
  words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  return ' '.join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_prediction(answer: str) -> str:
  """A predicted answer as the official script compares it."""
  answer = answer.replace('\n', ' ').replace('\t', ' ').strip()
  return process_digit_article(process_punctuation(answer))


def accuracy(prediction: str, answers: Sequence[str]) -> float:
  """VQA accuracy of one prediction against the human answers (ten in the
  VQA sets), in [0, 1].

  >>> accuracy('Two', ['2'] * 3 + ['3'] * 7)
  0.9
  """
  if not answers:
    raise ValueError('A question needs at least one human answer.')
  predicted = normalize_prediction(prediction)
  if len(set(answers)) > 1:
    answers = [process_punctuation(a) for a in answers]
  matches = [a == predicted for a in answers]
  total = sum(matches)
  # Leaving out answer i leaves total - matches[i] matches among the others.
  return sum(min(1.0, (total - m) / 3) for m in matches) / len(answers)


def mean_accuracy(predictions: Sequence[str],
                  answers: Sequence[Sequence[str]]) -> float:
  """The mean :func:`accuracy` over a set's questions, in [0, 1]."""
  if len(predictions) != len(answers):
    raise ValueError(f'{len(predictions)} predictions for {len(answers)}'
                     ' questions.')
  if not predictions:
    raise ValueError('No questions to score.')
  return sum(accuracy(p, a) for p, a in zip(predictions, answers)) / len(
      predictions)
