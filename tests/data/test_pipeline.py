"""Batching: layouts by hand, truncation, resume-by-step, process shares, eval coverage."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from rmjax.data import builders as B
from rmjax.data import pipeline as P
from rmjax.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
EOS, BOS = TOK.eos_id, TOK.bos_id


def ids(text):
  """Byte ids by a route independent of the tokenizer: UTF-8 bytes + 3."""
  return list(np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int64) + 3)


def pair_source(n):
  return [{'prompt_id': i // 2, 'prompt': f'p{i}:', 'chosen': f' good{i}', 'rejected': f' bad{"d" * (i % 3)}{i}'}
          for i in range(n)]


# --------------------------------------------------------------------------- layouts


def test_pair_layout_by_hand():
  tokens, mask, resp = P.encode_prompt_response(TOK, 'ab', 'c', seq_len=6)
  np.testing.assert_array_equal(tokens, [100, 101, 102, EOS, 0, 0])
  np.testing.assert_array_equal(mask, [1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(resp, [0, 0, 1, 1, 0, 0])
  tokens, _, resp = P.encode_prompt_response(TOK, 'ab', 'c', seq_len=6, add_bos=True)
  np.testing.assert_array_equal(tokens, [BOS, 100, 101, 102, EOS, 0])
  np.testing.assert_array_equal(resp, [0, 0, 0, 1, 1, 0])
  assert tokens.dtype == np.int32 and mask.dtype == bool and resp.dtype == bool


def test_truncation_cuts_prompt_from_left_then_response():
  # 'abcdef' + 'xy' + eos = 9 tokens into 5: the prompt loses 'abcd'.
  tokens, mask, resp = P.encode_prompt_response(TOK, 'abcdef', 'xy', seq_len=5)
  np.testing.assert_array_equal(tokens, ids('efxy') + [EOS])
  np.testing.assert_array_equal(resp, [0, 0, 1, 1, 1])
  assert mask.all()
  # The response alone is too long: its end and the eos are kept; bos stays first.
  tokens, _, resp = P.encode_prompt_response(TOK, 'ab', 'uvwxyz', seq_len=5, add_bos=True)
  np.testing.assert_array_equal(tokens, [BOS] + ids('xyz') + [EOS])
  np.testing.assert_array_equal(resp, [0, 1, 1, 1, 1])


@given(p=st.integers(0, 12), r=st.integers(0, 12), seq_len=st.integers(2, 20), bos=st.booleans())
def test_truncation_properties(p, r, seq_len, bos):
  prompt, response = 'p' * p, 'r' * r
  tokens, mask, resp = P.encode_prompt_response(TOK, prompt, response, seq_len=seq_len, add_bos=bos)
  full = ids(prompt) + ids(response) + [EOS]
  budget = seq_len - bos
  kept = full[-budget:] if len(full) > budget else full
  n_real = len(kept) + bos
  assert mask.sum() == n_real and mask[:n_real].all()
  np.testing.assert_array_equal(tokens[bos:n_real], kept)
  assert tokens[n_real - 1] == EOS and (tokens[n_real:] == TOK.pad_id).all()
  assert resp.sum() == min(r + 1, budget)
  assert (tokens[resp] != ids('p')[0]).all()  # no prompt token is marked as response.


def test_document_layout_by_hand():
  tokens, mask = P.encode_document(TOK, 'abc', seq_len=6)
  np.testing.assert_array_equal(tokens, ids('abc') + [EOS, 0, 0])
  np.testing.assert_array_equal(mask, [1, 1, 1, 1, 0, 0])
  tokens, mask = P.encode_document(TOK, 'abc', seq_len=3)  # cut on the right: eos falls off.
  np.testing.assert_array_equal(tokens, ids('abc'))
  tokens, _ = P.encode_document(TOK, 'abc', seq_len=4, add_bos=True)
  np.testing.assert_array_equal(tokens, [BOS] + ids('abc'))


# --------------------------------------------------------------------------- PairBatches


def test_pair_batch_contents_match_source():
  src = pair_source(10)
  batches = P.PairBatches(src, TOK, seq_len=16, global_batch_size=4, seed=3)
  assert len(batches) == 2
  batch = batches[1]
  assert batch['chosen_tokens'].shape == (4, 16) and batch['chosen_tokens'].dtype == np.int32
  assert batch['prompt_id'].dtype == np.int64 and batch['index'].dtype == np.int64
  assert batch['weight'].dtype == np.float32 and (batch['weight'] == 1).all()
  assert 'gold_chosen' not in batch
  for row, i in enumerate(batch['index']):
    ex = src[i]
    for side in ('chosen', 'rejected'):
      expected = ids(ex['prompt'] + ex[side]) + [EOS]
      np.testing.assert_array_equal(batch[f'{side}_tokens'][row, :len(expected)], expected)
      assert batch[f'{side}_mask'][row].sum() == len(expected)
      assert batch[f'{side}_response_mask'][row].sum() == len(ids(ex[side])) + 1
    assert batch['prompt_id'][row] == ex['prompt_id']


def test_epochs_are_permutations_reshuffled():
  batches = P.PairBatches(pair_source(12), TOK, seq_len=16, global_batch_size=4, seed=0)
  epochs = [np.concatenate([batches[e * 3 + b]['index'] for b in range(3)]) for e in range(3)]
  for order in epochs:
    assert sorted(order) == list(range(12))
  assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
  assert not np.array_equal(epochs[0], np.arange(12))
  # Epoch seeds come from (seed, epoch), not seed + epoch: epoch 1 of seed 0 != epoch 0 of seed 1.
  other = P.PairBatches(pair_source(12), TOK, seq_len=16, global_batch_size=4, seed=1)
  assert not np.array_equal(epochs[1], np.concatenate([other[b]['index'] for b in range(3)]))
  assert P.epoch_seed(0, 1) != P.epoch_seed(1, 0)


def test_batch_of_a_step_does_not_depend_on_history():
  make = lambda: P.PairBatches(pair_source(10), TOK, seq_len=16, global_batch_size=4, seed=11)  # noqa: E731
  direct = make()[7]
  walked = make()
  for step in (3, 0, 9, 1, 2, 5, 4, 6):
    walked[step]
  again = walked[7]
  for k in direct:
    np.testing.assert_array_equal(direct[k], again[k])


@pytest.mark.parametrize('eval_mode', [False, True])
def test_process_shares_concatenate_to_global_batch(eval_mode):
  kw = dict(seq_len=16, global_batch_size=4, seed=5)
  if eval_mode:
    kw.update(shuffle=False, drop_remainder=False)
  whole = P.PairBatches(pair_source(10), TOK, **kw)
  shares = [P.PairBatches(pair_source(10), TOK, process_index=p, process_count=2, **kw) for p in (0, 1)]
  assert len(shares[0]) == len(whole)
  for step in range(2 * len(whole)):
    full, parts = whole[step], [s[step] for s in shares]
    assert parts[0]['index'].shape == (2,)
    for k in full:
      np.testing.assert_array_equal(full[k], np.concatenate([p[k] for p in parts]))


def test_eval_mode_covers_every_example_once():
  batches = P.PairBatches(pair_source(10), TOK, seq_len=16, global_batch_size=4, seed=0, shuffle=False,
                          drop_remainder=False)
  assert len(batches) == 3
  got = list(batches)
  real = np.concatenate([b['index'][b['weight'] > 0] for b in got])
  np.testing.assert_array_equal(real, np.arange(10))
  last = got[-1]
  np.testing.assert_array_equal(last['weight'], [1, 1, 0, 0])
  np.testing.assert_array_equal(last['index'], [8, 9, -1, -1])
  np.testing.assert_array_equal(last['chosen_tokens'][2], got[0]['chosen_tokens'][0])  # a real row copy.
  assert last['chosen_mask'][2:].any(axis=1).all()


def test_shuffled_padded_epochs_cover_every_example():
  batches = P.PairBatches(pair_source(10), TOK, seq_len=16, global_batch_size=4, seed=2, drop_remainder=False)
  for epoch in range(2):
    b = [batches[epoch * 3 + i] for i in range(3)]
    real = np.concatenate([x['index'][x['weight'] > 0] for x in b])
    assert sorted(real) == list(range(10))
    assert (np.concatenate([x['weight'] for x in b]) == 0).sum() == 2


@pytest.fixture(scope='module')
def synthetic_source(tmp_path_factory):
  def cands(split):
    for i in range(16):
      yield i % 3, f'q{i % 3}', f' x{i}', f' y{i}', float(i), 7.5
  b = B.SyntheticPreferences(data_dir=tmp_path_factory.mktemp('pipe'), key='w', candidates=cands,
                             split_sizes={'train': 16})
  b.download_and_prepare()
  return b.as_data_source('train')


def test_tfds_source_with_gold_scores(synthetic_source):
  batches = P.PairBatches(synthetic_source, TOK, seq_len=12, global_batch_size=8, seed=0)
  batch = batches[1]
  assert batch['gold_chosen'].dtype == np.float32 and batch['flipped'].dtype == bool
  for row, i in enumerate(batch['index']):
    gold_x = float(i)
    assert batch['gold_chosen'][row] == max(gold_x, 7.5) and batch['gold_rejected'][row] == min(gold_x, 7.5)
    chosen = f' x{i}' if gold_x > 7.5 else f' y{i}'
    expected = ids(f'q{i % 3}' + chosen) + [EOS]
    np.testing.assert_array_equal(batch['chosen_tokens'][row, :len(expected)], expected)


def test_pair_errors():
  src = pair_source(6)
  with pytest.raises(ValueError, match=r"lack fields \['rejected'\]"):
    P.PairBatches([{'prompt_id': 0, 'prompt': 'p', 'chosen': 'c'}], TOK, seq_len=8, global_batch_size=1, seed=0)
  with pytest.raises(ValueError, match='not divisible by process_count=4'):
    P.PairBatches(src, TOK, seq_len=8, global_batch_size=6, seed=0, process_count=4)
  with pytest.raises(ValueError, match='no full batch'):
    P.PairBatches(src, TOK, seq_len=8, global_batch_size=8, seed=0)
  with pytest.raises(ValueError, match='process_index=2'):
    P.PairBatches(src, TOK, seq_len=8, global_batch_size=2, seed=0, process_index=2, process_count=2)
  with pytest.raises(ValueError, match='seq_len=1'):
    P.PairBatches(src, TOK, seq_len=1, global_batch_size=2, seed=0)
  with pytest.raises(ValueError, match='empty'):
    P.PairBatches([], TOK, seq_len=8, global_batch_size=2, seed=0)
  with pytest.raises(ValueError, match='non-negative integer'):
    P.PairBatches(src, TOK, seq_len=8, global_batch_size=2, seed=0)[-1]
  with pytest.raises(ValueError, match='must be str or bytes'):
    P.PairBatches([{'prompt_id': 0, 'prompt': 3, 'chosen': 'c', 'rejected': 'r'}], TOK, seq_len=8,
                  global_batch_size=1, seed=0)[0]


# --------------------------------------------------------------------------- SequenceBatches


def test_sequence_batches_pretraining():
  docs = [{'text': 'a' * (i + 1)} for i in range(6)]
  batches = P.SequenceBatches(docs, TOK, seq_len=5, global_batch_size=3, seed=0, shuffle=False)
  b = batches[0]
  assert set(b) == {'tokens', 'mask', 'loss_mask', 'index', 'weight'}
  np.testing.assert_array_equal(b['index'], [0, 1, 2])
  np.testing.assert_array_equal(b['tokens'][1], ids('aa') + [EOS, 0, 0])
  np.testing.assert_array_equal(b['loss_mask'][1], [0, 1, 1, 0, 0])
  np.testing.assert_array_equal(b['loss_mask'], b['mask'] & (np.arange(5) > 0))
  b = batches[1]  # 'aaaaa' + eos is cut at 5 tokens.
  np.testing.assert_array_equal(b['tokens'][1], ids('aaaaa'))
  assert len(batches) == 2 and batches[2]['index'].tolist() == [0, 1, 2]


def test_sequence_batches_supervised():
  rows = pair_source(4)
  batches = P.SequenceBatches(rows, TOK, seq_len=16, global_batch_size=2, seed=0, shuffle=False,
                              prompt_field='prompt', response_field='chosen')
  b = batches[0]
  n_prompt, n_resp = len(ids(rows[0]['prompt'])), len(ids(rows[0]['chosen'])) + 1
  expected = np.zeros(16, bool)
  expected[n_prompt:n_prompt + n_resp] = True
  np.testing.assert_array_equal(b['loss_mask'][0], expected)
  with pytest.raises(ValueError, match='give both'):
    P.SequenceBatches(rows, TOK, seq_len=16, global_batch_size=2, seed=0, prompt_field='prompt')
  with pytest.raises(ValueError, match=r"lack fields \['text'\]"):
    P.SequenceBatches(rows, TOK, seq_len=16, global_batch_size=2, seed=0)
  # A response that fills the whole sequence: position 0 is never a target.
  b = P.SequenceBatches([{'p': 'q', 'r': 'xyzw'}], TOK, seq_len=3, global_batch_size=1, seed=0,
                        prompt_field='p', response_field='r')[0]
  np.testing.assert_array_equal(b['loss_mask'][0], [0, 1, 1])
