"""Value model for PPO: the transformer backbone + a per-token scalar head.

Parameters: `backbone/...` (the LM's layout, so a critic can start from a reward model's
or a policy's `params['backbone']`) and `value_head/kernel [D]`, `value_head/bias []`.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from rmjax.models.config import ModelConfig
from rmjax.models.heads import ValueHead
from rmjax.models.transformer import Params, Transformer, check_inputs


class ValueModel(nn.Module):
  """Backbone + `ValueHead`: values `[B, T]` float32, one per position."""
  config: ModelConfig

  @nn.compact
  def __call__(self, tokens, mask, positions):
    h, _ = Transformer(self.config, name='backbone')(tokens, mask, positions)
    return ValueHead(self.config, name='value_head')(h)


def init_value_model(rng: jax.Array, config: ModelConfig) -> Params:
  """Value-model parameters `{'backbone': ..., 'value_head': ...}` initialised from `rng`."""
  dummy = jnp.zeros((1, 1), jnp.int32)
  return ValueModel(config).init(rng, dummy, jnp.ones((1, 1), bool), dummy)['params']


def values(params: Params, config: ModelConfig, tokens: jax.Array, mask: jax.Array,
           positions: jax.Array | None = None) -> jax.Array:
  """`V[:, t]` `[B, T]` float32: the value of the prefix ending at token t; 0 where mask is False."""
  tokens, mask, positions = check_inputs(config, tokens, mask, positions)
  return jnp.where(mask, ValueModel(config).apply({'params': params}, tokens, mask, positions), 0.0)
