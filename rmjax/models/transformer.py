"""Decoder-only transformer (Llama and GPT-2 families) as flax linen modules, pure apply.

Families (`ModelConfig.family`):
  llama: RMSNorm (eps = norm_eps), rotary embeddings on q and k (rope_theta, the
    "rotate half" convention of Hugging Face Llama/Qwen2), grouped-query attention
    (num_kv_heads), SwiGLU MLP `down(silu(gate) * up)`, optional qkv / MLP biases (Qwen2).
  gpt2: learned position table `[max_len, D]`, LayerNorm with bias, MLP
    `down(gelu_tanh(fc))`, biases on qkv, out and MLP (attn_bias / mlp_bias).

Parameters are a plain nested dict **without** flax's top-level `'params'` collection
(the functions below add and strip it). LM parameter tree (D = width, F = mlp_width,
H = num_heads, KV = num_kv_heads, hd = head_width, V = vocab_size, L = num_layers):

  backbone/embed/embedding               [V, D]
  backbone/pos_embed/embedding           [max_len, D]            (gpt2 only)
  backbone/layers_{i}/attn_norm/scale    [D]     (+ bias [D] for gpt2)
  backbone/layers_{i}/attn/qkv/kernel    [D, (H + 2 KV) hd]      (+ bias if attn_bias)
  backbone/layers_{i}/attn/out/kernel    [H hd, D]               (+ bias [D] if gpt2 and attn_bias)
  backbone/layers_{i}/mlp_norm/scale     [D]     (+ bias [D] for gpt2)
  backbone/layers_{i}/mlp/gate_up/kernel [D, 2F]  llama: columns [gate | up]  (+ bias [2F] if mlp_bias)
  backbone/layers_{i}/mlp/fc/kernel      [D, F]   gpt2                        (+ bias [F] if mlp_bias)
  backbone/layers_{i}/mlp/down/kernel    [F, D]                               (+ bias [D] if mlp_bias)
  backbone/final_norm/scale              [D]     (+ bias [D] for gpt2)
  lm_head/kernel                         [D, V]  (absent with tie_embeddings)

With `scan_layers` the L `layers_{i}` subtrees are one `backbone/layers/...` subtree whose leaves
have a leading layer axis `[L, ...]` (layer i = index i); `stack_layers` / `unstack_layers`
convert between the layouts (for a full ensemble, `jax.vmap` them over the members).

The qkv columns are `[q heads | k heads | v heads]`, each head-major (`head * hd + i`).
A Hugging Face import is then a fixed mapping: Llama/Qwen2 `q_proj, k_proj, v_proj`
weights are transposed and concatenated into `qkv` (biases concatenated), `gate_proj,
up_proj` into `gate_up`, `o_proj`/`down_proj` transposed; GPT-2's Conv1D `c_attn, c_proj,
c_fc, mlp.c_proj` weights are already `[in, out]` and map as they are. Every projection is
one 2-D dot over the flattened `[B*T, D]` input (much faster than a 3-D dot on XLA:CPU).

Masking: `tokens [B, T] int32`, `mask [B, T] bool` (True = real token), `positions [B, T]`
in `[0, max_len)` (default `default_positions(mask) = max(cumsum(mask) - 1, 0)`). Attention is
causal and restricted to real keys; a query with no real key (an all-padding row, or left
padding) gets uniform weights over its masked keys, so no NaN appears (its output is garbage and
should be masked by the caller).

KV cache (`KVCache`): per layer keys `k [B, KV, hd, S]` (slots last) and values
`v [B, KV, S, hd]`, each in the layout its batched matmul with the queries reads (a decode step
copies nothing but its new slot), a key-validity mask `valid [B, S]` and a scalar write
`index`. A call with a cache writes the new T keys/values at slots `index .. index + T - 1`
and attends, from the query in slot `index + t`, to the filled, real slots `s <= index + t`.
The caller keeps `index + T <= S` (`lax.dynamic_update_slice` would otherwise clamp the write).
An `index` that is a Python int (known when tracing, as in `shared_prompt_logits`) lets the call
attend in the no-cache pass's causal query blocks, through `attend` and its recomputing backward.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rmjax.models.config import ModelConfig
from rmjax.models.heads import INIT_STD, LMHead, flat_dot

Params = dict[str, Any]


class KVCache(NamedTuple):
  """Decoding state: per-layer keys `k [B, KV, hd, S]` and values `v [B, KV, S, hd]`,
  `valid [B, S]`, `index []` int32 (or a Python int)."""
  k: tuple[jax.Array, ...]
  v: tuple[jax.Array, ...]
  valid: jax.Array
  index: jax.Array


def default_positions(mask: jax.Array) -> jax.Array:
  """`max(cumsum(mask) - 1, 0)` per row `[B, T] int32`: left padding starts real tokens at 0."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


