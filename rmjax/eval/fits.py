"""Overoptimization curve fits (Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization").

With d = √KL between the optimized and the base policy and the gold reward measured relative to
the base policy (R(0) = 0):

  best-of-n:  R(d) = d·(α − β·d)          (linear least squares in (α, β): R = α·d − β·d²)
  RL:         R(d) = d·(α − β·log d)      (R = α·d − β·d·log d; points with d = 0 dropped)

Each fit returns α, β and R² = 1 − SS_res / SS_tot (SS_tot about the mean of R).
"""
from __future__ import annotations

import numpy as np

FORMS = ('bon', 'rl')


def fit(kl, reward, form: str) -> dict[str, float]:
  """Least-squares (α, β, R²) of `form` to points (kl [n], reward [n]); NaNs if under 3 usable points."""
  if form not in FORMS:
    raise ValueError(f'fit: form={form!r}; expected one of {FORMS}.')
  d = np.sqrt(np.maximum(np.asarray(kl, np.float64), 0.0))
  r = np.asarray(reward, np.float64)
  if d.shape != r.shape or d.ndim != 1:
    raise ValueError(f'fit: kl and reward must be [n] alike; got {d.shape} and {r.shape}.')
  keep = np.isfinite(d) & np.isfinite(r) & (d > 0)
  d, r = d[keep], r[keep]
  if d.size < 3:
    return {'alpha': float('nan'), 'beta': float('nan'), 'r2': float('nan')}
  basis = np.stack([d, -(d * d if form == 'bon' else d * np.log(d))], axis=1)
  (alpha, beta), *_ = np.linalg.lstsq(basis, r, rcond=None)
  resid = r - basis @ np.array([alpha, beta])
  ss_tot = np.sum((r - r.mean()) ** 2)
  r2 = 1.0 - np.sum(resid ** 2) / ss_tot if ss_tot > 0 else float('nan')
  return {'alpha': float(alpha), 'beta': float(beta), 'r2': float(r2)}


def best(kl, reward, forms=FORMS) -> dict:
  """`fit` of each of `forms` to (kl, reward), with its `form`: the one with the highest R² (NaN last)."""
  candidates = [dict(fit(kl, reward, form), form=form) for form in forms]
  return max(candidates, key=lambda f: -np.inf if np.isnan(f['r2']) else f['r2'])


def bootstrap_ci(samples, *, stat=np.mean, num: int = 1000, level: float = 0.95, seed: int = 0,
                 axis: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(statistic, low, high) over `axis` of `samples` by the percentile bootstrap (resampling that axis)."""
  x = np.asarray(samples, np.float64)
  n = x.shape[axis]
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, n, size=(num, n))
  stats = np.stack([stat(np.take(x, i, axis=axis), axis=axis) for i in idx])
  lo, hi = np.quantile(stats, [(1 - level) / 2, (1 + level) / 2], axis=0)
  return stat(x, axis=axis), lo, hi
