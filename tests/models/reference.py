"""A plain-numpy reference forward pass for one unpadded sequence, written independently.

Loops over layers and heads, float64, rotary embeddings via complex multiplication of the
(first half, second half) pairs, and GQA by mapping query head j to key/value head
j // (H / KV). Used to check `rmjax.models.transformer` end to end.
"""
import numpy as np


def _norm(x, p, family, eps):
  if family == 'llama':
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * p['scale']
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p['scale'] + p['bias']


def _dense(x, p):
  y = x @ p['kernel']
  return y + p['bias'] if 'bias' in p else y


def _rotate(x, pos, theta):
  """x [T, hd]: pairs (x[i], x[i + hd/2]) as complex numbers times exp(i pos theta^(-2i/hd))."""
  half = x.shape[-1] // 2
  z = x[:, :half] + 1j * x[:, half:]
  freq = theta ** (-np.arange(half) * 2.0 / x.shape[-1])
  z = z * np.exp(1j * pos[:, None] * freq[None, :])
  return np.concatenate([z.real, z.imag], axis=-1)


def hidden_states(params, config, tokens):
  """Final-normed hidden states [T, D] for one sequence `tokens [T]` (all real)."""
  p = _to_numpy(params)
  c = config
  t = len(tokens)
  pos = np.arange(t, dtype=np.float64)
  x = p['embed']['embedding'][tokens]
  if c.family == 'gpt2':
    x = x + p['pos_embed']['embedding'][:t]
  h, kv, hd = c.num_heads, c.num_kv_heads, c.head_width
  for i in range(c.num_layers):
    lp = p[f'layers_{i}']
    y = _norm(x, lp['attn_norm'], c.family, c.norm_eps)
    qkv = _dense(y, lp['attn']['qkv'])
    heads_out = []
    for j in range(h):
      g = j // (h // kv)
      q = qkv[:, j * hd:(j + 1) * hd]
      k = qkv[:, (h + g) * hd:(h + g + 1) * hd]
      v = qkv[:, (h + kv + g) * hd:(h + kv + g + 1) * hd]
      if c.family == 'llama':
        q, k = _rotate(q, pos, c.rope_theta), _rotate(k, pos, c.rope_theta)
      s = q @ k.T / np.sqrt(hd)
      s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
      w = np.exp(s - s.max(-1, keepdims=True))
      heads_out.append((w / w.sum(-1, keepdims=True)) @ v)
    x = x + _dense(np.concatenate(heads_out, axis=-1), lp['attn']['out'])
    y = _norm(x, lp['mlp_norm'], c.family, c.norm_eps)
    if c.family == 'llama':
      f = c.mlp_width
      gu = _dense(y, lp['mlp']['gate_up'])
      gate, up = gu[:, :f], gu[:, f:]
      hid = gate / (1 + np.exp(-gate)) * up
    else:
      a = _dense(y, lp['mlp']['fc'])
      hid = 0.5 * a * (1 + np.tanh(np.sqrt(2 / np.pi) * (a + 0.044715 * a ** 3)))
    x = x + _dense(hid, lp['mlp']['down'])
  return _norm(x, p['final_norm'], c.family, c.norm_eps)


def lm_logits(params, config, tokens):
  """Logits [T, V] for one all-real sequence."""
  h = hidden_states(params['backbone'], config, tokens)
  if config.tie_embeddings:
    return h @ np.asarray(params['backbone']['embed']['embedding'], np.float64).T
  return h @ np.asarray(params['lm_head']['kernel'], np.float64)


def _to_numpy(tree):
  if isinstance(tree, dict):
    return {k: _to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree, np.float64)
