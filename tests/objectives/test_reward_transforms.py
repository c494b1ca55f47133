"""Reward transforms and reward-side regularizers against worked values and their properties."""
import math

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

import rmjax.objectives as obj

LOG2 = math.log(2.0)
LOGSIG2 = -math.log1p(math.exp(-2.0))  # log σ(2)
GIVEN0 = obj.RewardContext(ref_reward=jnp.zeros(3))


def test_log_sigmoid_hand_values_and_quantile_reference():
  out = obj.get('log_sigmoid', ref='given')(jnp.array([0.0, 2.0, -1e4]), GIVEN0)
  np.testing.assert_allclose(out, [-LOG2, LOGSIG2, -1e4], rtol=1e-6)
  # r_ref = median of the prompt's reference samples: 2 for prompt 0, 10 for prompt 1
  ctx = obj.RewardContext(ref_samples=jnp.array([[0.0, 1.0, 2.0, 3.0, 4.0], [10.0] * 5]),
                          prompt_ids=jnp.array([0, 1, 1]))
  out = obj.get('log_sigmoid')(jnp.array([2.0, 12.0, 10.0]), ctx)
  np.testing.assert_allclose(out, [-LOG2, LOGSIG2, -LOG2], rtol=1e-6)
  # the 0.25-quantile of (0, 1, 2, 3, 4) is 1
  out = obj.get('log_sigmoid', q=0.25)(jnp.array([3.0, 10.0, 10.0]), ctx)
  np.testing.assert_allclose(out, [LOGSIG2, -LOG2, -LOG2], rtol=1e-6)


@given(hnp.arrays(np.float32, (2, 3), elements=st.floats(-1e3, 1e3, width=32)))
def test_log_sigmoid_is_monotone_and_nonpositive(r):
  lo, hi = jnp.minimum(r[0], r[1]), jnp.maximum(r[0], r[1])
  f = obj.get('log_sigmoid', ref='given')
  ctx = obj.RewardContext(ref_reward=jnp.array([0.0, 5.0, -5.0]))
  assert jnp.all(f(lo, ctx) <= f(hi, ctx)) and jnp.all(f(hi, ctx) <= 0.0)


def test_log_sigmoid_gradient_finite_for_very_negative_rewards():
  f = obj.get('log_sigmoid', ref='given')
  g = jax.grad(lambda r: f(r, GIVEN0).sum())(jnp.array([-1e4, -1e30, 0.0]))
  # d/dr log σ(r) = 1 − σ(r): 1 far below the reference, ½ at it
  np.testing.assert_allclose(g, [1.0, 1.0, 0.5], rtol=1e-6)


@given(hnp.arrays(np.float32, (3,), elements=st.floats(-15, 15, width=32, exclude_min=True, exclude_max=True)),
       hnp.arrays(np.float32, (3,), elements=st.floats(-1e4, 1e4, width=32)))
def test_par_is_in_the_unit_interval(d, far):
  f = obj.get('par', ref='given')
  inside = f(jnp.asarray(d), GIVEN0)
  assert jnp.all(inside > 0.0) and jnp.all(inside < 1.0)
  anywhere = f(jnp.asarray(far), GIVEN0)
  assert jnp.all(anywhere >= 0.0) and jnp.all(anywhere <= 1.0)


def test_par_hand_value():
  out = obj.get('par', ref='given')(jnp.array([0.0, 2.0, -2.0]), GIVEN0)
  np.testing.assert_allclose(out, [0.5, 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2))], rtol=1e-6)


def test_clip_and_length_penalty():
  np.testing.assert_allclose(obj.get('clip', low=-1.0, high=2.0)(jnp.array([-3.0, 0.5, 9.0])),
                             [-1.0, 0.5, 2.0])
  with pytest.raises(ValueError, match='give low or high'):
    obj.get('clip')
  ctx = obj.RewardContext(mask=jnp.array([[1.0] * 3 + [0.0] * 2, [1.0] * 5]))
  out = obj.get('length_penalty', coef=0.1, target=4.0)(jnp.array([1.0, 1.0]), ctx)
  np.testing.assert_allclose(out, [1.0, 0.9], rtol=1e-6)
  with pytest.raises(ValueError, match=r'ctx.lengths \[B\] or ctx.mask \[B, T\] is required'):
    obj.get('length_penalty', coef=0.1)(jnp.ones(2), obj.RewardContext())


