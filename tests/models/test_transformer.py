"""Transformer: parameter counts, a numpy reference, padding invariance, the KV cache."""
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmjax.models import transformer as tf
from rmjax.models.config import get_size
from rmjax.models.reward_model import RewardModel
from tests.models import reference
from tests.models.conftest import pad_rows, randomize

ROWS = [np.array([5, 9, 17, 3, 44]), np.array([7, 1, 63]), np.array([12, 30, 2, 8, 8, 50, 21]), np.array([33])]


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _layer_count(d, f, h, kv, hd):
  """One llama block: qkv + out + gate_up + down + two RMSNorm scales (no biases)."""
  return d * (h + 2 * kv) * hd + h * hd * d + d * 2 * f + f * d + 2 * d


def test_parameter_counts_tiny_and_small():
  # tiny: embedding 512*64 = 32,768; block 64*128 + 64*64 + 64*344 + 172*64 + 128 = 45,440; final norm 64.
  assert _layer_count(64, 172, 4, 2, 16) == 45_440
  for name, rm_count in (('tiny', 32_768 + 2 * 45_440 + 64), ('small', 4096 * 256 + 6 * _layer_count(256, 688, 8, 4, 32) + 256)):
    config = get_size(name)
    rm = RewardModel(config)
    shapes = jax.eval_shape(rm.init, jax.random.key(0))
    assert _count(shapes['backbone']) == rm_count
    assert _count(shapes['reward_head']) == config.width + 1
    lm = jax.eval_shape(lambda k: tf.init_lm(k, config), jax.random.key(0))
    assert _count(lm) == rm_count + config.vocab_size * config.width  # the untied head
    tied = jax.eval_shape(lambda k: tf.init_lm(k, config.replace(tie_embeddings=True)), jax.random.key(0))
    assert _count(tied) == rm_count
  assert _count(jax.eval_shape(RewardModel(get_size('tiny')).init, jax.random.key(0))['backbone']) == 123_712
  assert 5.39e6 < 4096 * 256 + 6 * _layer_count(256, 688, 8, 4, 32) + 256 < 5.41e6


@pytest.fixture(scope='module')
def model(family_config):
  params = randomize(jax.jit(tf.init_lm, static_argnums=1)(jax.random.key(0), family_config), seed=1)
  return family_config, params, jax.jit(tf.lm_logits, static_argnums=1)


def test_matches_numpy_reference_with_left_and_right_padding(model):
  """Padded batches (right, T=8; left, T=11: different pad amounts per row) vs the float64
  numpy reference on each unpadded row: |diff| < 1e-4 on real tokens (fp32 rounding)."""
  config, params, logits_fn = model
  refs = [reference.lm_logits(params, config, r) for r in ROWS]
  out = {}
  for side, length in (('right', 8), ('left', 11)):
    tokens, mask = pad_rows(ROWS, length, side)
    logits = np.asarray(logits_fn(params, config, tokens, mask))
    assert np.all(np.isfinite(logits))
    for i, r in enumerate(ROWS):
      real = logits[i][np.asarray(mask[i])]
      np.testing.assert_allclose(real, refs[i], atol=1e-4, rtol=0)
      out.setdefault(i, []).append(real)
  # The two paddings agree with each other more tightly than with the reference (same fp32 ops).
  for i in out:
    np.testing.assert_allclose(out[i][0], out[i][1], atol=1e-5, rtol=0)


def test_all_padding_row_is_finite(model):
  config, params, logits_fn = model
  tokens, mask = pad_rows([ROWS[0], np.array([], np.int32)], 8, 'right')
  logits = logits_fn(params, config, tokens, mask)
  assert np.all(np.isfinite(np.asarray(logits)))


