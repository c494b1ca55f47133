"""Rematerialized blocks and the scan over layers: same numbers as the plain model, and visibly used."""
import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from rmjax import config as C
from rmjax.models import partitioning
from rmjax.models import transformer as tf
from rmjax.models.reward_model import RewardModel
from rmjax.train import optim
from tests.models.conftest import LLAMA, pad_rows, randomize

ROWS = [np.array([5, 9, 17, 3, 44]), np.array([7, 1, 63]), np.array([12, 30, 2, 8, 8, 50, 21])]
CFG3 = LLAMA.replace(num_layers=3)  # 3 layers, so that a wrong layer order would show
logits_fn = jax.jit(tf.lm_logits, static_argnums=1)
decode_fn = jax.jit(tf.lm_decode, static_argnums=1)


def _nll(params, config, tokens, mask):
  logits = tf.lm_logits(params, config, tokens, mask)[:, :-1]
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  return (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()


def _primitives(jaxpr):
  """Names of every primitive in a jaxpr, nested jaxprs included."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      names |= _primitives(sub)
  return names


@pytest.fixture(scope='module')
def lm():
  params = jax.jit(lambda k: randomize(tf.init_lm(k, CFG3), seed=1))(jax.random.key(0))
  return params, *pad_rows(ROWS, 8, 'right')


def test_remat_block_same_loss_and_grads_and_marker_in_the_gradient(lm):
  params, tokens, mask = lm
  remat = CFG3.replace(remat='block')
  same_layout = jax.eval_shape(lambda k: tf.init_lm(k, remat), jax.random.key(0))
  assert jax.tree.structure(same_layout) == jax.tree.structure(params)
  grad = lambda c: jax.value_and_grad(functools.partial(_nll, config=c, tokens=tokens, mask=mask))
  (l0, g0), (l1, g1) = jax.jit(grad(CFG3))(params), jax.jit(grad(remat))(params)
  # float32: the recomputed forward is the same computation, so loss and gradients agree to 1e-6.
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(b).max())
  # The gradient's program holds one rematerialization per block; the plain model's none.
  assert 'remat2' not in _primitives(jax.make_jaxpr(grad(CFG3))(params).jaxpr)
  jaxpr = jax.make_jaxpr(grad(remat))(params).jaxpr
  assert 'remat2' in _primitives(jaxpr)
  assert sum(e.primitive.name == 'remat2' for e in jaxpr.eqns) == CFG3.num_layers


def test_stack_unstack_round_trip_and_init_layout(lm):
  params, _, _ = lm
  stacked = tf.stack_layers(params, 3)
  assert 'layers_0' not in stacked['backbone']
  assert stacked['backbone']['layers']['attn']['qkv']['kernel'].shape == (3, 32, (4 + 2 * 2) * 8)
  np.testing.assert_array_equal(stacked['backbone']['layers']['mlp']['down']['kernel'][2],
                                params['backbone']['layers_2']['mlp']['down']['kernel'])
  back = tf.unstack_layers(stacked, 3)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)))
  scanned_init = jax.eval_shape(lambda k: tf.init_lm(k, CFG3.replace(scan_layers=True)), jax.random.key(0))
  assert jax.tree.map(lambda x: x.shape, scanned_init) == jax.tree.map(lambda x: x.shape, stacked)
  with pytest.raises(ValueError, match='layer axis sizes'):
    tf.unstack_layers(stacked, 2)


@pytest.mark.parametrize('remat', ['none', 'block'])
def test_scanned_lm_matches_per_layer_lm_with_converted_params(lm, remat):
  params, tokens, mask = lm
  scanned = CFG3.replace(scan_layers=True, remat=remat)
  ref = logits_fn(params, CFG3, tokens, mask)
  out = logits_fn(tf.stack_layers(params, 3), scanned, tokens, mask)
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)  # float32, same ops in a loop


def test_scanned_kv_cache_decode_matches_per_layer(lm):
  params, tokens, mask = lm
  scanned = CFG3.replace(scan_layers=True)
  pos = tf.default_positions(mask)
  outs = []
  for c, p in ((CFG3, params), (scanned, tf.stack_layers(params, 3))):
    logits, cache = decode_fn(p, c, tokens[:, :5], mask[:, :5], pos[:, :5], tf.init_cache(c, 3, 8))
    step, cache = decode_fn(p, c, tokens[:, 5:6], mask[:, 5:6], pos[:, 5:6], cache)
    outs.append((logits, step, cache.k[2]))
  for a, b in zip(*outs):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_scanned_rematted_shared_prompt_logits_match_the_per_layer_plain_pass(lm):
  """`shared_prompt_logits` (its responses' pass at a static cache index) under the layer scan and
  block remat: the per-layer plain pass's response logits (atol 1e-5) and parameter gradients
  (within 1e-5 of the largest entry); 2 prompts × 3 rows, 5 prompt and 3 response tokens."""
  params, tokens, _ = lm
  tokens = jnp.concatenate([jnp.repeat(tokens[:2, :5], 3, 0), jnp.asarray(np.arange(18).reshape(6, 3) + 1)], 1)
  mask = jnp.ones_like(tokens, bool)
  scanned, stacked = CFG3.replace(scan_layers=True, remat='block'), tf.stack_layers(params, 3)
  plain = lambda p: tf.lm_logits(p, CFG3, tokens, mask, head_slice=slice(4, -1))
  shared = lambda p: tf.shared_prompt_logits(p, scanned, tokens, mask, 5, 3)
  weights = jax.random.normal(jax.random.key(2), (6, 3, CFG3.vocab_size))
  (want, want_grad), (got, got_grad) = (jax.jit(lambda p, f=f: (f(p), jax.grad(lambda q: (f(q) * weights).sum())(p)))(x)
                                        for f, x in ((plain, params), (shared, stacked)))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  for a, b in zip(jax.tree.leaves(tf.unstack_layers(got_grad, 3)), jax.tree.leaves(want_grad)):
    np.testing.assert_allclose(a, b, atol=1e-5 * float(jnp.abs(b).max()), rtol=0)


def test_scanned_reward_ensemble_matches_per_layer():
  rm, rm_scan = RewardModel(CFG3, 2, 'full'), RewardModel(CFG3.replace(scan_layers=True), 2, 'full')
  params = jax.jit(lambda k: randomize(rm.init(k), seed=3))(jax.random.key(2))
  tokens, mask = pad_rows(ROWS, 9, 'left')
  stacked = jax.vmap(lambda p: tf.stack_layers(p, 3))(params)  # per member: [K, L, ...]
  assert stacked['backbone']['layers']['attn_norm']['scale'].shape == (2, 3, 32)
  np.testing.assert_allclose(jax.jit(rm_scan.apply)(stacked, tokens, mask), jax.jit(rm.apply)(params, tokens, mask),
                             atol=1e-5, rtol=0)


def test_scanned_layer_axis_is_named_and_not_decayed():
  lm_shapes = jax.eval_shape(lambda k: tf.init_lm(k, CFG3.replace(scan_layers=True)), jax.random.key(0))
  axes = partitioning.logical_axes(lm_shapes)['backbone']
  assert axes['layers']['attn']['qkv']['kernel'] == ('layers', 'embed', 'qkv')
  assert axes['layers']['mlp_norm']['scale'] == ('layers', 'norm')
  assert axes['embed']['embedding'] == ('vocab', 'embed')
  rm_shapes = jax.eval_shape(RewardModel(CFG3.replace(scan_layers=True), 2, 'full').init, jax.random.key(0))
  rm_axes = partitioning.logical_axes(rm_shapes)['backbone']['layers']
  assert rm_axes['mlp']['down']['kernel'] == ('ensemble', 'layers', 'mlp', 'embed')
  # AdamW's weight decay: on the stacked kernels, not on the stacked norm scales [L, D].
  mask = optim._decay_mask(lm_shapes)['backbone']['layers']
  assert mask['attn']['qkv']['kernel'] and not mask['attn_norm']['scale']


def test_model_section_options_reach_the_model_config_and_are_checked():
  section = C.model('tiny', remat='block', scan_layers=True, param_dtype='bfloat16')
  mc = C.model_config(section, vocab_size=64)
  assert (mc.remat, mc.scan_layers, mc.param_dtype, mc.dtype) == ('block', True, 'bfloat16', 'float32')
  for field, bad in (('remat', 'full'), ('scan_layers', 1), ('dtype', 'float16')):
    with pytest.raises(C.ConfigError, match=f'{field}={bad!r}: expected'):
      C.model_config(C.model('tiny', **{field: bad}), vocab_size=64)
