"""Ensemble aggregations: hand values on a 3-member ensemble and the identities they must keep."""
import math

import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given

import rmjax.objectives as obj

SCORES = jnp.array([[1.0, 4.0], [3.0, 0.0], [2.0, 2.0]])  # K = 3 members, B = 2 examples


@pytest.mark.parametrize('name, kwargs, want', [
    ('mean', {}, [2.0, 2.0]),
    ('median', {}, [2.0, 2.0]),
    ('min', {}, [1.0, 0.0]),
    ('wco', {}, [1.0, 0.0]),
    # population variances 2/3 and 8/3
    ('uwo', dict(lam=0.5), [2.0 - 1.0 / 3.0, 2.0 - 4.0 / 3.0]),
    # unbiased variances 1 and 4
    ('uwo', dict(lam=0.5, unbiased=True), [1.5, 0.0]),
    ('mean_minus_std', {}, [2.0 - math.sqrt(2.0 / 3.0), 2.0 - math.sqrt(8.0 / 3.0)]),
    ('mean_minus_std', dict(k=2.0, unbiased=True), [0.0, -2.0]),
    # sorted columns (1, 2, 3) and (0, 2, 4); position q·(K−1) = 0.5
    ('quantile', dict(q=0.25), [1.5, 1.0]),
    # −log((e^-1 + e^-3 + e^-2)/3), −log((e^-4 + 1 + e^-2)/3)
    ('softmin', dict(beta=1.0), [1.69100632, 0.95568066]),
])
def test_hand_values(name, kwargs, want):
  np.testing.assert_allclose(obj.get(name, **kwargs)(SCORES), want, atol=1e-5)


def test_members_are_normalised_by_their_statistics():
  # member 0 is member 1 shifted by +10 and scaled by 2: after normalisation they agree.
  scores = jnp.array([[12.0, 16.0], [1.0, 3.0]])
  stats = obj.RewardStats(mean=jnp.array([10.0, 0.0]), std=jnp.array([2.0, 1.0]))
  np.testing.assert_allclose(obj.get('mean')(scores, stats), [1.0, 3.0], atol=1e-6)
  np.testing.assert_allclose(obj.get('uwo', lam=1.0)(scores, stats), [1.0, 3.0], atol=1e-6)
  # without statistics the offset dominates: means 6.5 and 9.5, variances 5.5² and 6.5²
  np.testing.assert_allclose(obj.get('uwo', lam=1.0)(scores), [6.5 - 30.25, 9.5 - 42.25], atol=1e-4)


def test_uwo_variance_is_stable_for_near_equal_members():
  # E[x²] − E[x]² in float32 would return noise of order 1e3·eps·|x|² here; two passes give ≈ 0.
  scores = jnp.full((4, 3), 1e4, jnp.float32) + jnp.array([0.0, 1e-3, 0.0, -1e-3])[:, None]
  out = obj.get('uwo', lam=1.0)(scores)
  np.testing.assert_allclose(out, np.full(3, 1e4), rtol=0, atol=2e-3)


def test_bad_statistics_and_shapes_are_named():
  with pytest.raises(ValueError, match=r'stats.std must have shape \[K\] \(one per member\) = \(3,\), got \(2,\)'):
    obj.get('mean')(SCORES, obj.RewardStats(jnp.zeros(3), jnp.ones(2)))
  with pytest.raises(ValueError, match=r'scores must have shape \[K, B\]'):
    obj.get('mean')(jnp.zeros(3))
  with pytest.raises(ValueError, match='unbiased variance needs K >= 2'):
    obj.get('uwo', lam=1.0, unbiased=True)(jnp.zeros((1, 3)))
  with pytest.raises(ValueError, match='beta must be > 0'):
    obj.get('softmin', beta=0.0)


_members = hnp.arrays(np.float32, (4, 3), elements=st.floats(-20, 20, width=32))
_stats = st.tuples(hnp.arrays(np.float32, (4,), elements=st.floats(-5, 5, width=32)),
                   hnp.arrays(np.float32, (4,), elements=st.floats(0.125, 5, width=32)))


@given(_members, st.floats(0.05, 50.0))
def test_order_wco_softmin_mean_max(scores, beta):
  scores = jnp.asarray(scores)
  wco = obj.get('wco')(scores)
  soft = obj.get('softmin', beta=beta)(scores)
  mean = obj.get('mean')(scores)
  tol = 1e-4 * (1.0 + jnp.abs(scores).max())
  assert jnp.all(wco <= soft + tol) and jnp.all(soft <= mean + tol)
  assert jnp.all(mean <= scores.max(0) + tol)


@given(_members)
def test_zero_coefficients_give_the_mean(scores):
  scores = jnp.asarray(scores)
  mean = obj.get('mean')(scores)
  np.testing.assert_allclose(obj.get('uwo', lam=0.0)(scores), mean, atol=1e-6)
  np.testing.assert_allclose(obj.get('mean_minus_std', k=0.0)(scores), mean, atol=1e-6)


def test_softmin_limits():
  np.testing.assert_allclose(obj.get('softmin', beta=1e-3)(SCORES), [1.0, 0.0], atol=1e-2)
  np.testing.assert_allclose(obj.get('softmin', beta=1e4)(SCORES), [2.0, 2.0], atol=1e-3)


@pytest.mark.parametrize('name, kwargs', [
    ('mean', {}), ('median', {}), ('wco', {}), ('uwo', dict(lam=0.7)), ('mean_minus_std', dict(k=1.3)),
    ('quantile', dict(q=0.3)), ('softmin', dict(beta=0.5))])
@given(_members, _stats, st.integers(0, 3), st.floats(-100, 100, width=32))
def test_shifting_a_member_with_its_statistics_changes_nothing(name, kwargs, scores, stats, k, shift):
  agg = obj.get(name, **kwargs)
  mean, std = jnp.asarray(stats[0]), jnp.asarray(stats[1])
  scores = jnp.asarray(scores)
  base = agg(scores, obj.RewardStats(mean, std))
  shifted = agg(scores.at[k].add(shift), obj.RewardStats(mean.at[k].add(shift), std))
  # float32 rounding of the shifted scores, amplified by up to 1/std = 8: relative 1e-3
  np.testing.assert_allclose(shifted, base, rtol=1e-3, atol=1e-3 * (1.0 + float(jnp.abs(base).max())))
