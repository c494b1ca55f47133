"""Sampler: log-probs against the no-cache model, greedy, truncation, EOS, the compiled loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmjax.models import sampling
from rmjax.models import transformer as tf
from tests.models.conftest import LLAMA, pad_rows, randomize

N = 6
PROMPTS = [np.array([1, 2, 3]), np.array([4, 5, 6, 7, 8]), np.array([9]), np.array([10, 11]),
           np.array([12, 13, 14, 15]), np.array([16]), np.array([17, 18, 19]), np.array([20, 21, 22, 23, 24])]


@pytest.fixture(scope='module')
def setup():
  params = randomize(jax.jit(tf.init_lm, static_argnums=1)(jax.random.key(0), LLAMA), seed=1, std=0.5)
  tokens, mask = pad_rows(PROMPTS, 5, 'left')
  return params, tokens, mask


@pytest.fixture(scope='module')
def logprob_fn():
  return jax.jit(sampling.token_logprobs, static_argnums=1)


@pytest.fixture(scope='module')
def logits_fn():
  return jax.jit(tf.lm_logits, static_argnums=1)


def _concat(tokens, mask, out):
  return jnp.concatenate([tokens, out.tokens], axis=1), jnp.concatenate([mask, out.mask], axis=1)


def _check_policy_logprobs(setup, logprob_fn, out, temperature):
  """policy_logprobs == token_logprobs(prompt + response, T) on response tokens (atol 1e-4, fp32)."""
  params, tokens, mask = setup
  full_tokens, full_mask = _concat(tokens, mask, out)
  want = np.asarray(logprob_fn(params, LLAMA, full_tokens, full_mask, temperature))[:, tokens.shape[1]:]
  np.testing.assert_allclose(np.asarray(out.policy_logprobs), want, atol=1e-4, rtol=0)
  assert np.all(np.asarray(out.policy_logprobs)[~np.asarray(out.mask)] == 0)


def test_untruncated_t1_logprobs_match_trainer_and_each_other(setup, logprob_fn):
  params, tokens, mask = setup
  out = sampling.sample(params, LLAMA, tokens, mask, jax.random.key(0), max_new_tokens=N)
  assert out.tokens.shape == (8, N) and out.tokens.dtype == jnp.int32 and bool(jnp.all(out.mask))
  _check_policy_logprobs(setup, logprob_fn, out, 1.0)
  # No truncation: the sampled distribution is the policy itself.
  np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(out.policy_logprobs), atol=1e-6)
  again = sampling.sample(params, LLAMA, tokens, mask, jax.random.key(0), max_new_tokens=N)
  np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(out.tokens))
  other = sampling.sample(params, LLAMA, tokens, mask, jax.random.key(1), max_new_tokens=N)
  assert not np.array_equal(np.asarray(other.tokens), np.asarray(out.tokens))


def test_greedy_equals_stepwise_argmax_of_no_cache_model(setup, logprob_fn, logits_fn):
  params, tokens, mask = setup
  out = sampling.sample(params, LLAMA, tokens, mask, jax.random.key(0), max_new_tokens=N, temperature=0.0)
  # Step by step with the no-cache model on a fixed-length buffer (causal: later slots are ignored).
  buf = np.concatenate([np.asarray(tokens), np.zeros((8, N), np.int32)], axis=1)
  buf_mask = jnp.concatenate([mask, jnp.ones((8, N), bool)], axis=1)
  for s in range(N):
    logits = np.asarray(logits_fn(params, LLAMA, jnp.asarray(buf), buf_mask))
    buf[:, 5 + s] = logits[:, 4 + s].argmax(-1)
  np.testing.assert_array_equal(np.asarray(out.tokens), buf[:, 5:])
  np.testing.assert_array_equal(np.asarray(out.logprobs), np.zeros((8, N)))
  _check_policy_logprobs(setup, logprob_fn, out, 0.0)  # T = 0 reads as the T = 1 policy
  _check_policy_logprobs(setup, logprob_fn, out, 1.0)


def test_top_k_1_is_greedy(setup):
  params, tokens, mask = setup
  greedy = sampling.sample(params, LLAMA, tokens, mask, jax.random.key(0), max_new_tokens=N, temperature=0.0)
  top1 = sampling.sample(params, LLAMA, tokens, mask, jax.random.key(3), max_new_tokens=N, top_k=1)
  np.testing.assert_array_equal(np.asarray(top1.tokens), np.asarray(greedy.tokens))
  np.testing.assert_allclose(np.asarray(top1.logprobs), 0.0, atol=1e-6)


def _truncated_reference(logits, temperature, top_k, top_p):
  """numpy: log-probs [V] of the top-k then top-p truncated, renormalised distribution (-inf outside)."""
  z = logits.astype(np.float64) / temperature
  order = np.argsort(-z, kind='stable')[:top_k]
  p = np.exp(z[order] - z[order].max())
  p /= p.sum()
  before = np.concatenate([[0.0], np.cumsum(p)[:-1]])
  kept = order[before < top_p]
  out = np.full(z.shape, -np.inf)
  zk = z[kept]
  out[kept] = zk - zk.max() - np.log(np.exp(zk - zk.max()).sum())
  return out, np.min(np.abs(before - top_p))


def test_truncated_sampling_with_eos(setup, logprob_fn, logits_fn):
  """T = 0.7, top_k = 10, top_p = 0.6 and an EOS id: every token lies in the nucleus computed
  in numpy from the no-cache logits, `logprobs` equal the numpy renormalised log-probs
  (atol 1e-4), `policy_logprobs` equal the trainer's; after EOS: pad, mask False, log-probs 0."""
  params, tokens, mask = setup
  t, k, p, eos = 0.7, 10, 0.6, 7
  out = sampling.sample(params, LLAMA, tokens, mask, jax.random.key(4), max_new_tokens=N, temperature=t,
                        top_k=k, top_p=p, eos_id=eos, pad_id=63)
  _check_policy_logprobs(setup, logprob_fn, out, t)
  full_tokens, full_mask = _concat(tokens, mask, out)
  logits = np.asarray(logits_fn(params, LLAMA, full_tokens, full_mask))
  got_tokens, got_mask, got_lp = (np.asarray(x) for x in (out.tokens, out.mask, out.logprobs))
  checked = 0
  for b in range(8):
    for s in range(N):
      if not got_mask[b, s]:
        continue
      ref, margin = _truncated_reference(logits[b, 4 + s], t, k, p)
      if margin < 1e-4:  # a nucleus boundary within float rounding: membership is ambiguous
        continue
      assert np.isfinite(ref[got_tokens[b, s]]), (b, s)
      np.testing.assert_allclose(got_lp[b, s], ref[got_tokens[b, s]], atol=1e-4)
      checked += 1
  assert checked >= 40
  # EOS bookkeeping, wherever it was drawn.
  for b in range(8):
    hits = np.flatnonzero(got_tokens[b] == eos)
    end = hits[0] + 1 if len(hits) else N
    assert got_mask[b, :end].all() and not got_mask[b, end:].any()
    assert (got_tokens[b, end:] == 63).all() and (got_lp[b, end:] == 0).all()


