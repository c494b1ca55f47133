"""RewardBench-style evaluation: metrics against hand-computed values, padding and batch invariance, the job."""
import json

import jax
import numpy as np
import pytest

from rmjax import config as config_lib
from rmjax.data import ByteTokenizer, chat
from rmjax.eval import reward_bench as rb
from rmjax.models import ModelConfig, RewardModel, hf

CONFIG = ModelConfig(vocab_size=300, width=32, mlp_width=64, num_layers=2, num_heads=4, num_kv_heads=2)


def test_ece_and_sections_by_hand():
  # conf = [0.9, 0.8, 0.7, 0.55], correct = [1, 1, 0, 1]; five bins of width 0.1 on [0.5, 1]:
  # ECE = (|1 - .55| + |0 - .7| + |1 - .8| + |1 - .9|) / 4 = 0.3625.
  ece, bins = rb.expected_calibration_error(np.array([0.9, 0.8, 0.3, 0.55]), num_bins=5)
  assert ece == pytest.approx(0.3625, abs=1e-12)
  assert [b['count'] for b in bins] == [1, 1, 1, 1] and bins[1]['accuracy'] == 0.0
  assert rb.expected_calibration_error(np.array([0.5, 0.5]), 2)[0] == pytest.approx(0.5)  # a tie is not correct
  correct = np.array([1, 0, 1, 1, 1, 0, 0, 1], float)
  subsets = ['alpacaeval-easy', 'alpacaeval-easy', 'mt-bench-med', 'math-prm', 'hep-go', 'hep-go', 'hep-cpp', 'mine']
  # Chat: 2 of 3 pooled; Reasoning: mean(math-prm 1/1, hep 1/3) = 2/3; mine -> Other.
  assert rb.section_accuracies(correct, subsets) == pytest.approx({'Chat': 2 / 3, 'Reasoning': 2 / 3, 'Other': 1.0})


def test_evaluate_ensemble_metrics():
  # K=2 members, 3 pairs; raw member margins [1, -1, 2] and [6, 2, -2], normalized by std [1, 2].
  rc = np.array([[1.0, 0.0, 2.0], [5.0, 2.0, 0.0]])
  rr = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 2.0]])
  stats = (np.array([10.0, -3.0]), np.array([1.0, 2.0]))
  r = rb.evaluate(rc, rr, ['a', 'a', 'b'], aggregate='mean', stats=stats)
  # normalized margins: [1, -1, 2] and [3, 1, -1]; mean margins [2, 0, 0.5] -> correct [1, 0, 1].
  assert r['accuracy'] == pytest.approx(2 / 3)
  assert r['subsets']['a']['accuracy'] == 0.5 and r['subsets']['b']['accuracy'] == 1.0
  assert r['disagreement']['sign_disagreement'] == pytest.approx(2 / 3)
  assert r['disagreement']['margin_std'] == pytest.approx(np.mean([1.0, 1.0, 1.5]))
  assert r['disagreement']['member_accuracy'] == pytest.approx([2 / 3, 2 / 3])
  # min over members of normalized scores, with means 0: chosen min [1, 0, 0], rejected min [-0.5, 0, 0].
  zero_mean = (np.zeros(2), stats[1])
  assert rb.evaluate(rc, rr, ['a', 'a', 'b'], aggregate='min', stats=zero_mean)['accuracy'] == pytest.approx(1 / 3)
  md = rb.markdown(r)
  assert '| a | Other | 2 | 0.5000 | 1.0000 | 0.5000 |' in md  # pair 1's members disagree in sign


@pytest.fixture(scope='module')
def ensemble():
  rm = RewardModel(CONFIG, num_members=2)
  return rm, jax.jit(rm.init)(jax.random.key(0))


def test_scores_do_not_depend_on_batch_size_or_padding_side(ensemble):
  """shared/PITFALLS.md #12: batch sizes 1 and 32, left and right padding give the same scores."""
  rm, params = ensemble
  rng = np.random.default_rng(0)
  words = ['alpha', 'beta', 'gamma', 'delta', 'the', 'a']
  prompts = [' '.join(rng.choice(words, rng.integers(1, 5))) for _ in range(40)]
  responses = [' '.join(rng.choice(words, rng.integers(1, 4))) for _ in range(40)]
  tok = ByteTokenizer()
  right = rb.encode(tok, prompts, responses, 48)
  left = rb.encode(tok, prompts, responses, 48, padding_side='left')
  assert (left[1][:, -1]).all() and (right[1][:, 0]).all()
  base = rb.score(rm, params, *right, batch_size=32)
  assert base.shape == (2, 40)
  for tokens, mask, bs in ((*right, 1), (*left, 32), (*left, 1)):
    np.testing.assert_allclose(rb.score(rm, params, tokens, mask, bs), base, atol=1e-5, rtol=0)


def test_job_on_exported_ensemble(ensemble, tokenizer_folders, tmp_path):
  rm, params = ensemble
  tok, template = chat.load_tokenizer(tokenizer_folders[0])
  hf.save(params, rm, tmp_path / 'rm', tokenizer=tok, chat_template=template,
          normalization={'mean': [0.1, -0.2], 'std': [1.5, 0.5]})
  rows = [{'prompt': f'hello {i}', 'chosen': 'hi there' * (i % 3 + 1), 'rejected': 'be brief',
           'subset': ['alpacaeval-easy', 'hep-go', 'math-prm', 'donotanswer'][i % 4], 'id': i} for i in range(12)]
  data = tmp_path / 'pairs.jsonl'
  data.write_text('\n'.join(json.dumps(r) for r in rows))
  config = config_lib.load_config_file('configs/rm_eval.py')
  config.model.path = str(tmp_path / 'rm')
  config.data.path = str(data)
  config.data.chat_template = True
  config.eval.batch_size = 8
  config.eval.seq_len = 64
  results = rb.run(config, str(tmp_path / 'out'))
  assert set(results['sections']) == {'Chat', 'Reasoning', 'Safety'}
  assert json.loads((tmp_path / 'out' / 'results.json').read_text()) == results
  assert (tmp_path / 'out' / 'reliability.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  assert '| section | accuracy |' in (tmp_path / 'out' / 'results.md').read_text()
  # An independent route: the same rows formatted by the template and scored directly.
  from rmjax.data.pipeline import encode_prompt_response
  split = [template.split([{'role': 'user', 'content': r['prompt']}, {'role': 'assistant', 'content': r[k]}])
           for k in ('chosen', 'rejected') for r in rows]
  enc = [encode_prompt_response(tok, p, s, 64) for p, s in split]
  scores = np.asarray(jax.jit(rm.apply)(params, np.stack([e[0] for e in enc]), np.stack([e[1] for e in enc])))
  norm = (scores - np.array([[0.1], [-0.2]])) / np.array([[1.5], [0.5]])
  margin = norm[:, :12].mean(0) - norm[:, 12:].mean(0)
  assert results['accuracy'] == pytest.approx(np.mean(margin > 0))
  config.model.path = ''
  with pytest.raises(config_lib.ConfigError, match='model.path'):
    rb.run(config, str(tmp_path / 'out2'))