def test_combine_is_a_logical_and():
  f = obj.get('combine', weights=jnp.array([1.0, 1.0]), ref='given')
  rewards = jnp.array([[0.0, 2.0, 20.0], [1.0, 1.0, -19.0]])
  ctx = obj.RewardContext(ref_reward=jnp.array([[0.0, 0.0, 0.0], [1.0, -1.0, 1.0]]))
  out = f(rewards, ctx)
  # each model: log σ(r_m − r_ref,m); the third response is excellent for model 0, awful for 1
  np.testing.assert_allclose(out, [-2 * LOG2, 2 * LOGSIG2, -20.0], rtol=1e-5, atol=1e-6)
  plain = obj.get('combine', weights=jnp.array([0.5, 2.0]), transform='none')(rewards)
  np.testing.assert_allclose(plain, [2.0, 3.0, -28.0], rtol=1e-6)


def test_whiten_running_statistics_match_all_rewards_seen():
  t = obj.get('whiten', eps=0.0)
  b1, b2 = jnp.array([1.0, 2.0, 3.0, 10.0]), jnp.array([-4.0, 0.5])
  out1, s = t.apply(b1, t.init())
  out2, s = t.apply(b2, s)
  seen = np.concatenate([b1, b2])
  assert int(s.count) == 2 and float(s.n) == 6.0
  np.testing.assert_allclose(s.mean, seen.mean(), rtol=1e-6)
  np.testing.assert_allclose(s.m2 / s.n, seen.var(), rtol=1e-5)
  np.testing.assert_allclose(out2, (np.asarray(b2) - seen.mean()) / seen.std(), rtol=1e-5)
  np.testing.assert_allclose(out1, (np.asarray(b1) - 4.0) / np.asarray(b1).std(), rtol=1e-5)
  kept, _ = obj.get('whiten', eps=0.0, shift_mean=False).apply(b1, t.init())
  np.testing.assert_allclose(kept, (np.asarray(b1) - 4.0) / np.asarray(b1).std() + 4.0, rtol=1e-5)


def test_lagrangian_reward_and_dual_ascent():
  comps = jnp.array([[2.0, 4.0], [0.0, 1.0]])
  t = obj.get('lagrangian', thresholds=jnp.array([1.0, 2.0]), lr=0.1)
  reward, s = t.apply(comps, t.init())
  np.testing.assert_allclose(reward, [1.0 - 2.0, 3.0 - 1.0], rtol=1e-6)
  # component 0 is above its threshold (mean 3 > 1): less weight; component 1 below: more
  np.testing.assert_allclose(s.multipliers, [0.8, 1.15], rtol=1e-6)
  _, s_ge = obj.get('lagrangian', thresholds=jnp.array([1.0, 2.0]), lr=1.0).apply(comps, t.init())
  _, s_eq = obj.get('lagrangian', thresholds=jnp.array([1.0, 2.0]), lr=1.0, constraint='eq').apply(comps, t.init())
  np.testing.assert_allclose(s_ge.multipliers, [0.0, 2.5])
  np.testing.assert_allclose(s_eq.multipliers, [-1.0, 2.5])
  with pytest.raises(ValueError, match=r'components must have shape \[C, B\]'):
    t.apply(jnp.zeros((3, 2)), t.init())


KL_CTX = obj.RewardContext(logp=jnp.array([[-1.0, -2.0, -5.0], [-1.0, -3.0, -3.0]]),
                           ref_logp=jnp.array([[-1.5, -1.0, -9.0], [-0.5, -7.0, -7.0]]),
                           mask=jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))


def test_kl_penalty_places_the_score_on_the_last_token():
  out = obj.get('kl_penalty', beta=0.5)(jnp.array([1.0, 2.0]), KL_CTX)
  # log-ratios (0.5, −1) and (−0.5); scores on tokens 1 and 0
  np.testing.assert_allclose(out, [[-0.25, 1.5, 0.0], [2.25, 0.0, 0.0]], rtol=1e-6)
  tokens = obj.get('kl_penalty', beta=0.5)(jnp.ones((2, 3)), KL_CTX)
  np.testing.assert_allclose(tokens, [[0.75, 1.5, 0.0], [1.25, 0.0, 0.0]], rtol=1e-6)


