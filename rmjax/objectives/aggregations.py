"""Ensemble aggregations: per-member scores [K, B] -> one reward [B].

Every aggregation first normalises member k with its saved statistics,
r̃_kb = (r_kb − mean_k) / std_k (`../shared/PITFALLS.md` #10), so that members trained to
different offsets and scales are comparable; `stats=None` skips this (use only for members
already on one scale). Coefficients (λ, k, q, β) may be traced; `unbiased` is static.
"""
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from rmjax.objectives import _checks
from rmjax.objectives.base import RewardStats
from rmjax.objectives.registry import register

Aggregation = Callable[[Float[Array, 'K B'], RewardStats | None], Float[Array, 'B']]


def normalize(scores: Float[Array, 'K B'], stats: RewardStats | None, piece: str = 'normalize'
              ) -> Float[Array, 'K B']:
  """(r_kb − mean_k) / std_k, after checking that `scores` is [K, B] and `stats` holds [K] arrays."""
  _checks.expect_rank(scores, 2, '[K, B] (members × examples)', 'scores', piece)
  if stats is None:
    return scores
  if not isinstance(stats, RewardStats):
    raise ValueError(f'{piece}: stats must be a RewardStats(mean [K], std [K]) or None, '
                     f'got {type(stats).__name__}.')
  k = scores.shape[0]
  _checks.expect(stats.mean, (k,), '[K] (one per member)', 'stats.mean', piece)
  _checks.expect(stats.std, (k,), '[K] (one per member)', 'stats.std', piece)
  return (scores - stats.mean[:, None]) / stats.std[:, None]


def _member_var(r: Array, unbiased: bool, piece: str) -> Array:
  """Variance across members by two passes (mean first, then mean squared deviation)."""
  k = r.shape[0]
  if unbiased and k < 2:
    raise ValueError(f'{piece}: the unbiased variance needs K >= 2 members, got K = {k}.')
  dev = r - r.mean(0, keepdims=True)
  return jnp.square(dev).sum(0) / (k - 1 if unbiased else k)


def _aggregation(piece: str, fn: Callable[[Array], Array]) -> Aggregation:

  def aggregate(scores: Float[Array, 'K B'], stats: RewardStats | None = None) -> Float[Array, 'B']:
    return fn(normalize(scores, stats, piece))

  aggregate.__doc__ = f'`{piece}` over normalised members: scores [K, B], stats -> [B].'
  return aggregate


@register('mean', kind='aggregation')
def mean() -> Aggregation:
  """Mean of the normalised members: (1/K)·Σ_k r̃_k (the plain ensemble, Coste et al. 2023)."""
  return _aggregation('mean', lambda r: r.mean(0))


@register('median', kind='aggregation')
def median() -> Aggregation:
  """Median of the normalised members (Eisenstein et al. 2023, "Helping or Herding?")."""
  return _aggregation('median', lambda r: jnp.median(r, axis=0))


@register('min', kind='aggregation', aliases=('wco',))
def min_() -> Aggregation:
  """Worst-case optimisation: min_k r̃_k (WCO, Coste et al. 2023)."""
  return _aggregation('min', lambda r: r.min(0))


@register('uwo', kind='aggregation')
def uwo(lam: Any, unbiased: bool = False) -> Aggregation:
  """Uncertainty-weighted optimisation: mean_k r̃_k − λ·Var_k r̃_k (UWO, Coste et al. 2023).

  The variance is the population variance (1/K) by default, the unbiased 1/(K−1) one with
  `unbiased=True` (static), computed by two passes so that near-equal members give ≈ 0, not
  cancellation noise. λ may be traced.
  """
  return _aggregation('uwo', lambda r: r.mean(0) - lam * _member_var(r, unbiased, 'uwo'))


@register('mean_minus_std', kind='aggregation')
def mean_minus_std(k: Any = 1.0, unbiased: bool = False) -> Aggregation:
  """Mean minus k standard deviations across normalised members (Eisenstein et al. 2023).

  mean_k r̃_k − k·sqrt(Var_k r̃_k); the variance as in `uwo` (population unless `unbiased`).
  k may be traced.
  """

  def fn(r):
    var = _member_var(r, unbiased, 'mean_minus_std')
    # sqrt has an infinite derivative at 0; agreeing members give a zero-gradient std instead.
    safe = jnp.where(var > 0, var, 1.0)
    return r.mean(0) - k * jnp.where(var > 0, jnp.sqrt(safe), 0.0)

  return _aggregation('mean_minus_std', fn)


@register('quantile', kind='aggregation')
def quantile(q: Any) -> Aggregation:
  """The q-quantile across normalised members, linear interpolation (q in [0, 1], may be traced).

  It interpolates between `min` (q = 0, the WCO of Coste et al. 2023), the `median` (q = 0.5)
  and the max (q = 1); a conservative ensemble takes q < 0.5.
  """
  _checks.nonnegative(q, 'q', 'quantile')
  _checks.nonnegative(1.0 - q, '1 - q', 'quantile')
  return _aggregation('quantile', lambda r: jnp.quantile(r, q, axis=0))


@register('softmin', kind='aggregation')
def softmin(beta: Any) -> Aggregation:
  """Soft minimum: −β·log((1/K)·Σ_k exp(−r̃_k/β)), β > 0 (may be traced).

  By Jensen's inequality min ≤ softmin ≤ mean; it tends to `min` as β → 0 and to `mean` as
  β → ∞. Computed with logsumexp, so it is finite for any scores and β.
  """
  _checks.positive(beta, 'beta', 'softmin')

  def fn(r):
    k = r.shape[0]
    return -beta * (jax.nn.logsumexp(-r / beta, axis=0) - jnp.log(k))

  return _aggregation('softmin', fn)