def test_cache_prefill_and_decode_match_full_forward(model):
  """Left-padded prompts prefilled in one call, then 3 tokens one at a time: each step's
  logits equal the no-cache forward on the whole sequence (atol 1e-5)."""
  config, params, logits_fn = model
  prompts = [r[:3] for r in ROWS[:3]] + [ROWS[3]]
  p_tokens, p_mask = pad_rows(prompts, 4, 'left')
  cont = jnp.asarray([[4, 6, 8], [1, 2, 3], [60, 61, 62], [9, 9, 9]], jnp.int32)
  full_tokens = jnp.concatenate([p_tokens, cont], axis=1)
  full_mask = jnp.concatenate([p_mask, jnp.ones_like(cont, bool)], axis=1)
  want = np.asarray(logits_fn(params, config, full_tokens, full_mask))

  decode = jax.jit(tf.lm_decode, static_argnums=1)
  cache = tf.init_cache(config, 4, 8)
  # keys slot-last, values slot-major (the layouts the decode step's two products read)
  assert cache.k[0].shape == (4, config.num_kv_heads, config.head_width, 8)
  assert cache.v[0].shape == (4, config.num_kv_heads, 8, config.head_width)
  got, cache = decode(params, config, p_tokens, p_mask, tf.default_positions(p_mask), cache)
  np.testing.assert_allclose(np.asarray(got)[np.asarray(p_mask)], want[:, :4][np.asarray(p_mask)], atol=1e-5)
  pos = p_mask.sum(1).astype(jnp.int32)
  for s in range(3):
    step, cache = decode(params, config, cont[:, s:s + 1], jnp.ones((4, 1), bool), (pos + s)[:, None], cache)
    np.testing.assert_allclose(np.asarray(step)[:, 0], want[:, 4 + s], atol=1e-5)
  assert int(cache.index) == 7
  np.testing.assert_array_equal(np.asarray(cache.valid)[:, :7], np.asarray(full_mask))


def test_head_slice_gives_the_logits_of_those_positions(model):
  """`head_slice` runs the LM head on a slice of the positions: the same logits as the full
  forward sliced afterwards (atol 1e-6: the same matmul on fewer rows), and the head's dot
  has only those rows."""
  config, params, logits_fn = model
  tokens, mask = pad_rows(ROWS, 11, 'left')
  full = np.asarray(logits_fn(params, config, tokens, mask))
  for cut in (slice(4, -1), slice(-1, None), slice(None, -1)):
    got = np.asarray(jax.jit(lambda p, t, m, c=cut: tf.lm_logits(p, config, t, m, head_slice=c))(params, tokens, mask))
    np.testing.assert_allclose(got, full[:, cut], atol=1e-6, rtol=0)
  # `tiny`, whose vocabulary (512) no other matmul has as its output width: the head's dot has 4 rows.
  tiny = get_size('tiny')
  abstract = jax.eval_shape(lambda: tf.init_lm(jax.random.key(0), tiny))
  jaxpr = jax.make_jaxpr(lambda p, t, m: tf.lm_logits(p, tiny, t, m, head_slice=slice(-1, None)))(abstract, tokens,
                                                                                                  mask)
  head_dots = [e.outvars[0].aval.shape for e in jaxpr.eqns
               if e.primitive.name == 'dot_general' and e.outvars[0].aval.shape[-1] == tiny.vocab_size]
  assert head_dots and all(np.prod(shape[:-1]) == len(ROWS) for shape in head_dots), head_dots


def score_blocks(fn, *args) -> list[tuple[int, int]]:
  """(query rows, keys) of every score product `attend` forms while `fn(*args)` is traced."""
  shapes, scores = [], tf._scores
  def recording(q, k, bias, keys='bksd'):
    shapes.append((q.shape[3], k.shape[2 if keys == 'bksd' else 3]))
    return scores(q, k, bias, keys)
  jax.clear_caches()  # traces cached from earlier calls would not call `_scores` again
  with mock.patch.object(tf, '_scores', recording):
    jax.make_jaxpr(fn)(*args)
  return shapes