def test_adaptive_kl_update_and_convergence_to_the_target():
  t = obj.get('adaptive_kl', target=1.0, init_coef=0.2)
  # sequence KLs −0.5 and −0.5: mean −0.5, error clipped to −0.2: β ← 0.2·(1 − 0.02)
  out, s = t.apply(jnp.array([1.0, 2.0]), t.init(), KL_CTX)
  np.testing.assert_allclose(out, [[-0.1, 1.2, 0.0], [2.1, 0.0, 0.0]], rtol=1e-6)
  np.testing.assert_allclose(s.coef, 0.2 * 0.98, rtol=1e-6)

  # closed loop: a policy whose KL is 2/β (a larger coefficient keeps it closer to π_ref)
  def step(state, _):
    per_token = 2.0 / state.coef / 4.0
    ctx = obj.RewardContext(logp=jnp.full((1, 4), per_token), ref_logp=jnp.zeros((1, 4)),
                            mask=jnp.ones((1, 4)))
    _, state = t.apply(jnp.zeros(1), state, ctx)
    return state, 2.0 / state.coef

  _, kls = jax.lax.scan(step, t.init(), length=400)
  kls = np.asarray(kls)
  assert abs(kls[-1] - 1.0) < 0.01 * abs(kls[0] - 1.0)  # KL 10 → target 1
  assert np.all(np.diff(np.abs(kls - 1.0)) <= 1e-6)       # monotonically closer


def test_chi2_occupancy_penalty():
  ctx = obj.RewardContext(logp=jnp.array([[math.log(2.0), 0.0]]), ref_logp=jnp.zeros((1, 2)),
                          mask=jnp.ones((1, 2)))
  # prefix ratios w = (2, 2), χ̂² = 2 − 1 = 1: r_t − 0.1·w_t, the score 1 on the last token
  out = obj.get('chi2', coef=0.1)(jnp.array([1.0]), ctx)
  np.testing.assert_allclose(out, [[-0.2, 0.8]], rtol=1e-6)
  # clipped to 1.5: χ̂² = 0.5, penalty 0.1·1.5/√0.5
  out = obj.get('chi2', coef=0.1, max_ratio=1.5)(jnp.zeros(1), ctx)
  np.testing.assert_allclose(out, [[-0.15 / math.sqrt(0.5)] * 2], rtol=1e-6)
  # at π = π_ref, χ̂² = 0 is floored at 1e-3: a finite penalty 0.1/√1e-3 per token
  same = ctx._replace(logp=jnp.zeros((1, 2)))
  np.testing.assert_allclose(obj.get('chi2', coef=0.1)(jnp.zeros(1), same),
                             [[-0.1 / math.sqrt(1e-3)] * 2], rtol=1e-5)


def test_chain_and_transform_compose_in_order():
  scores = jnp.array([[1.0, 4.0], [3.0, 0.0], [2.0, 2.0]])
  ctx = obj.RewardContext(ref_reward=jnp.array([1.0, 1.0]))
  t = obj.chain(obj.transform('uwo', lam=0.5), obj.transform('log_sigmoid', ref='given'),
                obj.transform('whiten'))
  state = t.init()
  out, state = t.apply(scores, state, ctx)
  # uwo: (5/3, 2/3); log σ(uwo − 1); then whitened over these two rewards
  ls = np.array([-math.log1p(math.exp(-2.0 / 3.0)), -math.log1p(math.exp(1.0 / 3.0))])
  np.testing.assert_allclose(out, (ls - ls.mean()) / np.sqrt(ls.var() + 1e-8), rtol=1e-5)
  assert isinstance(state, tuple) and len(state) == 3 and int(state[2].count) == 1
  with pytest.raises(ValueError, match=r'not a Transform.*rmjax.objectives.transform\(name'):
    obj.chain(obj.get('log_sigmoid'))
  with pytest.raises(ValueError, match='is of kind rm_loss, not a reward transform'):
    obj.transform('bradley_terry')


def test_missing_context_is_named():
  with pytest.raises(ValueError, match=r"log_sigmoid: ctx.ref_samples \[P, N\] is required with ref='quantile'"):
    obj.get('log_sigmoid')(jnp.zeros(2), obj.RewardContext())
  with pytest.raises(ValueError, match=r'kl_penalty: ctx.logp \[B, T\] is required'):
    obj.get('kl_penalty', beta=0.1)(jnp.zeros(2), obj.RewardContext())
  with pytest.raises(ValueError, match="ref must be one of 'quantile', 'given'"):
    obj.get('par', ref='median')
