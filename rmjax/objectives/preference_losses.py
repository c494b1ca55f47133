"""Direct-preference losses from per-token log-probs of chosen and rejected responses.

Every piece is `fn(logp_chosen, logp_rejected, ref_logp_chosen, ref_logp_rejected,
mask_chosen, mask_rejected) -> [B]` with [B, T] inputs (T may differ between chosen and
rejected); the policy log-probs carry the gradient. Coefficients may be traced; booleans are
static. Direct alignment overoptimizes too (Rafailov et al., 2024, "Scaling Laws for Reward
Model Overoptimization in Direct Alignment Algorithms").
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from rmjax.objectives import _checks
from rmjax.objectives.registry import register


def _log_ratio(logp: Array, ref: Array, mask: Array, average: bool, side: str, piece: str) -> Array:
  """Σ_t m·(log π − log π_ref) per row [B], divided by Σ_t m if `average`."""
  _checks.expect_rank(logp, 2, '[B, T]', f'logp_{side}', piece)
  _checks.expect(ref, logp.shape, f'[B, T] like logp_{side}', f'ref_logp_{side}', piece)
  _checks.expect(mask, logp.shape, f'[B, T] like logp_{side}', f'mask_{side}', piece)
  mask = jnp.asarray(mask, jnp.float32)
  total = jnp.where(mask > 0, logp - jax.lax.stop_gradient(ref), 0.0).sum(-1)
  return total / jnp.maximum(mask.sum(-1), 1.0) if average else total


def _margin(logp_c, logp_r, ref_c, ref_r, mask_c, mask_r, average, piece) -> Array:
  h_c = _log_ratio(logp_c, ref_c, mask_c, average, 'chosen', piece)
  h_r = _log_ratio(logp_r, ref_r, mask_r, average, 'rejected', piece)
  _checks.expect(h_r, h_c.shape, '[B] rows like the chosen side', 'rejected batch', piece)
  return h_c - h_r


@register('dpo', kind='preference_loss')
def dpo(beta: Any = 0.1, label_smoothing: Any = 0.0) -> Callable:
  """Direct preference optimisation (Rafailov et al., 2023), with label smoothing.

    h = [log π(y_c) − log π_ref(y_c)] − [log π(y_r) − log π_ref(y_r)]     (sequence sums)
    ℓ = −(1−ε)·log σ(β·h) − ε·log σ(−β·h)

  ε is the conservative DPO of Mitchell (2023): the expected loss under labels flipped with
  probability ε. At π = π_ref, ℓ = log 2. β and ε may be traced.

  Returns:
    `fn(logp_chosen, logp_rejected, ref_logp_chosen, ref_logp_rejected, mask_chosen, mask_rejected) -> [B]`.
  """

  def fn(logp_chosen: Float[Array, 'B Tc'], logp_rejected: Float[Array, 'B Tr'],
         ref_logp_chosen: Float[Array, 'B Tc'], ref_logp_rejected: Float[Array, 'B Tr'],
         mask_chosen: Float[Array, 'B Tc'], mask_rejected: Float[Array, 'B Tr']) -> Float[Array, 'B']:
    h = _margin(logp_chosen, logp_rejected, ref_logp_chosen, ref_logp_rejected, mask_chosen,
                mask_rejected, False, 'dpo')
    z = beta * h
    return (1.0 - label_smoothing) * jax.nn.softplus(-z) + label_smoothing * jax.nn.softplus(z)

  return fn


@register('ipo', kind='preference_loss')
def ipo(tau: Any = 0.1, average: bool = False) -> Callable:
  """IPO: the squared loss ℓ = (h − 1/(2τ))² on preference log-ratios (Azar et al., 2024).

  "A General Theoretical Paradigm to Understand Learning from Human Preferences". Azar et al. define h on *sequence* log-ratios, as in `dpo` (`average=False`, the default).
  `average=True` (static) uses per-token means of the log-ratios instead, h = mean_t(...)_c −
  mean_t(...)_r — the variant TRL adopted (TRL #1265; disputed in #1677,
  `../shared/PITFALLS.md` #8); the two differ whenever lengths differ or exceed 1. τ may be traced.

  Returns:
    `fn(logp_chosen, logp_rejected, ref_logp_chosen, ref_logp_rejected, mask_chosen, mask_rejected) -> [B]`.
  """
  _checks.positive(tau, 'tau', 'ipo')

  def fn(logp_chosen: Float[Array, 'B Tc'], logp_rejected: Float[Array, 'B Tr'],
         ref_logp_chosen: Float[Array, 'B Tc'], ref_logp_rejected: Float[Array, 'B Tr'],
         mask_chosen: Float[Array, 'B Tc'], mask_rejected: Float[Array, 'B Tr']) -> Float[Array, 'B']:
    h = _margin(logp_chosen, logp_rejected, ref_logp_chosen, ref_logp_rejected, mask_chosen,
                mask_rejected, average, 'ipo')
    return jnp.square(h - 1.0 / (2.0 * tau))

  return fn
