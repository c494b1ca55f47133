"""KV-cache sampling in one compiled loop, and no-cache token log-probabilities.

`sample` prefills a cache of P slots with the left-padded prompts `[R, P]` in one call, repeats
each prompt's cache to the `group_size` rows that sample it (B = R·group_size), adds the N - 1
slots decoding fills (`grow_cache`), then runs
`lax.scan` over `max_new_tokens - 1` decode steps whose query length is 1. At step n it
draws token n from the logits of the previous position:

  z = logits / T                                   (temperature T > 0)
  policy_logprobs[n] = log_softmax(z)[token]       the policy an RL trainer recomputes
  truncation: keep the top_k largest z (top_k > 0), then, of those, the smallest prefix of
  the descending order whose probability under softmax reaches top_p (the top token is
  always kept; Holtzman et al. 2020, "The Curious Case of Neural Text Degeneration");
  without top_k the nucleus is found by bisection instead of a sort of the vocabulary
  (`_nucleus`), which keeps all of a tie at the nucleus' edge
  logprobs[n] = log_softmax(z restricted to the kept set)[token]   the distribution drawn from

Temperature 0 means greedy decoding (`argmax(logits)`): `logprobs` are then 0 (the point
mass on the argmax has probability 1) and `policy_logprobs` are those of the untempered
policy, `log_softmax(logits)` (T = 0 is read as T = 1 there, as in `token_logprobs`).
After `eos_id` a row emits `pad_id` with mask False and log-probs 0.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rmjax.models.config import ModelConfig
from rmjax.models.transformer import (Params, check_inputs, default_positions, grow_cache, init_cache, lm_decode,
                                     lm_logits, repeat_cache, repeat_rows)


class SampleOutput(NamedTuple):
  """tokens [B, N] int32 (pad_id after EOS); mask [B, N] bool (generated, up to and including
  EOS); logprobs [B, N] under the truncated sampling distribution; policy_logprobs [B, N]
  under `log_softmax(logits / T)`; both 0 where mask is False."""
  tokens: jax.Array
  mask: jax.Array
  logprobs: jax.Array
  policy_logprobs: jax.Array


def _per_row(x: jax.Array) -> jax.Array:
  """A scalar or `[B]` hyperparameter as something that broadcasts against `[B, V]`."""
  x = jnp.asarray(x, jnp.float32)
  return x[:, None] if x.ndim == 1 else x


def _safe_temperature(temperature: jax.Array) -> jax.Array:
  return jnp.where(temperature > 0, temperature, 1.0)


def token_logprobs(params: Params, config: ModelConfig, tokens: jax.Array, mask: jax.Array,
                   temperature: float | jax.Array = 1.0, positions: jax.Array | None = None) -> jax.Array:
  """`out[:, t] = log_softmax(logits[:, t-1] / T)[tokens[:, t]]` `[B, T]` float32, no cache.

  0 at t = 0, where `mask[:, t]` is False, and where `mask[:, t-1]` is False (no real
  previous token, e.g. the first real token after left padding). T = 0 reads as T = 1.
  """
  tokens, mask, positions = check_inputs(config, tokens, mask, positions)
  logits = lm_logits(params, config, tokens, mask, positions, head_slice=slice(None, -1))
  t = _safe_temperature(_per_row(temperature))
  lp = jax.nn.log_softmax(logits / (t[..., None] if jnp.ndim(t) == 2 else t), axis=-1)
  picked = jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]
  keep = mask[:, 1:] & mask[:, :-1]
  return jnp.pad(jnp.where(keep, picked, 0.0), ((0, 0), (1, 0)))


def _order_keys(z: jax.Array) -> jax.Array:
  """float32 -> uint32 with the same order (negative floats have their bits flipped, others the sign bit set)."""
  bits = jax.lax.bitcast_convert_type(z.astype(jnp.float32), jnp.uint32)
  return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _nucleus(z: jax.Array, top_p: jax.Array) -> jax.Array:
  """The top-p nucleus of each row of `z [B, V]` as a mask `[B, V]`, found without sorting V.

  With p = softmax(z), token v is kept iff the mass strictly above it, M(z_v) = Σ_u p_u·[z_u > z_v],
  is below top_p: the smallest set of most probable tokens whose mass reaches top_p (the top
  token always). M falls as its argument rises, so a bisection over the order-preserving
  integer keys of the floats keeps M(lo) ≥ top_p > M(hi); after 32 halvings lo and hi are
  adjacent keys and the nucleus is exactly {v: key_v > lo}; top_p ≥ 1 keeps every token. Each halving is one pass over
  [B, V]. Where a sort would cut a tie at the nucleus' edge in index order, all of the tie is kept.
  """
  probs = jax.nn.softmax(z, axis=-1)
  keys = _order_keys(z)
  top_p = jnp.broadcast_to(top_p, z.shape[:1] + (1,))
  lo = jnp.min(keys, axis=-1, keepdims=True) - 1  # mass above: everything
  hi = jnp.max(keys, axis=-1, keepdims=True)      # mass above: nothing

  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    reached = jnp.sum(jnp.where(keys > mid, probs, 0.0), axis=-1, keepdims=True) >= top_p
    return jnp.where(reached, mid, lo), jnp.where(reached, hi, mid)

  lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, hi))
  return (keys > lo) | (top_p >= 1.0)  # top_p = 1: all (a float32 sum of part of p can round up to 1)


def _draw(key: jax.Array, weights: jax.Array) -> jax.Array:
  """One index per row of `weights [B, V]` (≥ 0, some > 0), drawn with probability w_v / Σ_u w_u.

  Inverse-CDF sampling in two levels, with only two uniforms per row: the V weights are cut
  into blocks of n = 2^⌈log2 √V⌉; block j is drawn as the first whose cumulative mass exceeds
  u₁·M (M the row's mass, P(j) = m_j / M), then index i within it as the first whose
  cumulative weight exceeds u₂·m_j (P(i | j) = w_i / m_j). A Gumbel-max draw needs V random
  numbers per row and a variadic argmax, a quarter of a decode step's time on CPU. Exact up
  to the float32 rounding of the partial sums (about 1e-7 of the mass); zero weights are
  never drawn.
  """
  rows, v = weights.shape
  size = 1 << max(0, math.ceil(math.log2(math.sqrt(v))))
  blocks = -(-v // size)
  w = jnp.pad(weights, ((0, 0), (0, blocks * size - v))).reshape(rows, blocks, size)
  u = jax.random.uniform(key, (rows, 2))

  def first_above(w, u):  # w [B, n]: the first i with Σ_{k≤i} w_k > u·Σ w, never a zero weight
    cum = jnp.cumsum(w, axis=-1)
    i = jnp.sum(cum <= u[:, None] * cum[:, -1:], axis=-1)
    last = jnp.max(jnp.where(w > 0, jnp.arange(w.shape[-1]), 0), axis=-1)  # where u·Σ w rounds up to Σ w
    return jnp.minimum(i, last)

  block = first_above(jnp.sum(w, axis=-1), u[:, 0])
  inner = jnp.take_along_axis(w, block[:, None, None], axis=1)[:, 0]
  return (block * size + first_above(inner, u[:, 1])).astype(jnp.int32)


def _first_max(z: jax.Array) -> jax.Array:
  """`argmax(z, -1)` (the first of ties) as a max and a min, which vectorise where XLA:CPU's argmax does not."""
  v = z.shape[-1]
  hit = z == jnp.max(z, axis=-1, keepdims=True)
  return jnp.minimum(jnp.min(jnp.where(hit, jnp.arange(v), v), axis=-1), v - 1).astype(jnp.int32)


def _choose(logits, key, temperature, top_p, top_k: int, use_top_p: bool):
  """One draw per row from `logits [B, V]` -> (token [B], logprob [B], policy_logprob [B])."""
  greedy = jnp.broadcast_to(temperature <= 0, logits.shape[:1] + (1,))[:, 0]
  z = logits / _safe_temperature(temperature)
  z_max = jnp.max(z, axis=-1, keepdims=True)
  unnormalised = jnp.exp(z - z_max)
  log_mass = jnp.log(jnp.sum(unnormalised, axis=-1))
  if top_k > 0:
    cand, cand_idx = jax.lax.top_k(z, top_k)  # descending
    shifted = cand - cand[:, :1]
    weights = jnp.exp(shifted)
    if use_top_p:
      probs = weights / jnp.sum(weights, axis=-1, keepdims=True)
      before = jnp.cumsum(probs, axis=-1) - probs
      weights = jnp.where((before < top_p) | (jnp.arange(top_k) == 0), weights, 0.0)
  else:
    cand_idx, shifted = None, z - z_max
    weights = jnp.where(_nucleus(z, top_p), unnormalised, 0.0) if use_top_p else unnormalised
  choice = _draw(key, weights)
  cand_lp = jnp.take_along_axis(shifted, choice[:, None], axis=-1)[:, 0] - jnp.log(jnp.sum(weights, axis=-1))
  drawn = choice if cand_idx is None else jnp.take_along_axis(cand_idx, choice[:, None], axis=-1)[:, 0]
  token = jnp.where(greedy, _first_max(z), drawn)
  logprob = jnp.where(greedy, 0.0, cand_lp)
  policy_lp = jnp.take_along_axis(z - z_max, token[:, None], axis=-1)[:, 0] - log_mass
  return token.astype(jnp.int32), logprob, policy_lp


@functools.partial(jax.jit, static_argnames=('config', 'max_new_tokens', 'top_k', 'use_top_p', 'eos_id', 'pad_id',
                                             'group_size'))
def _sample(params, config, prompt_tokens, prompt_mask, rng, temperature, top_p, *, max_new_tokens, top_k,
            use_top_p, eos_id, pad_id, group_size):
  prompts, prompt_len = prompt_tokens.shape
  batch = prompts * group_size
  temperature, top_p = _per_row(temperature), _per_row(top_p)
  # The prefill at a static cache index runs in causal query blocks; the decode loop carries an array.
  logits, cache = lm_decode(params, config, prompt_tokens, prompt_mask, default_positions(prompt_mask),
                            init_cache(config, prompts, prompt_len)._replace(index=0), head_slice=slice(-1, None))
  cache = grow_cache(repeat_cache(cache, group_size), max_new_tokens - 1)._replace(index=jnp.int32(prompt_len))
  logits = repeat_rows(logits, group_size)
  keys = jax.random.split(rng, max_new_tokens)
  choose = functools.partial(_choose, temperature=temperature, top_p=top_p, top_k=top_k, use_top_p=use_top_p)

  def emit(logits_last, key, done):
    token, lp, plp = choose(logits_last, key)
    live = ~done
    token = jnp.where(live, token, pad_id)
    out = (token, live, jnp.where(live, lp, 0.0), jnp.where(live, plp, 0.0))
    if eos_id is not None:
      done = done | (live & (token == eos_id))
    return out, done

  first, done = emit(logits[:, -1], keys[0], jnp.zeros((batch,), bool))
  pos0 = repeat_rows(jnp.sum(prompt_mask, axis=1, dtype=jnp.int32), group_size)

  def step(carry, key):
    cache, prev, done, pos = carry
    token, live = prev[0], prev[1]
    logits, cache = lm_decode(params, config, token[:, None], live[:, None], pos[:, None], cache)
    out, done = emit(logits[:, 0], key, done)
    return (cache, out, done, pos + 1), out

  _, rest = jax.lax.scan(step, (cache, first, done, pos0), keys[1:])
  tokens, mask, lp, plp = (jnp.concatenate([f[:, None], r.T], axis=1) for f, r in zip(first, rest))
  return SampleOutput(tokens, mask, lp, plp)


def sample(params: Params, config: ModelConfig, prompt_tokens: jax.Array, prompt_mask: jax.Array, rng: jax.Array,
           *, max_new_tokens: int, temperature: float | jax.Array = 1.0, top_k: int = 0,
           top_p: float | jax.Array = 1.0, eos_id: int | None = None, pad_id: int = 0,
           group_size: int = 1) -> SampleOutput:
  """Samples `max_new_tokens` tokens after left-padded prompts `[R, P]` (mask True = real), each
  prompt `group_size` = k times: output row `i·k + j` is prompt i's j-th response (B = R·k rows).
  Each prompt is prefilled once and its cache repeated to its k rows.

  temperature, top_p: Python numbers or traced arrays (scalars, or `[B]` per output row);
  max_new_tokens, top_k (0 = off), eos_id, pad_id, group_size: static. The nucleus sort is skipped
  when top_p is the Python number 1.0 (or more) and top_k is 0. Jitted; a fixed `rng`
  gives the same samples. Requires `P + max_new_tokens - 1 <= config.max_len`.
  """
  prompt_tokens, prompt_mask, _ = check_inputs(config, prompt_tokens, prompt_mask, None)
  if not isinstance(group_size, int) or group_size < 1:
    raise ValueError(f'sample: group_size={group_size!r} must be a positive int.')
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f'sample: max_new_tokens={max_new_tokens!r} must be a positive int.')
  if not isinstance(top_k, int) or not 0 <= top_k <= config.vocab_size:
    raise ValueError(f'sample: top_k={top_k!r} must be an int in [0, vocab_size={config.vocab_size}] (0 = off).')
  if prompt_tokens.shape[1] + max_new_tokens - 1 > config.max_len:
    raise ValueError(f'sample: prompt length {prompt_tokens.shape[1]} + max_new_tokens {max_new_tokens} - 1 '
                     f'exceeds config.max_len={config.max_len}.')
  use_top_p = not (isinstance(top_p, (int, float)) and top_p >= 1.0)
  return _sample(params, config, prompt_tokens, prompt_mask, rng, temperature, top_p, max_new_tokens=max_new_tokens,
                 top_k=top_k, use_top_p=use_top_p, eos_id=eos_id, pad_id=pad_id, group_size=group_size)
