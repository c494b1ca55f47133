"""Dtype policy: bfloat16 params with float32 master weights; a bfloat16-compute forward pass."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmjax import config as C
from rmjax import parallel
from rmjax.models import transformer
from rmjax.models.config import ModelConfig, get_size
from rmjax.train import lm_trainer, optim
from rmjax.train import state as state_lib

CFG = ModelConfig(vocab_size=32, width=16, mlp_width=32, num_layers=2, num_heads=2, num_kv_heads=1, max_len=16)
BF16 = jnp.bfloat16


def _opt(name, lr, master):
  c = C.optim(lr=lr, warmup_steps=0, schedule='constant', weight_decay=0.0, grad_clip=0.0)
  c.name, c.master_dtype = name, master
  return optim.make_optimizer(c, 100)


@pytest.mark.parametrize('name, lr', [('sgd', 8e-3), ('adamw', 1e-3)])
def test_tiny_updates_accumulate_in_the_master_copy_and_reach_bf16_params(name, lr):
  # Weights 1.0 in bf16: the next value below is 1 - 2^-8, so a step of 1e-3 (sgd: lr 8e-3 x grad 0.125;
  # adamw: about lr) is below half a bf16 spacing and rounds away in pure bf16.
  params = {'w': jnp.ones((4,), BF16)}
  grads = {'w': jnp.full((4,), 0.125, BF16)}
  final = {}
  for master in ('none', 'float32'):
    opt = _opt(name, lr, master)
    p, s = params, opt.init(params)
    update = jax.jit(opt.update)
    for _ in range(10):
      u, s = update(grads, s, p)
      p = jax.jit(lambda p, u: jax.tree.map(lambda a, b: (a + b).astype(a.dtype), p, u))(p, u)
      assert p['w'].dtype == BF16
    final[master] = p, s
  np.testing.assert_array_equal(np.asarray(final['none'][0]['w'], np.float32), 1.0)  # pure bf16: stuck
  p, s = final['float32']
  # Master after 10 steps: 1 - 10 x 1e-3 = 0.99 (float32; adamw's step is lr g / (|g| + eps)).
  np.testing.assert_allclose(s.master['w'], 0.99, rtol=1e-6)
  assert s.master['w'].dtype == jnp.float32
  np.testing.assert_array_equal(p['w'], s.master['w'].astype(BF16))  # the params are the master, rounded
  assert np.all(np.asarray(p['w'], np.float32) == 0.98828125)  # bf16(0.99) = 253 / 256


def test_lm_step_with_bf16_params_keeps_them_cast_from_the_master():
  config = CFG.replace(param_dtype='bfloat16', dtype='bfloat16')
  opt = _opt('adamw', 1e-3, 'float32')
  mesh = parallel.make_mesh()
  params = jax.jit(transformer.init_lm, static_argnums=1)(jax.random.key(0), config)
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(BF16)}
  abstract = jax.eval_shape(lambda p: state_lib.create(p, opt, jax.random.key(1)), params)
  shardings = state_lib.state_shardings(abstract, opt, mesh)
  step = lm_trainer.make_train_step(config, opt, grad_accum_steps=2, state_shardings=shardings)
  state = state_lib.create(jax.tree.map(jnp.copy, params), opt, jax.random.key(1))  # the step donates it
  rng = np.random.default_rng(0)
  batch = dict(tokens=rng.integers(3, 32, (4, 10)).astype(np.int32), mask=np.ones((4, 10), bool),
               loss_mask=np.ones((4, 10), bool), weight=np.ones(4, np.float32))
  for _ in range(3):
    state, m = step(state, parallel.global_batch(batch, mesh))
  assert np.isfinite(m['loss'])
  master = state.opt_state.master
  assert {x.dtype for x in jax.tree.leaves(master)} == {jnp.dtype(jnp.float32)}
  for p, w in zip(jax.tree.leaves(state.params), jax.tree.leaves(master)):
    assert p.dtype == BF16
    np.testing.assert_array_equal(p, w.astype(BF16))
  moved = [np.abs(np.asarray(w) - np.asarray(p0, np.float32)).max()
           for w, p0 in zip(jax.tree.leaves(master), jax.tree.leaves(params))]
  assert max(moved) > 1e-3  # three AdamW steps of about lr moved the master


def test_bf16_compute_forward_of_tiny_is_close_to_fp32():
  config = get_size('tiny')
  params = jax.jit(transformer.init_lm, static_argnums=1)(jax.random.key(0), config)
  rng = np.random.default_rng(0)
  tokens, mask = jnp.asarray(rng.integers(0, config.vocab_size, (4, 16))), jnp.ones((4, 16), bool)
  fn = jax.jit(transformer.lm_logits, static_argnums=1)
  ref = np.asarray(fn(params, config, tokens, mask))
  out = np.asarray(fn(params, config.replace(dtype='bfloat16'), tokens, mask))
  assert out.dtype == np.float32
  # bf16 dots keep 8 significant bits (the norms, softmax sums and outputs stay float32). Measured:
  # max |Δ logits| = 0.6% of max |logits|, max |Δ log p| = 0.004; the bound is 2% / 0.02, and the
  # lower bound shows the compute dtype is used.
  err = np.abs(out - ref).max() / np.abs(ref).max()
  assert 1e-4 < err < 2e-2, err
  logp = lambda x: np.asarray(jax.nn.log_softmax(x, axis=-1))
  assert np.abs(logp(out) - logp(ref)).max() < 2e-2


def test_bad_master_dtype_names_the_field():
  match = r"config.optim.master_dtype='bfloat16': expected one of \('none', 'float32'\)"
  with pytest.raises(C.ConfigError, match=match):
    _opt('adamw', 1e-3, 'bfloat16')
