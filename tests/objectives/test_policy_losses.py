"""Policy losses and KL / χ² / entropy regularizers: worked values and exact-gradient checks.

The KL checks use a categorical over V = 4 tokens: expectations over samples y ~ π are taken
exactly, Σ_y π(y)·f(y) with π(y) held fixed (the samples do not move with θ), and compared with
the closed-form KLs and their autodiff gradients (`../shared/PITFALLS.md` #1–2).
"""
import math

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

import rmjax.objectives as obj

THETA = jnp.array([0.3, -1.2, 0.8, 0.0])
REF = jax.nn.log_softmax(jnp.array([-0.5, 0.4, 0.1, 1.0]))


def _token_batch(logits, ref_log_probs):
  """Every vocabulary token as one sampled position: logp [1, V]."""
  return obj.PolicyBatch(logp=jax.nn.log_softmax(logits)[None, :], mask=jnp.ones((1, 4)),
                         ref_logp=ref_log_probs[None, :])


def _kl(p_log, q_log):
  return jnp.sum(jnp.exp(p_log) * (p_log - q_log))


def _expected_grad(name, theta):
  """∇θ Σ_y sg(π(y))·k(y; θ): the expected gradient of the estimator with samples held fixed."""
  piece = obj.get(name, coef=1.0)
  weights = jax.lax.stop_gradient(jax.nn.softmax(theta))
  return jax.grad(lambda t: (weights * piece(_token_batch(t, REF))[0][0]).sum())(theta)


def test_expected_gradients_of_the_kl_estimators():
  forward = jax.grad(lambda t: _kl(jax.nn.log_softmax(t), REF))(THETA)    # ∇KL(π‖π_ref)
  reverse = jax.grad(lambda t: _kl(REF, jax.nn.log_softmax(t)))(THETA)    # ∇KL(π_ref‖π)
  np.testing.assert_allclose(_expected_grad('kl_k1', THETA), 0.0, atol=1e-6)
  np.testing.assert_allclose(_expected_grad('kl_k2', THETA), forward, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(_expected_grad('kl_k3', THETA), reverse, rtol=1e-5, atol=1e-6)
  assert not np.allclose(forward, reverse, atol=1e-2)  # the directions really differ here


def test_a_step_on_kl_k2_or_kl_exact_lowers_the_exact_kl():
  kl = lambda t: float(_kl(jax.nn.log_softmax(t), REF))
  step_k2 = THETA - 0.5 * _expected_grad('kl_k2', THETA)
  exact = obj.get('kl_exact', coef=1.0)
  batch = lambda t: obj.PolicyBatch(logp=jnp.zeros((1, 1)), mask=jnp.ones((1, 1)),
                                    logits=t[None, None, :], ref_logits=REF[None, None, :])
  g_exact = jax.grad(lambda t: exact(batch(t))[0].sum())(THETA)
  step_exact = THETA - 0.5 * g_exact
  assert kl(step_k2) < kl(THETA) and kl(step_exact) < kl(THETA)
  np.testing.assert_allclose(exact(batch(THETA))[0][0, 0], kl(THETA), rtol=1e-6)


def test_monte_carlo_means_of_k1_and_k3_match_the_exact_kl():
  n = 40000
  y = jax.random.categorical(jax.random.key(0), THETA, shape=(n,))
  logp = jax.nn.log_softmax(THETA)
  batch = obj.PolicyBatch(logp=logp[y][None, :], mask=jnp.ones((1, n)), ref_logp=REF[y][None, :])
  exact = float(_kl(logp, REF))
  for name in ('kl_k1', 'kl_k3'):
    values = np.asarray(obj.get(name, coef=1.0)(batch)[0][0])
    se = values.std() / math.sqrt(n)
    assert abs(values.mean() - exact) < 4 * se, (name, values.mean(), exact, se)


@given(hnp.arrays(np.float32, (2, 3), elements=st.floats(-30, 0, width=32)),
       hnp.arrays(np.float32, (2, 3), elements=st.floats(-30, 0, width=32)))
def test_k3_is_nonnegative(logp, ref):
  batch = obj.PolicyBatch(logp=jnp.asarray(logp), mask=jnp.ones((2, 3)), ref_logp=jnp.asarray(ref))
  assert np.all(np.asarray(obj.get('kl_k3', coef=1.0)(batch)[0]) >= 0.0)


def test_exact_vocabulary_terms_hand_values():
  # π = (½, ½), π_ref = (¼, ¾)
  batch = obj.PolicyBatch(logp=jnp.zeros((1, 1)), mask=jnp.ones((1, 1)),
                          logits=jnp.log(jnp.array([[[0.5, 0.5]]])),
                          ref_logits=jnp.log(jnp.array([[[0.25, 0.75]]])))
  kl = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)
  np.testing.assert_allclose(obj.get('kl_exact', coef=2.0)(batch)[0], [[2.0 * kl]], rtol=1e-6)
  # Σ π²/π_ref − 1 = 1 + 1/3 − 1
  np.testing.assert_allclose(obj.get('chi2_token', coef=1.0)(batch)[0], [[1.0 / 3.0]], rtol=1e-6)
  # bonus: −coef·H, H = log 2
  np.testing.assert_allclose(obj.get('entropy', coef=0.1)(batch)[0], [[-0.1 * math.log(2.0)]], rtol=1e-6)