class Dense(nn.Module):
  """`[..., I] -> [..., features]` as one 2-D dot; kernel `[I, features]`, optional bias."""
  features: int
  use_bias: bool
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    param_dtype = jnp.dtype(self.config.param_dtype)
    dtype = jnp.dtype(self.config.dtype)
    kernel = self.param('kernel', nn.initializers.normal(INIT_STD), (x.shape[-1], self.features), param_dtype)
    y = flat_dot(x, kernel, dtype)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,), param_dtype).astype(dtype)
    return y


class Norm(nn.Module):
  """RMSNorm `x / sqrt(mean(x^2) + eps) * scale` (llama) or LayerNorm with bias (gpt2), in fp32."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    param_dtype = jnp.dtype(c.param_dtype)
    x32 = x.astype(jnp.float32)
    scale = self.param('scale', nn.initializers.ones, (c.width,), param_dtype).astype(jnp.float32)
    if c.family == 'llama':
      y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + c.norm_eps) * scale
    else:
      mean = jnp.mean(x32, axis=-1, keepdims=True)
      var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
      bias = self.param('bias', nn.initializers.zeros, (c.width,), param_dtype).astype(jnp.float32)
      y = (x32 - mean) * jax.lax.rsqrt(var + c.norm_eps) * scale + bias
    return y.astype(jnp.dtype(c.dtype))


ROPE_TABLE_ENTRIES = 1 << 20
"""Largest `max_len × hd/2` whose rotary tables are built once as constants and gathered (4 MiB each)."""


def rope_frequencies(config: ModelConfig) -> tuple[np.ndarray, float]:
  """(w `[hd/2]` float64, attention scale) of the rotary embedding (RoFormer).

  w_i = rope_theta^(-2i/hd) for 'default', rescaled per `config.rope_type` ('linear', 'llama3',
  'yarn'; formulas and sources in `ModelConfig`); for 'yarn' cos and sin are also multiplied
  by the attention factor (which scales every attention logit by its square).
  """
  c = config
  hd = c.head_width
  inv_freq = c.rope_theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
  scale = 1.0
  if c.rope_type == 'linear':
    inv_freq = inv_freq / c.rope_factor
  elif c.rope_type == 'llama3':
    # g = L / wavelength, mapped from [low, high] onto [0, 1]: 0 -> w / s, 1 -> w.
    rotations = c.rope_original_max_len * inv_freq / (2 * math.pi)
    g = np.clip((rotations - c.rope_low_freq_factor) / (c.rope_high_freq_factor - c.rope_low_freq_factor), 0, 1)
    inv_freq = (1 - g) * inv_freq / c.rope_factor + g * inv_freq
  elif c.rope_type == 'yarn':
    def index(rotations):  # the (fractional) i whose frequency turns `rotations` times over L
      return hd * math.log(c.rope_original_max_len / (2 * math.pi * rotations)) / (2 * math.log(c.rope_theta))
    low, high = index(c.rope_beta_fast), index(c.rope_beta_slow)
    if c.rope_truncate:
      low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, hd - 1)
    high = high + 0.001 if low == high else high
    ramp = np.clip((np.arange(hd // 2, dtype=np.float64) - low) / (high - low), 0, 1)  # 1 - g_i
    inv_freq = ramp * inv_freq / c.rope_factor + (1 - ramp) * inv_freq
    scale = c.rope_attention_factor
    if scale is None:
      scale = 0.1 * math.log(c.rope_factor) + 1.0 if c.rope_factor > 1 else 1.0
  return inv_freq, scale


def rope_tables(positions: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array]:
  """scale · (cos, sin) `[B, T, 1, hd/2]` float32 of the angles `positions · w_i`
  (`rope_frequencies`); positions must lie in `[0, max_len)`.

  When `max_len × hd/2 ≤ ROPE_TABLE_ENTRIES` the tables of every position are computed once, in
  float64, as constants of the program, and the rows of `positions` are gathered (a position out
  of range gives NaN): XLA:CPU otherwise re-evaluates cos and sin inside every fusion that
  applies them, per head, in each layer's forward and backward (8–10% of a `tiny` RM step,
  docs/benchmarks.md item 14). Longer contexts compute the angles in float32 at run time.
  """
  inv_freq, scale = rope_frequencies(config)
  if config.max_len * inv_freq.size <= ROPE_TABLE_ENTRIES:
    angles = np.arange(config.max_len, dtype=np.float64)[:, None] * inv_freq
    cos, sin = (jnp.take(jnp.asarray(scale * f(angles), jnp.float32), positions, axis=0, mode='fill',
                         fill_value=jnp.nan) for f in (np.cos, np.sin))
  else:
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    cos, sin = scale * jnp.cos(angles), scale * jnp.sin(angles)
  return cos[:, :, None, :], sin[:, :, None, :]


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotate `x [B, T, N, hd]` by halves: `[x1 cos - x2 sin, x2 cos + x1 sin]` (HF convention)."""
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _scores(q, k, bias, keys='bksd'):
  """`q kᵀ + bias` `[B, KV, G, T, S]` float32; k `[B, KV, S, hd]` (keys='bksd') or the cache's
  slot-last `[B, KV, hd, S]` (keys='bkds')."""
  with jax.named_scope('attention_scores'):
    return jnp.einsum(f'bkgtd,{keys}->bkgts', q, k, preferred_element_type=jnp.float32) + bias


