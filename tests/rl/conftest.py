"""Shared tiny policy, prompts and a toy reward for the RL tests (the reward-model job's workdir,
`world`, is in tests/conftest.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmjax.models import transformer
from rmjax.models.config import ModelConfig

TINY = ModelConfig(vocab_size=32, width=16, mlp_width=32, num_layers=1, num_heads=2, num_kv_heads=1, max_len=32)
TARGET = 7   # the toy reward counts this token
EOS, PAD = 1, 0


def count_scorer(params, tokens, mask):
  """Toy reward model: the number of TARGET tokens among the real tokens, `[1, B]`."""
  del params
  return ((tokens == TARGET) & mask).sum(-1).astype(jnp.float32)[None]


def left_padded_prompts(num: int = 8, width: int = 5, seed: int = 0) -> dict:
  """`num` prompts of lengths 3..width, left-padded with PAD; no EOS or TARGET inside."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(2, TINY.vocab_size, size=(num, width)).astype(np.int32)
  tokens[tokens == TARGET] = 2
  mask = np.ones((num, width), bool)
  for i in range(num):
    mask[i, :i % (width - 2)] = False
  tokens[~mask] = PAD
  return dict(prompt_tokens=jnp.asarray(tokens), prompt_mask=jnp.asarray(mask))


@pytest.fixture(scope='module')
def policy_params():
  return jax.jit(transformer.init_lm, static_argnums=1)(jax.random.key(0), TINY)
