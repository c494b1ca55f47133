"""Advantage estimators against worked values, closed forms and their properties."""
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

import rmjax.objectives as obj


def _seq(r):
  """Sequence rewards [B] as token rewards [B, 2] with the score on the last token."""
  r = jnp.asarray(r, jnp.float32)
  return jnp.stack([jnp.zeros_like(r), r], -1), jnp.ones((r.shape[0], 2))


def test_gae_hand_values():
  rewards = jnp.array([[1.0, 0.0, 2.0], [1.0, 0.0, 7.0]])
  values = jnp.array([[0.5, 1.0, 1.0], [0.5, 1.0, 9.0]])
  mask = jnp.array([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
  out = obj.get('gae', gamma=0.9, lam=0.8)(rewards, mask, values)
  # δ = (1.4, −0.1, 1) → A = (1.4 + 0.72·0.62, −0.1 + 0.72, 1); second row ends after token 1
  np.testing.assert_allclose(out.advantages, [[1.8464, 0.62, 1.0], [0.68, -1.0, 0.0]], rtol=1e-6)
  np.testing.assert_allclose(out.returns, [[2.3464, 1.62, 2.0], [1.18, 0.0, 0.0]], rtol=1e-6)


_GAE_1_1 = jax.jit(obj.get('gae', gamma=1.0, lam=1.0))  # compiled once for all examples


@given(hnp.arrays(np.float32, (2, 5), elements=st.floats(-3, 3, width=32)),
       hnp.arrays(np.float32, (2, 5), elements=st.floats(-3, 3, width=32)), st.integers(1, 5))
def test_gae_with_unit_gamma_lambda_is_returns_to_go_minus_values(r, v, length):
  mask = (np.arange(5)[None, :] < np.array([5, length])[:, None]).astype(np.float32)
  out = _GAE_1_1(jnp.asarray(r), jnp.asarray(mask), jnp.asarray(v))
  rtg = np.cumsum((r * mask)[:, ::-1], -1)[:, ::-1]
  np.testing.assert_allclose(out.advantages, (rtg - v) * mask, atol=1e-5)


def test_gae_needs_values():
  with pytest.raises(ValueError, match=r'values \[B, T\] is required'):
    obj.get('gae')(jnp.zeros((2, 3)), jnp.ones((2, 3)))


def test_rloo_hand_values_and_leave_one_out():
  rewards, mask = _seq([1.0, 2.0, 6.0])
  out = obj.get('rloo', group_size=3)(rewards, mask)
  # baselines (2 + 6)/2, (1 + 6)/2, (1 + 2)/2
  np.testing.assert_allclose(out.advantages[:, 0], [-3.0, -1.5, 4.5], rtol=1e-6)
  np.testing.assert_allclose(out.advantages[:, 1], out.advantages[:, 0])


@given(hnp.arrays(np.float32, (6,), elements=st.floats(-5, 5, width=32)), st.integers(0, 5),
       st.floats(-5, 5, width=32))
def test_rloo_baseline_excludes_the_sample(r, i, new):
  f = obj.get('rloo', group_size=3)
  before = f(*_seq(r)).advantages[:, 0] - r
  r2 = r.copy()
  r2[i] = new
  after = f(*_seq(r2)).advantages[:, 0] - r2
  # the baseline of sample i (R_i − A_i) does not depend on R_i
  np.testing.assert_allclose(after[i], before[i], atol=1e-5)


def test_rloo_kl_penalty_enters_before_the_baseline():
  ctx = obj.RewardContext(logp=jnp.array([[0.5, 0.0], [-1.0, 0.0]]), ref_logp=jnp.zeros((2, 2)),
                          mask=jnp.ones((2, 2)))
  tokens = obj.get('kl_penalty', beta=1.0)(jnp.array([1.0, 2.0]), ctx)
  out = obj.get('rloo', group_size=2)(tokens, ctx.mask)
  # penalised returns (1 − 0.5, 2 + 1) = (0.5, 3): A = ±2.5 (after the baseline it would be −1.5, 2)
  np.testing.assert_allclose(out.advantages[:, 0], [-2.5, 2.5], rtol=1e-6)


def test_grpo_and_dr_grpo_hand_values():
  rewards, mask = _seq([1.0, 2.0, 3.0, 6.0])
  std = np.sqrt(3.5)  # population variance (4 + 1 + 0 + 9)/4
  out = obj.get('grpo', group_size=4)(rewards, mask)
  np.testing.assert_allclose(out.advantages[:, 0], np.array([-2, -1, 0, 3]) / (std + 1e-4), rtol=1e-6)
  out = obj.get('grpo', group_size=4, unbiased=True, eps=0.0)(rewards, mask)
  np.testing.assert_allclose(out.advantages[:, 0], np.array([-2, -1, 0, 3]) / np.sqrt(14 / 3), rtol=1e-6)
  out = obj.get('dr_grpo', group_size=2)(rewards, mask)
  np.testing.assert_allclose(out.advantages[:, 0], [-0.5, 0.5, -1.5, 1.5], rtol=1e-6)


def test_grpo_zero_and_near_zero_variance_groups():
  f = obj.get('grpo', group_size=4)
  r = jnp.array([5.0, 5.0, 5.0, 5.0, 1e4, 1e4 + 1e-3, 1e4, 1e4 - 1e-3])
  adv = f(*_seq(r)).advantages[:, 0]
  np.testing.assert_allclose(adv[:4], 0.0)
  assert np.all(np.isfinite(adv)) and np.all(np.abs(adv) <= np.sqrt(3.0) + 1e-6)
  grad = jax.jit(jax.grad(lambda x: (f(*_seq(x)).advantages[:, 0] * jnp.arange(8.0)).sum()))(r)
  assert np.all(np.isfinite(grad))


def test_group_size_must_divide_the_batch():
  with pytest.raises(ValueError, match='batch size 3 is not a multiple of group_size 2'):
    obj.get('rloo', group_size=2)(*_seq([1.0, 2.0, 3.0]))
  with pytest.raises(ValueError, match='group_size must be a static int >= 2'):
    obj.get('rloo', group_size=1)


def test_reinforce_moving_average_baseline():
  t = obj.get('reinforce', decay=0.5)
  rewards, mask = _seq([1.0, 3.0])
  out, s = t.apply(rewards, mask, t.init())
  np.testing.assert_allclose(out.advantages, [[1.0, 1.0], [3.0, 3.0]])  # no history: b = 0
  np.testing.assert_allclose(s.baseline, 2.0)
  out, s = t.apply(rewards * 2.0, mask, s)
  np.testing.assert_allclose(out.advantages, [[0.0, 0.0], [4.0, 4.0]])  # b = 2 from batch 1
  np.testing.assert_allclose(s.baseline, 0.5 * 2.0 + 0.5 * 4.0)
  plain, _ = obj.get('reinforce').apply(rewards, mask, t.init())
  np.testing.assert_allclose(plain.advantages, obj.returns_to_go(rewards, mask))
