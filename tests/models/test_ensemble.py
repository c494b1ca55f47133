"""ensemble.stack / unstack / member / num_members."""
import jax.numpy as jnp
import numpy as np
import pytest

from rmjax.models import ensemble


def _tree(x):
  return {'a': jnp.full((2, 3), x), 'b': {'c': jnp.asarray([x, x + 1.0])}}


def test_stack_unstack_round_trip():
  trees = [_tree(float(i)) for i in range(3)]
  stacked = ensemble.stack(trees)
  assert stacked['a'].shape == (3, 2, 3) and stacked['b']['c'].shape == (3, 2)
  assert ensemble.num_members(stacked) == 3
  np.testing.assert_array_equal(ensemble.member(stacked, 2)['b']['c'], [2.0, 3.0])
  for got, want in zip(ensemble.unstack(stacked), trees):
    np.testing.assert_array_equal(got['a'], want['a'])
    np.testing.assert_array_equal(got['b']['c'], want['b']['c'])


def test_errors():
  with pytest.raises(ValueError, match='no trees'):
    ensemble.stack([])
  with pytest.raises(ValueError, match='structure'):
    ensemble.stack([_tree(0.0), {'a': jnp.zeros((2, 3))}])
  with pytest.raises(ValueError, match='shape'):
    ensemble.stack([_tree(0.0), {'a': jnp.zeros((2, 4)), 'b': {'c': jnp.zeros(2)}}])
  with pytest.raises(ValueError, match='leading'):
    ensemble.num_members({'a': jnp.zeros((2, 3)), 'b': jnp.zeros((3,))})
  with pytest.raises(ValueError, match='out of range'):
    ensemble.member(ensemble.stack([_tree(0.0)]), 1)
