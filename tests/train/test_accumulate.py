"""Gradient accumulation: N microbatches in one step give the update of the unsplit global batch."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmjax import config as C
from rmjax import objectives
from rmjax.models import transformer
from rmjax.models.config import ModelConfig
from rmjax.models.reward_model import RewardModel
from rmjax.train import accumulate, lm_trainer, optim, rm_trainer
from rmjax.train import state as state_lib

CFG = ModelConfig(vocab_size=32, width=16, mlp_width=32, num_layers=1, num_heads=2, num_kv_heads=1, max_len=16)
B, T, LR = 8, 10, 0.5
# With N = 2, microbatch 0 = rows 0, 2, 4, 6 and microbatch 1 = rows 1, 3, 5, 7 (`accumulate.split`).
# Rows 3, 5, 7 are padding (weight 0): microbatch 1 has one real row, microbatch 0 four.
WEIGHT = np.array([1, 1, 1, 0, 1, 0, 1, 0], np.float32)


def _sgd():
  # Plain SGD (no clipping, no decay): the update is -LR * gradient, so the params compare gradients.
  c = C.optim(lr=LR, warmup_steps=0, schedule='constant', grad_clip=0.0)
  c.name = 'sgd'
  return optim.make_optimizer(c, 10)


def _pairs():
  rng = np.random.default_rng(0)
  lens_c, lens_r = rng.integers(3, T + 1, B), rng.integers(3, T + 1, B)
  mask_c, mask_r = np.arange(T)[None] < lens_c[:, None], np.arange(T)[None] < lens_r[:, None]
  return dict(chosen_tokens=np.where(mask_c, rng.integers(3, 32, (B, T)), 0).astype(np.int32),
              rejected_tokens=np.where(mask_r, rng.integers(3, 32, (B, T)), 0).astype(np.int32),
              chosen_mask=mask_c, rejected_mask=mask_r, weight=WEIGHT, index=np.arange(B))


def _sequences():
  rng = np.random.default_rng(1)
  lens = np.array([10, 3, 9, 4, 10, 2, 8, 3])  # uneven target tokens: 45 in microbatch 0, 8 in 1
  mask = np.arange(T)[None] < lens[:, None]
  return dict(tokens=np.where(mask, rng.integers(3, 32, (B, T)), 0).astype(np.int32), mask=mask,
              loss_mask=mask.copy(), weight=np.ones(B, np.float32), index=np.arange(B))


def _rows(batch, rows):
  return {k: v[rows] for k, v in batch.items()}


def _delta(make_step, n, params, batch):
  """Parameter change of one SGD step with `n` microbatches, flattened."""
  opt, step = make_step(n)
  state = state_lib.create(jax.tree.map(jnp.copy, params), opt, jax.random.key(0))
  new, _ = step(state, batch)
  return np.concatenate([np.ravel(a - b) for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(params))])


def _check(make_step, params, batch):
  make_step = functools.cache(make_step)  # one compiled step per N
  full = _delta(make_step, 1, params, batch)
  acc = _delta(make_step, 2, params, batch)
  # float32: the accumulated update matches the unsplit one to 1e-6 of its largest entry (measured ~1e-7).
  np.testing.assert_allclose(acc, full, rtol=0, atol=1e-6 * np.abs(full).max())
  # The naive accumulation (mean of each microbatch's own mean) is a different update (measured 36% /
  # 76% of the largest entry off), so the check above can fail.
  naive = np.mean([_delta(make_step, 1, params, _rows(batch, np.arange(i, B, 2))) for i in range(2)], axis=0)
  assert np.abs(naive - full).max() > 0.1 * np.abs(full).max()


def test_rm_step_accumulated_equals_global_batch():
  rm = RewardModel(CFG, num_members=2, kind='multi_head')
  params = jax.jit(rm.init)(jax.random.key(0))

  def make_step(n):
    opt = _sgd()
    return opt, rm_trainer.make_train_step(rm, opt, objectives.get('bradley_terry'), bootstrap=True,
                                           grad_accum_steps=n)
  _check(make_step, params, _pairs())


def test_auto_steps_is_the_fewest_microbatches_that_fit_the_budget(monkeypatch):
  budget = accumulate.MICROBATCH_TOKENS  # 1024
  assert accumulate.auto_steps(16, 2 * 128) == 4          # 16 pairs x 128 tokens: 4 pairs each
  assert accumulate.auto_steps(16, 2 * 512) == 16         # 512 tokens: one pair each
  assert accumulate.auto_steps(6, 400) == 3               # 2 rows = 800 fit, 3 rows do not
  assert accumulate.auto_steps(7, 300) == 7               # prime: no divisor between 1 and 7 fits
  assert accumulate.auto_steps(4, budget // 4) == 1       # the whole batch fits
  assert accumulate.auto_steps(8, budget + 1) == 8        # not even one row fits: one row each
  assert accumulate.auto_steps(6, 30000, budget=65536) == 3  # a caller's own budget
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert accumulate.auto_steps(16, 2 * 128) == 1          # accelerators keep the batch whole


def test_rm_step_auto_splits_by_the_budget_and_equals_the_global_batch(monkeypatch):
  # A budget of 4 pairs of 2·T tokens splits B = 8 into N = 2.
  monkeypatch.setattr(accumulate, 'MICROBATCH_TOKENS', 4 * 2 * T)
  rm = RewardModel(CFG, num_members=1)
  params = jax.jit(rm.init)(jax.random.key(0))
  opt = _sgd()
  auto = rm_trainer.make_train_step(rm, opt, objectives.get('bradley_terry'), grad_accum_steps='auto')
  plain = rm_trainer.make_train_step(rm, opt, objectives.get('bradley_terry'))
  batch = _pairs()
  state = state_lib.create(params, opt, jax.random.key(0))
  jaxpr = str(jax.make_jaxpr(auto)(state, batch))
  assert 'scan' in jaxpr and 'length=2' in jaxpr and 'scan' not in str(jax.make_jaxpr(plain)(state, batch))
  got, want = (step(state_lib.create(jax.tree.map(jnp.copy, params), opt, jax.random.key(0)), batch)[0].params
               for step in (auto, plain))
  full = max(float(jnp.abs(w - p).max()) for w, p in zip(jax.tree.leaves(want), jax.tree.leaves(params)))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-6 * full)


def test_lm_step_accumulated_equals_global_batch():
  params = jax.jit(transformer.init_lm, static_argnums=1)(jax.random.key(0), CFG)
  def make_step(n):
    opt = _sgd()
    return opt, lm_trainer.make_train_step(CFG, opt, grad_accum_steps=n)
  _check(make_step, params, _sequences())


def test_split_takes_strided_rows():
  x = np.arange(12).reshape(6, 2)
  np.testing.assert_array_equal(accumulate.split({'x': x}, 3)['x'][1], x[[1, 4]])


@pytest.mark.parametrize('steps, match', [(3, 'does not divide the per-process batch of 8 rows'),
                                          (0, 'expected a positive integer'),
                                          ('auto', "expected a positive integer \\('auto' is for the RM")])
def test_bad_accumulation_steps_raise_config_error(steps, match):
  train = C.train(10, batch_size=8)
  train.grad_accum_steps = steps
  with pytest.raises(C.ConfigError, match=f'config.train.grad_accum_steps={steps!r}.*{match}'):
    accumulate.check_steps(train)
  train.grad_accum_steps = 4
  assert accumulate.check_steps(train) == 4
  train.grad_accum_steps = 'auto'
  assert accumulate.check_steps(train, allow_auto=True) == 'auto'


def test_the_rl_trainer_refuses_the_option():
  from rmjax.rl import trainer
  rl = trainer.base_config('rloo', 'test')
  trainer.validate(rl)
  rl.train.grad_accum_steps = 2
  with pytest.raises(C.ConfigError, match='config.train.grad_accum_steps=2: the RL trainer does not accumulate'):
    trainer.validate(rl)
