"""A built-in synthetic language: a seeded random PCFG over an invented lexicon.

The study's "world" needs a language with real structure that a `tiny` model learns in a
few hundred steps, and that needs no download. `Grammar.random(seed)` builds one:

Lexicon (invented lowercase ASCII words, drawn from the seed; letter `s` is reserved for
the plural): determiners `Det_sg`, `Det_pl`; nouns `N_sg` (a stem) / `N_pl` (stem + 's');
transitive verbs `VT_sg` (stem + 'a') / `VT_pl` (stem + 'o'); intransitive verbs
`VI_sg` / `VI_pl` (same suffixes); adjectives `Adj`; adverbs `Adv`; prepositions `P`.
About 60 surface forms with the default sizes.

Rules (n in {sg, pl}; subject, determiner and verb agree in number)::

  S     -> NP_sg VP_sg | NP_pl VP_pl
  NP_n  -> Det_n Nom_n
  Nom_n -> N_n | Adj Nom_n | N_n PP
  PP    -> P NP_sg | P NP_pl
  VP_n  -> VI_n | VI_n Adv | VT_n NP_sg | VT_n NP_pl

A sentence is its words joined by spaces, then '.'. Each nonterminal's rule probabilities
are Dirichlet(rule_concentration * base), around fixed base weights (recursion is rare, and
every Nom has at most one Nom below it, so sentences are finite).

Topics: a latent topic t ~ Categorical(topic_probs) is drawn once per text; given t, the
nouns and verbs follow topic-specific distributions (Dirichlet(topic_concentration) over the
stems, shared by the sg and pl forms), so the prompt tells which words its continuation
will use. Adjectives, adverbs, prepositions and determiners are uniform.

Texts: a prompt is one sentence of `min_prompt_bytes`..`max_prompt_bytes` bytes; a
continuation is ' ' + 1..`max_continuation_sentences` sentences (same topic), at most
`max_continuation_bytes` bytes (rejection sampling). A document is prompt + continuation.
"""
from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import re
from typing import Any

import numpy as np

_CONSONANTS = 'bdfgklmnprtvz'  # no 's': it only marks the plural.
_VOWELS = 'aeiou'
_NUMBERS = ('sg', 'pl')
_SENTENCE = re.compile(r'[a-z]+(?: [a-z]+)*\.')
_TEXT = re.compile(r'[a-z]+(?: [a-z]+)*\.(?: [a-z]+(?: [a-z]+)*\.)*')

# Base rule weights: (lhs, rhs, weight). `{n}` expands to sg and pl.
_BASE_RULES = (
    ('S', ('NP_sg', 'VP_sg'), 0.6), ('S', ('NP_pl', 'VP_pl'), 0.4),
    ('NP_{n}', ('Det_{n}', 'Nom_{n}'), 1.0),
    ('Nom_{n}', ('N_{n}',), 0.65), ('Nom_{n}', ('Adj', 'Nom_{n}'), 0.2), ('Nom_{n}', ('N_{n}', 'PP'), 0.15),
    ('PP', ('P', 'NP_sg'), 0.5), ('PP', ('P', 'NP_pl'), 0.5),
    ('VP_{n}', ('VI_{n}',), 0.3), ('VP_{n}', ('VI_{n}', 'Adv'), 0.2),
    ('VP_{n}', ('VT_{n}', 'NP_sg'), 0.3), ('VP_{n}', ('VT_{n}', 'NP_pl'), 0.2),
)


@dataclasses.dataclass(frozen=True)
class GrammarOptions:
  """Sizes and sampling settings of `Grammar.random` (see the module docstring)."""
  n_topics: int = 3
  n_determiners: int = 2  # per number.
  n_nouns: int = 12
  n_transitive: int = 6
  n_intransitive: int = 4
  n_adjectives: int = 6
  n_adverbs: int = 4
  n_prepositions: int = 3
  rule_concentration: float = 20.0
  topic_concentration: float = 0.5
  min_prompt_bytes: int = 16
  max_prompt_bytes: int = 40
  max_continuation_sentences: int = 2
  max_continuation_bytes: int = 80

  def __post_init__(self):
    for f in dataclasses.fields(self):
      if getattr(self, f.name) <= 0:
        raise ValueError(f'Grammar option {f.name}={getattr(self, f.name)}: must be positive.')
    if self.min_prompt_bytes > self.max_prompt_bytes:
      raise ValueError(f'Grammar options: min_prompt_bytes={self.min_prompt_bytes} exceeds '
                       f'max_prompt_bytes={self.max_prompt_bytes}.')