def test_eos_stops_rows(setup):
  """With eos_id = the greedy token at step 2 of row 0, row 0 stops there: mask True up to
  and including it, pad_id after, log-probs 0 after."""
  params, tokens, mask = setup
  greedy = sampling.sample(params, LLAMA, tokens, mask, jax.random.key(0), max_new_tokens=N, temperature=0.0)
  eos = int(greedy.tokens[0, 2])
  out = sampling.sample(params, LLAMA, tokens, mask, jax.random.key(0), max_new_tokens=N, temperature=0.0,
                        eos_id=eos, pad_id=0)
  g = np.asarray(greedy.tokens)
  for b in range(8):
    hits = np.flatnonzero(g[b] == eos)
    end = hits[0] + 1 if len(hits) else N
    np.testing.assert_array_equal(np.asarray(out.tokens)[b, :end], g[b, :end])
    assert (np.asarray(out.tokens)[b, end:] == 0).all()
    assert np.asarray(out.mask)[b, :end].all() and not np.asarray(out.mask)[b, end:].any()
    assert (np.asarray(out.policy_logprobs)[b, end:] == 0).all()
  assert np.asarray(out.mask)[0].sum() <= 3


def test_vmap_over_temperature_and_top_p(setup, logprob_fn):
  """A population of (temperature, top_p) settings vmapped in one call: member 0 (T = 0)
  equals the greedy run; member 1's policy_logprobs equal the trainer's at T = 1.3
  (atol 1e-4), and its truncated log-probs are never below them (renormalising a nucleus
  only raises probabilities) and strictly above somewhere (top_p = 0.8 truncates)."""
  params, tokens, mask = setup
  temps, tops = jnp.asarray([0.0, 1.3]), jnp.asarray([1.0, 0.8])
  run = lambda t, p: sampling.sample(params, LLAMA, tokens, mask, jax.random.key(5), max_new_tokens=N,
                                     temperature=t, top_p=p)
  pop = jax.vmap(run)(temps, tops)
  assert pop.tokens.shape == (2, 8, N)
  greedy = sampling.sample(params, LLAMA, tokens, mask, jax.random.key(0), max_new_tokens=N, temperature=0.0)
  np.testing.assert_array_equal(np.asarray(pop.tokens[0]), np.asarray(greedy.tokens))
  member = sampling.SampleOutput(*(x[1] for x in pop))
  _check_policy_logprobs(setup, logprob_fn, member, 1.3)
  gap = np.asarray(member.logprobs - member.policy_logprobs)
  assert gap.min() > -1e-5 and gap.max() > 0.1