def test_ppo_clip_hand_values():
  ratio = jnp.array([[1.5, 0.5, 0.5, 3.0, 1.1]])
  adv = jnp.array([[1.0, 1.0, -1.0, -1.0, 2.0]])
  batch = obj.PolicyBatch(logp=jnp.log(ratio), old_logp=jnp.zeros((1, 5)), advantages=adv,
                          mask=jnp.ones((1, 5)))
  loss, m = obj.get('ppo_clip', eps=0.2)(batch)
  np.testing.assert_allclose(loss, [[-1.2, -0.5, 0.8, 3.0, -2.2]], rtol=1e-6)
  np.testing.assert_allclose(m['clipped'], [[1.0, 0.0, 1.0, 0.0, 0.0]])
  loss, _ = obj.get('ppo_clip', eps=0.2, dual_clip=2.0)(batch)
  np.testing.assert_allclose(loss, [[-1.2, -0.5, 0.8, 2.0, -2.2]], rtol=1e-6)
  # no gradient through the clipped branch, the plain one elsewhere: d/dlogp(−A·ρ) = −A·ρ
  g = jax.grad(lambda lp: obj.get('ppo_clip')(batch._replace(logp=lp))[0].sum())(batch.logp)
  np.testing.assert_allclose(g, [[0.0, -0.5, 0.0, 3.0, -2.2]], rtol=1e-6)
  with pytest.raises(ValueError, match='dual_clip must exceed 1'):
    obj.get('ppo_clip', dual_clip=0.5)


def test_pg_and_value_hand_values():
  batch = obj.PolicyBatch(logp=jnp.array([[-1.0, -2.0]]), mask=jnp.array([[1.0, 0.0]]),
                          advantages=jnp.array([[3.0, 5.0]]), values=jnp.array([[2.0, 0.8]]),
                          old_values=jnp.array([[1.0, 0.0]]), returns=jnp.array([[0.0, 2.0]]))
  np.testing.assert_allclose(obj.get('pg')(batch)[0], [[3.0, 0.0]])
  np.testing.assert_allclose(obj.get('value')(batch)[0], [[2.0, 0.0]])
  full = batch._replace(mask=jnp.ones((1, 2)))
  # clip 0.5: max(4, 1.5²)/2 and max(1.44, (0.5 − 2)²)/2
  np.testing.assert_allclose(obj.get('value', clip=0.5)(full)[0], [[2.0, 1.125]], rtol=1e-6)


def test_sum_losses_and_missing_fields():
  batch = obj.PolicyBatch(logp=jnp.array([[-1.0]]), mask=jnp.ones((1, 1)), advantages=jnp.ones((1, 1)),
                          ref_logp=jnp.array([[-2.0]]))
  loss, m = obj.sum_losses(obj.get('pg'), obj.get('kl_k2', coef=0.1))(batch)
  np.testing.assert_allclose(loss, [[1.0 + 0.05]], rtol=1e-6)
  assert set(m) == {'kl_k2'}
  with pytest.raises(ValueError, match=r'ppo_clip: batch.old_logp is required by ppo_clip'):
    obj.get('ppo_clip')(batch)
  with pytest.raises(ValueError, match=r'batch.ref_logp must have shape \[B, T\] like batch.logp'):
    obj.get('kl_k1', coef=1.0)(batch._replace(ref_logp=jnp.zeros((1, 2))))
