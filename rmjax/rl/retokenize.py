"""Scoring policy samples with a reward model that has another tokenizer (`../shared/PITFALLS.md` #14).

Policy token ids mean nothing to a reward model trained with another vocabulary. Rows of a
rollout (`[B, Lp + N]`: a left-padded prompt of width Lp, then a right-padded response) are
decoded with the policy's tokenizer and encoded again with the reward model's, laid out as the
reward model was trained on them (`rmjax.data.encode_prompt_response`):

    target.encode(prompt text) + target.encode(response text) + [target eos if the response ended with EOS]

right-padded with the target's pad id to `width`; a longer row keeps its last `width` tokens
(the prompt is cut from the left first), so the response's end, where rewards are read, is kept.
A response that ran out of tokens gets no EOS (a truncated response is read at its last token,
as without re-tokenization; `../shared/PITFALLS.md` #6).

This runs on the host, inside the compiled iteration, through `jax.pure_callback`: the program
stays one program, with a device -> host copy of the tokens, Python decoding and encoding of
every row, and a host -> device copy of the new rows between the rollout and the scoring. Its
cost grows with B·L and does not overlap with device work (measured in `docs/rl.md`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rmjax.data.tokenizer import Tokenizer


def retokenize(tokens: np.ndarray, mask: np.ndarray, prompt_len: int, source: Tokenizer, target: Tokenizer,
               width: int) -> tuple[np.ndarray, np.ndarray]:
  """Rows `[..., Lp + N]` of `source` ids -> `(tokens [..., width] int32, mask [..., width] bool)` of `target`.

  prompt_len: Lp, the width of the (left-padded) prompt part of each row.
  """
  tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
  if tokens.shape != mask.shape or tokens.ndim < 2 or not 0 <= prompt_len <= tokens.shape[-1]:
    raise ValueError(f'retokenize: tokens {tokens.shape} and mask {mask.shape} must be [..., L] alike, with '
                     f'0 <= prompt_len={prompt_len} <= L.')
  if width < 2:
    raise ValueError(f'retokenize: width={width} must hold at least one token and eos.')
  lead, length = tokens.shape[:-1], tokens.shape[-1]
  flat_t, flat_m = tokens.reshape(-1, length), mask.reshape(-1, length)
  out_t = np.full((flat_t.shape[0], width), target.pad_id, np.int32)
  out_m = np.zeros((flat_t.shape[0], width), bool)
  for i, (row, m) in enumerate(zip(flat_t, flat_m)):
    prompt = row[:prompt_len][m[:prompt_len]].tolist()
    response = row[prompt_len:][m[prompt_len:]].tolist()
    finished = source.eos_id in response
    ids = target.encode(source.decode(prompt)) + target.encode(source.decode(response))
    ids = (ids + [target.eos_id] if finished else ids)[-width:]
    out_t[i, :len(ids)], out_m[i, :len(ids)] = ids, True
  return out_t.reshape(*lead, width), out_m.reshape(*lead, width)


def retokenizing_scorer(scorer, source: Tokenizer, target: Tokenizer, *, prompt_len: int, width: int):
  """`scorer(params, tokens, mask)` that reads `target` ids, as a scorer of `source` rows.

  The returned `fn(params, tokens [B, Lp + N], mask) -> [K, B]` re-tokenizes on the host
  (`retokenize`, via `jax.pure_callback`; it works under `jit` and `vmap`) and then calls
  `scorer` on `[B, width]` rows.
  """

  def host(tokens, mask):
    return retokenize(tokens, mask, prompt_len, source, target, width)

  def fn(params, tokens, mask):
    shape = tokens.shape[:-1] + (width,)
    out = (jax.ShapeDtypeStruct(shape, jnp.int32), jax.ShapeDtypeStruct(shape, jnp.bool_))
    new_tokens, new_mask = jax.pure_callback(host, out, tokens, mask, vmap_method='expand_dims')
    return scorer(params, new_tokens, new_mask)

  return fn
