"""Tests over the whole registry: every option changes the output (PITFALLS #3), jit = eager."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmjax.objectives as obj
from tests.objectives.cases import CASES, X, batch, own_entries

OPTION_CASES = [(name, option) for name, case in CASES.items() for option in case.alt]


def test_every_registered_piece_and_option_has_a_case():
  assert {e.name for e in own_entries()} == set(CASES)
  for name, case in CASES.items():
    assert set(case.alt) == set(obj.options(name)), name


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(leaf, np.float64)) for leaf in jax.tree.leaves(tree)])


@pytest.mark.parametrize('name, option', OPTION_CASES)
def test_every_option_changes_the_output(name, option):
  case = CASES[name]
  base = _flat(case.call(obj.get(name, **case.base), X))
  changed = _flat(case.call(obj.get(name, **{**case.base, option: case.alt[option]}), X))
  assert base.shape != changed.shape or not np.allclose(base, changed, rtol=1e-4, atol=1e-6), \
      f'{name}: option {option}={case.alt[option]!r} left the output unchanged'


@pytest.mark.parametrize('name', sorted(CASES))
def test_same_result_with_and_without_jit(name):
  case = CASES[name]
  piece = obj.get(name, **case.base)
  eager = case.call(piece, X)
  jitted = jax.jit(lambda x: case.call(piece, x))(X)
  # identical programs up to XLA fusion: float32 rounding only
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), eager, jitted)


@pytest.mark.parametrize('name', sorted(CASES))
def test_outputs_are_finite(name):
  case = CASES[name]
  out = case.call(obj.get(name, **case.base), X)
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(out)), name


def test_numeric_options_can_be_traced_and_vmapped():
  # a population of three runs differing in λ, β, ε: vmap over the coefficient
  lams = jnp.array([0.0, 0.5, 2.0])
  pop = jax.vmap(lambda lam: obj.get('uwo', lam=lam)(X['scores'], X['stats']))(lams)
  for i, lam in enumerate([0.0, 0.5, 2.0]):
    np.testing.assert_allclose(pop[i], obj.get('uwo', lam=lam)(X['scores'], X['stats']), rtol=1e-6)
  betas = jnp.array([0.05, 0.5])
  pop = jax.jit(jax.vmap(lambda b: obj.get('kl_k3', coef=b)(batch(X))[0]))(betas)
  np.testing.assert_allclose(pop[1], obj.get('kl_k3', coef=0.5)(batch(X))[0], rtol=1e-6)

