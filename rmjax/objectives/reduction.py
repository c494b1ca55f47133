"""The one reduction of unreduced losses, chosen by config, invariant to how a batch is split.

Contract (`../shared/PITFALLS.md` #4). Every mode is a *sum* over the elements of the batch
divided by a *normaliser* that belongs to the whole (global) batch:

  token_mean            Σ_bt m·v / N_tok                      N_tok = Σ_bt m
  seq_mean_token_sum    Σ_bt m·v / N_seq                      N_seq = #rows with Σ_t m > 0
  seq_mean_token_mean   Σ_b (Σ_t m·v / Σ_t m) / N_seq
  constant              Σ_bt m·v / (N_seq · constant)         (Dr. GRPO, Liu et al. 2025:
                                                               `constant` = the max length)

The per-row division of `seq_mean_token_mean` only looks inside one sequence, which is never
split, so every mode is linear in the rows once the normaliser is fixed. A trainer that splits a
global batch into minibatches, accumulation steps or devices computes the normaliser **once** over
the global batch with `batch_normalizer(mask, mode)` and passes it to `reduce(..., normalizer=n)` for
every part; the parts' losses (and gradients) then **sum** to the global one, whatever the split.
Leaving `normalizer=None` uses the part's own mask, which is right only for the whole batch.
When each minibatch takes its own optimiser step, pass the global normaliser divided by the number
of minibatches: every token then has the same weight in every step.

For values of shape [B] (per-example losses) with a [B] mask, a row is one element: all modes
but `constant` give Σ_b m·v / Σ_b m, and `constant` gives Σ_b m·v / (Σ_b m · constant).
"""
from typing import Any

import jax.numpy as jnp
from jaxtyping import Array, Float

from rmjax.objectives import _checks

MODES = ('token_mean', 'seq_mean_token_sum', 'seq_mean_token_mean', 'constant')


def _rows(mask: Array) -> Array:
  """[B] 1 for rows with at least one valid element."""
  return (mask.reshape(mask.shape[0], -1).sum(-1) > 0).astype(jnp.float32)


def batch_normalizer(mask: Float[Array, 'B ...'], mode: str) -> Float[Array, '']:
  """The global normaliser of `mode` over `mask` ([B] or [B, T]): N_tok or N_seq (see module doc).

  `mode` is static. Call it on the mask of the whole batch, before splitting it.
  """
  _checks.one_of(mode, MODES, 'mode', 'batch_normalizer')
  _checks.expect_rank(mask, (1, 2), '[B] or [B, T]', 'mask', 'batch_normalizer')
  mask = jnp.asarray(mask, jnp.float32)
  if mode == 'token_mean' or mask.ndim == 1:
    return mask.sum()
  return _rows(mask).sum()


def reduce(values: Float[Array, 'B ...'], mask: Float[Array, 'B ...'], mode: str, *,
           constant: Any = None, normalizer: Any = None) -> Float[Array, '']:
  """Reduces unreduced `values` ([B] or [B, T]) under the same-shaped `mask` to a scalar.

  Args:
    values: [B] per-example or [B, T] per-token losses.
    mask: same shape, 1 on valid elements (float or bool).
    mode: static, one of `MODES`.
    constant: the fixed length of the `constant` mode (may be traced); required there only.
    normalizer: the global normaliser from `batch_normalizer(global_mask, mode)` (may be traced); None
      uses this `mask`'s own, correct only when `values` is the whole batch.

  Returns:
    The scalar loss. Masked elements contribute nothing (also when they hold inf or nan).
  """
  _checks.one_of(mode, MODES, 'mode', 'reduce')
  _checks.expect_rank(values, (1, 2), '[B] or [B, T]', 'values', 'reduce')
  _checks.expect(mask, jnp.shape(values), '[B] or [B, T] like values', 'mask', 'reduce')
  if mode == 'constant':
    _checks.require(constant, 'constant', 'reduce', "for mode 'constant' (the fixed length)")
    _checks.positive(constant, 'constant', 'reduce')
  elif constant is not None:
    raise ValueError(f"reduce: constant is only used by mode 'constant', not {mode!r}; drop it.")
  mask = jnp.asarray(mask, jnp.float32)
  masked = jnp.where(mask > 0, values * mask, 0.0)
  n = batch_normalizer(mask, mode) if normalizer is None else normalizer
  n = jnp.maximum(n, 1e-12)
  if mode == 'seq_mean_token_mean' and masked.ndim == 2:
    per_row = masked.sum(-1) / jnp.maximum(mask.sum(-1), 1.0)
    return per_row.sum() / n
  total = masked.sum()
  if mode == 'constant':
    return total / (n * constant)
  return total / n

