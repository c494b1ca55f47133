"""Re-tokenization for a reward model with another tokenizer (PITFALLS #14): byte policy, BPE reward model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from rmjax.data import ByteTokenizer, Grammar, HFTokenizer, encode_prompt_response
from rmjax.models.config import ModelConfig
from rmjax.models.reward_model import RewardModel
from rmjax.rl import retokenize, trainer
from rmjax.train import checkpoint
from tests.rl.test_trainer import _config

BYTE = ByteTokenizer()
LP, N = 12, 10


@pytest.fixture(scope='module')
def bpe():
  """A byte-level BPE tokenizer (vocab 300) trained here on the synthetic language."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(Grammar.random(0).documents(200, seed=0), trainers.BpeTrainer(
      vocab_size=300, special_tokens=['<pad>', '<s>', '</s>'], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  return HFTokenizer.from_tokenizer(tok)


@pytest.fixture(scope='module')
def bpe_rm(bpe):
  rm = RewardModel(ModelConfig(vocab_size=bpe.vocab_size, width=16, mlp_width=32, num_layers=1, num_heads=2,
                               num_kv_heads=1, max_len=64), num_members=2)
  return rm, jax.jit(rm.init)(jax.random.key(0))


def _rollout_rows():
  """Byte rows as a rollout lays them out: left-padded prompt [LP], right-padded response [N]."""
  cases = [('vo zuz oz', 'ba daps', True), ('fibil', 'vaboka fib', False), ('zetob fopa', '', True)]
  tokens = np.zeros((len(cases), LP + N), np.int32)
  mask = np.zeros((len(cases), LP + N), bool)
  for i, (p, r, finished) in enumerate(cases):
    pi = BYTE.encode(p)[-LP:]
    ri = (BYTE.encode(r) + ([BYTE.eos_id] if finished else []))[:N]
    tokens[i, LP - len(pi):LP], mask[i, LP - len(pi):LP] = pi, True
    tokens[i, LP:LP + len(ri)], mask[i, LP:LP + len(ri)] = ri, True
  return cases, tokens, mask


def test_rows_are_laid_out_as_the_reward_model_was_trained(bpe):
  cases, tokens, mask = _rollout_rows()
  width = 16
  new_t, new_m = retokenize.retokenize(tokens, mask, LP, BYTE, bpe, width)
  for i, (p, r, finished) in enumerate(cases):
    if finished:  # the reward-model pipeline's own layout: prompt + response + eos, right-padded
      want_t, want_m, _ = encode_prompt_response(bpe, p, r, width)
    else:         # a truncated response gets no eos
      ids = bpe.encode(p) + bpe.encode(r)
      want_t, want_m = np.full(width, bpe.pad_id), np.arange(width) < len(ids)
      want_t[:len(ids)] = ids
    np.testing.assert_array_equal(new_t[i], want_t)
    np.testing.assert_array_equal(new_m[i], want_m)
  # BPE ids, not bytes: fewer tokens than the byte rows.
  assert new_m.sum() < mask.sum()
  # Too long for `width`: the last tokens are kept (the prompt is cut first), eos included.
  short_t, short_m = retokenize.retokenize(tokens, mask, LP, BYTE, bpe, 4)
  full = bpe.encode(cases[0][0]) + bpe.encode(cases[0][1]) + [bpe.eos_id]
  np.testing.assert_array_equal(short_t[0], full[-4:])
  assert short_m.all()


def test_scorer_under_jit_and_vmap_scores_the_retokenized_rows(bpe, bpe_rm):
  rm, params = bpe_rm
  _, tokens, mask = _rollout_rows()
  wrapped = retokenize.retokenizing_scorer(rm.apply, BYTE, bpe, prompt_len=LP, width=16)
  want = jax.jit(rm.apply)(params, *retokenize.retokenize(tokens, mask, LP, BYTE, bpe, 16))
  np.testing.assert_allclose(np.asarray(jax.jit(wrapped)(params, tokens, mask)), np.asarray(want), atol=1e-6)
  # Under vmap (as in a population), each member's rows are re-tokenized on their own.
  stacked = jnp.stack([jnp.asarray(tokens), jnp.asarray(tokens[::-1])]), jnp.stack([mask, mask[::-1]])
  both = jax.jit(jax.vmap(wrapped, in_axes=(None, 0, 0)))(params, *stacked)
  np.testing.assert_allclose(np.asarray(both[0]), np.asarray(want), atol=1e-6)
  np.testing.assert_allclose(np.asarray(both[1]), np.asarray(want)[:, ::-1], atol=1e-6)


def test_trainer_loads_a_reward_model_of_another_tokenizer_behind_retokenization(bpe, bpe_rm, tmp_path):
  rm, params = bpe_rm
  for name, tok in (('bpe_rm', bpe), ('byte_rm', BYTE)):
    with checkpoint.Checkpointer(tmp_path / name, max_to_keep=1, async_save=False) as ckpt:
      ckpt.save(0, {'params': params}, {'kind': 'reward_model', 'model': rm.to_dict(), 'tokenizer': tok.to_dict()},
                force=True)
  config = _config('grpo')
  config.reward.path = str(tmp_path / 'bpe_rm')
  cases, tokens, mask = _rollout_rows()
  # The trainer's scorer (the one its iteration calls) reads the BPE checkpoint's tokenizer and
  # scores the decoded texts as that tokenizer encodes them, `prompt_len + max_new_tokens` wide.
  scorer, loaded, _ = trainer.reward_scorer(config.reward, BYTE, LP, N)
  rows = [bpe.encode(p) + bpe.encode(r) + ([bpe.eos_id] if finished else []) for p, r, finished in cases]
  t, m = np.zeros((len(rows), 24), np.int32), np.zeros((len(rows), 24), bool)
  for i, ids in enumerate(rows):  # right-padded to another width: scores do not depend on padding
    t[i, :len(ids)], m[i, :len(ids)] = ids, True
  got = jax.jit(scorer)(loaded, tokens, mask)
  np.testing.assert_allclose(np.asarray(got), np.asarray(jax.jit(rm.apply)(params, t, m)), atol=1e-5)
  # Re-tokenization is off when the tokenizers agree: the byte checkpoint scores the byte ids as given.
  config.reward.path = str(tmp_path / 'byte_rm')
  plain, _, _ = trainer.reward_scorer(config.reward, BYTE, LP, N)
  assert getattr(plain, '__func__', None) is RewardModel.apply and plain.__self__ == rm
