"""The synthetic language: determinism, parse-back, agreement, probabilities, topic structure."""
import itertools
import math

import numpy as np
import pytest

from rmjax.data.synthetic_language import Grammar


@pytest.fixture(scope='module')
def grammar() -> Grammar:
  return Grammar.random(0)


@pytest.fixture(scope='module')
def docs(grammar) -> list[str]:
  return grammar.documents(300, seed=7)


def rule_prob(g: Grammar, lhs: str, rhs: tuple[str, ...]) -> float:
  return dict(g.rules[lhs])[rhs]


def test_deterministic_from_seed(grammar, docs):
  again = Grammar.random(0)
  assert again == grammar
  assert again.documents(300, seed=7) == docs
  assert again.prompts(20, seed=3) == grammar.prompts(20, seed=3)
  other = Grammar.random(1)
  assert other.lexicon != grammar.lexicon
  assert grammar.documents(20, seed=8) != docs[:20]


def test_rules_are_distributions(grammar):
  for lhs, alts in grammar.rules.items():
    assert math.isclose(sum(p for _, p in alts), 1.0, abs_tol=1e-9), lhs
  for cat, per_topic in grammar.word_probs.items():
    assert len(per_topic) == grammar.options.n_topics
    for probs in per_topic:
      assert len(probs) == len(grammar.lexicon[cat])
      assert math.isclose(sum(probs), 1.0, abs_tol=1e-9), cat
  assert len(grammar.words) == sum(len(w) for w in grammar.lexicon.values())  # forms are distinct.


def test_documents_parse_and_use_only_the_lexicon(grammar, docs):
  for d in docs:
    assert d.isascii()
    assert grammar.is_grammatical(d), d
    assert set(d.replace('.', '').split(' ')) <= grammar.words
    assert np.isfinite(grammar.log_prob(d))


def test_prompt_and_continuation_lengths(grammar):
  rng = np.random.default_rng(0)
  o = grammar.options
  for _ in range(100):
    topic = grammar.sample_topic(rng)
    p = grammar.sample_prompt(rng, topic)
    c = grammar.sample_continuation(rng, topic)
    assert o.min_prompt_bytes <= len(p) <= o.max_prompt_bytes and p.count('.') == 1
    assert c.startswith(' ') and len(c) <= o.max_continuation_bytes
    assert 1 <= c.count('.') <= o.max_continuation_sentences
    assert grammar.is_grammatical(c[1:])


def test_prompts_distinct_and_bounded(grammar):
  prompts = grammar.prompts(200, seed=0)
  assert len(prompts) == len(set(prompts)) == 200
  assert all(grammar.is_grammatical(p) for p in prompts)
  tiny = Grammar.random(0, n_nouns=1, n_transitive=1, n_intransitive=1, n_adjectives=1, n_adverbs=1,
                        n_prepositions=1, n_determiners=1, max_prompt_bytes=24)
  with pytest.raises(ValueError, match='distinct prompts'):
    tiny.prompts(50, seed=0)


def test_agreement_and_ungrammatical_texts(grammar):
  lx = grammar.lexicon
  d_sg, d_pl, n_sg, n_pl = lx['Det_sg'][0], lx['Det_pl'][0], lx['N_sg'][0], lx['N_pl'][0]
  vi_sg, vi_pl = lx['VI_sg'][0], lx['VI_pl'][0]
  assert grammar.is_grammatical(f'{d_sg} {n_sg} {vi_sg}.')
  assert grammar.is_grammatical(f'{d_pl} {n_pl} {vi_pl}.')
  for bad in (f'{d_sg} {n_sg} {vi_pl}.', f'{d_pl} {n_sg} {vi_sg}.', f'{d_sg} {n_pl} {vi_pl}.',
              f'{n_sg} {d_sg} {vi_sg}.', f'{d_sg} {n_sg} {vi_sg}', f'{d_sg} {n_sg}  {vi_sg}.',
              f'{d_sg} {n_sg} blorf.', f'{d_sg.upper()} {n_sg} {vi_sg}.', ''):
    assert not grammar.is_grammatical(bad), bad
    assert grammar.log_prob(bad) == -math.inf


