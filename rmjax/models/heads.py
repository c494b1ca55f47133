"""Output heads on the backbone's final hidden states `h [B, T, D]`.

Parameter layout (paths relative to the head's own name):

  LM head (`lm_head`, untied):  kernel [D, V]          logits = h @ kernel
  LM head, tied:                 no parameters          logits = h @ embed.embedding^T
  Reward head (`reward_head`):   kernel [D, K], bias [K] scores = h @ kernel + bias
  Value head (`value_head`):     kernel [D], bias []     values = h @ kernel + bias

Every head is one 2-D dot over the flattened `[B*T, D]` input (fast on XLA:CPU), and
returns float32 whatever the compute dtype, so that log-softmax and losses run in fp32.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from rmjax.models.config import ModelConfig

INIT_STD = 0.02


def flat_dot(x: jax.Array, kernel: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """`x [..., I] @ kernel [I, O] -> [..., O]` as a single 2-D dot on `[prod(...), I]`."""
  lead = x.shape[:-1]
  y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(dtype), kernel.astype(dtype))
  return y.reshape(*lead, kernel.shape[-1])


class LMHead(nn.Module):
  """Vocabulary logits `[B, T, V]` (float32) from `h [B, T, D]`.

  Untied (default): its own `kernel [D, V]`. Tied (`config.tie_embeddings`): pass the
  token table `embedding [V, D]`; logits = h @ embedding^T and the head has no parameters.
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, h: jax.Array, embedding: jax.Array | None = None) -> jax.Array:
    dtype = jnp.dtype(self.config.dtype)
    if self.config.tie_embeddings:
      if embedding is None:
        raise ValueError('LMHead: config.tie_embeddings=True needs the token embedding table.')
      return flat_dot(h, embedding.T, dtype).astype(jnp.float32)
    kernel = self.param('kernel', nn.initializers.normal(INIT_STD), (self.config.width, self.config.vocab_size),
                        jnp.dtype(self.config.param_dtype))
    return flat_dot(h, kernel, dtype).astype(jnp.float32)


class RewardHead(nn.Module):
  """K scalar rewards per position: `h [..., D] -> [..., K]` (float32), kernel [D, K], bias [K]."""
  config: ModelConfig
  num_heads: int = 1

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    param_dtype = jnp.dtype(self.config.param_dtype)
    kernel = self.param('kernel', nn.initializers.normal(INIT_STD), (self.config.width, self.num_heads), param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (self.num_heads,), param_dtype)
    y = flat_dot(h, kernel, jnp.dtype(self.config.dtype)).astype(jnp.float32)
    return y + bias.astype(jnp.float32)


class ValueHead(nn.Module):
  """Per-token value: `h [B, T, D] -> [B, T]` (float32), kernel [D], bias [] (a scalar)."""
  config: ModelConfig

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    param_dtype = jnp.dtype(self.config.param_dtype)
    kernel = self.param('kernel', nn.initializers.normal(INIT_STD), (self.config.width,), param_dtype)
    bias = self.param('bias', nn.initializers.zeros, (), param_dtype)
    y = flat_dot(h, kernel[:, None], jnp.dtype(self.config.dtype)).astype(jnp.float32)
    return y[..., 0] + bias.astype(jnp.float32)