@dataclasses.dataclass(frozen=True)
class Grammar:
  """A PCFG with topic-dependent lexical probabilities.

  rules: nonterminal -> ((rhs symbols, probability), ...); probabilities sum to 1.
  lexicon: preterminal -> its words.
  word_probs: preterminal -> per topic, the probabilities of its words ([n_topics][n_words]).
  topic_probs: [n_topics] prior of the latent topic.
  """
  seed: int
  options: GrammarOptions
  rules: dict[str, tuple[tuple[tuple[str, ...], float], ...]]
  lexicon: dict[str, tuple[str, ...]]
  word_probs: dict[str, tuple[tuple[float, ...], ...]]
  topic_probs: tuple[float, ...]

  @classmethod
  def random(cls, seed: int, **options: Any) -> 'Grammar':
    """The grammar drawn from `seed`; `options` override `GrammarOptions` fields."""
    names = [f.name for f in dataclasses.fields(GrammarOptions)]
    unknown = sorted(set(options) - set(names))
    if unknown:
      raise ValueError(f'Grammar.random: unknown options {unknown}; valid options are {names}.')
    opts = GrammarOptions(**options)
    rng = np.random.default_rng([int(seed), 0])
    lexicon = _random_lexicon(rng, opts)

    rules: dict[str, list[tuple[tuple[str, ...], float]]] = {}
    for lhs, rhs, weight in _BASE_RULES:
      for n in (_NUMBERS if '{n}' in lhs else ('',)):
        rules.setdefault(lhs.format(n=n), []).append((tuple(s.format(n=n) for s in rhs), weight))
    frozen_rules = {}
    for lhs, alts in rules.items():
      base = np.array([w for _, w in alts])
      probs = rng.dirichlet(opts.rule_concentration * base / base.sum()) if len(alts) > 1 else [1.0]
      frozen_rules[lhs] = tuple((rhs, float(p)) for (rhs, _), p in zip(alts, probs))

    word_probs = {}
    for stem_class in ('N', 'VT', 'VI'):
      size = len(lexicon[f'{stem_class}_sg'])
      per_topic = tuple(tuple(float(p) for p in rng.dirichlet(opts.topic_concentration * np.ones(size)))
                        for _ in range(opts.n_topics))
      for n in _NUMBERS:
        word_probs[f'{stem_class}_{n}'] = per_topic
    for cat in ('Det_sg', 'Det_pl', 'Adj', 'Adv', 'P'):
      size = len(lexicon[cat])
      word_probs[cat] = ((1.0 / size,) * size,) * opts.n_topics
    topic_probs = tuple(float(p) for p in rng.dirichlet(np.full(opts.n_topics, 5.0)))
    return cls(seed=int(seed), options=opts, rules=frozen_rules, lexicon=lexicon, word_probs=word_probs,
               topic_probs=topic_probs)

  # ---------------------------------------------------------------- sampling

  @property
  def words(self) -> frozenset[str]:
    """Every surface form of the lexicon."""
    return frozenset(itertools.chain.from_iterable(self.lexicon.values()))

  def sample_topic(self, rng: np.random.Generator) -> int:
    return _draw(rng, self.topic_probs)

  def sample_sentence(self, rng: np.random.Generator, topic: int) -> str:
    """One sentence from S given `topic` (no length filter)."""
    stack, words = ['S'], []
    while stack:
      sym = stack.pop()
      if sym in self.lexicon:
        words.append(self.lexicon[sym][_draw(rng, self.word_probs[sym][topic])])
      else:
        alts = self.rules[sym]
        rhs = alts[_draw(rng, [p for _, p in alts])][0]
        stack.extend(reversed(rhs))
    return ' '.join(words) + '.'

  def sample_prompt(self, rng: np.random.Generator, topic: int) -> str:
    """A sentence of min_prompt_bytes..max_prompt_bytes bytes given `topic`."""
    o = self.options
    return self._reject(lambda: self.sample_sentence(rng, topic),
                        lambda s: o.min_prompt_bytes <= len(s) <= o.max_prompt_bytes, 'prompt')

  def sample_continuation(self, rng: np.random.Generator, topic: int) -> str:
    """' ' + 1..max_continuation_sentences sentences, at most max_continuation_bytes bytes."""
    o = self.options

    def draw() -> str:
      k = int(rng.integers(1, o.max_continuation_sentences + 1))
      return ''.join(' ' + self.sample_sentence(rng, topic) for _ in range(k))
    return self._reject(draw, lambda s: len(s) <= o.max_continuation_bytes, 'continuation')

  def sample_text(self, rng: np.random.Generator) -> str:
    """One document: a topic, then a prompt and a continuation given it."""
    topic = self.sample_topic(rng)
    return self.sample_prompt(rng, topic) + self.sample_continuation(rng, topic)

  def prompts(self, n: int, seed: int) -> list[str]:
    """`n` distinct prompts, a fixed function of (grammar, n, seed); prompt id = index."""
    if n <= 0:
      raise ValueError(f'Grammar.prompts: n={n} must be positive.')
    rng = np.random.default_rng([int(seed), 1])
    out, seen = [], set()
    for _ in range(100 * n):
      p = self.sample_prompt(rng, self.sample_topic(rng))
      if p not in seen:
        seen.add(p)
        out.append(p)
        if len(out) == n:
          return out
    raise ValueError(f'Grammar.prompts: found only {len(out)} distinct prompts of the {n} asked; '
                     'ask for fewer, or widen min_prompt_bytes..max_prompt_bytes or the lexicon.')

  def documents(self, n: int, seed: int) -> list[str]:
    """`n` documents (prompt + continuation) drawn with `seed`, for pretraining a policy."""
    if n <= 0:
      raise ValueError(f'Grammar.documents: n={n} must be positive.')
    rng = np.random.default_rng([int(seed), 2])
    return [self.sample_text(rng) for _ in range(n)]

  @staticmethod
  def _reject(draw, accept, what: str) -> str:
    for _ in range(10_000):
      s = draw()
      if accept(s):
        return s
    raise ValueError(f'Grammar: no {what} within the length bounds after 10000 draws; widen them.')

  # ---------------------------------------------------------------- parsing

  def sentence_probs(self, sentence: str) -> np.ndarray:
    """[n_topics] P(sentence | topic) under the PCFG (0 where it does not parse).

    Inside algorithm over (symbol, start) -> {end: probability per topic}; the grammar has
    no empty rules and no left recursion, so the memoized recursion terminates.
    """
    if not _SENTENCE.fullmatch(sentence):
      return np.zeros(self.options.n_topics)
    words = sentence[:-1].split(' ')
    memo: dict[tuple[str, int], dict[int, np.ndarray]] = {}

    def inside(sym: str, i: int) -> dict[int, np.ndarray]:
      key = (sym, i)
      if key in memo:
        return memo[key]
      out: dict[int, np.ndarray] = {}
      if sym in self.lexicon:
        if i < len(words) and words[i] in self.lexicon[sym]:
          k = self.lexicon[sym].index(words[i])
          out[i + 1] = np.array([probs[k] for probs in self.word_probs[sym]])
      else:
        for rhs, p in self.rules[sym]:
          partial = {i: np.full(self.options.n_topics, p)}
          for s in rhs:
            nxt: dict[int, np.ndarray] = {}
            for pos, v in partial.items():
              for end, w in inside(s, pos).items():
                nxt[end] = nxt.get(end, 0.0) + v * w
            partial = nxt
          for end, v in partial.items():
            out[end] = out.get(end, 0.0) + v
      memo[key] = out
      return out

    return np.asarray(inside('S', 0).get(len(words), np.zeros(self.options.n_topics)))

  def log_prob(self, text: str) -> float:
    """log sum_t P(t) prod_sentences P(sentence | t): the PCFG probability of `text`.

    `text` is sentences separated by single spaces; the length filters of prompts and
    continuations are not included. -inf where a sentence does not parse.
    """
    if not _TEXT.fullmatch(text):
      return -math.inf
    per_topic = np.array(self.topic_probs)
    for sentence in _sentences(text):
      per_topic = per_topic * self.sentence_probs(sentence)
    total = float(per_topic.sum())
    return math.log(total) if total > 0 else -math.inf

  def is_grammatical(self, text: str) -> bool:
    """Whether every sentence of `text` parses with the grammar's rules."""
    return _TEXT.fullmatch(text) is not None and all(
        self.sentence_probs(s).any() for s in _sentences(text))

  def grammatical_share(self, text: str) -> float:
    """The share of the sentences of `text` that parse (0 for an empty text).

    Sentences are the '.'-terminated pieces of `text` (surrounding spaces stripped); an
    unterminated trailing piece (a sentence cut off) counts as one that does not parse.
    """
    pieces = text.strip().split('.')
    sentences = [s.strip() + '.' for s in pieces[:-1]]
    total = len(sentences) + (1 if pieces[-1].strip() else 0)
    return sum(bool(self.sentence_probs(s).any()) for s in sentences) / total if total else 0.0


