"""Best-of-n: plain sampling at n = 1, chunked search at n = 1024, the KL values, the unbiased curve."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmjax.models import sampling
from rmjax.rl import best_of_n as bon
from tests.rl.conftest import EOS, TINY, count_scorer, left_padded_prompts

REWARD = bon.objective_reward(dict(reward='mean'))


def test_n1_is_plain_sampling(policy_params):
  batch = left_padded_prompts(4)
  rng = jax.random.key(5)
  out = bon.best_of_n(policy_params, TINY, count_scorer, None, REWARD, batch['prompt_tokens'], batch['prompt_mask'],
                      rng, n=1, chunk=1, max_new_tokens=6, temperature=0.7, eos_id=EOS)
  plain = sampling.sample(policy_params, TINY, batch['prompt_tokens'], batch['prompt_mask'], jax.random.fold_in(rng, 0),
                          max_new_tokens=6, temperature=0.7, eos_id=EOS)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(plain.tokens))
  np.testing.assert_array_equal(np.asarray(out.mask), np.asarray(plain.mask))
  np.testing.assert_array_equal(np.asarray(out.samples[:, 0]), np.asarray(plain.tokens))


def test_n1024_in_chunks_keeps_the_best_draw(policy_params):
  batch = left_padded_prompts(2)
  out = bon.best_of_n(policy_params, TINY, count_scorer, None, REWARD, batch['prompt_tokens'], batch['prompt_mask'],
                      jax.random.key(6), n=1024, chunk=128, max_new_tokens=6, temperature=1.0, eos_id=EOS,
                      gold_scorer=lambda _, t, m: -count_scorer(None, t, m), gold_params=())
  rewards, samples = np.asarray(out.rewards), np.asarray(out.samples)
  assert rewards.shape == (2, 1024) and samples.shape == (2, 1024, 6)
  np.testing.assert_array_equal(np.asarray(out.reward), rewards.max(1))
  first_best = rewards.argmax(1)
  np.testing.assert_array_equal(np.asarray(out.tokens), samples[np.arange(2), first_best])
  # The kept response really scores its reward (re-scored from its tokens).
  full = jnp.concatenate([batch['prompt_tokens'][:2], out.tokens], 1)
  full_mask = jnp.concatenate([batch['prompt_mask'][:2], out.mask], 1)
  np.testing.assert_array_equal(np.asarray(count_scorer(None, full, full_mask)[0]), np.asarray(out.reward))
  np.testing.assert_array_equal(np.asarray(out.gold), -rewards)
  # Search helps: the best of 1024 beats the average draw; the curve at n = N is the best draw.
  assert np.all(rewards.max(1) > rewards.mean(1) + 1)
  curve = bon.expected_best_of_n(rewards, rewards, [1, 1024])
  np.testing.assert_allclose(curve[:, 0], rewards.mean(1), rtol=1e-12)
  np.testing.assert_allclose(curve[:, 1], rewards.max(1), rtol=1e-12)


def test_unbiased_estimator_equals_enumeration_of_all_subsets():
  rng = np.random.default_rng(0)
  big_n = 9
  proxy, gold = rng.normal(size=big_n), rng.normal(size=big_n)
  ns = [1, 2, 3, 5, 9]
  got = bon.expected_best_of_n(proxy, gold, ns)
  for j, n in enumerate(ns):
    subsets = list(itertools.combinations(range(big_n), n))
    brute = np.mean([gold[max(s, key=lambda i: proxy[i])] for s in subsets])
    assert got[j] == pytest.approx(brute, abs=1e-12)
  # Monte-Carlo resampling of n-subsets agrees within 4 standard errors (20000 draws, n = 3).
  draws = np.array([gold[max(rng.choice(big_n, 3, replace=False), key=lambda i: proxy[i])] for _ in range(20000)])
  assert abs(draws.mean() - got[2]) < 4 * draws.std() / math.sqrt(len(draws))


def test_estimator_weights_stay_finite_for_large_n():
  w = bon.best_of_n_weights(4096, 1024)
  assert np.all(np.isfinite(w)) and w.sum() == pytest.approx(1.0, abs=1e-9)
  assert np.all(w[:1023] == 0)


def test_kl_bound_and_plugin():
  assert bon.kl_bound(1) == 0.0
  assert bon.kl_bound(4) == pytest.approx(math.log(4) - 0.75)
  # Hand case: N = 4, ids (a, a, b, c), rewards ascending, n = 2: p = (1, 3, 5, 7) / 16.
  got = bon.plugin_kl(np.array([1.0, 1.0, 2.0, 3.0]), np.array([0, 0, 1, 2]), 2)
  want = 0.25 * math.log(0.25 / 0.5) + 5 / 16 * math.log(5 / 16 / 0.25) + 7 / 16 * math.log(7 / 16 / 0.25)
  assert got == pytest.approx(want, abs=1e-12)
  # All distinct and N large: the plug-in value tends to the analytic one (within 1e-3 at N = 10^5).
  r = np.random.default_rng(1).normal(size=100_000)
  assert bon.plugin_kl(r, np.arange(r.size), 8) == pytest.approx(bon.kl_bound(8), abs=1e-3)
  # Two distinct responses, 500 copies each: best-of-8 picks the better one w.p. 1 − 2^-8, so the
  # KL is that of Bernoulli(1 − 2^-8) against Bernoulli(1/2) — well below the bound.
  p1, p0 = 1 - 2.0 ** -8, 2.0 ** -8
  dup = bon.plugin_kl(np.repeat([0.0, 1.0], 500), np.repeat([0, 1], 500), 8)
  assert dup == pytest.approx(p1 * math.log(2 * p1) + p0 * math.log(2 * p0), abs=1e-12)
  assert dup < 0.6 * bon.kl_bound(8)
  assert bon.plugin_kl(np.zeros(10), np.zeros(10, int), 8) == pytest.approx(0.0, abs=1e-12)


def test_distinct_ids_ignore_padding():
  tokens = np.array([[3, 1, 0], [3, 1, 5], [3, 2, 0]])
  mask = np.array([[1, 1, 0], [1, 1, 0], [1, 1, 0]], bool)
  ids = bon.distinct_ids(tokens, mask)
  assert ids[0] == ids[1] != ids[2]


def test_bad_arguments_raise(policy_params):
  batch = left_padded_prompts(2)
  with pytest.raises(ValueError, match='multiple of chunk'):
    bon.best_of_n(policy_params, TINY, count_scorer, None, REWARD, batch['prompt_tokens'], batch['prompt_mask'],
                  jax.random.key(0), n=10, chunk=4, max_new_tokens=4)
  with pytest.raises(ValueError, match='1 <= n <= N'):
    bon.expected_best_of_n(np.zeros(3), np.zeros(3), [4])
  with pytest.raises(ValueError, match='aggregation'):
    bon.objective_reward(dict(advantage='rloo', rloo=dict(group_size=2)))
