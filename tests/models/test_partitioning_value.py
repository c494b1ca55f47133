"""Logical axes for every parameter tree; the value model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmjax.models import partitioning, value_model
from rmjax.models import transformer as tf
from rmjax.models.reward_model import RewardModel
from tests.models.conftest import GPT2, LLAMA, pad_rows

NAMES = {'vocab', 'embed', 'qkv', 'heads', 'mlp', 'norm', 'ensemble', 'reward_heads', 'positions'}
is_axes = lambda x: isinstance(x, tuple)


def _check(shapes, axes):
  flat_shapes = jax.tree.leaves(shapes)
  flat_axes = jax.tree.leaves(axes, is_leaf=is_axes)
  assert len(flat_shapes) == len(flat_axes)
  for s, a in zip(flat_shapes, flat_axes):
    assert len(a) == len(s.shape) and set(a) <= NAMES


@pytest.mark.parametrize('config', [LLAMA, GPT2, LLAMA.replace(mlp_bias=True, tie_embeddings=True)],
                         ids=['llama', 'gpt2', 'llama_tied_bias'])
def test_lm_axes(config):
  shapes = jax.eval_shape(lambda k: tf.init_lm(k, config), jax.random.key(0))
  axes = partitioning.logical_axes(shapes)
  _check(shapes, axes)
  b = axes['backbone']
  assert b['embed']['embedding'] == ('vocab', 'embed')
  assert b['layers_1']['attn']['qkv']['kernel'] == ('embed', 'qkv')
  assert b['layers_0']['attn']['out']['kernel'] == ('heads', 'embed')
  assert b['layers_0']['mlp']['down']['kernel'] == ('mlp', 'embed')
  assert b['final_norm']['scale'] == ('norm',)
  if config.family == 'gpt2':
    assert b['pos_embed']['embedding'] == ('positions', 'embed')
    assert b['layers_0']['mlp']['fc']['kernel'] == ('embed', 'mlp')
  if not config.tie_embeddings:
    assert axes['lm_head']['kernel'] == ('embed', 'vocab')


def test_reward_model_and_value_axes():
  full = jax.eval_shape(RewardModel(LLAMA, 3, 'full').init, jax.random.key(0))
  axes = partitioning.logical_axes(full)
  _check(full, axes)
  assert axes['backbone']['embed']['embedding'] == ('ensemble', 'vocab', 'embed')
  assert axes['reward_head']['kernel'] == ('ensemble', 'embed', 'reward_heads')
  multi = jax.eval_shape(RewardModel(LLAMA, 3, 'multi_head').init, jax.random.key(0))
  axes = partitioning.logical_axes(multi)
  assert axes['reward_head']['kernel'] == ('embed', 'reward_heads')
  assert axes['backbone']['embed']['embedding'] == ('vocab', 'embed')
  value = jax.eval_shape(lambda k: value_model.init_value_model(k, LLAMA), jax.random.key(0))
  axes = partitioning.logical_axes(value)
  _check(value, axes)
  assert axes['value_head'] == {'kernel': ('embed',), 'bias': ()}


def test_unknown_parameter_raises():
  with pytest.raises(ValueError, match='no rule for parameter backbone/adapter/kernel'):
    partitioning.logical_axes({'backbone': {'adapter': {'kernel': jnp.zeros((2, 2))}}})
  with pytest.raises(ValueError, match='dimensions'):
    partitioning.logical_axes({'lm_head': {'kernel': jnp.zeros((2, 2, 2, 2))}})


def test_values_are_head_on_backbone_hidden_states():
  """values == hidden states @ kernel + bias at real tokens, 0 at padding (atol 1e-5)."""
  params = jax.jit(value_model.init_value_model, static_argnums=1)(jax.random.key(0), LLAMA)
  params['value_head']['bias'] = jnp.asarray(0.25)
  tokens, mask = pad_rows([np.array([3, 4, 5]), np.array([6, 7, 8, 9, 10])], 6, 'left')
  v = np.asarray(jax.jit(value_model.values, static_argnums=1)(params, LLAMA, tokens, mask))
  backbone = jax.jit(lambda p, t, m: tf.Transformer(LLAMA).apply({'params': p}, t, m, tf.default_positions(m))[0])
  h = backbone(params['backbone'], tokens, mask)
  want = np.asarray(h) @ np.asarray(params['value_head']['kernel']) + 0.25
  m = np.asarray(mask)
  assert v.shape == (2, 6)
  np.testing.assert_allclose(v[m], want[m], atol=1e-5)
  assert np.all(v[~m] == 0)
