"""The benchmark's analytic FLOP counts (`benchmarks.common`) against hand-computed values and
against the matmuls of rmjax's own programs, counted from their jaxprs."""
import math

import jax
import jax.extend
import jax.numpy as jnp
import pytest

from benchmarks import common
from rmjax.models import sampling
from rmjax.models import transformer as tf
from rmjax.models.config import get_size


def dot_flops(jaxpr, inside_loop: bool = False) -> dict[bool, int]:
  """Σ 2·|out|·|contracted| over the `dot_general`s of a (closed) jaxpr and the jaxprs it calls
  (primal only), a scan's body counted `length` times; keyed by whether the dot is inside a loop."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  total = {False: 0, True: 0}
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'dot_general':
      (contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total[inside_loop] += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      times = eqn.params.get('length', 1) if eqn.primitive.name == 'scan' else 1
      for k, v in dot_flops(sub, inside_loop or eqn.primitive.name in ('scan', 'while')).items():
        total[k] += times * v
  return total


def test_dense_and_attention_flops_by_hand():
  """tiny: D = 64, F = 172, H = 4, KV = 2, hd = 16. Per token and block:
  qkv 2·64·(4 + 2·2)·16 = 16384, out 2·4·16·64 = 8192, gate+up and down 6·64·172 = 66048;
  attention to 100 keys 4·4·16·100 = 25600. A no-cache forward of 3 rows × 10 tokens with a
  head of width 7 at 2 positions: 3·(10·2·(90624 + 4·4·16·10) + 2·2·64·7) = 5,596,416."""
  s = common.shape('tiny')
  assert common.dense_flops_per_token(s) == 16384 + 8192 + 66048
  assert common.attention_flops(s, 100) == 25600
  assert common.forward_flops(s, 3, 10, 2, 7) == 5_596_416
  assert common.rm_step_flops(s, 2, 10) == 3 * common.forward_flops(s, 4, 10, 1, 1)


@pytest.mark.parametrize('size', ['tiny', 'small'])
def test_forward_flops_equal_the_matmuls_of_rmjaxs_forward(size, monkeypatch):
  """`forward_flops` (every query against all T keys, the LM head at the last position) equals the
  FLOPs of the dots in rmjax's no-cache forward over `[4, 40]` in one attention block exactly;
  in causal query blocks of 16 the attention's share falls to Σ_blocks rows · end / T² of it."""
  s = common.shape(size)
  config = get_size(size, rope_theta=s.rope_theta)
  params = jax.eval_shape(lambda k: tf.init_lm(k, config), jax.random.key(0))
  rows, t = 4, 40
  tokens, mask = jnp.ones((rows, t), jnp.int32), jnp.ones((rows, t), bool)
  forward = lambda p: tf.lm_logits(p, config, tokens, mask, head_slice=slice(-1, None))

  def traced(block):
    monkeypatch.setattr(tf, 'QUERY_BLOCK', block)
    jax.clear_caches()  # the blocks are chosen when tracing
    return dot_flops(jax.make_jaxpr(forward)(params))

  assert traced(1000) == {False: common.forward_flops(s, rows, t, 1, s.vocab), True: 0}
  attention = rows * s.layers * t * common.attention_flops(s, t)
  blocked = attention * (16 * 16 + 16 * 32 + 8 * 40) // (t * t)  # blocks [0,16), [16,32), [32,40)
  assert traced(16)[False] == common.forward_flops(s, rows, t, 1, s.vocab) - attention + blocked


def test_generate_flops_equal_the_samplers_matmuls_but_its_attention_to_empty_slots():
  """`generate_flops` (prefill with the LM head at the last position, then N - 1 decode steps of
  one token against P + n keys) equals the dots of `sampling.sample` once its decode attention,
  which reads all P + N - 1 slots every step, is counted against the filled ones only:
  rmjax's extra is Σ_n (P + N - 1 - (P + n)) keys per step."""
  s = common.shape('tiny')
  config = get_size('tiny', rope_theta=s.rope_theta)
  params = jax.eval_shape(lambda k: tf.init_lm(k, config), jax.random.key(0))
  rows, p, n = 3, 20, 9
  tokens, mask = jnp.ones((rows, p), jnp.int32), jnp.ones((rows, p), bool)
  sample = lambda w: sampling.sample(w, config, tokens, mask, jax.random.key(0), max_new_tokens=n).tokens
  got = dot_flops(jax.make_jaxpr(sample)(params))
  empty = sum(p + n - 1 - (p + k) for k in range(1, n))  # unfilled slots read by the N - 1 steps
  assert got[False] == common.forward_flops(s, rows, p, 1, s.vocab)  # the prefill: one block at P = 20 < 32
  extra = rows * s.layers * common.attention_flops(s, empty)
  assert got[True] + got[False] == common.generate_flops(s, rows, p, n) + extra