@pytest.mark.parametrize('block', [2, tf.QUERY_BLOCK])
def test_shared_prompt_logits_equal_the_plain_forward_and_its_gradients(model, block, monkeypatch):
  """Groups of k = 3 rows sharing a left-padded prompt (lengths 3, 5, 1), responses that end early
  (mask False after): `shared_prompt_logits` gives the plain forward's response logits (atol 1e-5
  on the positions of real tokens) and, through a loss on those logits, the same parameter
  gradients (within 1e-5 of the largest entry), with both passes in causal query blocks (of 2: the
  prompt's [0, 2), [2, 4), [4, 5), the responses' [0, 2), [2, 3) after the 5 prompt slots) or in
  one each; the prompts' dots run on one row per group."""
  monkeypatch.setattr(tf, 'QUERY_BLOCK', block)
  config, params, logits_fn = model
  k, prompt_len = 3, 5
  prompts, prompt_mask = pad_rows([ROWS[0][:3], ROWS[2][:5], ROWS[3]], prompt_len, 'left')
  responses, response_mask = pad_rows([r[:n] for r in ROWS[:3] for n in (4, 2, 3)], 4, 'right')
  tokens = jnp.concatenate([jnp.repeat(prompts, k, 0), responses], 1)
  mask = jnp.concatenate([jnp.repeat(prompt_mask, k, 0), response_mask], 1)
  real = np.asarray(mask[:, prompt_len - 1:-1])
  weights = jax.random.normal(jax.random.key(3), (9, 4, config.vocab_size)) * real[..., None]
  plain = lambda p: tf.lm_logits(p, config, tokens, mask, head_slice=slice(prompt_len - 1, -1))
  shared = lambda p: tf.shared_prompt_logits(p, config, tokens, mask, prompt_len, k)
  (want, want_grad), (got, got_grad) = (
      jax.jit(lambda p, f=f: (f(p), jax.grad(lambda q: (f(q) * weights).sum())(p)))(params) for f in (plain, shared))
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5, rtol=0)
  for g, w in zip(jax.tree.leaves(got_grad), jax.tree.leaves(want_grad)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-5 * float(jnp.abs(w).max()), rtol=0)
  jaxpr = jax.make_jaxpr(shared)(params)
  mlp_rows = {int(np.prod(e.outvars[0].aval.shape[:-1])) for e in jaxpr.eqns if e.primitive.name == 'dot_general'
              and e.invars[1].aval.shape == (config.mlp_width, config.width)}  # the MLP's `down` dots
  assert mlp_rows == {3 * prompt_len, 9 * 3}  # 3 prompts once; 9 rows × the first 3 response tokens
  if block == 2:
    prompt_blocks, response_blocks = [(2, 2), (2, 4), (1, 5)], [(2, 7), (1, 8)]
  else:
    prompt_blocks, response_blocks = [(5, 5)], [(3, 8)]
  assert score_blocks(shared, params) == prompt_blocks * config.num_layers + response_blocks * config.num_layers
  with pytest.raises(ValueError, match='groups of group_size=2'):
    tf.shared_prompt_logits(params, config, tokens, mask, prompt_len, 2)
  with pytest.raises(ValueError, match='prompt_len=9'):
    tf.shared_prompt_logits(params, config, tokens, mask, 9, k)


def test_bad_inputs_raise():
  config = get_size('tiny')
  params = jax.eval_shape(lambda k: tf.init_lm(k, config), jax.random.key(0))
  with pytest.raises(ValueError, match='mask must have the shape'):
    tf.lm_logits(params, config, jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 4), bool))
  with pytest.raises(ValueError, match=r'tokens must be \[B, T\]'):
    tf.lm_logits(params, config, jnp.zeros((3,), jnp.int32), jnp.ones((3,), bool))
  with pytest.raises(ValueError, match='integer token ids'):
    tf.lm_logits(params, config, jnp.zeros((2, 3)), jnp.ones((2, 3), bool))
  with pytest.raises(ValueError, match='max_len'):
    tf.init_cache(config, 2, config.max_len + 1)


def _plain_attention(q, k, v, bias):
  """softmax(q kᵀ + bias) v by jax.nn.softmax, differentiated by autodiff: the reference for `attend`."""
  s = jnp.einsum('bkgtd,bksd->bkgts', q, k) + bias
  return jnp.einsum('bkgts,bksd->bkgtd', jax.nn.softmax(s, axis=-1), v)


