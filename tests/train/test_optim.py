"""Schedules and optimizer construction, against hand-computed values."""
import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from rmjax import config as C
from rmjax.train import optim


def test_warmup_cosine_schedule_hand_values():
  c = C.optim(lr=1.0, warmup_steps=10, schedule='cosine')
  sched = optim.schedule(c, total_steps=110)
  # Warmup: linear from 0 to lr over 10 steps.
  assert float(sched(0)) == pytest.approx(0.0)
  assert float(sched(5)) == pytest.approx(0.5)
  # Cosine over the remaining 100 steps to lr * final_lr_ratio = 0.1:
  # lr(t) = 0.1 + 0.9 * (1 + cos(pi * (t - 10) / 100)) / 2.
  for t in (10, 35, 60, 110):
    expected = 0.1 + 0.9 * (1 + math.cos(math.pi * (t - 10) / 100)) / 2
    assert float(sched(t)) == pytest.approx(expected, abs=1e-6)


def test_constant_and_linear_schedules():
  assert float(optim.schedule(C.optim(lr=0.3, warmup_steps=0, schedule='constant'), 50)(37)) == pytest.approx(0.3)
  lin = optim.schedule(C.optim(lr=1.0, warmup_steps=0, schedule='linear'), 100)
  assert float(lin(50)) == pytest.approx(1.0 - 0.9 * 0.5, abs=1e-6)


def test_bad_names_are_clear_errors():
  with pytest.raises(ValueError, match="optim.name='lion'"):
    optim.make_optimizer(ml_collections.ConfigDict(dict(C.optim(), name='lion')), 10)
  with pytest.raises(ValueError, match='optim.schedule'):
    optim.schedule(ml_collections.ConfigDict(dict(C.optim(), schedule='step')), 10)


def test_clipping_and_no_decay_on_vectors():
  c = C.optim(lr=0.1, warmup_steps=0, schedule='constant', weight_decay=0.5, grad_clip=1.0)
  opt = optim.make_optimizer(c, 10)
  params = {'kernel': jnp.ones((2, 2)), 'scale': jnp.ones((2,))}
  state = opt.init(params)
  zero = {'kernel': jnp.zeros((2, 2)), 'scale': jnp.zeros((2,))}
  updates, _ = opt.update(zero, state, params)
  # With zero gradients only weight decay acts: -lr * wd * p on matrices, nothing on vectors.
  np.testing.assert_allclose(updates['kernel'], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)
  np.testing.assert_allclose(updates['scale'], 0.0)
  # A huge gradient is clipped to global norm 1 before Adam (Adam's first step is lr * sign).
  big = {'kernel': 1e6 * jnp.ones((2, 2)), 'scale': jnp.zeros((2,))}
  clipped, _ = optax.clip_by_global_norm(1.0).update(big, optax.EmptyState())
  assert float(optax.tree.norm(clipped)) == pytest.approx(1.0, rel=1e-6)
