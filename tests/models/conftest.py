"""Small model configs and helpers shared by the model tests."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmjax.models.config import ModelConfig

# Llama family with GQA (4 query heads on 2 KV heads) and Qwen2-style qkv biases.
LLAMA = ModelConfig(vocab_size=64, width=32, mlp_width=48, num_layers=2, num_heads=4, num_kv_heads=2,
                    max_len=32, attn_bias=True)
# GPT-2 family with biases everywhere and a tied LM head.
GPT2 = ModelConfig(vocab_size=64, width=32, mlp_width=48, num_layers=2, num_heads=4, num_kv_heads=4,
                   family='gpt2', max_len=32, attn_bias=True, mlp_bias=True, tie_embeddings=True, norm_eps=1e-5)


def randomize(params, seed, std=0.3):
  """Every leaf replaced by N(0, std^2) noise (+1 for norm scales), so biases and scales matter."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  out = []
  for (path, leaf), key in zip(leaves, keys):
    noise = std * jax.random.normal(key, leaf.shape, leaf.dtype)
    out.append(noise + 1.0 if path[-1].key == 'scale' else noise)
  return jax.tree_util.tree_unflatten(treedef, out)


def pad_rows(rows, length, side, pad_id=0):
  """Rows of different lengths padded to `length` on `side` -> tokens [B, T] int32, mask [B, T]."""
  tokens = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), bool)
  for i, r in enumerate(rows):
    sl = slice(0, len(r)) if side == 'right' else slice(length - len(r), length)
    tokens[i, sl] = r
    mask[i, sl] = True
  return jnp.asarray(tokens), jnp.asarray(mask)


@pytest.fixture(scope='module', params=['llama', 'gpt2'])
def family_config(request):
  return {'llama': LLAMA, 'gpt2': GPT2}[request.param]