def _sentences(text: str) -> list[str]:
  return [s + '.' for s in text[:-1].split('. ')]


def _draw(rng: np.random.Generator, probs) -> int:
  cum = list(itertools.accumulate(probs))
  return min(bisect.bisect_right(cum, rng.random() * cum[-1]), len(cum) - 1)


def _random_lexicon(rng: np.random.Generator, o: GrammarOptions) -> dict[str, tuple[str, ...]]:
  """Invented words; every surface form of the lexicon is distinct."""
  used: set[str] = set()

  def fresh(make, forms) -> str:
    for _ in range(10_000):
      stem = make()
      surface = [f(stem) for f in forms]
      if not used.intersection(surface) and len(set(surface)) == len(surface):
        used.update(surface)
        return stem
    raise ValueError('Grammar.random: ran out of distinct invented words; lower the lexicon sizes '
                     '(n_determiners and n_prepositions have at most 65 short forms each).')

  def syl() -> str:
    return str(rng.choice(list(_CONSONANTS))) + str(rng.choice(list(_VOWELS)))

  def closed() -> str:  # ends with a consonant: CVC or CVCVC.
    return ''.join(syl() for _ in range(int(rng.integers(1, 3)))) + str(rng.choice(list(_CONSONANTS)))

  def open_() -> str:  # ends with a vowel: CVCV.
    return syl() + syl()

  ident = lambda s: s  # noqa: E731
  lex: dict[str, tuple[str, ...]] = {}
  dets = [fresh(syl, [ident]) for _ in range(2 * o.n_determiners)]
  lex['Det_sg'], lex['Det_pl'] = tuple(dets[:o.n_determiners]), tuple(dets[o.n_determiners:])
  nouns = [fresh(closed, [ident, lambda s: s + 's']) for _ in range(o.n_nouns)]
  lex['N_sg'], lex['N_pl'] = tuple(nouns), tuple(s + 's' for s in nouns)
  for cat, size in (('VT', o.n_transitive), ('VI', o.n_intransitive)):
    stems = [fresh(closed, [lambda s: s + 'a', lambda s: s + 'o']) for _ in range(size)]
    lex[f'{cat}_sg'], lex[f'{cat}_pl'] = tuple(s + 'a' for s in stems), tuple(s + 'o' for s in stems)
  lex['Adj'] = tuple(fresh(open_, [ident]) for _ in range(o.n_adjectives))
  lex['Adv'] = tuple(fresh(lambda: open_() + 'l', [ident]) for _ in range(o.n_adverbs))
  lex['P'] = tuple(fresh(lambda: str(rng.choice(list(_VOWELS))) + str(rng.choice(list(_CONSONANTS))), [ident])
                   for _ in range(o.n_prepositions))
  return lex
