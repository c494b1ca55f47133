"""The RL and DPO trainers on the checkpoints and pairs written by `configs/rm.py:test`, loaded by path."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmjax.models.reward_model import RewardModel
from rmjax.rl import dpo, trainer
from rmjax.train import checkpoint, read_metrics
from tests.rl.test_trainer import _config


@pytest.fixture(scope='module')
def rl_run(world, tmp_path_factory):
  """Two GRPO iterations: the base policy, the K = 2 ensemble and the gold model of `world`."""
  workdir = tmp_path_factory.mktemp('rl_from_world')
  config = _config('grpo')
  config.policy.path = str(world / 'policy' / 'checkpoints')
  config.reward.path = str(world / 'rm' / 'checkpoints')
  config.gold.path = str(world / 'gold')
  config.train.steps = 2
  trainer.run(config, workdir)
  return workdir


def _score(path, rows):
  """Scores `[K, N]` of token lists, each row scored alone by a model rebuilt from its checkpoint."""
  state, meta = checkpoint.load(path)
  rm = RewardModel.from_dict(meta['model'])
  width = max(map(len, rows))
  tokens = np.zeros((len(rows), width), np.int32)
  mask = np.zeros((len(rows), width), bool)
  for i, r in enumerate(rows):  # right-padded: another layout than the rollout's left-padded prompts
    tokens[i, :len(r)], mask[i, :len(r)] = r, True
  raw = np.asarray(jax.jit(rm.apply)(jax.tree.map(jnp.asarray, state['params']), tokens, mask))
  norm = meta['normalization']
  return raw, (raw - np.asarray(norm['mean'])[:, None]) / np.asarray(norm['std'])[:, None]


def test_rl_run_scores_with_the_loaded_ensemble_and_gold(world, rl_run):
  rows = read_metrics(rl_run / 'metrics.jsonl')
  last = rows[-1]
  for k in ('train/reward/gold', 'train/reward/member_0', 'train/reward/member_1', 'train/reward/member_spread',
            'train/reward/proxy_gold_spearman', 'eval/reward/gold', 'eval/kl/exact'):
    assert np.isfinite(last[k]), k
  rollouts = [json.loads(l) for l in (rl_run / 'rollouts' / '2.jsonl').read_text().splitlines()]
  seqs = [r['prompt_tokens'] + r['tokens'] for r in rollouts]
  # The saved per-member scores and gold scores are those of the checkpointed models: re-scored
  # here row by row from the checkpoint files (no padding), within 1e-4 (float32, other layout).
  raw, _ = _score(world / 'rm' / 'checkpoints', seqs)
  np.testing.assert_allclose(np.array([r['scores'] for r in rollouts]).T, raw, atol=1e-4)
  _, gold = _score(world / 'gold', seqs)
  np.testing.assert_allclose(np.array([r['gold'] for r in rollouts]), gold[0], atol=1e-4)
  _, meta = checkpoint.load(rl_run / 'checkpoints')
  _, base = checkpoint.load(world / 'policy' / 'checkpoints')
  assert meta['kind'] == 'rl_policy' and meta['model'] == base['model']


def test_dpo_from_the_rl_policy_on_the_reward_model_jobs_pairs(world, rl_run, tmp_path):
  config = dpo.get_config('test')
  config.policy.path = str(rl_run / 'checkpoints')   # an RL run's policy as the DPO start (kind rl_policy)
  config.data.update(source='tfds', path=str(world / 'data'), seq_len=64)
  config.train.update(steps=2, log_every=2, eval_every=2, checkpoint_every=2)
  dpo.run(config, tmp_path)
  last = read_metrics(tmp_path / 'metrics.jsonl')[-1]
  # The world's pairs carry gold scores: the held-out gold accuracy is measured.
  assert {'eval/accuracy', 'eval/gold_accuracy', 'eval/loss'} <= set(last)
  state, _ = checkpoint.load(rl_run / 'checkpoints')
  start, _, _ = trainer.load_policy(str(rl_run / 'checkpoints'))
  for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(state['params']['policy'])):
    np.testing.assert_array_equal(np.asarray(a), b)


def test_score_job_rescores_saved_policies_and_rollouts(world, rl_run, tmp_path):
  from rmjax.rl import score
  config = score.get_config('test')
  config.reward.path = str(world / 'rm' / 'checkpoints')
  config.gold.path = str(world / 'gold')
  config.score.update(policies=f'{rl_run}/checkpoints,{world}/policy/checkpoints',
                      reference=str(world / 'policy' / 'checkpoints'), rollouts=str(rl_run / 'rollouts'))
  rows = score.run(config, tmp_path / 'same')
  rl_policy, base_policy, *files = rows
  # The RL policy re-scored with the run's own reward model, prompts and keys reproduces the run's
  # last held-out evaluation (same program, same inputs): within 1e-5.
  final = read_metrics(rl_run / 'metrics.jsonl')[-1]
  for k in ('reward/raw', 'reward/gold', 'kl/exact', 'response_length'):
    assert rl_policy[k] == pytest.approx(final[f'eval/{k}'], abs=1e-5), k
  assert base_policy['kl/exact'] == 0.0 and rl_policy['kl/exact'] > 0
  # The saved rollouts re-scored by the same models give their saved scores back.
  saved = [json.loads(l) for l in (rl_run / 'rollouts' / '2.jsonl').read_text().splitlines()]
  last = files[-1]
  assert last['step'] == 2 and last['reward/raw'] == pytest.approx(np.mean([r['scores'] for r in saved]), abs=1e-5)
  assert last['reward/gold'] == pytest.approx(np.mean([r['gold'] for r in saved]), abs=1e-5)
  # Another objective on the same rollouts: the worst-case member (WCO) of the normalized scores.
  config.objective.reward = 'min'
  config.score.policies = ''
  (*_, rescored) = score.run(config, tmp_path / 'wco')
  _, meta = checkpoint.load(world / 'rm' / 'checkpoints')
  z = (np.array([r['scores'] for r in saved]) - meta['normalization']['mean']) / meta['normalization']['std']
  assert rescored['reward/transformed'] == pytest.approx(z.min(1).mean(), abs=1e-5)
  table = (tmp_path / 'wco' / 'scores.md').read_text()
  assert '2.jsonl' in table and 'reward/transformed' in table
  per_row = (tmp_path / 'wco' / 'rescored').iterdir()
  assert len([json.loads(l) for f in per_row if f.name.endswith('_2.jsonl') for l in f.read_text().splitlines()]) == len(saved)