@pytest.mark.parametrize('blocks', [None, ((0, 2, 2), (2, 4, 4), (4, 5, 5))])
def test_attend_value_and_gradients_match_plain_softmax_attention(blocks):
  """`attend` (custom VJP, weights recomputed in the backward) against autodiff through plain
  softmax attention: values and the gradients of q, k, v within 1e-5 (float32; both are
  O(1)), for 2 KV groups of 2 queries, causal keys, left padding and an all-padding row, in one
  block and in causal query blocks [0, 2), [2, 4), [4, 5) (each against the keys up to its end;
  the queries with no real key, whose output is garbage either way, get a zero cotangent).
  Its pullback keeps no `[T, S]` array."""
  b, kvh, g, t, hd = 3, 2, 2, 5, 4
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((b, kvh, g, t, hd), (b, kvh, t, hd), (b, kvh, t, hd)))
  real = np.ones((b, t), bool)
  real[1, :2] = False  # left padding
  real[2] = False      # no real key at all: uniform weights, finite
  allowed = real[:, None, :] & np.tril(np.ones((t, t), bool))[None]
  bias = jnp.asarray(np.where(allowed, 0.0, np.finfo(np.float32).min)[:, None, None], jnp.float32)
  answered = allowed.any(-1)[:, None, None, :, None]  # [B, 1, 1, T, 1]: the query has a real key
  if blocks is None:
    answered = np.ones_like(answered)
  cot = jnp.asarray(rng.normal(size=(b, kvh, g, t, hd)) * answered, jnp.float32)
  blocked = lambda q, k, v, bias: tf.attend(q, k, v, bias, blocks)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v, bias) * cot)
  np.testing.assert_allclose(np.where(answered, blocked(q, k, v, bias), 0),
                             np.where(answered, _plain_attention(q, k, v, bias), 0), atol=1e-5, rtol=0)
  got = jax.grad(loss(blocked), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(_plain_attention), argnums=(0, 1, 2))(q, k, v)
  for name, x, y in zip('qkv', got, want):
    assert np.all(np.isfinite(x)), name
    np.testing.assert_allclose(x, y, atol=1e-5, rtol=0, err_msg=name)
  _, pullback = jax.vjp(blocked, q, k, v, bias)
  assert all(x.shape[-2:] != (t, t) or x.shape[1] == 1 for x in jax.tree_util.tree_leaves(pullback))


def test_query_blocks_leave_real_rows_and_gradients_unchanged(model, monkeypatch):
  """No-cache forward in causal query blocks of 3 (rows of 11 tokens: blocks [0, 3) .. [9, 11),
  each against the keys up to its end) against one block, rows left and right padded: the logits
  of real tokens agree within 1e-5, the gradient of their summed log-probability of token 0
  within 5e-6 of its largest entry (float32: entries reach 33 and are sums over tokens taken in
  another order, measured up to 1.5e-6 of it; a masked key let in would move them by O(1))."""
  config, params, _ = model
  assert tf.query_blocks(70) == [(0, 32), (32, 64), (64, 70)]  # CPU, QUERY_BLOCK = 32
  assert tf.query_blocks(32) == [(0, 32)]

  def run(block):
    monkeypatch.setattr(tf, 'QUERY_BLOCK', block)
    tokens, mask = (jnp.concatenate(x) for x in zip(pad_rows(ROWS[:2], 11, 'left'), pad_rows(ROWS[2:], 11, 'right')))
    logits = lambda p: tf.lm_logits(p, config, tokens, mask)
    loss = lambda p: jnp.sum(jax.nn.log_softmax(logits(p))[..., 0] * mask)
    return jax.jit(logits)(params)[mask], jax.jit(jax.grad(loss))(params), score_blocks(jax.grad(loss), params)

  (l3, g3, blocks3), (l1, g1, blocks1) = run(3), run(1000)
  # the forward's blocks in every layer, then the backward's recomputation of them in every layer
  assert blocks3 == [(3, 3), (3, 6), (3, 9), (2, 11)] * 2 * config.num_layers
  assert blocks1 == [(11, 11)] * 2 * config.num_layers
  np.testing.assert_allclose(l3, l1, atol=1e-5, rtol=0)
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g1))
  for a, b in zip(jax.tree.leaves(g3), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, atol=5e-6 * scale, rtol=0)
