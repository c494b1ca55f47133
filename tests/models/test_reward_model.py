"""Reward models: shapes, last-token reading, batch/padding invariance, ensembles."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmjax.models import ensemble
from rmjax.models.reward_model import RewardModel, last_index
from tests.models import reference
from tests.models.conftest import LLAMA, pad_rows, randomize

K = 3
ROWS = [np.array([5, 9, 17, 3, 44]), np.array([7, 1, 63]), np.array([12, 30, 2, 8, 8, 50, 21]), np.array([33]),
        np.array([2, 4, 6, 8]), np.array([11, 13]), np.array([1, 2, 3, 4, 5, 6]), np.array([40, 41, 42])]


@pytest.fixture(scope='module', params=['full', 'multi_head'])
def rm(request):
  model = RewardModel(LLAMA, num_members=K, kind=request.param)
  params = randomize(jax.jit(model.init)(jax.random.key(0)), seed=2)
  return model, params, jax.jit(model.apply)


def _reference_scores(model, params):
  """[K, B] from the numpy reference: head applied to the hidden state of the last token."""
  members = ensemble.unstack(params) if model.kind == 'full' else [params]
  out = []
  for p in members:
    w, b = np.asarray(p['reward_head']['kernel'], np.float64), np.asarray(p['reward_head']['bias'], np.float64)
    out.append(np.stack([reference.hidden_states(p['backbone'], LLAMA, r)[-1] @ w + b for r in ROWS], axis=1))
  return np.concatenate(out, axis=0)


def test_scores_match_reference_on_both_padding_sides(rm):
  """Right padding (T=9) and left padding (T=12): scores equal the float64 reference at the
  last real token of each row (atol 1e-4)."""
  model, params, apply = rm
  want = _reference_scores(model, params)
  assert want.shape == (K, len(ROWS))
  for side, length in (('right', 9), ('left', 12)):
    tokens, mask = pad_rows(ROWS, length, side)
    got = np.asarray(apply(params, tokens, mask))
    assert got.shape == (K, len(ROWS)) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_scores_do_not_depend_on_batch_size_or_padding_side(rm):
  """PITFALLS #12: batch 8 right-padded vs batch 8 left-padded vs each row alone in a
  batch of 1 (padded to the same T=9): atol 1e-5."""
  model, params, apply = rm
  right = np.asarray(apply(params, *pad_rows(ROWS, 9, 'right')))
  left = np.asarray(apply(params, *pad_rows(ROWS, 9, 'left')))
  np.testing.assert_allclose(left, right, atol=1e-5, rtol=0)
  for i, r in enumerate(ROWS):
    alone = np.asarray(apply(params, *pad_rows([r], 9, 'left' if i % 2 else 'right')))
    np.testing.assert_allclose(alone[:, 0], right[:, i], atol=1e-5, rtol=0)


def test_score_read_at_last_real_token_of_prompt_and_response():
  """A left-padded prompt + right-padded response row is scored at its last real token:
  padding after it, and tokens hidden by the mask, change nothing (exact up to 1e-5)."""
  model = RewardModel(LLAMA, 1, 'full')
  params = randomize(jax.jit(model.init)(jax.random.key(3)), seed=4)
  apply = jax.jit(model.apply)
  tokens = jnp.asarray([[0, 0, 5, 6, 7, 8, 0, 0], [0, 0, 5, 6, 7, 8, 0, 0]], jnp.int32)
  mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 0, 0]] * 2, bool)
  garbage = tokens.at[1].set(jnp.asarray([9, 9, 5, 6, 7, 8, 9, 9]))
  out = np.asarray(apply(params, garbage, mask))
  assert out.shape == (1, 2)
  np.testing.assert_allclose(out[0, 0], out[0, 1], atol=1e-5)
  compact = np.asarray(apply(params, jnp.asarray([[5, 6, 7, 8, 0, 0, 0, 0]] * 2), jnp.asarray([[1] * 4 + [0] * 4] * 2, bool)))
  np.testing.assert_allclose(out, compact, atol=1e-5)
  # An all-padding row scores 0, not NaN.
  empty = np.asarray(apply(params, tokens, jnp.zeros_like(mask)))
  np.testing.assert_array_equal(empty, np.zeros((1, 2), np.float32))


def test_last_index():
  mask = jnp.asarray([[1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1], [1, 0, 1, 0]], bool)
  np.testing.assert_array_equal(np.asarray(last_index(mask)), [1, 2, 3, 2])


def test_full_ensemble_equals_members_applied_alone():
  """Each member of a 'full' ensemble applied as a K=1 model equals its row of the vmapped
  apply (atol 1e-6), and members differ (each has its own init key)."""
  model = RewardModel(LLAMA, num_members=K, kind='full')
  params = jax.jit(model.init)(jax.random.key(5))
  tokens, mask = pad_rows(ROWS[:4], 8, 'right')
  both = np.asarray(jax.jit(model.apply)(params, tokens, mask))
  single = jax.jit(RewardModel(LLAMA, 1, 'full').apply)
  for i, p in enumerate(ensemble.unstack(params)):
    alone = np.asarray(single(ensemble.stack([p]), tokens, mask))
    np.testing.assert_allclose(alone[0], both[i], atol=1e-6, rtol=0)
  emb = params['backbone']['embed']['embedding']
  assert not np.allclose(emb[0], emb[1])
  assert not np.allclose(both[0], both[1])


def test_multi_head_shares_one_backbone():
  model = RewardModel(LLAMA, num_members=K, kind='multi_head')
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  assert shapes['backbone']['embed']['embedding'].shape == (LLAMA.vocab_size, LLAMA.width)
  assert shapes['reward_head']['kernel'].shape == (LLAMA.width, K)
  assert shapes['reward_head']['bias'].shape == (K,)
  full = jax.eval_shape(RewardModel(LLAMA, K, 'full').init, jax.random.key(0))
  assert full['backbone']['embed']['embedding'].shape == (K, LLAMA.vocab_size, LLAMA.width)
  assert full['reward_head']['kernel'].shape == (K, LLAMA.width, 1)


def test_dict_round_trip_and_errors():
  model = RewardModel(LLAMA, num_members=2, kind='multi_head')
  assert RewardModel.from_dict(model.to_dict()) == model
  with pytest.raises(ValueError, match='kind'):
    RewardModel(LLAMA, 2, 'heads')
  with pytest.raises(ValueError, match='num_members'):
    RewardModel(LLAMA, 0)
  with pytest.raises(ValueError, match='expected keys'):
    RewardModel.from_dict({'config': LLAMA.to_dict(), 'members': 2, 'kind': 'full'})
