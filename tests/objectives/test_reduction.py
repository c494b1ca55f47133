"""The reduction: hand values for each mode and split-invariance of the gradient (PITFALLS #4)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmjax.objectives as obj

VALUES = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
MASK = jnp.array([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # the last row is padding


@pytest.mark.parametrize('mode, kwargs, want', [
    ('token_mean', {}, 7.0 / 3.0),             # (1 + 2 + 4) / 3 tokens
    ('seq_mean_token_sum', {}, 3.5),           # (3 + 4) / 2 sequences
    ('seq_mean_token_mean', {}, 2.75),         # (1.5 + 4) / 2
    ('constant', dict(constant=4.0), 0.875),   # 7 / (2 sequences · 4)
])
def test_hand_values(mode, kwargs, want):
  np.testing.assert_allclose(obj.reduce(VALUES, MASK, mode, **kwargs), want, rtol=1e-6)


def test_per_example_values():
  v, m = jnp.array([1.0, 3.0, 100.0]), jnp.array([1.0, 1.0, 0.0])
  for mode in ('token_mean', 'seq_mean_token_sum', 'seq_mean_token_mean'):
    np.testing.assert_allclose(obj.reduce(v, m, mode), 2.0, rtol=1e-6)
  np.testing.assert_allclose(obj.reduce(v, m, 'constant', constant=2.0), 1.0, rtol=1e-6)


def test_masked_nonfinite_values_do_not_leak():
  v = VALUES.at[2, 0].set(jnp.inf).at[0, 2].set(jnp.nan)
  np.testing.assert_allclose(obj.reduce(v, MASK, 'token_mean'), 7.0 / 3.0, rtol=1e-6)


def _loss(theta, x, mask, mode, normalizer):
  """A per-token loss quadratic in theta [T] with row-dependent data x [B, T]."""
  values = jnp.square(x * theta[None, :] - 1.0)
  return obj.reduce(values, mask, mode, constant=8.0 if mode == 'constant' else None,
                    normalizer=normalizer)


@pytest.mark.parametrize('mode', obj.MODES)
def test_same_gradient_for_one_and_four_minibatches(mode):
  x = jax.random.normal(jax.random.key(0), (8, 6))
  lengths = jnp.array([6, 1, 3, 2, 6, 5, 0, 4])
  mask = (jnp.arange(6)[None, :] < lengths[:, None]).astype(jnp.float32)
  theta = jnp.linspace(-1.0, 1.0, 6)
  grad = jax.grad(_loss)
  full = grad(theta, x, mask, mode, None)
  n = obj.batch_normalizer(mask, mode)
  # 4 minibatches of 2 rows, gradients summed (accumulation), each with the global normaliser
  parts = sum(grad(theta, x[i:i + 2], mask[i:i + 2], mode, n) for i in range(0, 8, 2))
  np.testing.assert_allclose(parts, full, rtol=1e-5, atol=1e-6)
  # the same parts under jit
  jitted = jax.jit(grad, static_argnums=3)
  parts_jit = sum(jitted(theta, x[i:i + 2], mask[i:i + 2], mode, n) for i in range(0, 8, 2))
  np.testing.assert_allclose(parts_jit, full, rtol=1e-5, atol=1e-6)


def test_per_minibatch_normalisers_would_differ():
  # the failure the contract prevents: averaging minibatch means over unequal token counts
  x = jax.random.normal(jax.random.key(1), (4, 6))
  mask = (jnp.arange(6)[None, :] < jnp.array([6, 1, 1, 1])[:, None]).astype(jnp.float32)
  theta = jnp.linspace(-1.0, 1.0, 6)
  full = jax.grad(_loss)(theta, x, mask, 'token_mean', None)
  naive = sum(jax.grad(_loss)(theta, x[i:i + 2], mask[i:i + 2], 'token_mean', None) for i in (0, 2)) / 2
  assert not np.allclose(naive, full, rtol=1e-3)


def test_bad_use_is_explained():
  with pytest.raises(ValueError, match="mode must be one of 'token_mean'"):
    obj.reduce(VALUES, MASK, 'mean')
  with pytest.raises(ValueError, match=r"constant is required for mode 'constant'"):
    obj.reduce(VALUES, MASK, 'constant')
  with pytest.raises(ValueError, match=r"constant is only used by mode 'constant'"):
    obj.reduce(VALUES, MASK, 'token_mean', constant=3.0)
  with pytest.raises(ValueError, match=r'mask must have shape \[B\] or \[B, T\] like values = \(3, 3\), got \(3,\)'):
    obj.reduce(VALUES, MASK[0], 'token_mean')