def test_log_prob_by_hand(grammar):
  g, lx, wp = grammar, grammar.lexicon, grammar.word_probs
  text = f"{lx['Det_sg'][1]} {lx['N_sg'][2]} {lx['VI_sg'][3]}."
  structure = (rule_prob(g, 'S', ('NP_sg', 'VP_sg')) * rule_prob(g, 'NP_sg', ('Det_sg', 'Nom_sg'))
               * rule_prob(g, 'Nom_sg', ('N_sg',)) * rule_prob(g, 'VP_sg', ('VI_sg',)))
  lexical = sum(pt * wp['Det_sg'][t][1] * wp['N_sg'][t][2] * wp['VI_sg'][t][3]
                for t, pt in enumerate(g.topic_probs))
  assert math.isclose(g.log_prob(text), math.log(structure * lexical), rel_tol=1e-12)
  # Two sentences share the topic: sum_t P(t) P(s1|t) P(s2|t).
  p1 = g.sentence_probs(text)
  assert math.isclose(g.log_prob(f'{text} {text}'), math.log(np.dot(g.topic_probs, p1 * p1)), rel_tol=1e-12)


def test_three_word_sentences_enumeration_and_frequency(grammar):
  """Exact enumeration with the parser vs the closed form vs sampled frequency."""
  g, topic = grammar, 1
  closed = sum(rule_prob(g, 'S', (f'NP_{n}', f'VP_{n}')) * rule_prob(g, f'Nom_{n}', (f'N_{n}',))
               * rule_prob(g, f'VP_{n}', (f'VI_{n}',)) for n in ('sg', 'pl'))
  enumerated = sum(g.sentence_probs(f'{d} {w} {v}.')[topic]
                   for n in ('sg', 'pl')
                   for d, w, v in itertools.product(g.lexicon[f'Det_{n}'], g.lexicon[f'N_{n}'],
                                                    g.lexicon[f'VI_{n}']))
  assert math.isclose(enumerated, closed, rel_tol=1e-12)
  rng = np.random.default_rng(0)
  n = 4000
  freq = np.mean([g.sample_sentence(rng, topic).count(' ') == 2 for _ in range(n)])
  # 5 binomial standard deviations.
  assert abs(freq - closed) < 5 * math.sqrt(closed * (1 - closed) / n)


def test_prompt_tells_the_topic(grammar, docs):
  """Mean log p(doc) - log p(prompt) - log p(continuation) estimates I(prompt; continuation) > 0."""
  gains = []
  for d in docs:
    prompt, cont = d.split('. ', 1)
    gains.append(grammar.log_prob(d) - grammar.log_prob(prompt + '.') - grammar.log_prob(cont))
  assert np.mean(gains) > 0.1


def test_option_errors():
  with pytest.raises(ValueError, match='valid options'):
    Grammar.random(0, n_noun=3)
  with pytest.raises(ValueError, match='must be positive'):
    Grammar.random(0, n_topics=0)
  with pytest.raises(ValueError, match='exceeds'):
    Grammar.random(0, min_prompt_bytes=50)
  with pytest.raises(ValueError, match='must be positive'):
    Grammar.random(0).documents(0, seed=0)


def test_grammatical_share_by_hand(grammar):
  lx = grammar.lexicon
  ok = f'{lx["Det_sg"][0]} {lx["N_sg"][0]} {lx["VI_sg"][0]}.'
  bad = f'{lx["Det_sg"][0]} {lx["N_sg"][0]} {lx["VI_pl"][0]}.'  # number disagreement
  cases = {f' {ok}': 1.0, f'{ok} {bad}': 0.5, f' {ok} {ok} {bad} ': 2 / 3, bad: 0.0,
           f'{ok} {ok[:-1]}': 0.5,  # a cut-off sentence counts as one that does not parse
           f'{ok} {lx["Det_sg"][0]}': 0.5, f'{ok}.': 0.5, '': 0.0, '   ': 0.0, 'x.': 0.0}
  for text, share in cases.items():
    assert grammar.grammatical_share(text) == pytest.approx(share, abs=1e-12), text