def _weighted_values(s, v):
  """`W = exp(s - max s)`, `out = (W v) / Σ_s W` for scores s `[B, KV, G, T, S]`, v `[B, KV, S, hd]`:
  (out, max s, Σ_s W)."""
  top = jnp.max(s, axis=-1, keepdims=True)
  w = jnp.exp(s - top)
  mass = jnp.sum(w, axis=-1, keepdims=True)
  out = jnp.einsum('bkgts,bksd->bkgtd', w.astype(v.dtype), v, preferred_element_type=jnp.float32) / mass
  return out, top, mass


def attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array,
           blocks: tuple[tuple[int, int, int], ...] | None = None) -> jax.Array:
  """`softmax(q kᵀ + bias) v` float32 `[B, KV, G, T, hd]` for the queries of each KV group,
  q `[B, KV, G, T, hd]` (already scaled), k, v `[B, KV, S, hd]`, bias `[B, 1, 1, T, S]`
  float32 (0 or the most negative float). `blocks` (static): query rows `[a, e)` attend to
  keys `[0, s)` for each `(a, e, s)`, the rows covering `[0, T)` in order (`query_blocks`);
  the keys past `s` must be masked for those rows. None: one block, all rows against all keys.

  Forward: `W = exp(s - max s)`, `out = (W v) / Σ_s W` (normalised after the value product:
  fewer passes over `[T, S]`). The backward keeps only q, k, v, out, `max s` and `Σ_s W`
  (`[B, KV, G, T, 1]` each), not the `[T, S]` weights, and recomputes `P = W / Σ_s W`
  (Dao et al. 2022, "FlashAttention", Alg. 4; a log-normaliser `max s + log Σ_s W` would
  round to `max s` on a row with no real key, where s is the most negative float):
  `dv = Pᵀ dout`, `ds = P ∘ (dout vᵀ - rowsum(dout ∘ out))`, `dq = ds k`, `dk = dsᵀ q`,
  block by block, dk and dv summed in place over the blocks (autodiff through per-block slices
  sums one padded copy per block instead: 20% of a `tiny` RM step at 512 tokens, item 13 of
  docs/benchmarks.md). Autodiff would also keep W itself, `B·H·T·S` floats per layer, and RL
  passes over long rollouts spend more time storing and reloading it than on its arithmetic.
  """
  return _attend(q, k, v, bias, blocks or ((0, q.shape[3], k.shape[2]),))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q, k, v, bias, blocks):
  return _attend_fwd(q, k, v, bias, blocks)[0]


