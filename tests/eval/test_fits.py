"""Overoptimization fits and bootstrap intervals against exact cases."""
import numpy as np
import pytest

from rmjax.eval import fits


def test_bon_form_recovers_exact_parameters():
  kl = np.log(2.0 ** np.arange(9)) - (2.0 ** np.arange(9) - 1) / 2.0 ** np.arange(9)
  d = np.sqrt(kl)
  r = d * (0.8 - 0.3 * d)  # R(d) = d(α − βd), α = 0.8, β = 0.3
  f = fits.fit(kl, r, 'bon')
  assert f['alpha'] == pytest.approx(0.8, abs=1e-10) and f['beta'] == pytest.approx(0.3, abs=1e-10)
  assert f['r2'] == pytest.approx(1.0)


def test_rl_form_recovers_exact_parameters_and_drops_zero_kl():
  kl = np.array([0.0, 0.5, 1.0, 2.0, 4.0, 8.0])
  d = np.sqrt(kl)
  with np.errstate(divide='ignore', invalid='ignore'):
    r = np.where(d > 0, d * (1.2 - 0.5 * np.log(d)), 0.0)  # R(d) = d(α − β log d)
  f = fits.fit(kl, r, 'rl')
  assert f['alpha'] == pytest.approx(1.2, abs=1e-10) and f['beta'] == pytest.approx(0.5, abs=1e-10)


def test_noisy_fit_matches_the_normal_equations_and_errors():
  d = np.array([1.0, 2.0, 3.0, 4.0])
  r = np.array([0.9, 1.1, 1.6, 1.5])
  f = fits.fit(d ** 2, r, 'bon')
  # Independent route: the 2x2 normal equations of R = a·d + b·(−d²), solved by Cramer's rule.
  x1, x2 = d, -d ** 2
  s11, s12, s22 = x1 @ x1, x1 @ x2, x2 @ x2
  t1, t2 = x1 @ r, x2 @ r
  det = s11 * s22 - s12 ** 2
  a, b = (t1 * s22 - t2 * s12) / det, (s11 * t2 - s12 * t1) / det
  r2 = 1 - np.sum((r - a * x1 - b * x2) ** 2) / np.sum((r - r.mean()) ** 2)
  assert f['alpha'] == pytest.approx(a, rel=1e-9) and f['beta'] == pytest.approx(b, rel=1e-9)
  assert f['r2'] == pytest.approx(r2, rel=1e-9) and 0 < f['r2'] < 1
  assert np.isnan(fits.fit([1.0, 2.0], [1.0, 2.0], 'bon')['alpha'])  # under 3 points
  with pytest.raises(ValueError, match="form='dpo'"):
    fits.fit(d, r, 'dpo')


def test_bootstrap_interval_contains_the_mean_and_shrinks_with_n():
  rng = np.random.default_rng(0)
  small, large = rng.normal(size=20), rng.normal(size=2000)
  m, lo, hi = fits.bootstrap_ci(small, seed=1)
  assert lo < m < hi and m == pytest.approx(small.mean())
  _, lo2, hi2 = fits.bootstrap_ci(large, seed=1)
  # The standard error falls as 1/√n: the 95% width is about 3.92/√n (normal theory), within 25%.
  assert (hi2 - lo2) == pytest.approx(3.92 / np.sqrt(2000), rel=0.25)
  assert (hi2 - lo2) < (hi - lo)


def test_best_picks_the_form_that_generated_the_data():
  kl = np.array([0.5, 1.0, 2.0, 4.0, 8.0, 16.0])
  d = np.sqrt(kl)
  for form, r in (('bon', d * (0.8 - 0.3 * d)), ('rl', d * (1.2 - 0.5 * np.log(d)))):
    f = fits.best(kl, r)
    assert f['form'] == form and f['r2'] == pytest.approx(1.0, abs=1e-12)
    other = fits.fit(kl, r, 'rl' if form == 'bon' else 'bon')
    assert other['r2'] < 1.0 - 1e-3  # the other form does not fit exactly, so the choice is informative
  assert np.isnan(fits.best([1.0, 2.0], [0.1, 0.2])['r2'])  # too few points: NaN, no error
