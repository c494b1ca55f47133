"""Reward-model losses against hand-computed values (tolerance 1e-6 absolute, float32)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmjax.objectives as obj

SP1 = math.log1p(math.exp(-1.0))  # softplus(-1) = -log σ(1)
LOG2 = math.log(2.0)


def test_bradley_terry_hand_values():
  rc, rr = jnp.array([2.0, 0.0, 5.0]), jnp.array([1.0, 0.0, 4.0])
  np.testing.assert_allclose(obj.get('bradley_terry')(rc, rr), [SP1, LOG2, SP1], atol=1e-6)
  # the constant margin 1 makes the first and third pairs ties
  np.testing.assert_allclose(obj.get('bradley_terry', margin=1.0)(rc, rr), [LOG2, SP1 + 1.0, LOG2],
                             atol=1e-6)
  # per-example margins come on top of the constant one
  out = obj.get('bradley_terry', margin=0.5)(rc, rr, margin=jnp.array([0.5, -1.5, -0.5]))
  np.testing.assert_allclose(out, [LOG2, SP1, SP1], atol=1e-6)
  # label smoothing 0.1: 0.9·softplus(−1) + 0.1·softplus(1), softplus(1) = 1 + softplus(−1)
  out = obj.get('bradley_terry', label_smoothing=0.1)(rc[:1], rr[:1])
  np.testing.assert_allclose(out, [0.9 * SP1 + 0.1 * (1.0 + SP1)], atol=1e-6)


def test_bradley_terry_finite_for_huge_gaps():
  loss = obj.get('bradley_terry', label_smoothing=0.05)
  rc, rr = jnp.array([1e4, -1e4]), jnp.array([-1e4, 1e4])
  out = loss(rc, rr)
  np.testing.assert_allclose(out, [0.05 * 2e4, 0.95 * 2e4], rtol=1e-6)
  g = jax.grad(lambda a: loss(a, rr).sum())(rc)
  assert np.all(np.isfinite(g))


def test_bt_centered_adds_the_centering_penalty():
  rc, rr = jnp.array([2.0, -1.0]), jnp.array([1.0, -1.0])
  out = obj.get('bt_centered', eta=0.01)(rc, rr)
  np.testing.assert_allclose(out, [SP1 + 0.01 * 9.0, LOG2 + 0.01 * 4.0], atol=1e-6)


def test_regression_weighted_and_masked():
  pred = jnp.array([[1.0, 2.0], [0.0, 3.0]])
  target = jnp.array([[0.0, 0.0], [2.0, 3.0]])
  mask = jnp.array([[1.0, 0.0], [1.0, 1.0]])
  out = obj.get('regression', weights=jnp.array([2.0, 1.0]))(pred, target, mask)
  np.testing.assert_allclose(out, [2.0 * 1.0, 2.0 * 4.0 + 0.0], atol=1e-6)
  np.testing.assert_allclose(obj.get('regression')(pred, target), [5.0, 4.0], atol=1e-6)


def test_multi_objective_weights_heads_and_skips_missing_labels():
  rc = jnp.array([[2.0, 0.0], [0.0, 0.0]])
  rr = jnp.array([[1.0, 0.0], [0.0, 1.0]])
  label_mask = jnp.array([[1.0, 1.0], [0.0, 1.0]])
  out = obj.get('multi_objective', weights=jnp.array([0.75, 0.25]))(rc, rr, label_mask)
  np.testing.assert_allclose(out, [0.75 * SP1 + 0.25 * LOG2, 0.25 * (1.0 + SP1)], atol=1e-6)


def test_wrong_shapes_name_the_expected_one():
  loss = obj.get('bradley_terry')
  with pytest.raises(ValueError, match=r'r_rejected must have shape \[B\] like r_chosen = \(3,\), got \(3, 1\)'):
    loss(jnp.zeros(3), jnp.zeros((3, 1)))
  with pytest.raises(ValueError, match=r'r_chosen must have shape \[B\], got \(2, 3\)'):
    loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)))
  with pytest.raises(ValueError, match=r'weights must have shape \[A\]'):
    obj.get('multi_objective', weights=jnp.ones(3))(jnp.zeros((2, 2)), jnp.zeros((2, 2)))