def _attend_fwd(q, k, v, bias, blocks):
  parts = [_weighted_values(_scores(q[:, :, :, a:e], k[:, :, :s], bias[..., a:e, :s]), v[:, :, :s])
           for a, e, s in blocks]
  out, top, mass = (jnp.concatenate(x, axis=3) for x in zip(*parts))
  return out, (q, k, v, bias, out, top, mass)


def _attend_bwd(blocks, res, dout):
  q, k, v, bias, out, top, mass = res
  dq, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
  for a, e, s in blocks:
    rows = lambda x: x[:, :, :, a:e]
    qb, kb, vb, do = rows(q), k[:, :, :s], v[:, :, :s], rows(dout)
    p = jnp.exp(_scores(qb, kb, bias[..., a:e, :s]) - rows(top)) / rows(mass)
    dp = jnp.einsum('bkgtd,bksd->bkgts', do.astype(v.dtype), vb, preferred_element_type=jnp.float32)
    ds = (p * (dp - jnp.sum(do * rows(out), axis=-1, keepdims=True))).astype(q.dtype)
    dq.append(jnp.einsum('bkgts,bksd->bkgtd', ds, kb, preferred_element_type=jnp.float32))
    dk = jax.lax.dynamic_update_slice_in_dim(
        dk, dk[:, :, :s] + jnp.einsum('bkgts,bkgtd->bksd', ds, qb, preferred_element_type=jnp.float32), 0, axis=2)
    dv = jax.lax.dynamic_update_slice_in_dim(
        dv, dv[:, :, :s] + jnp.einsum('bkgts,bkgtd->bksd', p.astype(v.dtype), do.astype(v.dtype),
                                      preferred_element_type=jnp.float32), 0, axis=2)
  return (jnp.concatenate(dq, axis=3).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
          jnp.zeros_like(bias))


_attend.defvjp(_attend_fwd, _attend_bwd)


def attend_cache(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array) -> jax.Array:
  """`attend` against a cache: keys slot-last `k [B, KV, hd, S]`, values `v [B, KV, S, hd]`
  (`KVCache`; plain autodiff). On XLA:CPU the decode step's `[G, hd] x [hd, S]` score products
  ran 1.6x faster with this key layout than against `[S, hd]` (docs/benchmarks.md, item 10)."""
  return _weighted_values(_scores(q, k, bias, keys='bkds'), v)[0]


QUERY_BLOCK = 32


def query_blocks(t: int) -> list[tuple[int, int]]:
  """`[start, end)` query ranges of a no-cache causal pass over `t` tokens: blocks of
  `QUERY_BLOCK` on XLA:CPU, one block elsewhere. Block `[a, e)` attends to keys `[0, e)`:
  the later keys are masked for all of its queries (S = T, slot = position), so this skips
  about half of the scores and leaves the real rows' outputs as they were (a query with no
  real key gets uniform weights over fewer masked keys: garbage either way). On CPU,
  `[32, S]` score tiles kept attention 2-5x faster than one `[T, S]` product at T = 128-512
  (forward and backward; docs/benchmarks.md, item 8).
  """
  if jax.default_backend() != 'cpu' or t <= QUERY_BLOCK:
    return [(0, t)]
  return [(a, min(a + QUERY_BLOCK, t)) for a in range(0, t, QUERY_BLOCK)]