def _walk(jaxpr, in_loop, dots, loops):
  """Collects (inside a loop body?, output shape [B, KV, G, T, S]) of each attention-score
  dot, and every scan / while eqn, through nested jaxprs."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general' and 'attention_scores' in str(eqn.source_info.name_stack):
      dots.append((in_loop, eqn.outvars[0].aval.shape))
    is_loop = eqn.primitive.name in ('scan', 'while')
    if is_loop:
      loops.append(eqn)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else [value]:
        inner = getattr(sub, 'jaxpr', sub)
        if hasattr(inner, 'eqns'):
          _walk(inner, in_loop or is_loop, dots, loops)
  return dots, loops


def test_decode_is_one_loop_with_length_1_queries(setup):
  """The jaxpr: the prefill's attention queries have length P = 5 and attend to the P slots
  of the prompt only; the only other attention is inside one scan of N - 1 steps, with
  queries of length 1, against the S = P + N - 1 slots."""
  params, tokens, mask = setup
  jaxpr = jax.make_jaxpr(lambda p, t, m: sampling.sample(p, LLAMA, t, m, jax.random.key(0), max_new_tokens=N))(
      params, tokens, mask)
  dots, loops = _walk(jaxpr.jaxpr, False, [], [])
  g = LLAMA.num_heads // LLAMA.num_kv_heads
  slots = 5 + N - 1
  assert sorted(dots) == sorted([(False, (8, 2, g, 5, 5))] * 2 + [(True, (8, 2, g, 1, slots))] * 2)
  assert len(loops) == 1 and loops[0].params['length'] == N - 1


def test_group_size_samples_each_prompt_k_times_from_one_prefill(setup, logprob_fn, monkeypatch):
  """`group_size=3` on 4 prompts: 12 rows, row 3i + j prompt i's; the same tokens and log-probs
  (1e-5) as sampling the 12 repeated prompts with the same key, the policy log-probs those of the
  no-cache model (1e-4), and the prefill's attention has the 4 prompts' rows only. The prefill
  runs in causal query blocks of 2 here ([0, 2), [2, 4), [4, 5) of the 5 prompt slots)."""
  monkeypatch.setattr(tf, 'QUERY_BLOCK', 2)
  params, tokens, mask = setup
  tokens, mask = tokens[:4], mask[:4]
  kw = dict(max_new_tokens=N, temperature=0.8, top_p=0.9, eos_id=3)
  got = sampling.sample(params, LLAMA, tokens, mask, jax.random.key(5), group_size=3, **kw)
  rows, row_mask = jnp.repeat(tokens, 3, 0), jnp.repeat(mask, 3, 0)
  want = sampling.sample(params, LLAMA, rows, row_mask, jax.random.key(5), **kw)
  np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
  np.testing.assert_array_equal(np.asarray(got.mask), np.asarray(want.mask))
  for name in ('logprobs', 'policy_logprobs'):
    np.testing.assert_allclose(np.asarray(getattr(got, name)), np.asarray(getattr(want, name)), atol=1e-5, rtol=0)
  assert len({tuple(r) for r in np.asarray(got.tokens)}) > 4  # the rows of a group differ
  full_tokens, full_mask = _concat(rows, row_mask, got)
  lp = np.asarray(logprob_fn(params, LLAMA, full_tokens, full_mask, 0.8))[:, tokens.shape[1]:]
  np.testing.assert_allclose(np.asarray(got.policy_logprobs), np.where(np.asarray(got.mask), lp, 0), atol=1e-4)
  jaxpr = jax.make_jaxpr(lambda p: sampling.sample(p, LLAMA, tokens, mask, jax.random.key(5), group_size=3, **kw))(
      params)
  dots, _ = _walk(jaxpr.jaxpr, False, [], [])
  assert {shape[0] for in_loop, shape in dots if not in_loop} == {4} and {s[0] for _, s in dots} == {4, 12}
  assert sorted({shape[-2:] for in_loop, shape in dots if not in_loop}) == [(1, 5), (2, 2), (2, 4)]
  with pytest.raises(ValueError, match='group_size'):
    sampling.sample(params, LLAMA, tokens, mask, jax.random.key(0), max_new_tokens=2, group_size=0)


def test_token_logprobs_hand_check(setup, logprob_fn, logits_fn):
  """token_logprobs against log_softmax of the logits computed here, and its zeros."""
  params, _, _ = setup
  tokens, mask = pad_rows(PROMPTS, 11, 'left')  # the shape of prompt + response: no new compile
  lp = np.asarray(logprob_fn(params, LLAMA, tokens, mask, 0.5))
  logits = np.asarray(logits_fn(params, LLAMA, tokens, mask), np.float64) / 0.5
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  m = np.asarray(mask)
  for b in range(8):
    for t in range(11):
      want = logits[b, t - 1, tokens[b, t]] - logz[b, t - 1] if t and m[b, t] and m[b, t - 1] else 0.0
      assert abs(lp[b, t] - want) < 1e-4, (b, t)


def test_bad_arguments(setup):
  params, tokens, mask = setup
  with pytest.raises(ValueError, match='max_new_tokens'):
    sampling.sample(params, LLAMA, tokens, mask, jax.random.key(0), max_new_tokens=0)
  with pytest.raises(ValueError, match='top_k'):
    sampling.sample(params, LLAMA, tokens, mask, jax.random.key(0), max_new_tokens=2, top_k=-1)
  with pytest.raises(ValueError, match='max_len'):
    sampling.sample(params, LLAMA, tokens, mask, jax.random.key(0), max_new_tokens=LLAMA.max_len)


@pytest.mark.parametrize('scale', [0.1, 3.0, 300.0])
def test_nucleus_by_bisection_equals_the_sorted_prefix(scale):
  """`_nucleus` against numpy's sorted-prefix nucleus (cumulative mass before a token < top_p) on
  64 rows of distinct random logits of three scales, 9 values of top_p (0 keeps the top token
  only, 1 keeps everything): the same set in every row, except where the prefix mass lies
  within 1e-6 of top_p (float32 rounding of the sums decides there), counted and kept rare."""
  rng = np.random.default_rng(int(scale * 10))
  z = (rng.standard_normal((64, 300)) * scale).astype(np.float32)
  z[:, :5] = -np.inf  # masked tokens: probability 0, never kept unless nothing else is
  nucleus = jax.jit(sampling._nucleus)
  ambiguous = 0
  for top_p in (0.0, 0.05, 0.3, 0.5, 0.8, 0.9, 0.95, 0.999, 1.0):
    got = np.asarray(nucleus(jnp.asarray(z), jnp.float32(top_p)))
    for b in range(64):
      order = np.argsort(-z[b].astype(np.float64), kind='stable')
      p = np.exp(z[b, order].astype(np.float64) - z[b].max())
      p /= p.sum()
      before = np.concatenate([[0.0], np.cumsum(p)[:-1]])
      if np.min(np.abs(before - top_p)) < 1e-6 and 0 < top_p < 1:
        ambiguous += 1
        continue
      want = np.zeros(300, bool)
      want[order[(before < top_p) | (np.arange(300) == 0)]] = True
      if top_p == 1.0:
        want[:] = True  # top_p = 1 is no truncation
      np.testing.assert_array_equal(got[b], want, err_msg=f'row {b}, top_p {top_p}')
  assert ambiguous <= 0.02 * 64 * 7  # of the rows with 0 < top_p < 1 (6 of 448 at scale 3)


def test_nucleus_keeps_all_of_a_tie_at_its_edge():
  """Probabilities [0.4, 0.2, 0.2, 0.2] (logits log p): top_p 0.5 needs the top token and one of
  the three tied ones; the bisection keeps the whole tie, a sort would keep one. top_p 0.4
  is reached by the top token alone (mass before the next = 0.4, not < 0.4)."""
  z = jnp.log(jnp.asarray([[0.2, 0.4, 0.2, 0.2]], jnp.float32))
  np.testing.assert_array_equal(np.asarray(sampling._nucleus(z, jnp.float32(0.5))), [[True, True, True, True]])
  np.testing.assert_array_equal(np.asarray(sampling._nucleus(z, jnp.float32(0.39))), [[False, True, False, False]])


def _frequencies(draws: np.ndarray, v: int) -> np.ndarray:
  """draws [n, B] -> empirical frequencies [B, v]."""
  return np.stack([np.bincount(draws[:, b], minlength=v) for b in range(draws.shape[1])]) / draws.shape[0]


def _assert_follows(freq: np.ndarray, p: np.ndarray, n: int):
  """Each frequency within 5 binomial standard deviations (+1/n) of its probability; zero
  probabilities never drawn."""
  bound = 5 * np.sqrt(p * (1 - p) / n) + 1 / n
  assert np.all(np.abs(freq - p) <= bound), np.max(np.abs(freq - p) - bound)
  assert np.all(freq[p == 0] == 0)


def test_two_level_draw_follows_the_weights():
  """`_draw` over 200k keys against the normalised weights: V = 37 (not a multiple of the
  block size 8, so the last block is padded), zero weights (also a whole zero block and a
  zero first entry), weights spanning 6 orders of magnitude, and one-hot rows."""
  rng = np.random.default_rng(0)
  w = rng.exponential(size=(5, 37)).astype(np.float32)
  w[0, :8] = 0.0                      # a whole block of zeros, and a zero first weight
  w[1, ::3] = 0.0
  w[2] = np.exp(rng.uniform(-14, 0, 37)).astype(np.float32)
  w[3] = 0.0
  w[3, 36] = 2.0                      # all mass on the last, padded block
  w[4] = 0.0
  w[4, 0] = 1e-3                      # all mass on the first index
  n = 200_000
  draws = jax.jit(jax.vmap(lambda k: sampling._draw(k, jnp.asarray(w))))(jax.random.split(jax.random.key(0), n))
  p = w.astype(np.float64) / w.sum(-1, keepdims=True)
  _assert_follows(_frequencies(np.asarray(draws), 37), p, n)


@pytest.mark.parametrize('top_k, top_p', [(0, 1.0), (0, 0.7), (6, 0.9)])
def test_choose_draws_the_truncated_distribution(top_k, top_p):
  """`_choose` at T = 0.8 over 100k keys: token frequencies against the numpy truncated,
  renormalised distribution (`_truncated_reference`, 5 binomial std), and the returned
  log-probs equal that distribution's and the untruncated policy's (1e-5)."""
  rng = np.random.default_rng(1)
  logits = (rng.standard_normal((4, 50)) * 2).astype(np.float32)
  t = 0.8
  choose = jax.jit(jax.vmap(lambda k: sampling._choose(jnp.asarray(logits), k, jnp.float32(t), jnp.float32(top_p),
                                                       top_k, top_p < 1.0)))
  n = 100_000
  tokens, lp, plp = (np.asarray(x) for x in choose(jax.random.split(jax.random.key(1), n)))
  refs = [_truncated_reference(logits[b], t, top_k or 50, top_p) for b in range(4)]
  assert top_p == 1.0 or min(margin for _, margin in refs) > 1e-4  # no nucleus edge within rounding
  want = np.stack([np.exp(ref) for ref, _ in refs])
  _assert_follows(_frequencies(tokens, 50), want, n)
  policy = logits.astype(np.float64) / t
  policy = policy - policy.max(-1, keepdims=True)
  policy -= np.log(np.exp(policy).sum(-1, keepdims=True))
  for b in range(4):
    np.testing.assert_allclose(lp[:1000, b], refs[b][0][tokens[:1000, b]], atol=1e-5)
    np.testing.assert_allclose(plp[:1000, b], policy[b, tokens[:1000, b]], atol=1e-5)


def test_first_max_is_argmax_with_ties_to_the_first():
  z = jnp.asarray([[0.0, 3.0, 3.0, 1.0], [-1.0, -1.0, -2.0, -5.0], [2.0, 0.0, 0.0, 2.0]], jnp.float32)
  np.testing.assert_array_equal(np.asarray(sampling._first_max(z)), [1, 0, 0])
  z = jax.random.normal(jax.random.key(0), (64, 1000))
  np.testing.assert_array_equal(np.asarray(sampling._first_max(z)), np.asarray(jnp.argmax(z, -1)))