class Attention(nn.Module):
  """Causal grouped-query attention with a fused qkv projection and an optional KV cache.

  x [B, T, D]; bias [B, 1, 1, T, S] float32 (0 where a key is allowed, the most negative
  float where not); rope (cos, sin) or None; kv: the layer's
  cached (k `[B, KV, hd, S]`, v `[B, KV, S, hd]`) or None (then S = T). Returns (y [B, T, D], new
  kv or None).
  """
  config: ModelConfig

  @nn.compact
  def __call__(self, x, bias, rope, kv, index):
    c = self.config
    b, t, _ = x.shape
    h, kvh, hd = c.num_heads, c.num_kv_heads, c.head_width
    dtype = jnp.dtype(c.dtype)
    qkv = Dense((h + 2 * kvh) * hd, c.attn_bias, c, name='qkv')(x).reshape(b, t, h + 2 * kvh, hd)
    q, k, v = qkv[:, :, :h], qkv[:, :, h:h + kvh], qkv[:, :, h + kvh:]
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    v = v.transpose(0, 2, 1, 3)  # [B, KV, T, hd]
    new_kv = None
    if kv is not None:
      k = jax.lax.dynamic_update_slice(kv[0], k.transpose(0, 2, 3, 1).astype(kv[0].dtype), (0, 0, 0, index))
      v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, 0, index, 0))
      new_kv = (k, v)
    else:
      k = k.transpose(0, 2, 1, 3)  # [B, KV, T, hd]
    # Queries of one KV group share a batched matmul: [B, KV, G, T, hd] x keys.
    g = h // kvh
    q = (q * hd ** -0.5).reshape(b, t, kvh, g, hd).transpose(0, 2, 3, 1, 4)
    k, v = k.astype(dtype), v.astype(dtype)
    offset = 0 if kv is None else index  # the slot of the first query
    if isinstance(offset, int):  # causal blocks of queries, each against the keys up to its last query
      k = k if kv is None else jnp.swapaxes(k, -1, -2)
      out = attend(q, k, v, bias, tuple((a, e, offset + e) for a, e in query_blocks(t)))
    else:
      out = attend_cache(q, k, v, bias)
    out = out.astype(dtype).transpose(0, 3, 1, 2, 4).reshape(b, t, h * hd)
    return Dense(c.width, c.attn_bias and c.family == 'gpt2', c, name='out')(out), new_kv


class MLP(nn.Module):
  """llama: `down(silu(gate) * up)` with fused `gate_up [D, 2F]`; gpt2: `down(gelu_tanh(fc))`."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = self.config
    if c.family == 'llama':
      gate, up = jnp.split(Dense(2 * c.mlp_width, c.mlp_bias, c, name='gate_up')(x), 2, axis=-1)
      hidden = jax.nn.silu(gate) * up
    else:
      hidden = jax.nn.gelu(Dense(c.mlp_width, c.mlp_bias, c, name='fc')(x), approximate=True)
    return Dense(c.width, c.mlp_bias, c, name='down')(hidden)


class Block(nn.Module):
  """Pre-norm residual block: `x += attn(norm(x)); x += mlp(norm(x))`."""
  config: ModelConfig

  @nn.compact
  def __call__(self, x, bias, rope, kv, index):
    a, new_kv = Attention(self.config, name='attn')(Norm(self.config, name='attn_norm')(x), bias, rope, kv, index)
    x = x + a
    x = x + MLP(self.config, name='mlp')(Norm(self.config, name='mlp_norm')(x))
    return x, new_kv


class Transformer(nn.Module):
  """Backbone: tokens `[B, T]` -> final-normed hidden states `[B, T, D]` (and the new cache).

  `config.remat == 'block'` wraps `Block` in `nn.remat` (its activations are recomputed in the
  backward pass); `config.scan_layers` runs the blocks as one `nn.scan` with parameters stacked
  on a leading layer axis, the cache's per-layer k, v stacked on a leading `L` axis for it.
  """
  config: ModelConfig

  def setup(self):
    c = self.config
    kw = dict(embedding_init=nn.initializers.normal(INIT_STD), dtype=jnp.dtype(c.dtype),
              param_dtype=jnp.dtype(c.param_dtype))
    self.embed = nn.Embed(c.vocab_size, c.width, **kw)
    if c.family == 'gpt2':
      self.pos_embed = nn.Embed(c.max_len, c.width, **kw)
    block = nn.remat(Block) if c.remat == 'block' else Block
    if c.scan_layers:
      # carry x; bias, rope and index are shared by every layer; kv is per layer (axis 0).
      scanned = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True},
                        in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=c.num_layers)
      self.layers = scanned(c)
    else:
      self.layers = [block(c) for _ in range(c.num_layers)]
    self.final_norm = Norm(c)

  def __call__(self, tokens: jax.Array, mask: jax.Array, positions: jax.Array,
               cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    c = self.config
    t = tokens.shape[1]
    x = self.embed(tokens)
    rope = None
    if c.family == 'gpt2':
      x = x + self.pos_embed(positions)
    else:
      rope = rope_tables(positions, c)
    if cache is None:
      index = jnp.zeros((), jnp.int32)
      key_valid, key_slot = mask, jnp.arange(t)
    else:
      index = cache.index
      key_valid = jax.lax.dynamic_update_slice(cache.valid, mask.astype(bool), (0, index))
      key_slot = jnp.arange(key_valid.shape[1])
    query_slot = index + jnp.arange(t)
    allowed = key_valid[:, None, None, None, :] & (key_slot[None, :] <= query_slot[:, None])[None, None, None]
    bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)
    if c.scan_layers:
      kv = None if cache is None else (jnp.stack(cache.k), jnp.stack(cache.v))
      x, new_kv = self.layers(x, bias, rope, kv, index)
      new_k, new_v = (None, None) if cache is None else (tuple(new_kv[0]), tuple(new_kv[1]))
    else:
      new_k, new_v = [], []
      for i, layer in enumerate(self.layers):
        kv = None if cache is None else (cache.k[i], cache.v[i])
        x, layer_kv = layer(x, bias, rope, kv, index)
        if cache is not None:
          new_k.append(layer_kv[0])
          new_v.append(layer_kv[1])
    new_cache = None if cache is None else KVCache(tuple(new_k), tuple(new_v), key_valid, index + t)
    return self.final_norm(x), new_cache


class LanguageModel(nn.Module):
  """Backbone + LM head: logits `[B, T', V]` float32 (and the new cache).

  head_slice: a static `slice` of the T positions that get logits (default all, T' = T); the
  head's `[D, V]` matmul then runs on those positions only.
  """
  config: ModelConfig

  def setup(self):
    self.backbone = Transformer(self.config)
    self.lm_head = LMHead(self.config)

  def __call__(self, tokens, mask, positions, cache=None, head_slice: slice | None = None):
    h, cache = self.backbone(tokens, mask, positions, cache)
    if head_slice is not None:
      h = h[:, head_slice]
    embedding = self.backbone.embed.embedding if self.config.tie_embeddings else None
    return self.lm_head(h, embedding), cache


def check_inputs(config: ModelConfig, tokens: jax.Array, mask: jax.Array,
                 positions: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Validates shapes and dtypes (before tracing goes further); fills in default positions."""
  if tokens.ndim != 2:
    raise ValueError(f'tokens must be [B, T]; got shape {tokens.shape}.')
  if mask.shape != tokens.shape:
    raise ValueError(f'mask must have the shape of tokens {tokens.shape}; got {mask.shape}.')
  if not jnp.issubdtype(tokens.dtype, jnp.integer):
    raise ValueError(f'tokens must be integer token ids; got dtype {tokens.dtype}.')
  if positions is None:
    positions = default_positions(mask)
  elif positions.shape != tokens.shape:
    raise ValueError(f'positions must have the shape of tokens {tokens.shape}; got {positions.shape}.')
  return tokens.astype(jnp.int32), mask.astype(bool), positions.astype(jnp.int32)


def stack_layers(params: Params, num_layers: int) -> Params:
  """Per-layer layout -> scanned layout: every `layers_0 .. layers_{L-1}` subtree (of the backbone,
  at any depth of an LM or reward model tree) becomes one `layers` subtree with leaves
  `jnp.stack([layer_0, ..., layer_{L-1}])` `[L, ...]`."""
  if not isinstance(params, dict):
    return params
  names = [f'layers_{i}' for i in range(num_layers)]
  if names[0] in params:
    missing = [n for n in names if n not in params]
    if missing:
      raise ValueError(f'stack_layers: layers {missing} missing; expected {num_layers} layers.')
    rest = {k: stack_layers(v, num_layers) for k, v in params.items() if k not in names}
    return {**rest, 'layers': jax.tree.map(lambda *xs: jnp.stack(xs), *(params[n] for n in names))}
  return {k: stack_layers(v, num_layers) for k, v in params.items()}


def unstack_layers(params: Params, num_layers: int) -> Params:
  """Scanned layout -> per-layer layout: the inverse of `stack_layers` (`layers` leaves `[L, ...]` ->
  `layers_{i}` leaves, index i of the layer axis)."""
  if not isinstance(params, dict):
    return params
  out = {k: unstack_layers(v, num_layers) for k, v in params.items() if k != 'layers'}
  if 'layers' in params:
    stacked = params['layers']
    sizes = {x.shape[0] for x in jax.tree.leaves(stacked)}
    if sizes != {num_layers}:
      raise ValueError(f'unstack_layers: layer axis sizes {sorted(sizes)}; expected {num_layers}.')
    out.update({f'layers_{i}': jax.tree.map(lambda x: x[i], stacked) for i in range(num_layers)})
  return out


def init_lm(rng: jax.Array, config: ModelConfig) -> Params:
  """LM parameters (layout in the module docstring), initialised from `rng`."""
  dummy = jnp.zeros((1, 1), jnp.int32)
  return LanguageModel(config).init(rng, dummy, jnp.ones((1, 1), bool), dummy)['params']


def lm_logits(params: Params, config: ModelConfig, tokens: jax.Array, mask: jax.Array,
              positions: jax.Array | None = None, head_slice: slice | None = None) -> jax.Array:
  """No-cache forward pass: logits `[B, T, V]` float32 for `tokens [B, T]`, `mask [B, T]`; with
  `head_slice`, logits `[B, T', V]` of those positions only (`LanguageModel`)."""
  tokens, mask, positions = check_inputs(config, tokens, mask, positions)
  return LanguageModel(config).apply({'params': params}, tokens, mask, positions, head_slice=head_slice)[0]


def init_cache(config: ModelConfig, batch: int, max_len: int) -> KVCache:
  """An empty cache of `max_len` slots: zeros `k [B, KV, hd, S]`, `v [B, KV, S, hd]`, `valid` all
  False, index 0."""
  if max_len <= 0 or max_len > config.max_len:
    raise ValueError(f'init_cache: max_len={max_len} must be in [1, config.max_len={config.max_len}].')
  if batch <= 0:
    raise ValueError(f'init_cache: batch={batch} must be positive.')
  b, kv, hd, dtype = batch, config.num_kv_heads, config.head_width, jnp.dtype(config.dtype)
  keys = tuple(jnp.zeros((b, kv, hd, max_len), dtype) for _ in range(config.num_layers))
  values = tuple(jnp.zeros((b, kv, max_len, hd), dtype) for _ in range(config.num_layers))
  return KVCache(keys, values, jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32))


def grow_cache(cache: KVCache, slots: int) -> KVCache:
  """`cache` with `slots` empty slots appended (zeros, `valid` False): a prefill can run on a
  cache of the prompt's length, so that its attention does not span the slots decoding fills."""
  def pad(x, axis):
    return jnp.pad(x, [(0, slots) if i == axis % x.ndim else (0, 0) for i in range(x.ndim)])
  return KVCache(tuple(pad(k, -1) for k in cache.k), tuple(pad(v, -2) for v in cache.v), pad(cache.valid, -1),
                 cache.index)


def repeat_rows(x: jax.Array, repeats: int) -> jax.Array:
  """Each row of `x [R, ...]` `repeats` times in consecutive rows: `[R·repeats, ...]` (`jnp.repeat` on
  axis 0, as a broadcast and reshape)."""
  return jnp.broadcast_to(x[:, None], (x.shape[0], repeats, *x.shape[1:])).reshape(-1, *x.shape[1:])


def repeat_cache(cache: KVCache, repeats: int) -> KVCache:
  """`cache` with each row repeated `repeats` times in consecutive rows: a prompt prefilled once
  serves the `repeats` rows that continue it."""
  rep = lambda x: repeat_rows(x, repeats)
  return KVCache(tuple(map(rep, cache.k)), tuple(map(rep, cache.v)), rep(cache.valid), cache.index)


def lm_decode(params: Params, config: ModelConfig, tokens: jax.Array, mask: jax.Array,
              positions: jax.Array, cache: KVCache, head_slice: slice | None = None) -> tuple[jax.Array, KVCache]:
  """Forward pass of `tokens [B, T]` against a cache: (logits `[B, T, V]`, updated cache).

  Used for the prefill (T = prompt length, `head_slice=slice(-1, None)`: logits of the last
  position only) and for each decode step (T = 1). The new
  keys/values go to slots `cache.index ..`; `positions` must be given (the caller knows
  how many real tokens each row has seen).
  """
  tokens, mask, positions = check_inputs(config, tokens, mask, positions)
  if cache.valid.shape[0] != tokens.shape[0]:
    raise ValueError(f'lm_decode: cache batch {cache.valid.shape[0]} != tokens batch {tokens.shape[0]}.')
  if tokens.shape[1] > cache.valid.shape[1]:
    raise ValueError(f'lm_decode: {tokens.shape[1]} tokens do not fit a cache of {cache.valid.shape[1]} slots.')
  return LanguageModel(config).apply({'params': params}, tokens, mask, positions, cache, head_slice=head_slice)


def shared_prompt_logits(params: Params, config: ModelConfig, tokens: jax.Array, mask: jax.Array,
                         prompt_len: int, group_size: int) -> jax.Array:
  """`lm_logits(..., head_slice=slice(prompt_len - 1, -1))` `[B, L - prompt_len, V]`, the logits that
  predict `tokens[:, prompt_len:]`, for rows in groups of `group_size` = k consecutive rows that
  share their prompt (`tokens` and `mask` equal on `[:, :prompt_len]`, as when k responses are
  drawn per prompt; not checked).

  Each prompt runs once, as a prefill of a cache of `prompt_len` slots; the cache is repeated to
  the k rows of its group and the responses' first L - prompt_len - 1 tokens run as one cached
  pass (causal among themselves, attending to the prompt). The same logits to float32 rounding,
  and differentiable like `lm_logits`; the prompt's FLOPs are divided by k.
  """
  tokens, mask, positions = check_inputs(config, tokens, mask, None)
  b, length = tokens.shape
  if group_size < 1 or b % group_size:
    raise ValueError(f'shared_prompt_logits: {b} rows do not form groups of group_size={group_size}.')
  if not 0 < prompt_len < length:
    raise ValueError(f'shared_prompt_logits: prompt_len={prompt_len} must be in [1, {length - 1}] for {length} '
                     'tokens.')
  first = lambda x: x.reshape(b // group_size, group_size, *x.shape[1:])[:, 0, :prompt_len]
  # Static write indices (0, then prompt_len): both passes run `attend` in causal query blocks.
  last, cache = lm_decode(params, config, first(tokens), first(mask), first(positions),
                          init_cache(config, b // group_size, prompt_len)._replace(index=0), head_slice=slice(-1, None))
  last = repeat_rows(last, group_size)
  if length - prompt_len == 1:
    return last
  cache = grow_cache(repeat_cache(cache, group_size), length - prompt_len - 1)
  rest, _ = lm_decode(params, config, tokens[:, prompt_len:-1], mask[:, prompt_len:-1],
                      positions[:, prompt_len:-1], cache)
  return jnp.concatenate([last, rest], axis=1)
